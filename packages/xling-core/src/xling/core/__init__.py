"""The frozen diffusers teacher, the student-encoder protocol and UNet taps for cross-lingual distillation."""

from xling.core.conditioning import Conditioning
from xling.core.features import FeatureTap, pea_blocks
from xling.core.pivot import (
    AttentionFn,
    PivotAttnProcessor,
    PivotTap,
    cross_attention_layers,
    dual_attention_mse_sdpa,
    dual_attention_sdpa,
)
from xling.core.student import (
    StudentEncoder,
    StudentHiddenStates,
    TeacherShape,
    check_conditioning_fits,
    check_student_fits,
)
from xling.core.teacher import Family, Teacher, detect_family, missing_components

__all__ = [
    "AttentionFn",
    "Conditioning",
    "Family",
    "FeatureTap",
    "PivotAttnProcessor",
    "PivotTap",
    "StudentEncoder",
    "StudentHiddenStates",
    "Teacher",
    "TeacherShape",
    "check_conditioning_fits",
    "check_student_fits",
    "cross_attention_layers",
    "detect_family",
    "dual_attention_mse_sdpa",
    "dual_attention_sdpa",
    "missing_components",
    "pea_blocks",
]
