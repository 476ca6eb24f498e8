"""Joint dual attention for the MMDiT pivot: one image query against [image keys; text keys] for two text sets.

In an MMDiT (SD3, Flux) image and text tokens share one attention. The MMDiT pivot keeps the image tokens' Q, K, V
from the teacher's English pass and compares the image tokens' outputs under two text branches:

    o1 = softmax(scale * q [k_img; k1]^T) [v_img; v1]     (English text: a constant target, no grad)
    o2 = softmax(scale * q [k_img; k2]^T) [v_img; v2]     (student text: grad to k2, v2, and q if it needs grad)

The image-key part of both softmaxes is the same, so it is computed once as unnormalised statistics (row max
`m_img`, row sum `l_img = sum_j exp(s_j - m_img)`, output `a_img = sum_j exp(s_j - m_img) v_j`) and merged with each
branch's text part `(m_t, l_t, a_t)` by log-sum-exp:

    m = max(m_img, m_t);  o = (exp(m_img - m) a_img + exp(m_t - m) a_t) / (exp(m_img - m) l_img + exp(m_t - m) l_t)

The concatenated keys are never built. The image part comes from one of two paths:

- fused (CPU, the default there): PyTorch's fused CPU attention kernel returns the image output and its row
  log-sum-exp, which are the statistics with `m = lse`, `l = 1`; no `[N_img, N_kv]` scores are ever held, with or
  without a gradient to `q` (`_LogSumExp` gives the lse its gradient);
- chunked (elsewhere, or with an explicit `image_chunk`): an online softmax over chunks of image keys with the
  same merge; it holds one chunk's scores at a time when `q` needs no gradient (the pivot's case), all of them
  (for backward) when `q` needs one.

Gradients are plain autograd through these formulas, exact because every row max is detached (the result does
not depend on the shift). Everything is computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from xling.kernels._validation import check_joint_inputs

#: Score elements `B * H * N_img * chunk` of one image-key chunk (128 MiB in fp32); sets the default chunk.
SCORE_BUDGET = 1 << 25
#: Fewest image keys per chunk, so a huge `B * H * N_img` does not degrade into one key per step.
MIN_CHUNK = 64


class _Part(NamedTuple):
    """Unnormalised softmax statistics of the queries against one block of keys."""

    m: torch.Tensor  # [B, H, N, 1] row max of the scores (detached); -inf where every key is masked
    total: torch.Tensor  # [B, H, N, 1] sum_j exp(s_j - m)
    a: torch.Tensor  # [B, H, N, d] sum_j exp(s_j - m) v_j


def _finite(m: torch.Tensor) -> torch.Tensor:
    # A row without any key has m = -inf; any finite shift gives it l = 0, a = 0 instead of exp(-inf + inf) = NaN.
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def _part(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> _Part:
    """Statistics of `q` `[B, H, N, d]` against `k`, `v` `[B, H, M, d]` with an optional key mask `[B, M]`."""
    s = torch.matmul(q * scale, k.transpose(-2, -1))  # [B, H, N, M]; scaling q is N*d work, not N*M
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        p = torch.exp(s - _finite(m))  # masked keys: exp(-inf) = 0, with zero gradient
    else:  # no graph: reuse the score buffer, two passes over [B, H, N, M] fewer
        p = s.sub_(_finite(m)).exp_()
    return _Part(m, p.sum(dim=-1, keepdim=True), torch.matmul(p, v))


def _merge(x: _Part, y: _Part) -> _Part:
    """Log-sum-exp merge of two key blocks' statistics (the same queries)."""
    m = torch.maximum(x.m, y.m)
    shift = _finite(m)
    wx, wy = torch.exp(x.m - shift), torch.exp(y.m - shift)  # a block without keys (m = -inf) weighs 0
    return _Part(m, wx * x.total + wy * y.total, wx * x.a + wy * y.a)


def _cpu_attention_kernel() -> Callable[..., tuple[torch.Tensor, ...]] | None:
    # PyTorch's fused CPU attention (the kernel behind SDPA there), the one public-ish way to get the row
    # log-sum-exp without the score matrix. A private op: a PyTorch without it falls back to the chunked path.
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class _LogSumExp(torch.autograd.Function):
    """Row log-sum-exp `lse_i = log sum_j exp(scale * q_i . k_j)` `[B, H, N]`, with its gradient to `q`.

    `d lse_i / d q_i = scale * sum_j softmax_ij k_j`: attention with the keys as values, which the forward
    kernel returns alongside the lse, so the backward needs no recomputation and only `[B, H, N, d]` is saved.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        kernel = _cpu_attention_kernel()
        assert kernel is not None  # checked by the caller
        mean_key, lse = kernel(q, k, k, 0.0, False, scale=scale)[:2]
        ctx.save_for_backward(mean_key)
        ctx.scale = scale
        return lse.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_lse: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mean_key,) = ctx.saved_tensors
        return grad_lse[..., None] * ctx.scale * mean_key, None, None


def _fused_image_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> _Part | None:
    """The image part from PyTorch's fused CPU attention, or None off the CPU (or without the kernel).

    With the row log-sum-exp as the shift, the statistics are `m = lse`, `l = 1`, `a = o`: no `[N_img, N_kv]`
    scores are held. When `q` needs a gradient, `o` comes from SDPA (whose backward is memory-efficient) and
    the lse from `_LogSumExp`, and `l = exp(lse - m)` (1, with `m` detached) carries the lse's gradient.
    """
    kernel = _cpu_attention_kernel()
    if q.device.type != "cpu" or kernel is None:
        return None
    if not (q.requires_grad and torch.is_grad_enabled()):
        with torch.no_grad():
            o, lse = kernel(q, k, v, 0.0, False, scale=scale)[:2]  # [B, H, N, d], [B, H, N]
        lse = lse.to(o.dtype)[..., None]
        return _Part(lse, torch.ones_like(lse), o)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    lse = _LogSumExp.apply(q, k, scale)[..., None]
    m = lse.detach()
    total = torch.exp(lse - m)
    return _Part(m, total, o * total)


def _image_chunk(b: int, h: int, n: int, n_kv: int, image_chunk: int | None) -> int:
    if image_chunk is None:
        return min(n_kv, max(MIN_CHUNK, SCORE_BUDGET // max(1, b * h * n)))
    if isinstance(image_chunk, bool) or not isinstance(image_chunk, int) or image_chunk < 1:
        raise ValueError(f"image_chunk must be a positive int or None, got {image_chunk!r}")
    return min(n_kv, image_chunk)


def _joint(
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
    image_chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(o1, o2)` `[B, H, N_img, d]` in the compute dtype (fp32, or fp64 for fp64 inputs); o1 without graph."""
    softmax_scale = check_joint_inputs(q, k_img, v_img, k1, v1, k2, v2, mask1, mask2, scale)
    b, h, n, _ = q.shape
    n_kv = k_img.shape[2]
    chunk = _image_chunk(b, h, n, n_kv, image_chunk)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = q.to(compute)
    # The image stream is a constant of the pivot: detached here, so no gradient ever reaches k_img / v_img.
    k_img_c, v_img_c = k_img.detach().to(compute), v_img.detach().to(compute)

    # Shared by both branches; it has a graph (to q) only when q needs a gradient.
    image = None if image_chunk is not None else _fused_image_part(qc, k_img_c, v_img_c, softmax_scale)
    if image is None:
        for start in range(0, n_kv, chunk):
            block = _part(
                qc,
                k_img_c[:, :, start : start + chunk],
                v_img_c[:, :, start : start + chunk],
                None,
                softmax_scale,
            )
            image = block if image is None else _merge(image, block)
    assert image is not None  # n_kv >= 1 is validated

    with torch.no_grad():
        constant = _Part(image.m, image.total.detach(), image.a.detach())
        branch1 = _merge(constant, _part(qc, k1.to(compute), v1.to(compute), mask1, softmax_scale))
        o1 = branch1.a / branch1.total  # l >= 1: the block holding the row max contributes exp(0)
    branch2 = _merge(image, _part(qc, k2.to(compute), v2.to(compute), mask2, softmax_scale))
    return o1, branch2.a / branch2.total


def joint_dual_attention(
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
    image_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-token outputs of joint attention under two text branches, the image-key part computed once.

    `o_i = softmax(scale * q [k_img; k_i]^T) [v_img; v_i]` (keys concatenated along the token axis, image first;
    the order does not change the result). Never builds the concatenated keys: see the module docstring.

    Gradient contract: `o1` is a constant target (no graph). `o2` has a graph to `k2`, `v2` and, when it
    requires grad, `q`. The image keys/values are constants of the pivot (the image stream is never
    back-propagated): `k_img` and `v_img` get no gradient even when they require grad, as do `k1`, `v1`.

    Args:
        q: Image queries `[B, H, N_img, d]`; fp64, fp32, fp16 or bf16 (all seven tensors share the dtype).
        k_img: Image keys `[B, H, N_kv, d]` (in an MMDiT the same tokens as `q`: `N_kv = N_img`); never masked.
        v_img: Image values, the shape of `k_img`.
        k1: Text keys of branch 1 (e.g. English) `[B, H, M1, d]`.
        v1: Text values of branch 1 `[B, H, M1, d]`.
        k2: Text keys of branch 2 (the student) `[B, H, M2, d]`.
        v2: Text values of branch 2 `[B, H, M2, d]`.
        mask1: Optional key-padding mask of `k1` `[B, M1]`, bool, True = attend.
        mask2: Optional key-padding mask of `k2` `[B, M2]`, bool, True = attend. A fully masked text row is
            still defined (the image keys remain): the output is image-only attention and `k2`, `v2` of that
            batch element get zero gradient.
        scale: Softmax scale, default `1 / sqrt(d)`.
        image_chunk: Image keys per step of the chunked path; giving it always takes that path. None: the fused
            CPU kernel on the CPU, else chunks that keep one fp32 score block `[B, H, N_img, chunk]` under
            `SCORE_BUDGET` elements (at least `MIN_CHUNK` keys).

    Returns:
        `(o1, o2)`, each `[B, H, N_img, d]` in the input dtype (computed in fp32, fp64 for fp64 inputs).

    Raises:
        TypeError: Non-tensor input, mixed or unsupported dtypes, or a non-bool mask.
        ValueError: Mismatched shapes or devices, a bad `scale` or a bad `image_chunk`.
    """
    o1, o2 = _joint(q, k_img, v_img, k1, v1, k2, v2, mask1, mask2, scale, image_chunk)
    return o1.to(q.dtype), o2.to(q.dtype)


def joint_dual_attention_mse(
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
    image_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch-1 output and `loss = mean((o1 - o2)^2)` over all `B * H * N_img * d` elements (the MMDiT pivot).

    The loss of `dual_attention_mse` with the joint outputs of :func:`joint_dual_attention`; it is taken from the
    fp32 (fp64) outputs before any cast, and `o2` is not returned. Same gradient contract: the loss reaches `k2`,
    `v2` and `q` (when it requires grad) only.

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
        image_chunk: Image keys per step of the chunked path (see :func:`joint_dual_attention`).

    Returns:
        `(o1, loss)`: `o1` `[B, H, N_img, d]` in the input dtype without grad; `loss` a scalar, fp32 (fp64 for
        fp64 inputs).

    Raises:
        TypeError: Non-tensor input, mixed or unsupported dtypes, or a non-bool mask.
        ValueError: Mismatched shapes or devices, a bad `scale` or a bad `image_chunk`.
    """
    o1, o2 = _joint(q, k_img, v_img, k1, v1, k2, v2, mask1, mask2, scale, image_chunk)
    return o1.to(q.dtype), torch.mean((o2 - o1) ** 2)
