"""Reading and checking a released state dict: the one place ``xling import`` touches foreign files.

``.safetensors`` files are read with safetensors. ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` files (what the
papers released) go through ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds
tensors and plain containers only and refuses any other object, so a crafted file cannot run code. The
adapter ``xling import`` writes holds safetensors only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from xling.adapters import LanguageEncoder

__all__ = ["LayoutError", "check_layout", "read_state_dict", "save_imported", "teacher_widths"]

_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
# Wrappers training scripts put around a state dict (``torch.save({"state_dict": ...})``, DDP's ``module.``).
_WRAPPERS = ("state_dict", "model", "module")
_SHOWN = 6


class LayoutError(ValueError):
    """A released checkpoint does not have the public layout; the message names the keys and shapes."""


def _weights_file(source: Path) -> Path:
    if source.is_file():
        return source
    found = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", *_PICKLED))
    safe = [p for p in found if p.suffix == ".safetensors"]
    found = safe or found
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise FileNotFoundError(
            f"{source}: expected one weights file (.safetensors or .bin/.pt), found {names}"
        )
    return found[0]


def read_state_dict(source: str | Path) -> dict[str, Tensor]:
    """The tensors of a released checkpoint, unwrapped from ``{"state_dict": ...}`` and ``module.`` prefixes.

    Args:
        source: a weights file, or a directory holding exactly one.

    Raises:
        LayoutError: the file does not hold a flat mapping of names to tensors.
        ValueError: the file cannot be read (the message names it).
    """
    path = _weights_file(Path(source))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader error becomes one naming the file
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    while isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in _WRAPPERS:
        state = next(iter(state.values()))
    if not isinstance(state, Mapping):
        raise LayoutError(
            f"{path}: expected a mapping of parameter names to tensors, got {type(state).__name__}"
        )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise LayoutError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:_SHOWN]))}")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def check_layout(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Sequence[int]],
    *,
    source: str | Path,
    ignore: Sequence[str] = (),
) -> None:
    """Raise unless ``state`` has exactly the keys of ``expected`` with those shapes (and finite values).

    Args:
        state: the loaded tensors.
        expected: key -> shape of the public layout.
        source: named in the message.
        ignore: key prefixes the public checkpoint may hold beside the layout (e.g. an optimizer's, a
            discriminator's), dropped without a word.

    Raises:
        LayoutError: naming every missing key, unexpected key and shape mismatch (first few of each).
    """
    keys = {k for k in state if not any(k.startswith(p) for p in ignore)}
    problems: list[str] = []
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(keys - set(expected))
    wrong = [
        f"{k}: {tuple(state[k].shape)}, expected {tuple(s)}"
        for k, s in expected.items()
        if k in keys and tuple(state[k].shape) != tuple(s)
    ]
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            problems.append(f"{label}: {'; '.join(items[:_SHOWN])}{more}")
    if problems:
        raise LayoutError(f"{source}: not the public layout; " + " | ".join(problems))
    bad = [k for k in expected if not torch.isfinite(state[k]).all()]
    if bad:
        raise LayoutError(f"{source}: non-finite values in {', '.join(bad[:_SHOWN])}")


def teacher_widths(teacher: str) -> dict[str, object]:
    """The ``HeadConfig`` teacher fields of ``teacher`` read from its configs (no weights are loaded).

    Returns:
        ``{"teacher_width": D, "teacher_family": "sd1"|"sd2"|"sdxl", "pooled_width": P or None}``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig

    from xling.core.teacher import detect_family
    from xling.train.toyworld.names import resolve_teacher

    path = resolve_teacher(teacher)
    family = detect_family(path)
    dim = UNet2DConditionModel.load_config(path, subfolder="unet")["cross_attention_dim"]
    pooled = None
    if family == "sdxl":
        pooled = int(AutoConfig.from_pretrained(path, subfolder="text_encoder_2").projection_dim)
    return {
        "teacher_width": int(dim[0] if isinstance(dim, (list, tuple)) else dim),
        "teacher_family": family,
        "pooled_width": pooled,
    }


def save_imported(encoder: LanguageEncoder, output: Path, *, teacher: str, student: str) -> Path:
    """Write an imported ``encoder`` to ``output`` as training writes an adapter: the teacher recorded, a toy
    student copied in."""
    from xling.train.toyworld.names import teacher_record, toy_student_variant

    include = toy_student_variant(student) is not None
    return encoder.save_pretrained(output, include_student=include, teacher=teacher_record(teacher))
