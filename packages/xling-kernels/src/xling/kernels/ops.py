"""Dispatch: the Triton kernels when they can run (a CUDA tensor, or `TRITON_INTERPRET=1`), else the reference.

Both paths share one signature, one validation and one rule for fully masked rows (`o2 = 0`, zero gradient).
A branch-1 mask (`mask1`: a teacher whose text keys are padded, e.g. PixArt's T5 mask) runs on the reference: the
Triton kernels take no branch-1 mask.

Under `TRITON_INTERPRET=1` bf16 inputs are upcast to fp32 for the kernels and the outputs cast back to bf16:
the CPU interpreter emulates Triton with numpy, which has no bfloat16, and its `tl.dot` on bf16 tiles returns
garbage (values around 1e8). Gradients flow through the casts, so bf16 leaves still get bf16 gradients.
"""

from __future__ import annotations

import os

import torch

from xling.kernels.reference import dual_attention_mse_reference, dual_attention_reference

try:  # Triton is Linux-only and optional: without it everything runs on the reference.
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

if HAS_TRITON:
    from xling.kernels.dual_attention import dual_attention_triton
    from xling.kernels.dual_attention_mse import dual_attention_mse_triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _upcast_bf16(*tensors: torch.Tensor) -> tuple[bool, tuple[torch.Tensor, ...]]:
    """``(True, fp32 copies)`` when the interpreter would get bf16 tensors, else ``(False, tensors)``.

    Only the five attention inputs are cast (the mask stays bool). Mixed dtypes are left as they are, so the
    kernels' validation still reports them.
    """
    if not _interpreting() or any(not isinstance(t, torch.Tensor) for t in tensors):
        return False, tensors
    if any(t.dtype != torch.bfloat16 for t in tensors):
        return False, tensors
    return True, tuple(t.float() for t in tensors)


def use_triton(q: torch.Tensor) -> bool:
    """Whether :func:`dual_attention` runs the Triton kernels for this query tensor.

    Args:
        q: Queries `[B, H, N, d]`.

    Returns:
        True when Triton is installed and `q` is on a CUDA device or `TRITON_INTERPRET=1` is set.
    """
    if not HAS_TRITON or not isinstance(q, torch.Tensor):
        return False  # a non-tensor goes to the reference, whose validation names the bad argument
    return q.is_cuda or _interpreting()


def dual_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    *,
    mask1: torch.Tensor | None = None,
    mask2: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend one query to two key/value sets in one pass: `o_i = softmax(scale * q k_i^T) v_i`.

    Branch 1 (e.g. the English teacher) is a constant target: `o1` carries no grad. Gradients reach `q`, `k2`
    and `v2` through `o2`. Inputs may be non-contiguous (diffusers' `view(B, N, H, d).transpose(1, 2)`).

    Args:
        q: Queries `[B, H, N, d]`; fp32, fp16 or bf16 (all five tensors share the dtype). Under
            `TRITON_INTERPRET=1` bf16 is computed in fp32 and the outputs cast back to bf16.
        k1: Keys of branch 1 `[B, H, M1, d]`.
        v1: Values of branch 1 `[B, H, M1, d]`.
        k2: Keys of branch 2 `[B, H, M2, d]`.
        v2: Values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of branch 1 `[B, M1]`, bool, True = attend (a fully masked row gives
            `o1 = 0`); given, the call runs on the reference (the Triton kernels take no branch-1 mask).
        mask2: Optional key-padding mask of branch 2 `[B, M2]`, bool, True = attend. A batch element whose
            mask is all False gets `o2 = 0` and zero gradient (never NaN).
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, o2)`, each `[B, H, N, d]` in the input dtype.

    Raises:
        TypeError: Non-tensor input, mixed or unsupported dtypes, or a non-bool mask.
        ValueError: Mismatched shapes or devices, or (Triton path) a head dim above 256.
    """
    if mask1 is None and use_triton(q):
        upcast, (q, k1, v1, k2, v2) = _upcast_bf16(q, k1, v1, k2, v2)
        o1, o2 = dual_attention_triton(q, k1, v1, k2, v2, mask2, scale)
        if upcast:
            return o1.to(torch.bfloat16), o2.to(torch.bfloat16)
        return o1, o2
    return dual_attention_reference(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)


def dual_attention_mse(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    *,
    mask1: torch.Tensor | None = None,
    mask2: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch-1 output and `loss = mean((o1 - o2)^2)` (IAP eq. 3), fused so `o2` is never written to memory.

    The Triton loss is deterministic (bit-identical across runs); its backward recomputes `o2` from saved
    log-sum-exp statistics.

    Args:
        q: Queries `[B, H, N, d]`.
        k1: Keys of branch 1 `[B, H, M1, d]`.
        v1: Values of branch 1 `[B, H, M1, d]`.
        k2: Keys of branch 2 `[B, H, M2, d]`.
        v2: Values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of branch 1 `[B, M1]`, bool, True = attend; given, the call runs on the
            reference (the Triton kernels take no branch-1 mask).
        mask2: Optional key-padding mask `[B, M2]`, bool, True = attend (fully masked rows: `o2 = 0`).
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, loss)`: `o1` `[B, H, N, d]` without grad, `loss` an fp32 scalar, the mean over `B*H*N*d`.

    Raises:
        TypeError: Non-tensor input, mixed or unsupported dtypes, or a non-bool mask.
        ValueError: Mismatched shapes or devices, or (Triton path) a head dim above 256.
    """
    if mask1 is None and use_triton(q):
        upcast, (q, k1, v1, k2, v2) = _upcast_bf16(q, k1, v1, k2, v2)
        o1, loss = dual_attention_mse_triton(q, k1, v1, k2, v2, mask2, scale)
        # The loss is fp32 for every input dtype; only o1 goes back to the caller's bf16.
        return (o1.to(torch.bfloat16) if upcast else o1), loss
    return dual_attention_mse_reference(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)
