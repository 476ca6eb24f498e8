"""The frozen diffusers teacher, the student-encoder protocol and UNet taps for cross-lingual distillation."""

from xling.core.conditioning import Conditioning
from xling.core.features import FeatureTap, pea_blocks
from xling.core.joint_pivot import (
    JointAttnTapProcessor,
    JointPivotTap,
    joint_attention_blocks,
    joint_dual_attention_mse_sdpa,
    joint_dual_attention_sdpa,
)
from xling.core.pivot import (
    AttentionFn,
    PivotAttnProcessor,
    PivotTap,
    caption_context_module,
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
from xling.core.teacher import (
    CROSS_ATTENTION_DIT_FAMILIES,
    FLOW_FAMILIES,
    MMDIT_FAMILIES,
    UNET_FAMILIES,
    Family,
    Teacher,
    detect_family,
    flow_training_scheduler,
    missing_components,
)

__all__ = [
    "CROSS_ATTENTION_DIT_FAMILIES",
    "FLOW_FAMILIES",
    "MMDIT_FAMILIES",
    "UNET_FAMILIES",
    "AttentionFn",
    "Conditioning",
    "Family",
    "FeatureTap",
    "JointAttnTapProcessor",
    "JointPivotTap",
    "PivotAttnProcessor",
    "PivotTap",
    "StudentEncoder",
    "StudentHiddenStates",
    "Teacher",
    "TeacherShape",
    "caption_context_module",
    "check_conditioning_fits",
    "check_student_fits",
    "cross_attention_layers",
    "detect_family",
    "dual_attention_mse_sdpa",
    "dual_attention_sdpa",
    "flow_training_scheduler",
    "joint_attention_blocks",
    "joint_dual_attention_mse_sdpa",
    "joint_dual_attention_sdpa",
    "missing_components",
    "pea_blocks",
]
