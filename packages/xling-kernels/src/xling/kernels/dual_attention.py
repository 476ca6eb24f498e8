"""Triton dual attention: one query tile, two key/value sets, both outputs in one pass.

Forward: each program loads a `[BLOCK_N, d]` query tile once, runs an online softmax over the keys of
branch 1 and then of branch 2 (keys in `BLOCK_M` chunks, the last chunk masked, so any key length works),
and writes `o1`, `o2` and the base-2 log-sum-exp of branch 2. Head dims that are not powers of two
(40, 80, 160) are padded to `BLOCK_D = next_pow2(d)` with load masks.

Backward (branch 2 only; branch 1 is a constant target), flash-attention style from the saved LSE:
    P = exp2(S - lse), Delta = rowsum(dO * O)
    dV = P^T dO, dS = P * (dO V^T - Delta), dQ = scale * dS K, dK = scale * dS^T Q
`dQ` is computed per query tile (reduction over the few keys); `dK`/`dV` per key tile over a split of the
queries, written as fp32 partials `[S, B, H, M, d]` and summed by PyTorch: deterministic, no atomics. The
dK/dV kernel (`DKDV`) also serves the fused MSE of dual_attention_mse.py.

Fully masked rows (`mask2[b]` all False) give `o2 = 0`, `lse = +inf`, hence zero gradient (see reference.py).

The jit helpers the kernels share with dual_attention_mse.py are in _jit.py; builds, tiles and launches in
_launch.py.
"""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from xling.kernels._jit import key_loop, load_rows, normalise
from xling.kernels._launch import checked_scale, kernel_pair, launch_dkdv, launch_dq, launch_forward

# The kernels are plain functions: kernel_pair() jit-compiles each twice (generic and fast builds).


def _dual_attention_fwd_kernel(
    Q,
    K1,
    V1,
    K2,
    V2,
    MASK2,
    O1,
    O2,
    LSE2,
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
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
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

    q = load_rows(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, N, D)  # [BN, BD]
    out_offs = pid_bh.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :]
    out_mask = row_ok[:, None] & (offs_d[None, :] < D)

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
    tl.store(O1 + out_offs, o1.to(O1.dtype.element_ty), mask=out_mask)

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
    tl.store(O2 + out_offs, o2.to(O2.dtype.element_ty), mask=out_mask)
    tl.store(LSE2 + pid_bh.to(tl.int64) * N + offs_n, lse2, mask=row_ok)


def _dual_attention_bwd_dq_kernel(
    Q,
    K2,
    V2,
    MASK2,
    O2,
    DO,
    LSE2,
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
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
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
    # Delta = rowsum(dO * O2) for the dK/dV kernel, and dQ when q needs a gradient.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    row_base = pid_bh.to(tl.int64) * N

    do = load_rows(DO + b * stride_dob + h * stride_doh, offs_n, offs_d, stride_don, stride_dod, N, D)
    o2 = load_rows(O2 + row_base * D, offs_n, offs_d, D, 1, N, D)
    delta = tl.sum(do.to(tl.float32) * o2.to(tl.float32), 1)  # [BN]
    tl.store(DELTA + row_base + offs_n, delta, mask=row_ok)
    if COMPUTE_DQ:
        q = load_rows(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, N, D)
        lse = tl.load(LSE2 + row_base + offs_n, mask=row_ok, other=float("inf"))
        dq, _, _ = key_loop(
            q,
            lse,
            do,
            delta,
            K2 + b * stride_kb + h * stride_kh,
            V2 + b * stride_vb + h * stride_vh,
            MASK2 + b * stride_mb,
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
        out_offs = row_base * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(
            DQ + out_offs,
            (dq * sm_scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & (offs_d[None, :] < D),
        )


def _dual_attention_bwd_dkdv_kernel(
    Q,
    K2,
    V2,
    MASK2,
    DO,
    LSE2,
    DELTA,
    DK_PART,
    DV_PART,
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
    stride_dob,
    stride_doh,
    stride_don,
    stride_dod,
    B,
    H,
    N,
    M2,
    D: tl.constexpr,
    rows_per_split,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One key tile of one (b, h) against the queries of one split; fp32 partials, summed over splits outside.
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_base = pid_bh.to(tl.int64) * N

    k = load_rows(K2 + b * stride_kb + h * stride_kh, offs_m, offs_d, stride_km, stride_kd, M2, D)  # [BM, BD]
    v = load_rows(V2 + b * stride_vb + h * stride_vh, offs_m, offs_d, stride_vm, stride_vd, M2, D)  # [BM, BD]
    valid = offs_m < M2  # [BM]
    if HAS_MASK:
        valid = valid & (tl.load(MASK2 + b * stride_mb + offs_m * stride_mm, mask=offs_m < M2, other=0) != 0)
    q_ptr = Q + b * stride_qb + h * stride_qh
    do_ptr = DO + b * stride_dob + h * stride_doh

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    # Loads inlined, not load_rows: per-iteration jit calls are slow on the interpreter (see _jit.key_loop).
    for start in range(row_start, row_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        row_mask = (offs_n[:, None] < row_end) & (offs_d[None, :] < D)
        q = tl.load(
            q_ptr + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_mask, other=0.0
        )
        do = tl.load(
            do_ptr + offs_n[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=row_mask, other=0.0
        )
        # Rows past the split read lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(LSE2 + row_base + offs_n, mask=offs_n < row_end, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_n, mask=offs_n < row_end, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BM, BN]
        p_t = tl.where(valid[:, None], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BM, BN]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    part = ((pid_s * B * H + pid_bh).to(tl.int64) * M2) * D + offs_m[:, None] * D + offs_d[None, :]
    part_mask = (offs_m[:, None] < M2) & (offs_d[None, :] < D)
    tl.store(DK_PART + part, dk * sm_scale, mask=part_mask)
    tl.store(DV_PART + part, dv, mask=part_mask)


_FWD = kernel_pair(_dual_attention_fwd_kernel, autotune_key=["N", "M1", "M2", "D"])
_DQ = kernel_pair(_dual_attention_bwd_dq_kernel)
#: Shared with the fused MSE, whose backward needs the same dK/dV from its own dO.
DKDV = kernel_pair(_dual_attention_bwd_dkdv_kernel)


class DualAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton dual attention: `o1` is a constant, gradients flow to q, k2, v2 through `o2`.

    `apply(q, k1, v1, k2, v2, mask2, scale)`: q `[B, H, N, d]`, k1 and v1 `[B, H, M1, d]`, k2 and v2
    `[B, H, M2, d]`, mask2 `[B, M2]` bool or None, scale a float or None (`1 / sqrt(d)`); validated first.
    Returns `(o1, o2)`, each `[B, H, N, d]`.
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
        o2 = torch.empty_like(o1)
        lse2 = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        launch_forward(_FWD, (q, k1, v1, k2, v2, mask2), scale, (o1, o2, lse2))
        ctx.mark_non_differentiable(o1)
        ctx.save_for_backward(q, k2, v2, o2, lse2, mask2)
        ctx.scale = scale
        return o1, o2

    @staticmethod
    def backward(ctx: Any, grad_o1: torch.Tensor | None, grad_o2: torch.Tensor | None) -> tuple[Any, ...]:
        q, k2, v2, o2, lse2, mask2 = ctx.saved_tensors
        scale = ctx.scale
        b, h, n, d = q.shape
        if grad_o2 is None:
            grad_o2 = torch.zeros_like(o2)
        need_dq = ctx.needs_input_grad[0]
        delta = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        dq = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device) if need_dq else delta
        launch_dq(
            _DQ,
            (q, k2, v2, mask2),
            scale,
            (o2, grad_o2, lse2, delta, dq),
            *grad_o2.stride(),
            compute_dq=need_dq,
        )
        dk2 = dv2 = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            dk, dv = launch_dkdv(DKDV, (q, k2, v2, mask2), grad_o2, lse2, delta, scale)
            dk2, dv2 = dk.to(k2.dtype), dv.to(v2.dtype)
        return (dq if need_dq else None), None, None, dk2, dv2, None, None


#: The Triton path of :func:`xling.kernels.dual_attention`. Positional arguments
#: `(q, k1, v1, k2, v2, mask2, scale)`, `scale` may be None; the Function validates them.
dual_attention_triton = DualAttentionFunction.apply
