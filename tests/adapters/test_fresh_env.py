"""`pip install "packages/xling-adapters[diffusers]"` alone loads a saved adapter and generates an image.

About 35-45 s on 2 cores with a warm uv cache, so not marked slow.
"""

from __future__ import annotations

import pytest
import torch

from tests import _venv

GENERATE = """
import sys
from importlib import metadata
import numpy as np, torch
from diffusers import StableDiffusionPipeline
from xling.adapters import attach

pipe = StableDiffusionPipeline.from_pretrained({sd1!r}, text_encoder=None)
pipe.set_progress_bar_config(disable=True)
wrapped = attach(pipe, {adapter!r})
image = wrapped(prompt="一只戴帽子的猫", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
np.save({out!r}, image)
installed = {{d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}}
for name in ("accelerate", "xling-train", "xling-core", "xling-kernels", "xling-losses", "peft"):
    assert name not in installed, name
# (triton is not checked here: torch itself may import it where its wheel pulled it in)
bad = sorted({{m.split(".")[0] for m in sys.modules}} & {{"accelerate", "peft", "xling.train", "xling.core"}})
assert not bad, bad
assert not any(m.startswith(("xling.core", "xling.train", "xling.kernels")) for m in sys.modules)
print("ok")
"""


def test_adapters_with_diffusers_extra_alone_generates(tmp_path, tiny_sd1_path, tiny_bert_path):
    diffusers = pytest.importorskip("diffusers")
    from xling.adapters import LanguageEncoder, MLPAdapter, MLPAdapterConfig, attach

    torch.manual_seed(0)
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=48, teacher_width=32, teacher_family="sd1", pooled_width=None, hidden_width=16
        )
    )
    encoder = LanguageEncoder.from_student(tiny_bert_path, head).eval()
    encoder.save_pretrained(tmp_path / "adapter")

    python = _venv.make_venv(tmp_path / "venv")
    _venv.install(python, "./packages/xling-adapters[diffusers]", workdir=tmp_path)
    graph = _venv.distributions(python)
    through_torch = _venv.pulled_by(graph, "torch")
    for name in _venv.FORBIDDEN:
        # only torch itself may bring triton (PyPI's Linux wheels require it); xling-adapters never does
        assert name not in graph or name in through_torch, f"xling-adapters[diffusers] pulled {name}"
    out = tmp_path / "image.npy"
    script = GENERATE.format(sd1=str(tiny_sd1_path), adapter=str(tmp_path / "adapter"), out=str(out))
    assert _venv.run(python, script, cwd=tmp_path).strip().endswith("ok")

    # the fresh environment produced exactly the image of the development environment
    import numpy as np

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    expected = attach(pipe, encoder)(
        prompt="一只戴帽子的猫",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
