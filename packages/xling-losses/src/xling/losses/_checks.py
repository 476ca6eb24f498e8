"""Input validation shared by every loss term.

Each check raises with a message that starts with the public function's name and names the offending
argument and both shapes (or dtypes, or devices), e.g.
``attention_mse: pairs[3] teacher shape (2, 8, 64, 40) != student shape (2, 8, 64, 80)``.
``TypeError`` is for a wrong kind of object or dtype; ``ValueError`` for a wrong shape, device, length or value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_tensor(fn: str, name: str, x: object, *, floating: bool = True) -> Tensor:
    """Returns ``x`` if it is a tensor (of a floating dtype when ``floating``); raises ``TypeError`` otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {x.dtype} (shape {tuple(x.shape)})")
    return x


def check_ndim(fn: str, name: str, x: Tensor, ndims: Sequence[int], layout: str) -> None:
    """Raises ``ValueError`` unless ``x.ndim`` is one of ``ndims``; ``layout`` is the documented form, e.g. ``[B, L, D]``."""
    if x.ndim not in ndims:
        raise ValueError(f"{fn}: {name} must be {layout}, got shape {tuple(x.shape)}")


def check_nonempty(fn: str, name: str, x: Tensor) -> None:
    """Raises ``ValueError`` for a tensor with no elements: a mean over nothing is undefined."""
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} is empty (shape {tuple(x.shape)})")


def check_pair(fn: str, a: Tensor, b: Tensor, names: tuple[str, str], where: str = "") -> None:
    """Checks that two tensors agree in shape, dtype and device.

    Args:
        fn: Name of the public function, the message prefix.
        a: First tensor.
        b: Second tensor.
        names: Argument names of ``a`` and ``b`` as the caller knows them, e.g. ``("teacher", "student")``.
        where: Optional location prefix such as ``"pairs[3] "``.

    Raises:
        ValueError: Shapes or devices differ.
        TypeError: Dtypes differ.
    """
    na, nb = names
    if a.shape != b.shape:
        raise ValueError(f"{fn}: {where}{na} shape {tuple(a.shape)} != {nb} shape {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(
            f"{fn}: {where}{na} dtype {a.dtype} != {nb} dtype {b.dtype} (shape {tuple(a.shape)}); cast one of them"
        )
    if a.device != b.device:
        raise ValueError(
            f"{fn}: {where}{na} device {a.device} != {nb} device {b.device} (shape {tuple(a.shape)})"
        )


def check_mask(fn: str, mask: object, ref: Tensor, ref_name: str, name: str = "mask") -> Tensor | None:
    """Validates a key-padding mask against a ``[B, L, ...]`` tensor and returns it as bool.

    Args:
        fn: Name of the public function, the message prefix.
        mask: ``None`` or a ``[B, L]`` tensor, bool or 0/1 of any numeric dtype; True (1) marks a real token.
        ref: The tensor the mask applies to, ``[B, L, ...]``.
        ref_name: Argument name of ``ref``.
        name: Argument name of the mask.

    Returns:
        ``None`` or the mask as a ``[B, L]`` bool tensor.

    Raises:
        TypeError: ``mask`` is not a tensor, or is complex.
        ValueError: Its shape is not ``ref.shape[:2]``, it lives on another device, or it holds values other than 0/1.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{fn}: {name} must be bool or 0/1, got dtype {mask.dtype}")
    expected = tuple(ref.shape[:2])
    if mask.ndim != 2 or tuple(mask.shape) != expected:
        raise ValueError(
            f"{fn}: {name} shape {tuple(mask.shape)} does not fit {ref_name} shape {tuple(ref.shape)}; "
            f"expected {expected} ([B, L])"
        )
    if mask.device != ref.device:
        raise ValueError(f"{fn}: {name} device {mask.device} != {ref_name} device {ref.device}")
    if mask.dtype == torch.bool:
        return mask
    # A soft mask (e.g. 0.5) would silently turn a masked mean into a weighted one; refuse it.
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{fn}: {name} must hold only 0 and 1 (or be bool), got other values; dtype {mask.dtype}"
        )
    return mask != 0


def check_reduction(fn: str, reduction: object, allowed: Sequence[str] = REDUCTIONS) -> str:
    """Returns ``reduction`` if it is one of ``allowed``; raises ``ValueError`` otherwise."""
    if reduction not in allowed:
        raise ValueError(f"{fn}: reduction must be one of {tuple(allowed)}, got {reduction!r}")
    return str(reduction)


def check_number(fn: str, name: str, value: object) -> float:
    """Returns ``value`` as a finite float; raises ``TypeError`` for a non-number, ``ValueError`` for inf/nan."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.requires_grad:
            value = value.item()
        else:
            raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return value


def check_weights(fn: str, weights: Sequence[float] | None, count: int, what: str) -> list[float]:
    """Returns per-layer weights as floats (all 1.0 when ``weights`` is None).

    Args:
        fn: Name of the public function, the message prefix.
        weights: ``None`` or one number per layer.
        count: Number of layers.
        what: How the layers are described in the message, e.g. ``"pairs"``.

    Raises:
        TypeError: ``weights`` is not a sequence of numbers.
        ValueError: Its length differs from ``count`` or a weight is not finite.
    """
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence | Tensor):
        raise TypeError(f"{fn}: weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"{fn}: weights has {len(weights)} entries != {what} has {count} layers")
    return [check_number(fn, f"weights[{i}]", w) for i, w in enumerate(weights)]
