"""The multilingual toy world: renderer, grammars, checker, dataset and the committed tiny English teachers.

Example:
    >>> from xling.train import toyworld
    >>> scene = toyworld.all_single_scenes()[0]
    >>> toyworld.caption_en(scene), toyworld.caption_zh(scene)
    ('a red circle on the left', '左边的红色圆形')
    >>> toyworld.caption(scene, "es"), toyworld.caption(scene, "ko")
    ('un círculo rojo a la izquierda', '왼쪽에 있는 빨간 원')
    >>> toyworld.check(toyworld.render(scene), scene)["all"]
    True
"""

from __future__ import annotations

from xling.train._lazy import lazy_exports

_EXPORTS = {
    "BACKGROUND": "xling.train.toyworld.world",
    "COLORS": "xling.train.toyworld.world",
    "DEFAULT_GUIDANCE": "xling.train.toyworld.teacher",
    "DEFAULT_STEPS": "xling.train.toyworld.teacher",
    "LANGUAGES": "xling.train.toyworld.world",
    "MIXED": "xling.train.toyworld.world",
    "Obj": "xling.train.toyworld.world",
    "PALETTE": "xling.train.toyworld.world",
    "POSITIONS": "xling.train.toyworld.world",
    "SHAPES": "xling.train.toyworld.world",
    "Scene": "xling.train.toyworld.world",
    "TARGET_LANGUAGES": "xling.train.toyworld.world",
    "TOY": "xling.train.toyworld.names",
    "TOY_MMDIT": "xling.train.toyworld.names",
    "TOY_STUDENTS": "xling.train.toyworld.names",
    "TOY_TEACHERS": "xling.train.toyworld.names",
    "TeacherConfig": "xling.train.toyworld.teacher",
    "ToyWorldDataset": "xling.train.toyworld.world",
    "all_pair_scenes": "xling.train.toyworld.world",
    "all_scenes": "xling.train.toyworld.world",
    "all_single_scenes": "xling.train.toyworld.world",
    "build_identity_vae": "xling.train.toyworld.teacher",
    "build_scheduler": "xling.train.toyworld.teacher",
    "build_text_encoder": "xling.train.toyworld.teacher",
    "build_unet": "xling.train.toyworld.teacher",
    "caption": "xling.train.toyworld.world",
    "caption_en": "xling.train.toyworld.world",
    "caption_mixed": "xling.train.toyworld.world",
    "caption_zh": "xling.train.toyworld.world",
    "check": "xling.train.toyworld.world",
    "english_words": "xling.train.toyworld.teacher",
    "evaluate_accuracy": "xling.train.toyworld.world",
    "evaluate_teacher": "xling.train.toyworld.sampling",
    "generate": "xling.train.toyworld.sampling",
    "image_grid": "xling.train.toyworld.sampling",
    "is_heldout": "xling.train.toyworld.world",
    "is_toy_teacher": "xling.train.toyworld.names",
    "mmdit_teacher_path": "xling.train.toyworld.mmdit",
    "pair_eval_scenes": "xling.train.toyworld.world",
    "parse_languages": "xling.train.toyworld.world",
    "render": "xling.train.toyworld.world",
    "resolve_student": "xling.train.toyworld.names",
    "resolve_teacher": "xling.train.toyworld.names",
    "scene_seeds": "xling.train.toyworld.sampling",
    "teacher_options": "xling.train.toyworld.names",
    "teacher_path": "xling.train.toyworld.teacher",
    "toy_student_variant": "xling.train.toyworld.names",
    "write_tokenizer": "xling.train.toyworld.teacher",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
