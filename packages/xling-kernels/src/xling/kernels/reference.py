"""Pure PyTorch dual attention: two `scaled_dot_product_attention` calls (the ground truth and the fallback).

Fully masked rows: when `mask2[b]` is all False, branch 2 of batch element `b` has no key to attend to.
Softmax over an empty set is undefined (SDPA gives NaN on some backends), so xling defines the result as
`o2[b] = 0` with zero gradient to `q`, `k2` and `v2`; the Triton kernels implement the same rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xling.kernels._validation import check_inputs


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA with a key-padding mask `[B, M]`; fully masked batch elements give 0, not NaN. Returns `[B, H, N, d]`."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_key = mask.any(dim=1)  # [B]
    # Let empty rows attend everywhere (finite, well-defined backward), then zero them: grad through 0 * o is 0.
    attend = mask | ~has_key[:, None]  # [B, M]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :], scale=scale)
    return torch.where(has_key[:, None, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))


def dual_attention_reference(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    *,
    mask2: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend one query to two key/value sets: `o_i = softmax(scale * q k_i^T) v_i`.

    Branch 1 is a constant target (computed without grad); gradients reach `q`, `k2` and `v2` through `o2`.

    Args:
        q: Queries `[B, H, N, d]` (any strides).
        k1: Keys of branch 1 `[B, H, M1, d]`.
        v1: Values of branch 1 `[B, H, M1, d]`.
        k2: Keys of branch 2 `[B, H, M2, d]`.
        v2: Values of branch 2 `[B, H, M2, d]`.
        mask2: Optional key-padding mask `[B, M2]`, bool, True = attend. A fully masked row gives `o2 = 0`.
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, o2)`, each `[B, H, N, d]` in the input dtype; `o1` has no grad.
    """
    softmax_scale = check_inputs(q, k1, v1, k2, v2, mask2, scale)
    with torch.no_grad():
        o1 = F.scaled_dot_product_attention(q, k1, v1, scale=softmax_scale)
    o2 = _masked_sdpa(q, k2, v2, mask2, softmax_scale)
    return o1, o2


def dual_attention_mse_reference(
    q: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    *,
    mask2: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch-1 output and the MSE between both branches: `loss = mean((o1 - o2)^2)` (IAP, Hu et al. 2023, eq. 3).

    Args:
        q: Queries `[B, H, N, d]`.
        k1: Keys of branch 1 `[B, H, M1, d]`.
        v1: Values of branch 1 `[B, H, M1, d]`.
        k2: Keys of branch 2 `[B, H, M2, d]`.
        v2: Values of branch 2 `[B, H, M2, d]`.
        mask2: Optional key-padding mask `[B, M2]`, bool, True = attend.
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, loss)`: `o1` `[B, H, N, d]` without grad, `loss` an fp32 scalar (mean over all `B*H*N*d` elements).
    """
    o1, o2 = dual_attention_reference(q, k1, v1, k2, v2, mask2=mask2, scale=scale)
    return o1, F.mse_loss(o2.float(), o1.float())
