"""The frozen teacher loads every family and encodes exactly as the pipelines' own ``encode_prompt``."""

from __future__ import annotations

import shutil

import pytest
import torch

from xling.core import Teacher, detect_family, missing_components

PROMPTS = ["a red circle on the left", "an astronaut riding a horse on the moon"]


@pytest.mark.parametrize(
    ("fixture", "family", "cross", "pooled"),
    [
        ("tiny_sd1_path", "sd1", 32, None),
        ("tiny_sd2_path", "sd2", 32, None),
        ("tiny_sdxl_path", "sdxl", 64, 32),
    ],
)
def test_family_and_widths(request, fixture, family, cross, pooled):
    path = request.getfixturevalue(fixture)
    assert detect_family(path) == family
    teacher = Teacher.from_pretrained(path)
    assert teacher.family == family
    assert teacher.cross_attention_dim == cross
    assert teacher.pooled_dim == pooled
    assert teacher.resolution == 32  # sample_size 16 x VAE factor 2
    assert teacher.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert type(teacher.scheduler).__name__ == "DDPMScheduler"
    assert teacher.scheduler.config.prediction_type == teacher.inference_scheduler.config.prediction_type
    assert len(teacher.text_encoders) == len(teacher.tokenizers) == (2 if family == "sdxl" else 1)


def _assert_frozen(teacher: Teacher) -> None:
    for name, module in teacher.components.items():
        assert not module.training, name
        assert not any(p.requires_grad for p in module.parameters()), name


def test_everything_frozen_and_in_eval(sd1_teacher, sdxl_teacher):
    _assert_frozen(sd1_teacher)
    _assert_frozen(sdxl_teacher)
    assert set(sdxl_teacher.components) == {"unet", "vae", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize(
    ("path_fixture", "pipe_fixture"), [("tiny_sd1_path", "sd1_pipe"), ("tiny_sd2_path", "sd2_pipe")]
)
def test_sd_encode_equals_pipeline(request, path_fixture, pipe_fixture):
    teacher = Teacher.from_pretrained(request.getfixturevalue(path_fixture))
    pipe = request.getfixturevalue(pipe_fixture)
    cond, uncond = teacher.encode(PROMPTS), teacher.encode_unconditional(len(PROMPTS))
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert cond.prompt_embeds.shape == (2, 77, 32)
    assert cond.pooled_prompt_embeds is None
    assert torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(uncond.prompt_embeds, negative)
    # a real prompt differs from the empty one (the comparison above is not trivially zeros == zeros)
    assert not torch.allclose(cond.prompt_embeds, uncond.prompt_embeds)


def test_sd_clip_skip_and_negative_prompts_equal_pipeline(tiny_sd1_path, sd1_pipe):
    teacher = Teacher.from_pretrained(tiny_sd1_path, clip_skip=1)
    # diffusers 0.42's clip_skip path reads text_encoder.text_model, gone from transformers >= 5.20's CLIPTextModel,
    # so the reference is the pipeline's recipe written out: layer -(clip_skip + 1), then the final LayerNorm.
    encoder = sd1_pipe.text_encoder
    ids = sd1_pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    assert torch.equal(teacher.encode(PROMPTS).prompt_embeds, expected)
    plain = sd1_pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert not torch.allclose(expected, plain)
    # negatives ignore clip_skip in the pipeline; so does the teacher
    _, negative = sd1_pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["blurry", "dark"])
    assert torch.equal(
        teacher.encode_unconditional(negative_prompts=["blurry", "dark"]).prompt_embeds, negative
    )


def test_sdxl_encode_equals_pipeline_with_zeroed_empty_prompt(sdxl_teacher, sdxl_pipe):
    assert sdxl_teacher.force_zeros_for_empty_prompt
    cond, uncond = sdxl_teacher.encode(PROMPTS), sdxl_teacher.encode_unconditional(len(PROMPTS))
    embeds, negative, pooled, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu")
    assert cond.prompt_embeds.shape == (2, 77, 64)  # 32 + 32: both encoders' penultimate states
    assert cond.pooled_prompt_embeds.shape == (2, 32)
    assert torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(cond.pooled_prompt_embeds, pooled)
    assert torch.equal(uncond.prompt_embeds, negative) and not uncond.prompt_embeds.any()
    assert torch.equal(uncond.pooled_prompt_embeds, negative_pooled) and not uncond.pooled_prompt_embeds.any()


def test_sdxl_empty_prompt_encoded_when_not_forced_to_zeros(tiny_sdxl_path, sdxl_pipe):
    teacher = Teacher.from_pretrained(tiny_sdxl_path)
    teacher.force_zeros_for_empty_prompt = False
    sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, negative, _, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu")
    finally:
        sdxl_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    uncond = teacher.encode_unconditional(len(PROMPTS))
    assert uncond.prompt_embeds.abs().sum() > 0
    assert torch.equal(uncond.prompt_embeds, negative)
    assert torch.equal(uncond.pooled_prompt_embeds, negative_pooled)


def test_sdxl_add_time_ids_and_unet_runs(sdxl_teacher):
    ids = sdxl_teacher.add_time_ids(3)
    assert ids.shape == (3, 6)
    assert ids[0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    custom = sdxl_teacher.add_time_ids(1, original_size=(64, 48), crops_coords_top_left=(4, 2))
    assert custom[0].tolist() == [64.0, 48.0, 4.0, 2.0, 32.0, 32.0]
    cond = sdxl_teacher.encode(PROMPTS)
    out = sdxl_teacher.unet(
        torch.randn(2, 4, 16, 16),
        10,
        cond.prompt_embeds,
        added_cond_kwargs=sdxl_teacher.added_cond_kwargs(cond),
    ).sample
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_sd_has_no_added_conditions(sd1_teacher):
    assert sd1_teacher.add_time_ids(2) is None
    assert sd1_teacher.added_cond_kwargs(sd1_teacher.encode(["a"])) is None


def test_encode_images_scaled_latents(sd1_teacher):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = sd1_teacher.encode_images(pixels, sample=False)
    assert latents.shape == (2, 4, 16, 16)
    expected = sd1_teacher.vae.encode(pixels).latent_dist.mode() * sd1_teacher.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(
        sd1_teacher.encode_images(pixels, generator=g1), sd1_teacher.encode_images(pixels, generator=g2)
    )
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        sd1_teacher.encode_images(torch.zeros(1, 3, 31, 32))


def test_dtype_choice_keeps_vae_fp32_when_it_must_upcast(tiny_sd1_path):
    half = Teacher.from_pretrained(tiny_sd1_path, dtype=torch.float16)
    assert half.unet.dtype == half.text_encoders[0].dtype == torch.float16
    assert half.vae.dtype == torch.float32  # force_upcast: the SD VAEs overflow in fp16
    bf16 = Teacher.from_pretrained(tiny_sd1_path, dtype=torch.bfloat16)
    assert bf16.unet.dtype == bf16.vae.dtype == torch.bfloat16
    assert bf16.encode(["a"]).prompt_embeds.dtype == torch.bfloat16
    assert bf16.encode_images(torch.zeros(1, 3, 32, 32)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        Teacher.from_pretrained(tiny_sd1_path, dtype=torch.int8)


def test_missing_components_are_all_listed(tiny_sdxl_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_path, broken, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer"))
    assert missing_components(broken) == ["tokenizer", "text_encoder_2"]
    with pytest.raises(FileNotFoundError, match="missing tokenizer, text_encoder_2"):
        Teacher.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="no diffusers model directory"):
        Teacher.from_pretrained(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"model_index\.json, unet, vae, scheduler, text_encoder, tokenizer"
    ):
        Teacher.from_pretrained(empty)


def test_from_pipeline_matches_from_pretrained(sd2_pipe, tiny_sd2_path):
    wrapped = Teacher.from_pipeline(sd2_pipe)
    assert wrapped.family == "sd2"
    loaded = Teacher.from_pretrained(tiny_sd2_path)
    assert torch.equal(wrapped.encode(PROMPTS).prompt_embeds, loaded.encode(PROMPTS).prompt_embeds)


def test_bad_prompts_rejected(sd1_teacher):
    with pytest.raises(ValueError, match="prompts"):
        sd1_teacher.encode([])
    with pytest.raises(TypeError, match="strings"):
        sd1_teacher.encode(["a", 3])


@pytest.mark.parametrize("fixture", ["sd1_teacher", "sdxl_teacher"])
def test_denoise_is_the_unet_as_the_pipelines_call_it(request, fixture):
    teacher = request.getfixturevalue(fixture)
    prompts = ["a red circle on the left", "a cat wearing a hat"]
    cond = teacher.encode(prompts)
    g = torch.Generator().manual_seed(0)
    side = teacher.resolution // teacher.vae_scale_factor
    z = torch.randn(2, teacher.unet.config.in_channels, side, side, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        expected = teacher.unet(
            z, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=teacher.added_cond_kwargs(cond)
        ).sample
        assert torch.equal(teacher.denoise(z, t, cond), expected)
        # A key padding mask reaches the cross-attention: hiding tokens changes the prediction.
        mask = torch.ones(2, cond.prompt_embeds.shape[1], dtype=torch.long)
        mask[:, 3:] = 0
        assert not torch.allclose(teacher.denoise(z, t, cond, attention_mask=mask), expected)


def test_pooled_is_sdxls_pooled_embedding_or_clips_final_eos_state(sd1_teacher, sdxl_teacher):
    prompts = ["a red circle on the left", "a cat wearing a hat"]
    cond = sdxl_teacher.encode(prompts)
    assert torch.equal(sdxl_teacher.pooled(prompts, cond), cond.pooled_prompt_embeds)
    assert torch.equal(sdxl_teacher.pooled(prompts), cond.pooled_prompt_embeds)
    tokenizer, encoder = sd1_teacher.tokenizers[0], sd1_teacher.text_encoders[0]
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = encoder(ids).pooler_output  # [B, 32]: the [EOS] state after the final LayerNorm
    assert torch.equal(sd1_teacher.pooled(prompts), expected)
