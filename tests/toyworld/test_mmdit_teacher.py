"""The committed toy MMDiT teacher (``toy-mmdit``): format, components, the zero T5 tokens, sampling, a small
accuracy check, and the script that trains it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xling.train import toyworld as tw
from xling.train.toyworld import mmdit

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_toy_mmdit_teacher.py"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    # T5 is dropped: diffusers loads such a folder only when told so, as its SD3 docs show.
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tw.mmdit_teacher_path(), text_encoder_3=None, tokenizer_3=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_committed_teacher_is_small_safetensors_only() -> None:
    files = [p for p in tw.mmdit_teacher_path().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 12 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert {p.parent.name for p in weights} == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert all(p.suffix == ".safetensors" for p in weights)
    index = json.loads((tw.mmdit_teacher_path() / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == index["tokenizer_3"] == [None, None]


def test_teacher_components(pipe) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    assert isinstance(pipe.transformer, SD3Transformer2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (pipe.text_encoder, pipe.text_encoder_2))
    config = pipe.transformer.config
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert config.joint_attention_dim == widths  # the CLIP states side by side fill the joint width
    projections = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert config.pooled_projection_dim == projections
    assert (config.sample_size // config.patch_size) ** 2 == 64  # image tokens
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.scaling_factor == 1.0
    for word in tw.english_words():  # the UNet teacher's tokenizer: every grammar word is one token
        assert len(pipe.tokenizer.tokenize(word)) == 1, word


def test_prompt_is_clip_then_the_zero_t5_tokens(pipe) -> None:
    embeds, _, pooled, _ = pipe.encode_prompt(
        ["a red circle on the left"],
        None,
        None,
        device="cpu",
        do_classifier_free_guidance=False,
        **mmdit.PIPELINE_KWARGS,
    )
    length = pipe.tokenizer.model_max_length
    assert embeds.shape == (1, length + mmdit.T5_TOKENS, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert torch.count_nonzero(embeds[:, length:]) == 0 and torch.count_nonzero(embeds[:, :length]) > 0


def test_generate_shape_and_prompt_embeds_path(pipe) -> None:
    prompts = ["a red circle on the left", "a blue triangle at the top"]
    call = mmdit.PIPELINE_KWARGS
    images = tw.generate(pipe, prompts=prompts, seeds=[0, 1], steps=2, call_kwargs=call)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, None, None, device="cpu", **call)
    again = tw.generate(
        pipe,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        seeds=[0, 1],
        steps=2,
        call_kwargs={"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled},
    )
    assert np.abs(images.astype(int) - again.astype(int)).max() <= 1  # the public door gives the same images


def test_teacher_follows_the_caption(pipe) -> None:
    # Four scenes using every position and shape; the full measurement (every scene x 4 seeds) is in
    # docs/toyworld.md.
    scenes = [
        tw.Scene((tw.Obj(c, s, p),))
        for c, s, p in (
            ("red", "circle", "left"),
            ("green", "square", "top"),
            ("blue", "triangle", "right"),
            ("yellow", "square", "bottom"),
        )
    ]
    acc, images = tw.evaluate_teacher(pipe, scenes, seeds=[0], call_kwargs=mmdit.PIPELINE_KWARGS)
    assert images.shape == (4, 32, 32, 3)
    assert acc["all"] >= 0.75, acc


def test_training_script_writes_a_loadable_pipeline(tmp_path) -> None:
    """Two steps of the training script on 4 images: the folder it writes is the committed teacher's format."""
    from diffusers import StableDiffusion3Pipeline

    spec = importlib.util.spec_from_file_location("train_toy_mmdit_teacher", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "teacher"
    threads = torch.get_num_threads()
    try:
        script.main(
            [
                "--out",
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--renders-per-scene",
                "2",
                "--layers",
                "1",
                "--eval-seeds",
                "0",
                "--device",
                "cpu",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    log = json.loads((tmp_path / "teacher_log.json").read_text())
    assert log["steps"] == 2 and np.isfinite(log["log"][0]["loss"])
    loaded = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert loaded.transformer.config.num_layers == 1
    committed = json.loads((tw.mmdit_teacher_path() / "model_index.json").read_text())
    assert json.loads((out / "model_index.json").read_text()).keys() == committed.keys()
    assert not list(out.rglob("*.bin"))
