"""Host side of the Triton kernels: builds, tile configs, autotuning, and one launcher per argument layout.

Every kernel is built twice (:class:`KernelPair`): a generic build that does not specialise on sizes and
strides, for small problems and the CPU interpreter, and a fast build for large GPU problems (from
`AUTOTUNE_MIN_NUMEL` query elements on), specialised on them; the forward kernels' fast build is autotuned
over a few tile configs. The kernel modules hold only their kernels and autograd Functions and call the
`launch_*` helpers here, one per argument layout: forward (dual attention and the fused MSE), query-tiled
backward (Delta and dQ, both), key-tiled backward (dK/dV, shared).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton

from xling.kernels._validation import check_inputs

LOG2E = 1.4426950408889634

#: From this many query elements on a GPU, the specialised (forward: autotuned) builds run; below, the generic one.
AUTOTUNE_MIN_NUMEL = 1 << 20

#: Row granularity of the query splits in the dK/dV kernel (a multiple of every BLOCK_N it may use).
SPLIT_ROWS = 128

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


def _input_args(inputs: tuple[torch.Tensor | None, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    # The pointers and strides of `(q, k..., v..., mask2)` in kernel order. The bool mask goes in as a uint8
    # view (no copy) so every Triton version loads it as a plain byte; absent, as a dummy with strides 0.
    *tensors, mask2 = inputs
    if mask2 is None:
        mask, mask_strides = torch.ones(1, dtype=torch.uint8, device=tensors[0].device), (0, 0)
    else:
        mask = mask2.view(torch.uint8)
        mask_strides = mask.stride()
    return (*tensors, mask), (*(s for t in tensors for s in t.stride()), *mask_strides)


def _query_grid(n: int, bh: int) -> Callable[[dict[str, int]], tuple[int, int]]:
    # One program per (query tile, b * h).
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), bh)


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
        kernels: The forward kernel of dual_attention.py or of dual_attention_mse.py.
        inputs: `(q, k1, v1, k2, v2, mask2)`, q `[B, H, N, d]`.
        scale: Softmax scale.
        outputs: The kernel's output tensors, in its argument order.
        *extra: Integer arguments after `qk_scale`.
        **constexprs: Compile-time arguments other than `HAS_MASK` and those :func:`launch` adds.
    """
    q, k1, _, k2, _, mask2 = inputs
    b, h, n, d = q.shape
    pointers, strides = _input_args(inputs)
    args = (*pointers, *outputs, *strides, h, n, k1.shape[2], k2.shape[2], d, scale * LOG2E, *extra)
    launch(kernels, "forward", _query_grid(n, b * h), q, *args, HAS_MASK=mask2 is not None, **constexprs)


def launch_dq(
    kernels: KernelPair,
    inputs: tuple[torch.Tensor | None, ...],
    scale: float,
    others: tuple[torch.Tensor, ...],
    *strides: int,
    compute_dq: bool,
) -> None:
    """Launch a query-tiled backward kernel (Delta, maybe dQ): dual attention's or the fused MSE's.

    Args:
        kernels: The query-tiled backward kernel of dual_attention.py or of dual_attention_mse.py.
        inputs: `(q, k2, v2, mask2)`, q `[B, H, N, d]`.
        scale: Softmax scale.
        others: The kernel's other tensor arguments, in its order.
        *strides: Strides after the mask's (dual attention: those of dO).
        compute_dq: Whether q needs a gradient.
    """
    q, k2, _, mask2 = inputs
    b, h, n, d = q.shape
    pointers, input_strides = _input_args(inputs)
    args = (*pointers, *others, *input_strides, *strides, h, n, k2.shape[2], d, scale * LOG2E, scale)
    launch(kernels, "dq", _query_grid(n, b * h), q, *args, HAS_MASK=mask2 is not None, COMPUTE_DQ=compute_dq)


def launch_dkdv(
    kernels: KernelPair,
    inputs: tuple[torch.Tensor | None, ...],
    do: torch.Tensor,
    lse2: torch.Tensor,
    delta: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the key-tiled backward kernel over query splits and sum its fp32 partials.

    Args:
        kernels: The dK/dV kernel of dual_attention.py (shared by both autograd Functions).
        inputs: `(q, k2, v2, mask2)`, q `[B, H, N, d]`, k2 and v2 `[B, H, M2, d]`.
        do: Gradient of `o2` `[B, H, N, d]` (the fused MSE passes it unscaled by the upstream gradient).
        lse2: Base-2 log-sum-exp of branch 2 `[B, H, N]`, fp32.
        delta: `rowsum(do * o2)` `[B, H, N]`, fp32.
        scale: Softmax scale.

    Returns:
        `(dk2, dv2)`, each `[B, H, M2, d]` in fp32.
    """
    q, k2, _, mask2 = inputs
    b, h, n, d = q.shape
    m2 = k2.shape[2]
    meta_m = fixed_config("dkdv", d, q.dtype)["BLOCK_M"]
    splits, rows = _num_splits(n, triton.cdiv(m2, meta_m), b * h, q.device)
    dk_part = torch.empty((splits, b, h, m2, d), dtype=torch.float32, device=q.device)
    dv_part = torch.empty_like(dk_part)
    pointers, strides = _input_args(inputs)
    args = (*pointers, do, lse2, delta, dk_part, dv_part, *strides, *do.stride(), b, h, n, m2, d, rows)

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:  # one program per (key tile, split, b * h)
        return triton.cdiv(m2, meta["BLOCK_M"]), splits, b * h

    launch(kernels, "dkdv", grid, q, *args, scale * LOG2E, scale, HAS_MASK=mask2 is not None)
    # A fixed-order sum over the splits: deterministic, unlike atomics.
    return dk_part.sum(0), dv_part.sum(0)


def checked_scale(*inputs: torch.Tensor | None, scale: float | None) -> float:
    """Validate an autograd Function's inputs as the reference does, plus the Triton-only limit `d <= 256`.

    Args:
        *inputs: `q, k1, v1, k2, v2, mask2` (see :func:`xling.kernels.dual_attention`).
        scale: Softmax scale, or None for `1 / sqrt(d)`.

    Returns:
        The softmax scale to use.
    """
    softmax_scale = check_inputs(*inputs, scale)
    block_d(inputs[0].shape[-1])  # fail before anything is allocated or launched
    return softmax_scale
