"""The committed toy teacher: format, tokenizer, identity VAE, sampling and a small accuracy smoke check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xling.train import toyworld as tw


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tw.teacher_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_committed_teacher_is_small_safetensors_only() -> None:
    files = [p for p in tw.teacher_path().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert {p.parent.name for p in weights} == {"unet", "text_encoder", "vae"}
    assert all(p.suffix == ".safetensors" for p in weights)


def test_teacher_components(pipe) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr
    # Every word of the English grammar is one token of the real CLIP BPE.
    for word in tw.english_words():
        assert len(pipe.tokenizer.tokenize(word)) == 1, word
    assert (tw.teacher_path() / "tokenizer" / "merges.txt").is_file()


def test_identity_vae_round_trip(pipe) -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for vae in (pipe.vae, tw.build_identity_vae()):
            z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            torch.testing.assert_close(z, x, atol=1e-4, rtol=0)
            torch.testing.assert_close(vae.decode(z / vae.config.scaling_factor).sample, x, atol=1e-4, rtol=0)


def test_generate_shape_and_prompt_embeds_path(pipe) -> None:
    prompts = ["a red circle on the left", "a blue triangle at the top"]
    images = tw.generate(pipe, prompts=prompts, seeds=[0, 1], steps=2)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
    again = tw.generate(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative, seeds=[0, 1], steps=2)
    assert np.abs(images.astype(int) - again.astype(int)).max() <= 1  # the public door gives the same images
    with pytest.raises(ValueError, match="seeds"):
        tw.generate(pipe, prompts=prompts, seeds=[0], steps=3)


def test_teacher_follows_the_caption(pipe) -> None:
    # Four scenes that between them use every position, several colours and every shape; the full
    # measurement (every scene x 4 seeds) is in docs/toyworld.md.
    scenes = [
        tw.Scene((tw.Obj(c, s, p),))
        for c, s, p in (
            ("red", "circle", "left"),
            ("green", "square", "top"),
            ("blue", "triangle", "right"),
            ("yellow", "square", "bottom"),
        )
    ]
    acc, images = tw.evaluate_teacher(pipe, scenes, seeds=[0], steps=10)  # 10 steps keeps CI cheap
    assert images.shape == (4, 32, 32, 3)
    assert acc["all"] >= 0.75, acc
