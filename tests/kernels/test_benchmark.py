"""pytest-benchmark suite: Triton dual attention vs two SDPA calls (and the fused MSE vs SDPA + mse_loss).

Skipped by the default `--benchmark-skip`; run with `uv run pytest tests/kernels --benchmark-only`. On a GPU it
times the SD1.5 / SDXL layer shapes at batch 16; on a CPU the tiny shapes (Triton rows on the interpreter).
Shapes, callables and byte counts come from benchmarks/kernels/bench_dual_attention.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from xling.kernels import use_triton


def _load_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_dual_attention.py"
    spec = importlib.util.spec_from_file_location("bench_dual_attention", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
SHAPES = bench.SD_SHAPES if CUDA else bench.SMALL_SHAPES[:1]


@pytest.mark.parametrize("impl", list(bench.IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name.replace(" ", "-") for s in SHAPES])
def test_dual_attention_speed(benchmark: Any, shape: Any, impl: str) -> None:
    is_triton, baseline, _ = bench.IMPLS[impl]
    inputs = bench.make_inputs(shape, DTYPE, DEVICE)
    if is_triton and not use_triton(inputs[0]):
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
    fn = bench.make_callable(impl, inputs)
    benchmark.group = f"{shape.label} {'fwd+bwd' if impl.endswith('fwd+bwd') else 'fwd'}"
    if CUDA:
        fn()  # compile / autotune outside the timed rounds
        benchmark.pedantic(fn, rounds=20, iterations=5, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=1)
    nbytes = bench.traffic_bytes(impl, shape, DTYPE)
    benchmark.extra_info.update(impl=impl, baseline=baseline, bytes=nbytes, dtype=str(DTYPE), device=DEVICE)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = round(nbytes / benchmark.stats.stats.median / 1e9, 1)
