"""attach(): Chinese prompts through SD-1 / SDXL pipelines via prompt_embeds only; UNet LoRA, ControlNet, LCM."""

from __future__ import annotations

import pytest
import torch

from xling.adapters import (
    LanguageEncoder,
    LinearHead,
    LinearHeadConfig,
    MLPAdapter,
    MLPAdapterConfig,
    WidthMismatchError,
    attach,
)

diffusers = pytest.importorskip("diffusers")

CAT = "一只戴帽子的猫"
RUN = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def sd1_pipe(tiny_sd1_path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_path):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd1_encoder(tiny_bert_path):
    torch.manual_seed(0)
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=48, teacher_width=32, teacher_family="sd1", pooled_width=None, hidden_width=16
        )
    )
    return LanguageEncoder.from_student(tiny_bert_path, head).eval()


@pytest.fixture(scope="module")
def sdxl_encoder(tiny_xlmr_path):
    torch.manual_seed(0)
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=40, teacher_width=64, teacher_family="sdxl", pooled_width=32, hidden_width=16
        )
    )
    return LanguageEncoder.from_student(tiny_xlmr_path, head).eval()


def test_sd1_prompt_equals_prompt_embeds_by_hand(sd1_pipe, sd1_encoder):
    wrapped = attach(sd1_pipe, sd1_encoder)
    image = wrapped(prompt=CAT, generator=_gen(), **RUN).images
    with torch.no_grad():
        out = sd1_encoder([CAT, ""])  # the pipelines' default negative prompt is ""
    by_hand = sd1_pipe(
        prompt_embeds=out.prompt_embeds[:1],
        negative_prompt_embeds=out.prompt_embeds[1:],
        generator=_gen(),
        **RUN,
    ).images
    assert image.shape == (1, 32, 32, 3)
    assert (image == by_hand).all()
    # the prompt matters
    other = wrapped(prompt="水墨画中的山和河", generator=_gen(), **RUN).images
    assert not (other == image).all()


def test_sd1_negative_prompt_long_prompt_and_batch(sd1_pipe, sd1_encoder):
    wrapped = attach(sd1_pipe, sd1_encoder)
    long_prompt = (
        "一张小狗在海滩上奔跑的照片，" * 4
    )  # several windows; the negative is padded to the same shape
    kwargs = wrapped.encode_prompt([long_prompt, CAT], negative_prompt="日落时飞过长城的龙")
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape
    assert kwargs["prompt_embeds"].shape[1] > 32
    images = wrapped(
        prompt=[long_prompt, CAT], negative_prompt="日落时飞过长城的龙", generator=_gen(), **RUN
    ).images
    assert images.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="negative_prompt"):
        wrapped.encode_prompt([CAT, CAT], negative_prompt=["a", "b", "c"])
    with pytest.raises(TypeError, match="not both"):
        wrapped(prompt=CAT, prompt_embeds=kwargs["prompt_embeds"])


def test_sdxl_prompt_equals_prompt_embeds_by_hand(sdxl_pipe, sdxl_encoder):
    wrapped = attach(sdxl_pipe, sdxl_encoder)
    assert (wrapped.cross_attention_dim, wrapped.needs_pooled, wrapped.pooled_width) == (64, True, 32)
    image = wrapped(prompt=CAT, generator=_gen(), **RUN).images
    with torch.no_grad():
        out = sdxl_encoder([CAT])
    # force_zeros_for_empty_prompt: with no negative prompt the SDXL pipeline uses zeros, and so does attach
    by_hand = sdxl_pipe(
        prompt_embeds=out.prompt_embeds,
        pooled_prompt_embeds=out.pooled_prompt_embeds,
        negative_prompt_embeds=torch.zeros_like(out.prompt_embeds),
        negative_pooled_prompt_embeds=torch.zeros_like(out.pooled_prompt_embeds),
        generator=_gen(),
        **RUN,
    ).images
    assert (image == by_hand).all()
    with_negative = wrapped(prompt=CAT, negative_prompt="下面的黄色圆形", generator=_gen(), **RUN).images
    assert not (with_negative == image).all()


def test_width_mismatch_fails_at_attach(sd1_pipe, sdxl_pipe, sd1_encoder, sdxl_encoder):
    with pytest.raises(WidthMismatchError, match=r"teacher_width 64 != unet\.config\.cross_attention_dim 32"):
        attach(sd1_pipe, sdxl_encoder)
    with pytest.raises(WidthMismatchError) as err:
        attach(sdxl_pipe, sd1_encoder)
    assert "teacher_width 32 != unet.config.cross_attention_dim 64" in str(err.value)
    assert "no pooled output" in str(err.value)


def test_attach_a_saved_adapter_directory(sd1_pipe, sd1_encoder, tmp_path, tiny_xlmr_path):
    sd1_encoder.save_pretrained(tmp_path / "ad")
    from_dir = attach(sd1_pipe, tmp_path / "ad")
    expected = attach(sd1_pipe, sd1_encoder)(prompt=CAT, generator=_gen(), **RUN).images
    assert (from_dir(prompt=CAT, generator=_gen(), **RUN).images == expected).all()
    # a head of other widths fails at load time, naming the widths
    head = LinearHead(LinearHeadConfig(student_width=40, teacher_width=48))
    LanguageEncoder.from_student(tiny_xlmr_path, head).save_pretrained(tmp_path / "wrong")
    with pytest.raises(WidthMismatchError, match=r"teacher_width 48 != unet\.config\.cross_attention_dim 32"):
        attach(sd1_pipe, tmp_path / "wrong")


def test_unet_lora_still_applies(tiny_sd1_path, sd1_encoder, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    # a LoRA for the tiny UNet, saved the way diffusers' training scripts save one
    torch.manual_seed(1)
    trainer = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path)
    trainer.unet.add_adapter(
        peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    state = diffusers.utils.convert_state_dict_to_diffusers(get_peft_model_state_dict(trainer.unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=state)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path)
    pipe.set_progress_bar_config(disable=True)
    wrapped = attach(pipe, sd1_encoder)
    plain = wrapped(prompt=CAT, generator=_gen(), **RUN).images
    wrapped.load_lora_weights(tmp_path / "lora")  # forwarded to the pipeline
    with_lora = wrapped(prompt=CAT, generator=_gen(), **RUN).images
    assert not (with_lora == plain).all()
    by_hand = pipe(**wrapped.encode_prompt(CAT), generator=_gen(), **RUN).images
    assert (with_lora == by_hand).all()


def test_controlnet_pipeline_runs_with_the_encoder(tiny_sd1_path, sd1_pipe, sd1_encoder):
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel.from_unet(
        sd1_pipe.unet, conditioning_embedding_out_channels=(8, 16)
    )
    pipe = diffusers.StableDiffusionControlNetPipeline(**sd1_pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    wrapped = attach(pipe, sd1_encoder)
    control = torch.rand(1, 3, 32, 32)
    image = wrapped(prompt=CAT, image=control, generator=_gen(), **RUN).images
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    by_hand = pipe(**wrapped.encode_prompt(CAT), image=control, generator=_gen(), **RUN).images
    assert (image == by_hand).all()


def test_swapped_scheduler_lcm(sd1_pipe, sd1_encoder):
    wrapped = attach(sd1_pipe, sd1_encoder)
    original = sd1_pipe.scheduler
    try:
        wrapped.scheduler = diffusers.LCMScheduler.from_config(original.config)  # set on the pipeline
        assert isinstance(sd1_pipe.scheduler, diffusers.LCMScheduler)
        image = wrapped(prompt=CAT, generator=_gen(), guidance_scale=1.0, **RUN).images
        assert image.shape == (1, 32, 32, 3)
    finally:
        sd1_pipe.scheduler = original


def test_sdxl_without_english_text_encoders(tiny_sdxl_path, sdxl_pipe, sdxl_encoder):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_path, text_encoder=None, text_encoder_2=None
    )
    pipe.set_progress_bar_config(disable=True)
    wrapped = attach(pipe, sdxl_encoder)  # the pooled width is then read off the UNet's added conditions
    assert wrapped.pooled_width == 32
    image = wrapped(prompt=CAT, generator=_gen(), **RUN).images
    assert (image == attach(sdxl_pipe, sdxl_encoder)(prompt=CAT, generator=_gen(), **RUN).images).all()
