"""``xling import pea``: PEA-Diffusion's MLP adapter (OPPO-Mente-Lab/PEA-Diffusion) as an xling adapter.

SRC is what PEA's training scripts save every ``--every_n_steps``, ``torch.save(self.proj.state_dict(),
"proj_<step>/pytorch_model.bin")`` (the file, or the ``proj_<step>`` directory). Its layout, ``d`` the student
width, ``h`` the hidden width, ``D`` the teacher's ``cross_attention_dim``, ``P`` SDXL's pooled width:

- SDXL (``train_sdxl_zh.py``, ``MLP(d, P, h, D)``): ``layernorm.weight`` / ``.bias [d]``,
  ``projector.0.weight [h, d]``, ``projector.2.weight [h, h]``, ``projector.4.weight [P, h]`` (bias-free, GELU
  between), ``fc.weight [D, P]``, ``fc.bias [D]``; tokens ``fc(GELU(x))``, pooled ``mean(x, 1)`` over every
  position of the padded window.
- SD 1.x / 2.x (``train_sd_zh.py``, ``MLP(d, D, h)``): the same without ``fc``; ``projector.4.weight [D, h]``.

Only ``fc`` is renamed (xling's ``out_proj.1``); the head is an :class:`~xling.adapters.MLPAdapter` with
``pooled="all"``. The checkpoint holds no student: ``--student`` names the encoder it was trained on, a
Hugging Face folder or Hub id (PEA's SDXL and SD 1.x scripts both use Chinese-CLIP ViT-H/14's text tower, a
1024-wide RoBERTa-wwm-ext-large; give it as a ``ChineseCLIPTextModel`` folder). Chinese-CLIP students get
PEA's 52-token window (``cn_clip.clip.tokenize``); every other student 77.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from xling.adapters.config import TeacherFamily
from xling.train.importers.state import (
    LayoutError,
    check_layout,
    read_state_dict,
    save_imported,
    teacher_widths,
)

__all__ = ["convert"]

#: ``cn_clip.clip.tokenize``'s default ``context_length``, the window PEA's Chinese-CLIP student reads.
CHINESE_CLIP_WINDOW = 52
_CHINESE_CLIP = ("chinese_clip", "chinese_clip_text_model")


def _student_width(student: str) -> tuple[int, str]:
    """``(hidden width, model_type)`` of the student's config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(student)
    if config.model_type == "chinese_clip":
        raise ValueError(
            f"--student {student}: a whole Chinese-CLIP model; PEA reads its text tower only: save "
            "ChineseCLIPModel.text_model (a ChineseCLIPTextModel) with its tokenizer to a folder and pass that"
        )
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if width is None:
        raise ValueError(f"--student {student}: cannot read its hidden width from its config")
    return int(width), str(config.model_type)


def convert(source: Path, *, teacher: str, output: Path, student: str | None) -> Path:
    """Write the PEA adapter ``source`` as an xling adapter directory ``output`` (see the module docstring).

    Raises:
        ValueError: no ``student``, or one whose width the checkpoint does not take.
        LayoutError: a missing, unexpected or wrongly shaped key (named), e.g. an SD 1.x adapter for an SDXL
            teacher.
    """
    from xling.adapters import LanguageEncoder, MLPAdapter, MLPAdapterConfig
    from xling.train.toyworld.names import resolve_student

    if student is None:
        raise ValueError(
            "xling import pea needs --student: PEA's checkpoint holds the adapter only; pass the text encoder "
            "it was trained on (PEA: Chinese-CLIP ViT-H/14's text tower)"
        )
    state = read_state_dict(source)
    widths = teacher_widths(teacher)
    d, model_type = _student_width(resolve_student(student))
    big_d = cast(int, widths["teacher_width"])
    pooled = cast("int | None", widths["pooled_width"])
    family = cast(TeacherFamily, widths["teacher_family"])
    first = state.get("projector.0.weight")
    hidden = int(first.shape[0]) if first is not None and first.ndim == 2 else d
    stack_out = big_d if pooled is None else pooled
    expected: dict[str, tuple[int, ...]] = {
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
        "projector.0.weight": (hidden, d),
        "projector.2.weight": (hidden, hidden),
        "projector.4.weight": (stack_out, hidden),
    }
    if pooled is not None:
        expected.update({"fc.weight": (big_d, stack_out), "fc.bias": (big_d,)})
    try:
        check_layout(state, expected, source=source)
    except LayoutError as e:
        raise LayoutError(
            f"{e} (PEA's {family} adapter for teacher {teacher} and a {d}-wide student {student})"
        ) from e
    renamed = {k.replace("fc.", "out_proj.1.", 1) if k.startswith("fc.") else k: v for k, v in state.items()}
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=d,
            teacher_width=big_d,
            teacher_family=family,
            pooled_width=pooled,
            hidden_width=hidden,
            num_layers=3,
            pooled="all",
        )
    )
    head.load_state_dict({k: v.float() for k, v in renamed.items()}, strict=True)
    window = CHINESE_CLIP_WINDOW if model_type in _CHINESE_CLIP else 77
    encoder = LanguageEncoder.from_student(resolve_student(student), head, max_length=window)
    return save_imported(encoder, output, teacher=teacher, student=student)
