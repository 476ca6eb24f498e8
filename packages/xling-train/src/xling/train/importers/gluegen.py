"""``xling import gluegen``: GlueGen's multilingual GlueNet translator (salesforce/GlueGen) as an xling adapter.

SRC is what ``multilingual-gluenet/train_gluenet_multi.py`` saves, ``torch.save(adapter.state_dict(),
"gluenet_multi_<Language>.ckpt")``, released as ``gluenet_<Language>_clip_overnorm_over3_noln.ckpt`` (the file,
or a directory holding it). The module is ``Translator_noln(77, d, D, 2, depth)`` of
``multilingual-gluenet/model.py`` (``d`` the student width, 1024 for XLM-R large; ``D`` the teacher's, 768 for
SD 1.x's CLIP ViT-L/14; ``depth`` 5), ``n`` standing for ``d`` in ``net_sen`` and for the 77 positions in
``net_tok``:

- ``blocks.{i}.net_sen`` / ``blocks.{i}.net_tok`` (post-norm): ``.0.weight [2n, n]``, ``.0.bias [2n]``,
  ``.1.weight`` / ``.1.bias [2n]`` (LayerNorm), ``.3.weight [2n, 2n]``, ``.3.bias [2n]``, ``.4.*`` ``[2n]``
  (LayerNorm), ``.6.weight [n, 2n]``, ``.6.bias [n]``, ``.7.*`` ``[n]`` (LayerNorm): 24 tensors a block;
- ``tail.net_sen``: ``.0.weight [2d, d]``, ``.2.weight [2d, 2d]``, ``.4.weight [D, 2d]`` (+ biases);
  ``tail.net_tok``: ``.0.weight [154, 77]``, ``.2.weight [154, 154]``, ``.4.weight [77, 154]`` (+ biases).

132 tensors for depth 5, 50,179,776 parameters. They load, renamed (``blocks.i.net_sen`` ->
``encoder.blocks.i.channel``, ``net_tok`` -> ``token``, ``tail`` -> ``encoder.transition``), into a
:class:`~xling.adapters.MixerTranslator` with ``translator="gluenet"``, ``positions="all"`` (GlueGen pads the
prompt to 77 tokens and translates every position), ``input_scale=1/3`` and ``output_scale`` = GlueGen's 77
per-position norms / 2: what its inference embedder (``RobMlgEmbedder_multi``) computes,
``Translator_noln(XLM-R(prompt).last_hidden_state / 3) * tensor_norm / 2``. The checkpoint holds no student:
``--student`` is the encoder it was trained on, ``xlm-roberta-large`` for every released language (the
default); no decoder is written (inference needs none).
"""

from __future__ import annotations

import re
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

__all__ = ["DEFAULT_STUDENT", "convert", "expected_layout"]

#: The student every released GlueGen multilingual translator was trained on (``train_gluenet_multi.py``).
DEFAULT_STUDENT = "xlm-roberta-large"
#: GlueGen's token count (``MAX_LENGTH``) and MLP expansion (``mult``).
_TOKENS, _MULT = 77, 2


def expected_layout(student_width: int, teacher_width: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``Translator_noln(77, student_width, teacher_width, 2, depth).state_dict()``."""
    layout: dict[str, tuple[int, ...]] = {}

    def mlp(prefix: str, n_in: int, n_out: int, post_norm: bool) -> None:
        hidden = n_in * _MULT
        linears = [(n_in, hidden), (hidden, hidden), (hidden, n_out)]
        step = 3 if post_norm else 2  # Linear, (LayerNorm,) GELU
        for j, (a, b) in enumerate(linears):
            layout[f"{prefix}.{j * step}.weight"] = (b, a)
            layout[f"{prefix}.{j * step}.bias"] = (b,)
            if post_norm:
                layout[f"{prefix}.{j * step + 1}.weight"] = (b,)
                layout[f"{prefix}.{j * step + 1}.bias"] = (b,)

    for i in range(depth):
        mlp(f"blocks.{i}.net_sen", student_width, student_width, True)
        mlp(f"blocks.{i}.net_tok", _TOKENS, _TOKENS, True)
    mlp("tail.net_sen", student_width, teacher_width, False)
    mlp("tail.net_tok", _TOKENS, _TOKENS, False)
    return layout


def _rename(key: str) -> str:
    """GlueGen's key -> xling's: ``blocks.i.net_sen.j`` -> ``encoder.blocks.i.channel.j``, ``net_tok`` -> ``token``,
    ``tail`` -> ``encoder.transition``."""
    key = key.replace(".net_sen.", ".channel.").replace(".net_tok.", ".token.")
    return "encoder." + ("transition." + key.removeprefix("tail.") if key.startswith("tail.") else key)


def convert(source: Path, *, teacher: str, output: Path, student: str | None) -> Path:
    """Write the GlueNet translator ``source`` as an xling adapter directory ``output`` (module docstring).

    Raises:
        ValueError: an SDXL teacher (GlueGen's translators have no pooled projection) or a student whose
            width cannot be read.
        LayoutError: a missing, unexpected or wrongly shaped key (named), e.g. a translator for a 768-wide
            teacher imported for a 1024-wide one.
    """
    from transformers import AutoConfig

    from xling.adapters import LanguageEncoder, MixerTranslator, MixerTranslatorConfig
    from xling.adapters.mixer import GLUEGEN_INPUT_SCALE, GLUEGEN_OUTPUT_SCALE
    from xling.train.toyworld.names import resolve_student

    student = student or DEFAULT_STUDENT
    state = read_state_dict(source)
    widths = teacher_widths(teacher)
    family = cast(TeacherFamily, widths["teacher_family"])
    if family == "sdxl":
        raise ValueError(
            f"--teacher {teacher} is an SDXL model; GlueGen's translators condition SD 1.x (CLIP ViT-L/14, "
            "768 wide) and have no pooled projection for SDXL's added conditions"
        )
    big_d = cast(int, widths["teacher_width"])
    student_path = resolve_student(student)
    config = AutoConfig.from_pretrained(student_path)
    d = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if d is None:
        raise ValueError(f"--student {student}: cannot read its hidden width from its config")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    try:
        check_layout(state, expected_layout(int(d), big_d, depth), source=source)
    except LayoutError as e:
        raise LayoutError(
            f"{e} (GlueGen's Translator_noln(77, {d}, {big_d}, 2, {depth}) for teacher {teacher} and the "
            f"{d}-wide student {student})"
        ) from e
    head = MixerTranslator(
        MixerTranslatorConfig(
            student_width=int(d),
            teacher_width=big_d,
            teacher_family=family,
            pooled_width=None,
            source_length=_TOKENS,
            target_length=_TOKENS,
            depth=depth,
            mult=float(_MULT),
            with_decoder=False,
            translator="gluenet",
            positions="all",
            input_scale=GLUEGEN_INPUT_SCALE,
            output_scale=list(GLUEGEN_OUTPUT_SCALE),
        )
    )
    head.load_state_dict({_rename(k): v.float() for k, v in state.items()}, strict=True)
    encoder = LanguageEncoder.from_student(student_path, head, max_length=_TOKENS)
    return save_imported(encoder, output, teacher=teacher, student=student)
