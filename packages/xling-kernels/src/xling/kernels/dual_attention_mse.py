"""Triton fused dual attention + MSE: returns `o1` and `mean((o1 - o2)^2)` without ever writing `o2`.

Forward: like the dual-attention kernel, but instead of storing `o2` each program reduces `(o1 - o2)^2` over
its query tile to one fp32 partial per 16 query rows (a fixed layout, whatever tile size autotuning picks);
PyTorch sums the partials in a fixed order, so the loss is bit-identical from run to run (no atomics).
It stores `o1` (returned) and the base-2 LSE of branch 2 (`[B, H, N]` fp32, for the backward).

Backward: with `c = 2 * grad_loss / numel`, `dL/do2 = c * (o2 - o1)`. A query-tile kernel recomputes `o2 = P V2`
from the LSE, writes the unscaled `dO = o2 - o1` (input dtype) and `Delta = rowsum(dO * o2)`, and computes
`dQ`; the shared dK/dV kernel of dual_attention.py (`DKDV`) does the rest; `c` is applied last (a tiny `c`
would underflow in fp16 if it were folded into `dO`).

The jit helpers are shared with dual_attention.py through _jit.py; builds, tiles and launches are in _launch.py.

Source: IAP, "Efficient Cross-Lingual Transfer for Chinese Stable Diffusion with Images as Pivots" (Hu et al.,
2023), eq. 3: per layer `mean((Attn(Q, K_en, V_en) - Attn(Q, K_zh, V_zh))^2)`.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from xling.kernels._jit import key_loop, load_rows, normalise
from xling.kernels._launch import checked_scale, kernel_pair, launch_dkdv, launch_dq, launch_forward
from xling.kernels.dual_attention import DKDV

#: Query rows per loss partial; every BLOCK_N is a multiple of it, so the partial layout is config-independent.
PARTIAL_ROWS = 16


def _dual_attention_mse_fwd_kernel(
    Q,
    K1,
    V1,
    K2,
    V2,
    MASK2,
    O1,
    LSE2,
    PARTIAL,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_k1b,
    stride_k1h,
    stride_k1m,
    stride_k1d,
    stride_v1b,
    stride_v1h,
    stride_v1m,
    stride_v1d,
    stride_k2b,
    stride_k2h,
    stride_k2m,
    stride_k2d,
    stride_v2b,
    stride_v2h,
    stride_v2m,
    stride_v2d,
    stride_mb,
    stride_mm,
    H,
    N,
    M1,
    M2,
    D: tl.constexpr,
    qk_scale,
    partials_per_bh,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    PARTIAL_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    valid = row_ok[:, None] & (offs_d[None, :] < D)

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, N, D)  # [BN, BD]

    acc1, m1, l1 = key_loop(
        q,
        None,
        None,
        None,
        K1 + b * stride_k1b + h * stride_k1h,
        V1 + b * stride_v1b + h * stride_v1h,
        MASK2,
        stride_k1m,
        stride_k1d,
        stride_v1m,
        stride_v1d,
        stride_mm,
        M1,
        D,
        qk_scale,
        "softmax",
        False,
        PRECISION,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
    )
    o1, _ = normalise(acc1, m1, l1)
    o1 = o1.to(O1.dtype.element_ty)
    tl.store(O1 + pid_bh.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :], o1, mask=valid)

    acc2, m2, l2 = key_loop(
        q,
        None,
        None,
        None,
        K2 + b * stride_k2b + h * stride_k2h,
        V2 + b * stride_v2b + h * stride_v2h,
        MASK2 + b * stride_mb,
        stride_k2m,
        stride_k2d,
        stride_v2m,
        stride_v2d,
        stride_mm,
        M2,
        D,
        qk_scale,
        "softmax",
        HAS_MASK,
        PRECISION,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
    )
    o2, lse2 = normalise(acc2, m2, l2)
    tl.store(LSE2 + pid_bh.to(tl.int64) * N + offs_n, lse2, mask=row_ok)

    # The returned (rounded) o1 is the target, exactly as the backward sees it; o2 stays fp32.
    diff = tl.where(valid, o1.to(tl.float32) - o2, 0.0)
    row_sq = tl.sum(diff * diff, 1)  # [BN]
    group_sq = tl.sum(tl.reshape(row_sq, (BLOCK_N // PARTIAL_ROWS, PARTIAL_ROWS)), 1)  # [BN / 16]
    offs_g = pid_n * (BLOCK_N // PARTIAL_ROWS) + tl.arange(0, BLOCK_N // PARTIAL_ROWS)
    tl.store(
        PARTIAL + pid_bh.to(tl.int64) * partials_per_bh + offs_g, group_sq, mask=offs_g < partials_per_bh
    )


def _dual_attention_mse_bwd_dq_kernel(
    Q,
    K2,
    V2,
    MASK2,
    O1,
    LSE2,
    GRAD_SCALE,
    DO,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_km,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vm,
    stride_vd,
    stride_mb,
    stride_mm,
    H,
    N,
    M2,
    D: tl.constexpr,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Recompute o2, write dO = o2 - o1 and Delta for the dK/dV kernel, and dQ (times c) when q needs it.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    row_base = pid_bh.to(tl.int64) * N
    out_offs = row_base * D + offs_n[:, None] * D + offs_d[None, :]
    out_mask = row_ok[:, None] & (offs_d[None, :] < D)

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, N, D)
    o1 = load_rows(O1 + row_base * D, offs_n, offs_d, D, 1, N, D)
    lse = tl.load(LSE2 + row_base + offs_n, mask=row_ok, other=float("inf"))
    k_ptr = K2 + b * stride_kb + h * stride_kh
    v_ptr = V2 + b * stride_vb + h * stride_vh
    m_ptr = MASK2 + b * stride_mb
    o2, _, _ = key_loop(
        q,
        lse,
        None,
        None,
        k_ptr,
        v_ptr,
        m_ptr,
        stride_km,
        stride_kd,
        stride_vm,
        stride_vd,
        stride_mm,
        M2,
        D,
        qk_scale,
        "out",
        HAS_MASK,
        PRECISION,
        BLOCK_N,
        BLOCK_M,
        BLOCK_D,
    )
    # Round dO to the input dtype before Delta, so Delta matches the dO that dQ and dK/dV multiply with
    # (otherwise dP - Delta carries the rounding error, visible when a row has a single key).
    do = tl.where(out_mask, o2 - o1.to(tl.float32), 0.0).to(DO.dtype.element_ty)
    delta = tl.sum(do.to(tl.float32) * o2, 1)
    tl.store(DO + out_offs, do, mask=out_mask)
    tl.store(DELTA + row_base + offs_n, delta, mask=row_ok)
    if COMPUTE_DQ:
        dq, _, _ = key_loop(
            q,
            lse,
            do,
            delta,
            k_ptr,
            v_ptr,
            m_ptr,
            stride_km,
            stride_kd,
            stride_vm,
            stride_vd,
            stride_mm,
            M2,
            D,
            qk_scale,
            "dq",
            HAS_MASK,
            PRECISION,
            BLOCK_N,
            BLOCK_M,
            BLOCK_D,
        )
        c = tl.load(GRAD_SCALE)
        tl.store(DQ + out_offs, (dq * (sm_scale * c)).to(DQ.dtype.element_ty), mask=out_mask)


_MSE_FWD = kernel_pair(_dual_attention_mse_fwd_kernel, autotune_key=["N", "M1", "M2", "D"])
_MSE_DQ = kernel_pair(_dual_attention_mse_bwd_dq_kernel)


class DualAttentionMSEFunction(torch.autograd.Function):
    """Autograd for the fused kernel: `loss = mean((o1 - o2)^2)`, `o1` constant, grads to q, k2, v2.

    `apply(q, k1, v1, k2, v2, mask2, scale)` as :class:`~xling.kernels.dual_attention.DualAttentionFunction`;
    returns `(o1, loss)`, `o1` `[B, H, N, d]` and `loss` an fp32 scalar.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k1: torch.Tensor,
        v1: torch.Tensor,
        k2: torch.Tensor,
        v2: torch.Tensor,
        mask2: torch.Tensor | None,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scale = checked_scale(q, k1, v1, k2, v2, mask2, scale=scale)  # the reference's checks, and d <= 256
        b, h, n, d = q.shape
        o1 = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
        lse2 = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        partials_per_bh = triton.cdiv(n, PARTIAL_ROWS)
        partial = torch.empty((b * h, partials_per_bh), dtype=torch.float32, device=q.device)
        launch_forward(
            _MSE_FWD,
            (q, k1, v1, k2, v2, mask2),
            scale,
            (o1, lse2, partial),
            partials_per_bh,
            PARTIAL_ROWS=PARTIAL_ROWS,
        )
        # fp64 for the final fixed-order sum: cheap (numel / 16 terms) and keeps large means exact to fp32.
        loss = (partial.sum(dtype=torch.float64) / o1.numel()).to(torch.float32)
        ctx.mark_non_differentiable(o1)
        ctx.save_for_backward(q, k2, v2, o1, lse2, mask2)
        ctx.scale = scale
        return o1, loss

    @staticmethod
    def backward(ctx: Any, grad_o1: torch.Tensor | None, grad_loss: torch.Tensor | None) -> tuple[Any, ...]:
        q, k2, v2, o1, lse2, mask2 = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None
        scale = ctx.scale
        b, h, n, d = q.shape
        # dL/do2 = c * (o2 - o1); c stays a device tensor so the backward never synchronises.
        c = (grad_loss.detach().to(torch.float32) * (2.0 / o1.numel())).reshape(1)
        need_dq = ctx.needs_input_grad[0]
        do = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
        delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        dq = torch.empty_like(do) if need_dq else delta
        launch_dq(_MSE_DQ, (q, k2, v2, mask2), scale, (o1, lse2, c, do, delta, dq), compute_dq=need_dq)
        dk2 = dv2 = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            dk, dv = launch_dkdv(DKDV, (q, k2, v2, mask2), do, lse2, delta, scale)
            dk2, dv2 = (dk * c).to(k2.dtype), (dv * c).to(v2.dtype)
        return (dq if need_dq else None), None, None, dk2, dv2, None, None


#: The Triton path of :func:`xling.kernels.dual_attention_mse`. Positional arguments
#: `(q, k1, v1, k2, v2, mask2, scale)`, `scale` may be None; the Function validates them.
dual_attention_mse_triton = DualAttentionMSEFunction.apply
