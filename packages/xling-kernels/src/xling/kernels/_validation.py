"""Argument checks shared by the reference and the Triton paths, so both fail the same way on bad input."""

from __future__ import annotations

import math

import torch

#: Dtypes every path accepts; the Triton kernels accumulate in fp32 whatever the input.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    mask2: torch.Tensor | None,
    scale: float | None,
) -> float:
    """Validate dual-attention arguments and return the softmax scale to use.

    Args:
        q: Queries `[B, H, N, d]`.
        k1: Keys of the first (teacher) set `[B, H, M1, d]`.
        v1: Values of the first set `[B, H, M1, d]`.
        k2: Keys of the second (student) set `[B, H, M2, d]`.
        v2: Values of the second set `[B, H, M2, d]`.
        mask2: Optional key-padding mask of the second set `[B, M2]`, bool, True = attend.
        scale: Softmax scale, or None for `1 / sqrt(d)`.

    Returns:
        The softmax scale as a Python float.

    Raises:
        TypeError: A tensor argument is not a tensor, dtypes differ or are unsupported, or `mask2` is not bool.
        ValueError: Ranks, batch/head/feature sizes, key lengths or devices do not match, or `scale` is not a
            positive finite number.
    """
    named = {"q": q, "k1": k1, "v1": v1, "k2": k2, "v2": v2}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, d], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all five must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    b, h, n, d = q.shape
    if n < 1 or d < 1:
        raise ValueError(f"q must have at least one query and one feature, got shape {tuple(q.shape)}")
    for key_name, value_name in (("k1", "v1"), ("k2", "v2")):
        k, v = named[key_name], named[value_name]
        if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
            raise ValueError(
                f"{key_name} shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, H or d"
            )
        if v.shape != k.shape:
            raise ValueError(
                f"{value_name} shape {tuple(v.shape)} must equal {key_name} shape {tuple(k.shape)}"
            )
        if k.shape[2] < 1:
            raise ValueError(f"{key_name} must have at least one key, got shape {tuple(k.shape)}")
    if mask2 is not None:
        if not isinstance(mask2, torch.Tensor):
            raise TypeError(f"mask2 must be a torch.Tensor or None, got {type(mask2).__name__}")
        if mask2.dtype != torch.bool:
            raise TypeError(f"mask2 must be a bool tensor (True = attend), got dtype {mask2.dtype}")
        if tuple(mask2.shape) != (b, k2.shape[2]):
            raise ValueError(f"mask2 must have shape [B, M2] = {(b, k2.shape[2])}, got {tuple(mask2.shape)}")
        if mask2.device != q.device:
            raise ValueError(f"mask2 is on {mask2.device} but q is on {q.device}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)
