"""Per-sample accumulation and the three reductions every term shares.

A term first computes, per sample, the sum of its element losses and how many elements counted
(padding excluded), then reduces:

- ``"none"``: ``sum_b / count_b``, shape ``[B]`` (a sample with no real element gives 0);
- ``"mean"``: ``sum_b sum_b / sum_b count_b``, a scalar, the mean over every counted element;
- ``"sum"``:  ``sum_b sum_b``, a scalar; so ``sum == mean * (number of counted elements)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import reduce
from torch import Tensor

from ._checks import check_nonempty, check_pair, check_tensor


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: at least float32, so half/bfloat16 inputs do not lose the loss to rounding."""
    return torch.promote_types(x.dtype, torch.float32)


def squared_error(a: Tensor, b: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample sum of squared differences and per-sample element count.

    Args:
        a: ``[B, ...]``.
        b: ``[B, ...]``, same shape as ``a``.
        mask: Optional ``[B, L]`` bool, True = real token, applied to ``[B, L, ...]`` inputs.

    Returns:
        ``(sums [B], counts [B])`` in the accumulation dtype.
    """
    dtype = acc_dtype(a)
    if mask is not None:
        a, b = fill_padding(a, mask, 0.0), fill_padding(b, mask, 0.0)
    sq = (a.to(dtype) - b.to(dtype)).square()  # [B, ...]
    sums = reduce(sq, "b ... -> b", "sum")
    return sums, element_counts(a, mask, dtype)


def element_counts(x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Number of counted elements per sample, ``[B]``: every element, or only those of real tokens."""
    per_sample = x[0].numel() if x.shape[0] > 0 else 0
    if mask is None:
        return torch.full((x.shape[0],), float(per_sample), dtype=dtype, device=x.device)
    per_token = per_sample // max(x.shape[1], 1)
    return mask.sum(dim=1).to(dtype) * per_token


def fill_padding(x: Tensor, mask: Tensor, value: float) -> Tensor:
    """Replaces padding tokens of ``x`` ``[B, L, ...]`` by ``value``.

    ``masked_fill`` (not a multiply) is what makes padding harmless: its backward sends exactly zero to the
    filled positions, so even NaN or inf in padding changes neither the loss nor any gradient.
    """
    keep = mask.reshape(*mask.shape, *([1] * (x.ndim - 2)))  # [B, L, 1, ...]
    return x.masked_fill(~keep, value)


def reduce_samples(sums: Tensor, counts: Tensor, reduction: str) -> Tensor:
    """Applies ``reduction`` to per-sample sums ``[B]`` and counts ``[B]`` (see the module docstring)."""
    if reduction == "none":
        return sums / counts.clamp_min(1)
    if reduction == "sum":
        return sums.sum()
    return sums.sum() / counts.sum().clamp_min(1)


class Layer(NamedTuple):
    """One layer of a layer-wise loss: the two tensors and how messages name them."""

    where: str  # location prefix for messages, e.g. "pairs[3] " (may be "")
    names: tuple[str, str]  # argument names of a and b, e.g. ("teacher", "student")
    a: Tensor  # [B, ...]
    b: Tensor  # [B, ...]


def layerwise_mse(fn: str, layers: Sequence[Layer], weights: Sequence[float], reduction: str) -> Tensor:
    """``sum_i w_i * reduce((a_i - b_i)^2)`` over layers of possibly different shapes.

    Args:
        fn: Name of the public function, the message prefix.
        layers: One ``Layer`` per layer; all share batch size and device.
        weights: One float per layer.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` applied per layer (see the module docstring).

    Returns:
        A scalar (``[B]`` for ``"none"``).

    Raises:
        ValueError: No layers, a shape or device mismatch, or layers that disagree on batch size or device.
        TypeError: A non-floating tensor or a dtype mismatch.
    """
    if not layers:
        raise ValueError(f"{fn}: no layers given; expected at least one")
    total: Tensor | None = None
    first: Layer | None = None
    for layer, w in zip(layers, weights, strict=True):
        name_a, name_b = layer.names
        check_tensor(fn, f"{layer.where}{name_a}", layer.a)
        check_tensor(fn, f"{layer.where}{name_b}", layer.b)
        check_pair(fn, layer.a, layer.b, layer.names, where=layer.where)
        check_nonempty(fn, f"{layer.where}{name_a}", layer.a)
        if layer.a.ndim == 0:
            raise ValueError(f"{fn}: {layer.where}{name_a} must be [B, ...], got a 0-d tensor")
        if first is None:
            first = layer
        elif layer.a.shape[0] != first.a.shape[0] or layer.a.device != first.a.device:
            raise ValueError(
                f"{fn}: {layer.where}{name_a} shape {tuple(layer.a.shape)} on {layer.a.device} does not share "
                f"batch size and device with {first.where}{first.names[0]} shape {tuple(first.a.shape)} "
                f"on {first.a.device}"
            )
        sums, counts = squared_error(layer.a, layer.b)  # [B], [B]
        term = w * reduce_samples(sums, counts, reduction)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"{fn}: no layers given; expected at least one")
    return total
