"""`pip install "packages/xling-adapters[diffusers]"` alone loads a saved adapter of every student kind
(frozen, unfrozen, LoRA: through its merged copy, peft is not installed) and generates an image.

About 40-50 s on 2 cores with a warm uv cache (one venv for the three adapters), so not marked slow.
"""

from __future__ import annotations

import pytest
import torch

from tests import _venv

KINDS = ("frozen", "unfrozen", "lora")

GENERATE = """
import sys
from importlib import metadata
import numpy as np, torch
from diffusers import StableDiffusionPipeline
from xling.adapters import attach

pipe = StableDiffusionPipeline.from_pretrained({sd1!r}, text_encoder=None)
pipe.set_progress_bar_config(disable=True)
for kind in {kinds!r}:
    wrapped = attach(pipe, {adapters!r} + "/" + kind)
    image = wrapped(prompt="一只戴帽子的猫", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    np.save({out!r} + "/" + kind + ".npy", image)
installed = {{d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}}
for name in ("accelerate", "xling-train", "xling-core", "xling-kernels", "xling-losses", "peft"):
    assert name not in installed, name
# (triton is not checked here: torch itself may import it where its wheel pulled it in)
bad = sorted({{m.split(".")[0] for m in sys.modules}} & {{"accelerate", "peft", "xling.train", "xling.core"}})
assert not bad, bad
assert not any(m.startswith(("xling.core", "xling.train", "xling.kernels")) for m in sys.modules)
print("ok")
"""


def _encoders(student):
    """One adapter per student kind, each with weights that differ from the base student's."""
    from xling.adapters import LanguageEncoder, LoraHeadConfig, MLPAdapter, MLPAdapterConfig

    encoders = {}
    for kind in KINDS:
        torch.manual_seed(0)
        head = MLPAdapter(
            MLPAdapterConfig(
                student_width=48, teacher_width=32, teacher_family="sd1", pooled_width=None, hidden_width=16
            )
        )
        lora = LoraHeadConfig() if kind == "lora" else None
        encoder = LanguageEncoder.from_student(student, head, lora=lora)
        if kind == "unfrozen":
            encoder.set_trainable(backbone=True)
        with torch.no_grad():  # a trained student: LoRA B (zero at init) or the student's own weights
            for name, p in encoder.student.named_parameters():
                if ("lora_B" in name) if kind == "lora" else (kind == "unfrozen" and "query" in name):
                    p.normal_(std=0.1)
        encoders[kind] = encoder.eval()
    return encoders


def test_adapters_with_diffusers_extra_alone_generates(tmp_path, tiny_sd1_path, tiny_bert_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # to build the LoRA adapter here; the fresh venv has no peft
    from xling.adapters import attach

    encoders = _encoders(tiny_bert_path)
    for kind, encoder in encoders.items():
        encoder.save_pretrained(tmp_path / "adapters" / kind)

    python = _venv.make_venv(tmp_path / "venv")
    _venv.install(python, "./packages/xling-adapters[diffusers]", workdir=tmp_path)
    graph = _venv.distributions(python)
    through_torch = _venv.pulled_by(graph, "torch")
    for name in _venv.FORBIDDEN:
        # only torch itself may bring triton (PyPI's Linux wheels require it); xling-adapters never does
        assert name not in graph or name in through_torch, f"xling-adapters[diffusers] pulled {name}"
    out = tmp_path / "images"
    out.mkdir()
    script = GENERATE.format(
        sd1=str(tiny_sd1_path), kinds=KINDS, adapters=str(tmp_path / "adapters"), out=str(out)
    )
    assert _venv.run(python, script, cwd=tmp_path).strip().endswith("ok")

    # the fresh environment produced exactly the images of the development environment (peft there)
    import numpy as np

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path, text_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for kind, encoder in encoders.items():
        images[kind] = attach(pipe, encoder)(
            prompt="一只戴帽子的猫",
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        np.testing.assert_allclose(np.load(out / f"{kind}.npy"), images[kind], atol=1e-5)
    # the three students really differ, so each kind's loading path was exercised
    assert not np.allclose(images["frozen"], images["unfrozen"])
    assert not np.allclose(images["frozen"], images["lora"])
