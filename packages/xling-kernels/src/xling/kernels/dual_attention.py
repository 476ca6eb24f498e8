"""Triton dual attention: one query tile, two key/value sets, both outputs in one pass.

Forward: each program loads a `[BLOCK_N, d]` query tile once, runs an online softmax over the keys of
branch 1 and then of branch 2 (keys in `BLOCK_M` chunks, the last chunk masked, so any key length works),
and writes `o1`, `o2` and the base-2 log-sum-exp of branch 2. Head dims that are not powers of two
(40, 80, 160) are padded to `BLOCK_D = next_pow2(d)` with load masks.

Backward (branch 2 only; branch 1 is a constant target), flash-attention style from the saved LSE:
    P = exp2(S - lse), Delta = rowsum(dO * O)
    dV = P^T dO, dS = P * (dO V^T - Delta), dQ = scale * dS K, dK = scale * dS^T Q
`dQ` is computed per query tile (reduction over the few keys); `dK`/`dV` per key tile over a split of the
queries, written as fp32 partials `[S, B, H, M, d]` and summed by PyTorch: deterministic, no atomics.

Fully masked rows (`mask2[b]` all False) give `o2 = 0`, `lse = +inf`, hence zero gradient (see reference.py).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from xling.kernels._validation import check_inputs

LOG2E = 1.4426950408889634

#: From this many query elements on a GPU, the specialised (forward: autotuned) builds run; below, the generic one.
AUTOTUNE_MIN_NUMEL = 1 << 20

#: Row granularity of the query splits in the dK/dV kernel (a multiple of every BLOCK_N it may use).
SPLIT_ROWS = 128


# ----------------------------------------------------------------------------------------------------------------
# jit helpers shared with dual_attention_mse.py
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, offs_r, offs_d, stride_r, stride_d, n_rows, D: tl.constexpr):
    # [R, BLOCK_D] tile of a strided [n_rows, D] matrix; padded rows and features read as 0.
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)


# The loop below inlines its loads instead of calling jit helpers: the CPU interpreter re-patches
# triton.language on every nested call, which dominated the test time. PRECISION is "ieee" for fp32 inputs
# (tensor cores would otherwise round them to tf32) and "tf32" (a no-op for fp16/bf16) otherwise.


@triton.jit
def _key_loop(
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
def _normalise(acc, m_i, l_i):
    # o = acc / l and lse = m + log2(l); an empty row (l = 0) gives o = 0 and lse = +inf (so P = 0 in backward).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    return o, lse


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


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

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, N, D)  # [BN, BD]
    out_offs = pid_bh.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :]
    out_mask = row_ok[:, None] & (offs_d[None, :] < D)

    acc1, m1, l1 = _key_loop(
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
    o1, _ = _normalise(acc1, m1, l1)
    tl.store(O1 + out_offs, o1.to(O1.dtype.element_ty), mask=out_mask)

    acc2, m2, l2 = _key_loop(
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
    o2, lse2 = _normalise(acc2, m2, l2)
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

    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_n, offs_d, stride_don, stride_dod, N, D)
    o2 = _load_rows(O2 + row_base * D, offs_n, offs_d, D, 1, N, D)
    delta = tl.sum(do.to(tl.float32) * o2.to(tl.float32), 1)  # [BN]
    tl.store(DELTA + row_base + offs_n, delta, mask=row_ok)
    if COMPUTE_DQ:
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, N, D)
        lse = tl.load(LSE2 + row_base + offs_n, mask=row_ok, other=float("inf"))
        dq, _, _ = _key_loop(
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

    k = _load_rows(
        K2 + b * stride_kb + h * stride_kh, offs_m, offs_d, stride_km, stride_kd, M2, D
    )  # [BM, BD]
    v = _load_rows(
        V2 + b * stride_vb + h * stride_vh, offs_m, offs_d, stride_vm, stride_vd, M2, D
    )  # [BM, BD]
    valid = offs_m < M2  # [BM]
    if HAS_MASK:
        valid = valid & (tl.load(MASK2 + b * stride_mb + offs_m * stride_mm, mask=offs_m < M2, other=0) != 0)
    q_ptr = Q + b * stride_qb + h * stride_qh
    do_ptr = DO + b * stride_dob + h * stride_doh

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
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


# ----------------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------------


# (BLOCK_N, BLOCK_M, num_warps, num_stages) tried by the forward autotuner, by head width: few on purpose,
# each is compiled and timed once per shape. Chosen from ptxas reports for sm_90 (at most a few bytes spilled).
_NARROW = [(64, 32, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2)]  # BLOCK_D <= 128
_WIDE = [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)]  # BLOCK_D = 256 (d = 160)
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=st)
    for bn, bm, w, st in _NARROW + _WIDE
]


def _prune_by_width(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    # Two fp32 [BLOCK_N, BLOCK_D] accumulators live per program: wide heads need the small-tile configs.
    wanted = set(_WIDE if kwargs["BLOCK_D"] >= 256 else _NARROW)
    return [
        c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) in wanted
    ]


#: Integer arguments (sizes and strides). The generic build does not specialise on them (== 1, % 16), so the
#: many small shapes of the tests and of small layers share a handful of compiled kernels.
_SIZE_ARGS = frozenset({"B", "H", "N", "M1", "M2", "rows_per_split", "partials_per_bh"})


class KernelPair(NamedTuple):
    """One kernel source built twice: `generic` for small problems and the interpreter, `fast` for large GPU
    problems (specialised on strides and sizes; autotuned over `_FORWARD_CONFIGS` when `tuned`)."""

    generic: Any
    fast: Any
    tuned: bool


def kernel_pair(fn: Callable[..., None], autotune_key: list[str] | None = None) -> KernelPair:
    """Build the :class:`KernelPair` of a kernel function (undecorated).

    Args:
        fn: The Triton kernel as a plain Python function.
        autotune_key: Arguments whose values key the autotuning cache; None for a fixed config.

    Returns:
        The pair.
    """
    ints = [n for n in inspect.signature(fn).parameters if n.startswith("stride_") or n in _SIZE_ARGS]
    generic = triton.jit(fn, do_not_specialize=ints)
    fast = triton.jit(fn)
    if autotune_key is None:
        return KernelPair(generic, fast, tuned=False)
    prune = {"early_config_prune": _prune_by_width}
    return KernelPair(
        generic, triton.autotune(_FORWARD_CONFIGS, key=autotune_key, prune_configs_by=prune)(fast), True
    )


def interpreting() -> bool:
    """True when Triton runs on its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 products for fp32 inputs (matches the reference), else tf32 (unused)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(d: int) -> int:
    """Feature tile width: `d` padded to a power of two, at least 16 (the smallest `tl.dot` operand)."""
    if d > 256:
        raise ValueError(f"the Triton dual attention supports head dims up to 256, got d={d}")
    return max(16, triton.next_power_of_2(d))


def fixed_config(kind: str, d: int, dtype: torch.dtype, large: bool = False) -> dict[str, int]:
    """The launch config used without autotuning (all but the large-problem forward).

    Tiles shrink as the head widens so that the fp32 accumulators stay in registers (checked with ptxas
    for sm_90: no spills for fp16/bf16).

    Args:
        kind: `"forward"`, `"dq"` (query-tiled backward) or `"dkdv"` (key-tiled backward).
        d: Head dim.
        dtype: Input dtype.
        large: A large GPU problem (pipelined loads pay off).

    Returns:
        Meta-parameters `BLOCK_N`, `BLOCK_M`, `num_warps`, `num_stages`.
    """
    if interpreting():
        # Small tiles so the CPU tests cross several key chunks, query tiles and splits.
        return {"BLOCK_N": 16, "BLOCK_M": 64, "num_warps": 4, "num_stages": 1}
    width = block_d(d)
    if dtype == torch.float32 or width >= 256:
        block_n, block_m, warps = 32, 32, 4 if width <= 64 else 8
    elif kind == "forward":
        block_n, block_m, warps = 64, 32, 4
    elif kind == "dq":
        block_n, block_m, warps = 64, 32, 4 if width <= 64 else 8
    else:
        block_n, block_m, warps = 64, (64 if width <= 64 else 32), 4 if width <= 64 else 8
    return {"BLOCK_N": block_n, "BLOCK_M": block_m, "num_warps": warps, "num_stages": 2 if large else 1}


def launch(
    kernels: KernelPair,
    kind: str,
    grid: Callable[[dict[str, int]], tuple[int, ...]],
    ref: torch.Tensor,
    *args: Any,
    **constexprs: Any,
) -> None:
    """Launch a kernel: the generic build for small problems, the fast (maybe autotuned) one for large ones.

    Args:
        kernels: The kernel's two builds.
        kind: `"forward"`, `"dq"` or `"dkdv"` (see :func:`fixed_config`).
        grid: Grid as a function of the meta-parameters.
        ref: The query tensor `[B, H, N, d]`; its size, dtype and device pick the build.
        *args: Kernel arguments.
        **constexprs: Compile-time arguments other than the tiles and `PRECISION` (all follow from `ref`).
    """
    constexprs.update(PRECISION=precision(ref.dtype), BLOCK_D=block_d(ref.shape[-1]))
    large = ref.is_cuda and not interpreting() and ref.numel() >= AUTOTUNE_MIN_NUMEL
    device = torch.cuda.device(ref.device) if ref.is_cuda else contextlib.nullcontext()
    with device:
        if large and kernels.tuned:
            kernels.fast[grid](*args, **constexprs)
            return
        meta = fixed_config(kind, ref.shape[-1], ref.dtype, large)
        (kernels.fast if large else kernels.generic)[grid(meta)](*args, **constexprs, **meta)


_FWD = kernel_pair(_dual_attention_fwd_kernel, autotune_key=["N", "M1", "M2", "D"])
_DQ = kernel_pair(_dual_attention_bwd_dq_kernel)
_DKDV = kernel_pair(_dual_attention_bwd_dkdv_kernel)


def _mask_args(mask2: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    # bool -> uint8 view (no copy) so every Triton version loads it as a plain byte; a dummy when absent.
    if mask2 is None:
        return torch.ones(1, dtype=torch.uint8, device=q.device), 0, 0
    m = mask2.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _num_splits(n: int, key_tiles: int, bh: int, device: torch.device) -> tuple[int, int]:
    # Enough (key tile, split, b*h) programs to fill the GPU twice over; splits are SPLIT_ROWS-aligned.
    if device.type == "cuda" and not interpreting():
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        granularity = SPLIT_ROWS
    else:
        programs, granularity = 2 * key_tiles * bh, 16  # two splits on the interpreter, to test the reduction
    splits = max(1, min(triton.cdiv(n, granularity), triton.cdiv(programs, key_tiles * bh)))
    rows = triton.cdiv(triton.cdiv(n, splits), granularity) * granularity
    return triton.cdiv(n, rows), rows


def launch_forward(
    kernels: KernelPair,
    inputs: tuple[torch.Tensor | None, ...],
    scale: float,
    outputs: tuple[torch.Tensor, ...],
    *extra: int,
    **constexprs: Any,
) -> None:
    """Launch a forward kernel, dual attention or the fused MSE: one argument layout, their own outputs.

    Args:
        kernels: `_FWD` or the fused `_MSE_FWD`.
        inputs: `(q, k1, v1, k2, v2, mask2)`, q `[B, H, N, d]`.
        scale: Softmax scale.
        outputs: The kernel's output tensors, in its argument order.
        *extra: Integer arguments after `qk_scale`.
        **constexprs: Compile-time arguments other than `HAS_MASK` and those :func:`launch` adds.
    """
    q, k1, v1, k2, v2, mask2 = inputs
    b, h, n, d = q.shape
    mask, smb, smm = _mask_args(mask2, q)
    launch(
        kernels,
        "forward",
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h),
        q,
        q,
        k1,
        v1,
        k2,
        v2,
        mask,
        *outputs,
        *q.stride(),
        *k1.stride(),
        *v1.stride(),
        *k2.stride(),
        *v2.stride(),
        smb,
        smm,
        h,
        n,
        k1.shape[2],
        k2.shape[2],
        d,
        scale * LOG2E,
        *extra,
        HAS_MASK=mask2 is not None,
        **constexprs,
    )


def launch_dq(
    kernels: KernelPair,
    inputs: tuple[torch.Tensor | None, ...],
    scale: float,
    pointers: tuple[torch.Tensor, ...],
    *strides: int,
    compute_dq: bool,
) -> None:
    """Launch a query-tiled backward kernel (Delta, maybe dQ): dual attention's or the fused MSE's.

    Args:
        kernels: `_DQ` or the fused `_MSE_DQ`.
        inputs: `(q, k2, v2, mask2)`, q `[B, H, N, d]`.
        scale: Softmax scale.
        pointers: The kernel's other tensor arguments, in its order.
        *strides: Strides after the mask's (dual attention: those of dO).
        compute_dq: Whether q needs a gradient.
    """
    q, k2, v2, mask2 = inputs
    b, h, n, d = q.shape
    mask, smb, smm = _mask_args(mask2, q)
    launch(
        kernels,
        "dq",
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h),
        q,
        q,
        k2,
        v2,
        mask,
        *pointers,
        *q.stride(),
        *k2.stride(),
        *v2.stride(),
        smb,
        smm,
        *strides,
        h,
        n,
        k2.shape[2],
        d,
        scale * LOG2E,
        scale,
        HAS_MASK=mask2 is not None,
        COMPUTE_DQ=compute_dq,
    )


def key_value_grads(
    q: torch.Tensor,
    k2: torch.Tensor,
    v2: torch.Tensor,
    mask2: torch.Tensor | None,
    do: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled-by-upstream dK2, dV2 `[B, H, M2, d]` in fp32 from `do` `[B, H, N, d]`, `lse2` and `delta` `[B, H, N]`."""
    b, h, n, d = q.shape
    m2 = k2.shape[2]
    meta_m = fixed_config("dkdv", d, q.dtype)["BLOCK_M"]
    splits, rows = _num_splits(n, triton.cdiv(m2, meta_m), b * h, q.device)
    dk_part = torch.empty((splits, b, h, m2, d), dtype=torch.float32, device=q.device)
    dv_part = torch.empty_like(dk_part)
    mask, smb, smm = _mask_args(mask2, q)
    launch(
        _DKDV,
        "dkdv",
        lambda meta: (triton.cdiv(m2, meta["BLOCK_M"]), splits, b * h),
        q,
        q,
        k2,
        v2,
        mask,
        do,
        lse2,
        delta,
        dk_part,
        dv_part,
        *q.stride(),
        *k2.stride(),
        *v2.stride(),
        smb,
        smm,
        *do.stride(),
        b,
        h,
        n,
        m2,
        d,
        rows,
        scale * LOG2E,
        scale,
        HAS_MASK=mask2 is not None,
    )
    # A fixed-order sum over the splits: deterministic, unlike atomics.
    return dk_part.sum(0), dv_part.sum(0)


class DualAttentionFunction(torch.autograd.Function):
    """Autograd for the Triton dual attention: `o1` is a constant, gradients flow to q, k2, v2 through `o2`."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k1: torch.Tensor,
        v1: torch.Tensor,
        k2: torch.Tensor,
        v2: torch.Tensor,
        mask2: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
            dk, dv = key_value_grads(q, k2, v2, mask2, grad_o2, lse2, delta, scale)
            dk2, dv2 = dk.to(k2.dtype), dv.to(v2.dtype)
        return (dq if need_dq else None), None, None, dk2, dv2, None, None


def apply_checked(
    function: type[torch.autograd.Function], *inputs: torch.Tensor | None, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inputs as the reference does, then run a Triton autograd Function on them.

    Args:
        function: :class:`DualAttentionFunction` or `DualAttentionMSEFunction`.
        *inputs: `q, k1, v1, k2, v2, mask2` (see :func:`xling.kernels.dual_attention`).
        scale: Softmax scale, or None for `1 / sqrt(d)`.

    Returns:
        What `function` returns: `(o1, o2)` or `(o1, loss)`.
    """
    softmax_scale = check_inputs(*inputs, scale)
    block_d(inputs[0].shape[-1])  # the Triton-only limit, d <= 256: fail before anything runs
    return function.apply(*inputs, softmax_scale)
