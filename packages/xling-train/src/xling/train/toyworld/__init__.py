"""The bilingual toy world: renderer, grammar, checker, dataset and the committed tiny English teacher.

Example:
    >>> from xling.train import toyworld
    >>> scene = toyworld.all_single_scenes()[0]
    >>> toyworld.caption_en(scene), toyworld.caption_zh(scene)
    ('a red circle on the left', '左边的红色圆形')
    >>> toyworld.check(toyworld.render(scene), scene)["all"]
    True
"""

from xling.train.toyworld.sampling import evaluate_teacher, generate, image_grid, scene_seeds
from xling.train.toyworld.teacher import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    TeacherConfig,
    build_identity_vae,
    build_scheduler,
    build_text_encoder,
    build_unet,
    english_words,
    teacher_path,
    write_tokenizer,
)
from xling.train.toyworld.world import (
    BACKGROUND,
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    Obj,
    Scene,
    ToyWorldDataset,
    all_pair_scenes,
    all_scenes,
    all_single_scenes,
    caption_en,
    caption_zh,
    check,
    evaluate_accuracy,
    is_heldout,
    render,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "Obj",
    "Scene",
    "TeacherConfig",
    "ToyWorldDataset",
    "all_pair_scenes",
    "all_scenes",
    "all_single_scenes",
    "build_identity_vae",
    "build_scheduler",
    "build_text_encoder",
    "build_unet",
    "caption_en",
    "caption_zh",
    "check",
    "english_words",
    "evaluate_accuracy",
    "evaluate_teacher",
    "generate",
    "image_grid",
    "is_heldout",
    "render",
    "scene_seeds",
    "teacher_path",
    "write_tokenizer",
]
