"""Argument checks shared by the reference and the Triton paths, so both fail the same way on bad input."""

from __future__ import annotations

import math

import torch

#: Dtypes every path accepts; the Triton kernels accumulate in fp32 whatever the input.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

#: Dtypes of the pure-PyTorch joint attention: float64 as well, the precision its tests are checked in.
JOINT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, *SUPPORTED_DTYPES)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_tensors(named: dict[str, torch.Tensor], dtypes: tuple[torch.dtype, ...], count: str) -> None:
    """Each value is a 4-D tensor of a supported dtype, on the device and in the dtype of the first one."""
    q_name, q = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, d], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: {_dtype_names(dtypes)}")
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {q_name} has {q.dtype}; all {count} must share one dtype"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but {q_name} is on {q.device}")
    if q.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f"{q_name} must have at least one query and one feature, got shape {tuple(q.shape)}")


def _check_mask(
    name: str, label: str, mask: torch.Tensor | None, b: int, m: int, device: torch.device
) -> None:
    """`mask` is None or a bool `[B, M]` tensor on `device`; `label` is how the docs name `M` (e.g. `M2`)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = attend), got dtype {mask.dtype}")
    if tuple(mask.shape) != (b, m):
        raise ValueError(f"{name} must have shape [B, {label}] = {(b, m)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but q is on {device}")


def _check_scale(scale: float | None, d: int) -> float:
    """The softmax scale as a float: `1 / sqrt(d)` for None, else a positive finite number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def check_inputs(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    mask2: torch.Tensor | None,
    scale: float | None,
    mask1: torch.Tensor | None = None,
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
        mask1: Optional key-padding mask of the first set `[B, M1]`, bool, True = attend.

    Returns:
        The softmax scale as a Python float.

    Raises:
        TypeError: A tensor argument is not a tensor, dtypes differ or are unsupported, or a mask is not bool.
        ValueError: Ranks, batch/head/feature sizes, key lengths or devices do not match, or `scale` is not a
            positive finite number.
    """
    named = {"q": q, "k1": k1, "v1": v1, "k2": k2, "v2": v2}
    _check_tensors(named, SUPPORTED_DTYPES, "five")
    b, h, _, d = q.shape
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
    _check_mask("mask1", "M1", mask1, b, k1.shape[2], q.device)
    _check_mask("mask2", "M2", mask2, b, k2.shape[2], q.device)
    return _check_scale(scale, d)


def check_joint_inputs(
    q: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    mask1: torch.Tensor | None,
    mask2: torch.Tensor | None,
    scale: float | None,
) -> float:
    """Validate joint dual-attention arguments and return the softmax scale to use.

    Args:
        q: Image queries `[B, H, N_img, d]`.
        k_img: Image keys `[B, H, N_kv, d]` (in an MMDiT the same tokens as `q`, so `N_kv = N_img`).
        v_img: Image values, the shape of `k_img`.
        k1: Text keys of branch 1 `[B, H, M1, d]`.
        v1: Text values of branch 1 `[B, H, M1, d]`.
        k2: Text keys of branch 2 `[B, H, M2, d]`.
        v2: Text values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of `k1` `[B, M1]`, bool, True = attend.
        mask2: Optional key-padding mask of `k2` `[B, M2]`, bool, True = attend.
        scale: Softmax scale, or None for `1 / sqrt(d)`.

    Returns:
        The softmax scale as a Python float.

    Raises:
        TypeError: A tensor argument is not a tensor, dtypes differ or are unsupported, or a mask is not bool.
        ValueError: Ranks, batch/head/feature sizes, key lengths or devices do not match, or `scale` is not a
            positive finite number.
    """
    named = {"q": q, "k_img": k_img, "v_img": v_img, "k1": k1, "v1": v1, "k2": k2, "v2": v2}
    _check_tensors(named, JOINT_DTYPES, "seven")
    b, h, _, d = q.shape
    for key_name, value_name, length in (("k_img", "v_img", "N_img"), ("k1", "v1", "M1"), ("k2", "v2", "M2")):
        k, v = named[key_name], named[value_name]
        if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d or k.shape[2] < 1:
            raise ValueError(
                f"{key_name} must have shape [B, H, {length}, d] = ({b}, {h}, {length} >= 1, {d}) to match "
                f"q {tuple(q.shape)}, got {tuple(k.shape)}"
            )
        if v.shape != k.shape:
            raise ValueError(
                f"{value_name} must have the shape of {key_name} {tuple(k.shape)}, got {tuple(v.shape)}"
            )
    _check_mask("mask1", "M1", mask1, b, k1.shape[2], q.device)
    _check_mask("mask2", "M2", mask2, b, k2.shape[2], q.device)
    return _check_scale(scale, d)
