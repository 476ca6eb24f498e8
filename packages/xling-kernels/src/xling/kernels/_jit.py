"""`@triton.jit` helpers shared by the dual-attention and fused-MSE kernels (Triton inlines them into each).

All math is base 2: the callers pass `qk_scale = softmax scale * log2(e)`, so `exp2(s - lse)` is the softmax.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, offs_r, offs_d, stride_r, stride_d, n_rows, D: tl.constexpr):
    # [R, BLOCK_D] tile of a strided [n_rows, D] matrix; padded rows and features read as 0.
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)


# The loop below inlines its loads instead of calling jit helpers: the CPU interpreter re-patches
# triton.language on every nested call, which dominated the test time. PRECISION is "ieee" for fp32 inputs
# (tensor cores would otherwise round them to tf32) and "tf32" (a no-op for fp16/bf16) otherwise.


@triton.jit
def key_loop(
    q,
    lse,
    do,
    delta,
    K,
    V,
    MASK,
    stride_km,
    stride_kd,
    stride_vm,
    stride_vd,
    stride_mm,
    M,
    D: tl.constexpr,
    qk_scale,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One query tile q [BLOCK_N, BLOCK_D] against all keys of one branch, BLOCK_M keys at a time (base 2).
    # Returns (acc, m, l), acc fp32 [BLOCK_N, BLOCK_D] and per-row m, l [BLOCK_N], by MODE:
    #   "softmax": online softmax; acc = unnormalised P V, m = row max, l = row sum (lse, do, delta unused)
    #   "out":     acc = P V with P = exp2(S - lse) from the saved LSE (do, delta unused)
    #   "dq":      acc = dS K with dS = P * (dO V^T - Delta): dQ before the softmax scale
    # MODE is a compile-time constant, so each caller compiles only its own branch.
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        valid = offs_m < M  # [BM]
        kv_mask = valid[:, None] & d_ok
        k = tl.load(K + offs_m[:, None] * stride_km + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_m[:, None] * stride_vm + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if HAS_MASK:
            valid = valid & (tl.load(MASK + offs_m * stride_mm, mask=offs_m < M, other=0) != 0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BN, BM]
        if MODE == "softmax":
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no valid key so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        else:
            p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)  # [BN, BM]
            if MODE == "out":
                acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            else:
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BN, BM]
                ds = p * (dp - delta[:, None])
                acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def normalise(acc, m_i, l_i):
    # o = acc / l and lse = m + log2(l); an empty row (l = 0) gives o = 0 and lse = +inf (so P = 0 in backward).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    return o, lse
