"""Each light package installs alone into a fresh venv and pulls in only what DESIGN.md allows."""

from __future__ import annotations

import pytest

from tests import _venv

pytestmark = pytest.mark.slow

LOSSES_SMOKE = """
import torch, xling.losses as L
missing = [name for name in L.__all__ if not hasattr(L, name)]
assert not missing, missing
t, s = torch.randn(2, 4, 8, 5), torch.randn(2, 4, 8, 5, requires_grad=True)
total, logs = L.weighted_sum({"attn": L.attention_mse([(t, s)]), "cos": L.cosine_alignment(s[:, 0], t[:, 0])})
total.backward()
assert s.grad is not None and set(logs) >= {"attn", "cos"}
import sys
assert not any(m.split(".")[0] in ("transformers", "diffusers", "accelerate", "triton") for m in sys.modules)
print("ok")
"""

ADAPTERS_SMOKE = """
import sys, torch, xling.adapters as A
missing = [name for name in A.__all__ if not hasattr(A, name)]
assert not missing, missing
assert not any(m.split(".")[0] in ("transformers", "diffusers", "peft", "accelerate", "triton") for m in sys.modules)
print("ok")
"""


def _install_alone(tmp_path, requirement: str, dist: str) -> _venv.Path:
    python = _venv.make_venv(tmp_path / "venv")
    _venv.install(python, requirement, workdir=tmp_path)
    graph = _venv.distributions(python)
    assert dist in graph, sorted(graph)
    allowed_through_torch = _venv.pulled_by(graph, "torch")
    for name in _venv.FORBIDDEN:
        if name in graph:
            # Only torch itself may bring triton (PyPI's Linux wheels require it); xling never does.
            assert name in allowed_through_torch, f"{dist} pulled {name}: {sorted(graph)}"
            assert (
                name
                not in _venv.pulled_by(graph, dist, stop_at=("torch",)) - {"torch"} - allowed_through_torch
            )
    return python


def test_losses_installs_alone_with_torch_and_einops(tmp_path):
    python = _install_alone(tmp_path, "./packages/xling-losses", "xling-losses")
    graph = _venv.distributions(python)
    assert _venv.pulled_by(graph, "xling-losses", stop_at=("torch",)) == {"xling-losses", "torch", "einops"}
    assert _venv.run(python, LOSSES_SMOKE, cwd=tmp_path).strip() == "ok"


def test_adapters_installs_alone_and_imports_without_extras(tmp_path):
    python = _install_alone(tmp_path, "./packages/xling-adapters", "xling-adapters")
    graph = _venv.distributions(python)
    # huggingface_hub resolves Hub repo ids and pushes; what it pulls in is its own business.
    assert _venv.pulled_by(graph, "xling-adapters", stop_at=("torch", "huggingface-hub")) == {
        "xling-adapters",
        "torch",
        "safetensors",
        "einops",
        "huggingface-hub",
    }
    assert _venv.run(python, ADAPTERS_SMOKE, cwd=tmp_path).strip() == "ok"
