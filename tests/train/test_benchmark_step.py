"""Keeps benchmarks/train/bench_iap_step.py running: one tiny step of each method on the tiny SD1 fixture."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train" / "bench_iap_step.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_iap_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_iap_step_runs_on_tiny_teacher(tiny_sd1_path: Path, tmp_path: Path) -> None:
    # The reference attention: the fused kernel under the Triton CPU interpreter costs ~50 s here, and
    # tests/kernels already checks it against this reference.
    bench = _load()
    out = tmp_path / "result.json"
    argv = ["--teacher", str(tiny_sd1_path), "--device", "cpu", "--batch-size", "2", "--text-len", "8"]
    argv += ["--student-width", "32", "--student-layers", "1", "--iters", "1", "--warmup", "0"]
    argv += ["--attention", "reference", "--json", str(out)]
    info = bench.main(argv)
    assert json.loads(out.read_text())["batch"] == 2
    methods = {r["method"]: r for r in info["results"]}
    assert set(methods) == {"pivot", "naive"}
    assert info["cross_attention_layers"] > 0
    for result in methods.values():
        assert result["samples_per_s"] > 0 and result["loss"] > 0
    assert info["speedup"] > 0 and "| pivot |" in bench.markdown(info)


@pytest.mark.parametrize("family", ["pixart", "sana", "sd3", "flux"])
def test_bench_iap_step_runs_on_each_transformer_family(family: str) -> None:
    bench = _load()
    argv = ["--family", family, "--device", "cpu", "--batch-size", "1", "--text-len", "8"]
    argv += ["--student-width", "32", "--student-layers", "1", "--iters", "1", "--warmup", "0"]
    argv += ["--attention", "reference"]
    info = bench.main(argv)
    methods = {r["method"]: r for r in info["results"]}
    assert set(methods) == {"pivot", "naive"} and info["config"] == f"{family} (cpu)"
    # every attn2 (PixArt, Sana: 4 blocks) or every joint block (SD3: 4; Flux: 2 double + 2 single)
    assert info["cross_attention_layers"] == 4
    for result in methods.values():
        assert result["samples_per_s"] > 0 and result["loss"] > 0


def test_bench_iap_step_runs_on_the_toy_mmdit_teacher() -> None:
    """``--config toy-mmdit``: the committed toy MMDiT transformer, its 17-token prompt, the toy student."""
    bench = _load()
    argv = ["--config", "toy-mmdit", "--device", "cpu", "--batch-size", "1", "--text-len", "8"]
    argv += ["--iters", "1", "--warmup", "0", "--attention", "reference"]
    info = bench.main(argv)
    assert info["config"] == "toy-mmdit" and info["latent"] == "3x32x32"
    assert info["cross_attention_layers"] == 4  # every joint block of the toy teacher
    for result in info["results"]:
        assert result["samples_per_s"] > 0 and result["loss"] > 0
