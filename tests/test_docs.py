"""The user docs keep up with the code: every data option is in docs/data.md, every recipe output in
docs/inference.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from xling.train.config import DataConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_data_option_is_documented():
    text = (DOCS / "data.md").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(DataConfig) if f"data.{f.name}" not in text]
    assert not missing, f"docs/data.md does not mention data.{', data.'.join(missing)}"


def test_every_recipe_output_has_its_inference_section():
    text = (DOCS / "inference.md").read_text(encoding="utf-8")
    # What TrainStep.save and DenoiseStep.save write next to the run (see their docstrings).
    for name in ("adapter/", "cross_attention_kv.safetensors", "unet/"):
        assert name in text, f"docs/inference.md does not say how to use {name}"
    assert "attn2.to_k" in text and "attn2.to_v" in text  # which UNet weights the kv file replaces
