"""Pure PyTorch dual attention: two `scaled_dot_product_attention` calls (the ground truth and the fallback).

Fully masked rows: when `mask2[b]` is all False, branch 2 of batch element `b` has no key to attend to.
Softmax over an empty set is undefined (SDPA gives NaN on some backends), so xling defines the result as
`o2[b] = 0` with zero gradient to `q`, `k2` and `v2`; the Triton kernels implement the same rule.

The joint references (the MMDiT pivot) concatenate `[k_img; k_i]` and run one SDPA per branch: the ground truth
of `joint_attention.py`. There the image keys are never masked, so a fully masked text row stays defined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xling.kernels._validation import check_inputs, check_joint_inputs


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
    mask1: torch.Tensor | None = None,
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
        mask1: Optional key-padding mask of branch 1 `[B, M1]` (a teacher's text padding), bool, True = attend.
            A fully masked row gives `o1 = 0`.
        mask2: Optional key-padding mask `[B, M2]`, bool, True = attend. A fully masked row gives `o2 = 0`.
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, o2)`, each `[B, H, N, d]` in the input dtype; `o1` has no grad.
    """
    softmax_scale = check_inputs(q, k1, v1, k2, v2, mask2, scale, mask1)
    with torch.no_grad():
        o1 = _masked_sdpa(q, k1, v1, mask1, softmax_scale)
    o2 = _masked_sdpa(q, k2, v2, mask2, softmax_scale)
    return o1, o2


def dual_attention_mse_reference(
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
    """Branch-1 output and the MSE between both branches: `loss = mean((o1 - o2)^2)` (IAP, Hu et al. 2023, eq. 3).

    Args:
        q: Queries `[B, H, N, d]`.
        k1: Keys of branch 1 `[B, H, M1, d]`.
        v1: Values of branch 1 `[B, H, M1, d]`.
        k2: Keys of branch 2 `[B, H, M2, d]`.
        v2: Values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of branch 1 `[B, M1]`, bool, True = attend.
        mask2: Optional key-padding mask `[B, M2]`, bool, True = attend.
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, loss)`: `o1` `[B, H, N, d]` without grad, `loss` an fp32 scalar (mean over all `B*H*N*d` elements).
    """
    o1, o2 = dual_attention_reference(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)
    return o1, F.mse_loss(o2.float(), o1.float())


def joint_dual_attention_reference(
    q: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    *,
    mask1: torch.Tensor | None = None,
    mask2: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain concatenated joint attention: `o_i = softmax(scale * q [k_img; k_i]^T) [v_img; v_i]`, one SDPA each.

    Same contract as `joint_dual_attention`: `o1` has no grad; `o2` reaches `k2`, `v2` and `q` (if it requires
    grad); the image keys/values are constants (detached) and are never masked.

    Args:
        q: Image queries `[B, H, N_img, d]`.
        k_img: Image keys `[B, H, N_kv, d]`.
        v_img: Image values `[B, H, N_kv, d]`.
        k1: Text keys of branch 1 `[B, H, M1, d]`.
        v1: Text values of branch 1 `[B, H, M1, d]`.
        k2: Text keys of branch 2 `[B, H, M2, d]`.
        v2: Text values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of `k1` `[B, M1]`, bool, True = attend.
        mask2: Optional key-padding mask of `k2` `[B, M2]`, bool, True = attend.
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, o2)`, each `[B, H, N_img, d]` in the input dtype; `o1` has no grad.
    """
    softmax_scale = check_joint_inputs(q, k_img, v_img, k1, v1, k2, v2, mask1, mask2, scale)
    k_img, v_img = k_img.detach(), v_img.detach()

    def branch(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        keys, values = torch.cat([k_img, k], dim=2), torch.cat([v_img, v], dim=2)  # [B, H, N_kv + M, d]
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, scale=softmax_scale)
        image_keys = mask.new_ones(mask.shape[0], k_img.shape[2])
        attend = torch.cat([image_keys, mask], dim=1)[:, None, None, :]  # [B, 1, 1, N_kv + M]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=softmax_scale)

    with torch.no_grad():
        o1 = branch(k1, v1, mask1)
    return o1, branch(k2, v2, mask2)


def joint_dual_attention_mse_reference(
    q: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k1: torch.Tensor,
    v1: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    *,
    mask1: torch.Tensor | None = None,
    mask2: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch-1 output and `mean((o1 - o2)^2)` of the concatenated joint attention.

    Args:
        q: Image queries `[B, H, N_img, d]`.
        k_img: Image keys `[B, H, N_kv, d]`.
        v_img: Image values `[B, H, N_kv, d]`.
        k1: Text keys of branch 1 `[B, H, M1, d]`.
        v1: Text values of branch 1 `[B, H, M1, d]`.
        k2: Text keys of branch 2 `[B, H, M2, d]`.
        v2: Text values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of `k1` `[B, M1]`, bool, True = attend.
        mask2: Optional key-padding mask of `k2` `[B, M2]`, bool, True = attend.
        scale: Softmax scale, default `1 / sqrt(d)`.

    Returns:
        `(o1, loss)`: `o1` `[B, H, N_img, d]` without grad, `loss` a scalar in fp32 (fp64 for fp64 inputs), the
        mean over all `B*H*N_img*d` elements.
    """
    o1, o2 = joint_dual_attention_reference(
        q, k_img, v_img, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale
    )
    loss_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o1, F.mse_loss(o2.to(loss_dtype), o1.to(loss_dtype))
