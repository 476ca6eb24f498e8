"""xling-kernels installs alone into a fresh venv and its kernels run there on Triton's CPU interpreter.

Without numpy, ``import triton`` fails under ``TRITON_INTERPRET=1`` (the interpreter imports it), so
``HAS_TRITON`` would be False and every call would quietly take the reference; the package declares numpy on
Linux so that this cannot happen.
"""

from __future__ import annotations

import sys

import pytest

from tests import _venv

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="triton is Linux-only"),
]

INTERPRETER_SMOKE = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch, xling.kernels as xk
assert xk.HAS_TRITON, "triton failed to import"
q, k1, v1, k2, v2 = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(5))
assert xk.use_triton(q)
import xling.kernels.ops as ops
calls = []
kernel = ops.dual_attention_triton
ops.dual_attention_triton = lambda *a: calls.append(1) or kernel(*a)
o1, o2 = xk.dual_attention(q, k1, v1, k2, v2)
r1, r2 = xk.dual_attention_reference(q, k1, v1, k2, v2)
assert calls == [1], "the Triton path was not taken"
assert torch.allclose(o2, r2, atol=1e-4) and torch.allclose(o1, r1, atol=1e-4)
print("ok")
"""


def test_kernels_install_alone_and_run_on_the_interpreter(tmp_path):
    python = _venv.make_venv(tmp_path / "venv")
    _venv.install(python, "./packages/xling-kernels", workdir=tmp_path)
    graph = _venv.distributions(python)
    pulled = _venv.pulled_by(graph, "xling-kernels", stop_at=("torch",))
    assert {"torch", "triton", "numpy"} <= pulled, sorted(pulled)
    assert not pulled & {"xling-core", "xling-train", "accelerate", "transformers"}, sorted(pulled)
    assert _venv.run(python, INTERPRETER_SMOKE, cwd=tmp_path).strip() == "ok"
