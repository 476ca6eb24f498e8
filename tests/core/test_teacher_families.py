"""The teacher of PixArt-α/Σ, Sana, SD3 and Flux encodes, noises and denoises exactly as their pipelines do.

Every reference here is the diffusers pipeline itself (its ``encode_prompt``) or the denoiser call written out
by hand from the pipeline's sampling loop, on the tiny fixtures of :mod:`tests._families`.
"""

from __future__ import annotations

import inspect
import shutil

import pytest
import torch
from torch.testing import assert_close

from xling.core import (
    CROSS_ATTENTION_DIT_FAMILIES,
    FLOW_FAMILIES,
    MMDIT_FAMILIES,
    UNET_FAMILIES,
    Conditioning,
    Teacher,
    detect_family,
    missing_components,
)

# Mixed case and stray spaces: PixArt / Sana lower-case and strip (clean_caption=False), the others do not.
PROMPTS = ["  A Red Circle on the left", "an astronaut riding a horse on the moon"]
NEGATIVE = ["blurry", "dark"]
FAMILY_FIXTURES = {
    "pixart": "tiny_pixart_path",
    "pixart_sigma": "tiny_pixart_sigma_path",
    "sana": "tiny_sana_path",
    "sd3": "tiny_sd3_path",
    "flux": "tiny_flux_path",
}
PIPELINES = {
    "pixart": "PixArtAlphaPipeline",
    "pixart_sigma": "PixArtSigmaPipeline",
    "sana": "SanaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@pytest.fixture(scope="module")
def loaded(request):
    """``name -> (pipeline, teacher)``, each loaded once from its saved directory."""
    import diffusers

    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = request.getfixturevalue(FAMILY_FIXTURES[name])
            pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(path)
            pipe.set_progress_bar_config(disable=True)
            cache[name] = (pipe, Teacher.from_pretrained(path), path)
        return cache[name]

    return get


def _sana_instruction() -> list[str]:
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


@pytest.mark.parametrize("name", list(FAMILY_FIXTURES))
def test_fixture_pipelines_generate(loaded, name):
    """The tiny pipelines are complete: the diffusers pipeline itself makes 32x32 images from them."""
    pipe, _, path = loaded(name)
    assert not list(path.rglob("*.bin")) and list(path.rglob("*.safetensors"))
    kwargs = {"use_resolution_binning": False} if name in ("pixart", "pixart_sigma", "sana") else {}
    generator = torch.Generator().manual_seed(0)
    images = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=generator,
        **kwargs,
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_family_constants():
    assert set(UNET_FAMILIES) == {"sd1", "sd2", "sdxl"}
    assert CROSS_ATTENTION_DIT_FAMILIES == ("pixart", "sana")
    assert MMDIT_FAMILIES == ("sd3", "flux")
    assert FLOW_FAMILIES == ("sana", "sd3", "flux")


# name, family, D, P, L, resolution, scheduler class
FACTS = [
    ("pixart", "pixart", 32, None, 120, 32, "DDPMScheduler"),
    ("pixart_sigma", "pixart", 32, None, 300, 32, "DDPMScheduler"),
    ("sana", "sana", 16, None, 300, 32, "FlowMatchEulerDiscreteScheduler"),
    ("sd3", "sd3", 48, 32, 77 + 256, 32, "FlowMatchEulerDiscreteScheduler"),
    # the tiny Flux records sample_size 16 (the real one has none: see test_flux_resolution_without_sample_size)
    ("flux", "flux", 40, 20, 512, 32, "FlowMatchEulerDiscreteScheduler"),
]


@pytest.mark.parametrize(("name", "family", "dim", "pooled", "length", "resolution", "scheduler"), FACTS)
def test_loads_frozen_with_the_family_facts(loaded, name, family, dim, pooled, length, resolution, scheduler):
    pipe, teacher, path = loaded(name)
    assert detect_family(path) == family
    assert teacher.family == family and f"family={family!r}" in repr(teacher)
    assert teacher.unet is teacher.denoiser  # code written for UNets (PivotTap(teacher.unet)) keeps working
    assert type(teacher.denoiser).__name__ == type(pipe.transformer).__name__
    assert set(teacher.components) == {"transformer", "vae"} | {
        n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None
    }
    for part, module in teacher.components.items():
        assert not module.training, part
        assert not any(p.requires_grad for p in module.parameters()), part
    assert teacher.cross_attention_dim == dim
    assert teacher.pooled_dim == pooled
    assert teacher.max_length == length
    assert teacher.resolution == resolution
    assert teacher.latent_channels == 4 and teacher.vae_scale_factor == 2
    assert teacher.num_train_timesteps == 1000
    assert type(teacher.scheduler).__name__ == scheduler
    assert teacher.is_mmdit == (family in MMDIT_FAMILIES)
    assert teacher.flow_matching == (family in FLOW_FAMILIES)
    assert teacher.needs_attention_mask == (family in CROSS_ATTENTION_DIT_FAMILIES)
    assert teacher.prediction_type == ("flow" if family in FLOW_FAMILIES else "epsilon")
    if name == "sana":
        assert type(teacher.vae).__name__ == "AutoencoderDC"
        # the DPM-Solver flow scheduler's flow_shift becomes the training scheduler's shift
        assert teacher.scheduler.config.shift == pipe.scheduler.config.flow_shift == 3.0


def test_flux_resolution_without_sample_size(loaded):
    """A real Flux transformer config has no sample_size: FluxPipeline's default side, 128 latents x VAE factor."""
    from diffusers import FluxTransformer2DModel

    pipe, _, _ = loaded("flux")
    config = {k: v for k, v in pipe.transformer.config.items() if k != "sample_size"}
    transformer = FluxTransformer2DModel.from_config(config)
    teacher = Teacher(
        denoiser=transformer,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
        text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
        family="flux",
    )
    assert teacher.resolution == pipe.default_sample_size * pipe.vae_scale_factor == 256


def test_from_pipeline_matches_from_pretrained(loaded):
    pipe, teacher, _ = loaded("pixart_sigma")
    wrapped = Teacher.from_pipeline(pipe)
    assert wrapped.family == "pixart" and wrapped.max_length == 300
    assert_close(wrapped.encode(PROMPTS).prompt_embeds, teacher.encode(PROMPTS).prompt_embeds)
    pipe, _, _ = loaded("flux")
    assert Teacher.from_pipeline(pipe).family == "flux"


# ---------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("name", ["pixart", "pixart_sigma"])
def test_pixart_encode_equals_pipeline(loaded, name):
    pipe, teacher, _ = loaded(name)
    length = 120 if name == "pixart" else 300
    embeds, mask, neg, neg_mask = pipe.encode_prompt(
        PROMPTS, True, device="cpu", clean_caption=False, max_sequence_length=length
    )
    cond, uncond = teacher.encode(PROMPTS), teacher.encode_unconditional(len(PROMPTS))
    assert cond.prompt_embeds.shape == (2, length, 32)
    assert cond.pooled_prompt_embeds is None
    assert_close(cond.prompt_embeds, embeds)
    assert torch.equal(cond.attention_mask, mask)
    assert_close(uncond.prompt_embeds, neg)
    assert torch.equal(uncond.attention_mask, neg_mask)
    assert 2 < int(cond.attention_mask[0].sum()) < length  # a real padding mask, not all ones
    assert not torch.allclose(cond.prompt_embeds, uncond.prompt_embeds)
    *_, neg, neg_mask = pipe.encode_prompt(
        PROMPTS, True, negative_prompt=NEGATIVE, device="cpu", clean_caption=False, max_sequence_length=length
    )
    given = teacher.encode_unconditional(negative_prompts=NEGATIVE)
    assert_close(given.prompt_embeds, neg)
    assert torch.equal(given.attention_mask, neg_mask)


def test_max_sequence_length_overrides_the_default(loaded):
    pipe, _, _ = loaded("pixart")
    teacher = Teacher.from_pipeline(pipe, max_sequence_length=24)
    embeds, mask, *_ = pipe.encode_prompt(
        PROMPTS, False, device="cpu", clean_caption=False, max_sequence_length=24
    )
    cond = teacher.encode(PROMPTS)
    assert teacher.max_length == 24 and cond.prompt_embeds.shape == (2, 24, 32)
    assert_close(cond.prompt_embeds, embeds)
    assert torch.equal(cond.attention_mask, mask)


def test_sana_encode_equals_pipeline_call_defaults(loaded):
    pipe, teacher, _ = loaded("sana")
    instruction = _sana_instruction()
    assert teacher.complex_human_instruction == instruction
    # __call__ passes its default instruction to encode_prompt (whose own default is none)
    embeds, mask, neg, neg_mask = pipe.encode_prompt(
        PROMPTS, True, device="cpu", complex_human_instruction=instruction
    )
    cond, uncond = teacher.encode(PROMPTS), teacher.encode_unconditional(2)
    assert cond.prompt_embeds.shape == uncond.prompt_embeds.shape == (2, 300, 16)
    assert_close(cond.prompt_embeds, embeds)
    assert torch.equal(cond.attention_mask, mask)
    assert_close(uncond.prompt_embeds, neg)
    assert torch.equal(uncond.attention_mask, neg_mask)
    # the instruction matters: without it the embeddings differ, and equal encode_prompt's own default
    plain, plain_mask, *_ = pipe.encode_prompt(PROMPTS, False, device="cpu")
    assert not torch.allclose(plain, embeds)
    bare = Teacher.from_pipeline(pipe, complex_human_instruction=None).encode(PROMPTS)
    assert_close(bare.prompt_embeds, plain)
    assert torch.equal(bare.attention_mask, plain_mask)
    *_, neg, neg_mask = pipe.encode_prompt(PROMPTS, True, negative_prompt=NEGATIVE, device="cpu")
    given = teacher.encode_unconditional(negative_prompts=NEGATIVE)
    assert_close(given.prompt_embeds, neg)
    assert torch.equal(given.attention_mask, neg_mask)


def test_sd3_encode_equals_pipeline(loaded):
    pipe, teacher, _ = loaded("sd3")
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
    cond, uncond = teacher.encode(PROMPTS), teacher.encode_unconditional(2)
    assert cond.prompt_embeds.shape == (2, 77 + 256, 48)
    assert cond.pooled_prompt_embeds.shape == (2, 12 + 20)
    assert cond.attention_mask is None
    assert_close(cond.prompt_embeds, embeds)
    assert_close(cond.pooled_prompt_embeds, pooled)
    assert_close(uncond.prompt_embeds, neg)
    assert_close(uncond.pooled_prompt_embeds, neg_pooled)
    # CLIP's 16 + 20 = 36 columns are zero-padded to T5's 48, then T5's 256 tokens follow
    assert torch.count_nonzero(cond.prompt_embeds[:, :77, 36:]) == 0
    assert torch.count_nonzero(cond.prompt_embeds[:, 77:, 36:]) > 0
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=NEGATIVE)
    given = teacher.encode_unconditional(negative_prompts=NEGATIVE)
    assert_close(given.prompt_embeds, neg)
    assert_close(given.pooled_prompt_embeds, neg_pooled)
    assert_close(teacher.pooled(PROMPTS), pooled)


def test_sd3_clip_skip_equals_pipeline(loaded):
    pipe, _, _ = loaded("sd3")
    teacher = Teacher.from_pipeline(pipe, clip_skip=1)
    embeds, neg, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", clip_skip=1)
    cond = teacher.encode(PROMPTS)
    assert_close(cond.prompt_embeds, embeds)
    assert_close(cond.pooled_prompt_embeds, pooled)
    assert_close(teacher.encode_unconditional(2).prompt_embeds, neg)  # negatives ignore clip_skip


def test_flux_encode_equals_pipeline(loaded):
    pipe, teacher, _ = loaded("flux")
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu")
    cond = teacher.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 512, 40) and cond.pooled_prompt_embeds.shape == (2, 20)
    assert cond.attention_mask is None
    assert_close(cond.prompt_embeds, embeds)
    assert_close(cond.pooled_prompt_embeds, pooled)
    # the true-CFG branch encodes the negative prompt through encode_prompt
    neg, neg_pooled, _ = pipe.encode_prompt(["", ""], device="cpu")
    uncond = teacher.encode_unconditional(2)
    assert_close(uncond.prompt_embeds, neg)
    assert_close(uncond.pooled_prompt_embeds, neg_pooled)
    assert not torch.allclose(uncond.pooled_prompt_embeds, pooled)
    assert_close(teacher.pooled(PROMPTS, cond), pooled)


@pytest.mark.parametrize("name", ["pixart", "sana"])
def test_pooled_does_not_exist_for_t5_and_gemma_families(loaded, name):
    _, teacher, _ = loaded(name)
    with pytest.raises(ValueError, match="no pooled text vector"):
        teacher.pooled(PROMPTS)


# ---------------------------------------------------------------------------------------------- noise


def _flow_reference(name: str, pipe):
    """The FlowMatchEulerDiscreteScheduler a training script would build, at init (sigmas high -> low)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name == "sana":  # Sana ships a DPM-Solver in flow mode: its flow_shift is the shift
        return FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("name", ["sana", "sd3", "flux"])
def test_flow_noise_follows_the_scheduler_grid(loaded, name):
    pipe, teacher, _ = loaded(name)
    reference = _flow_reference(name, pipe)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    sigma = teacher.sigmas(t)
    assert_close(sigma, reference.sigmas.flip(0)[t])
    assert torch.all(sigma[1:] > sigma[:-1])  # larger index = noisier
    assert_close(sigma[-1], torch.tensor(1.0))
    u = (t + 1).float() / 1000
    shift = 1.0 if name == "flux" else 3.0  # Flux shifts dynamically at sampling, not on the training grid
    assert_close(sigma, shift * u / (1 + (shift - 1) * u))
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    assert_close(teacher.add_noise(z0, noise, t), (1 - s) * z0 + s * noise)
    assert_close(teacher.denoising_target(z0, noise, t), noise - z0)
    expected_t = reference.timesteps.flip(0)[t]  # sigma * 1000, what SD3's pipeline passes
    if name == "sana":
        expected_t = expected_t * pipe.transformer.config.timestep_scale
    if name == "flux":
        expected_t = expected_t / 1000
    assert_close(teacher.model_timesteps(t), expected_t)


def test_pixart_noise_is_ddpm(loaded):
    _, teacher, _ = loaded("pixart")
    t = torch.tensor([0, 500, 999])
    g = torch.Generator().manual_seed(1)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert_close(teacher.add_noise(z0, noise, t), a.sqrt() * z0 + (1 - a).sqrt() * noise)
    assert torch.equal(teacher.denoising_target(z0, noise, t), noise)
    assert torch.equal(teacher.model_timesteps(t), t)
    with pytest.raises(ValueError, match="DDPM"):
        teacher.sigmas(t)


@pytest.mark.parametrize(
    ("t", "match"),
    [
        (torch.tensor([0, 1000]), r"\[0, 1000\)"),
        (torch.tensor([-1, 3]), r"\[0, 1000\)"),
        (torch.tensor([0.5, 0.2]), "integer"),
        (torch.tensor([[1, 2]]), "integer"),
        (torch.tensor([1, 2, 3]), "batch of 2"),
    ],
)
def test_bad_timesteps_are_refused(loaded, t, match):
    _, teacher, _ = loaded("sd3")
    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match=match):
        teacher.add_noise(z, z, t)


# ---------------------------------------------------------------------------------------------- denoising


def _latents(teacher: Teacher, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Latents of 32x32 images (16x16: every fixture's VAE halves the side)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, teacher.latent_channels, 16, 16, generator=g)


@pytest.mark.parametrize("name", ["pixart", "pixart_sigma"])
def test_pixart_denoise_equals_pipeline_call(loaded, name):
    pipe, teacher, _ = loaded(name)
    cond = teacher.encode(PROMPTS)
    latents, t = _latents(teacher), torch.tensor([10, 900])
    with torch.no_grad():
        out = pipe.transformer(
            latents,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        pred = teacher.denoise(latents, t, cond)
    assert out.shape == (2, 8, 16, 16)  # learned sigma: the pipeline keeps the first half
    assert_close(pred, out.chunk(2, dim=1)[0])
    # an explicit mask wins over the conditioning's
    ones = torch.ones_like(cond.attention_mask)
    with torch.no_grad():
        unmasked = teacher.denoise(latents, t, cond, attention_mask=ones)
        plain = teacher.denoise(latents, t, Conditioning(cond.prompt_embeds))
    assert not torch.allclose(unmasked, pred)
    assert_close(unmasked, plain)  # no mask at all = every token attends


def test_pixart_added_conditions_are_the_image_size(loaded):
    """PixArt-α 1024 embeds (height, width) in pixels and their ratio, as the pipeline does for sample_size 128."""
    from diffusers import PixArtTransformer2DModel

    pipe, teacher, _ = loaded("pixart")
    torch.manual_seed(0)
    config = dict(pipe.transformer.config)
    config.update(use_additional_conditions=True)
    transformer = PixArtTransformer2DModel.from_config(config).eval()
    conditioned = Teacher(
        denoiser=transformer,
        vae=teacher.vae,
        scheduler=teacher.scheduler,
        tokenizers=teacher.tokenizers,
        text_encoders=teacher.text_encoders,
        family="pixart",
    )
    cond = teacher.encode(PROMPTS)
    latents, t = torch.randn(2, 4, 16, 8), torch.tensor([3, 600])
    added = {"resolution": torch.tensor([[32.0, 16.0]] * 2), "aspect_ratio": torch.tensor([[2.0]] * 2)}
    with torch.no_grad():
        out = transformer(
            latents,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask,
            timestep=t,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        assert_close(conditioned.denoise(latents, t, cond), out.chunk(2, dim=1)[0])


def test_sana_denoise_equals_pipeline_call(loaded):
    pipe, teacher, _ = loaded("sana")
    cond = teacher.encode(PROMPTS)
    latents, t = _latents(teacher), torch.tensor([100, 800])
    sigma = _flow_reference("sana", pipe).sigmas.flip(0)[t]
    with torch.no_grad():
        out = pipe.transformer(
            latents,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.attention_mask,
            timestep=sigma * 1000 * pipe.transformer.config.timestep_scale,
            return_dict=False,
        )[0]
        pred = teacher.denoise(latents, t, cond)
    assert pred.shape == latents.shape
    assert_close(pred, out)


def test_sd3_denoise_equals_pipeline_call(loaded):
    pipe, teacher, _ = loaded("sd3")
    cond = teacher.encode(PROMPTS)
    latents, t = _latents(teacher), torch.tensor([100, 800])
    sigma = _flow_reference("sd3", pipe).sigmas.flip(0)[t]
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=latents,
            timestep=sigma * 1000,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            return_dict=False,
        )[0]
        pred = teacher.denoise(latents, t, cond)
    assert pred.shape == latents.shape
    assert_close(pred, out)


def test_flux_denoise_equals_pipeline_call(loaded):
    pipe, teacher, _ = loaded("flux")
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
    cond = teacher.encode(PROMPTS)
    latents, t = _latents(teacher), torch.tensor([100, 800])
    b, c, h, w = latents.shape
    sigma = _flow_reference("flux", pipe).sigmas.flip(0)[t]
    packed = pipe._pack_latents(latents, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=packed,
            timestep=(sigma * 1000) / 1000,
            guidance=torch.full([1], 3.5).expand(b),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        expected = pipe._unpack_latents(
            out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor
        )
        pred = teacher.denoise(latents, t, cond)
        other_guidance = Teacher.from_pipeline(pipe, guidance_scale=1.0).denoise(latents, t, cond)
    assert packed.shape == (2, 64, 16) and pred.shape == latents.shape
    assert_close(pred, expected)
    assert not torch.allclose(other_guidance, pred)  # the guidance value reaches the transformer
    with pytest.raises(ValueError, match="even"):
        teacher.denoise(latents[..., :15], t, cond)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_mmdit_denoise_refuses_masks_and_bad_widths(loaded, name):
    _, teacher, _ = loaded(name)
    cond = teacher.encode(PROMPTS)
    latents, t = _latents(teacher), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="no text padding mask"):
        teacher.denoise(latents, t, cond, attention_mask=torch.ones(2, cond.prompt_embeds.shape[1]))
    narrow = Conditioning(cond.prompt_embeds[..., :8], cond.pooled_prompt_embeds)
    with pytest.raises(ValueError, match=f"width {teacher.cross_attention_dim}, got 8"):
        teacher.denoise(latents, t, narrow)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        teacher.denoise(latents, t, Conditioning(cond.prompt_embeds))


def test_dit_denoise_refuses_bad_masks(loaded):
    _, teacher, _ = loaded("sana")
    cond = teacher.encode(PROMPTS)
    with pytest.raises(ValueError, match=r"attention_mask` must be \[B, L\]"):
        teacher.denoise(_latents(teacher), torch.tensor([1, 2]), cond, attention_mask=torch.ones(2, 7))


# ---------------------------------------------------------------------------------------------- taps, images


@pytest.mark.parametrize("name", ["pixart", "sana"])
def test_text_context_module_is_what_attn2_sees(loaded, name):
    _, teacher, _ = loaded(name)
    cond = teacher.encode(PROMPTS)
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"])

    attn2 = teacher.denoiser.transformer_blocks[0].attn2
    handle = attn2.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            teacher.denoise(_latents(teacher), torch.tensor([5, 500]), cond)
    finally:
        handle.remove()
    module = teacher.text_context_module()
    assert module is not None and not any(p.requires_grad for p in module.parameters())
    with torch.no_grad():
        context = module(cond.prompt_embeds)
    assert context.shape == (2, teacher.max_length, attn2.to_k.in_features)
    assert_close(context, seen[0])


def test_text_context_module_is_none_without_a_caption_projection(loaded, sd1_teacher):
    assert sd1_teacher.text_context_module() is None
    for name in ("sd3", "flux"):
        assert loaded(name)[1].text_context_module() is None


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        ("pixart", ("transformer_blocks.0", "transformer_blocks.1")),
        ("sana", ("transformer_blocks.0",)),
        ("sd3", ("transformer_blocks.0",)),
        ("flux", ("transformer_blocks.0", "single_transformer_blocks.0")),
    ],
)
def test_feature_blocks(loaded, name, blocks):
    teacher = loaded(name)[1]
    assert teacher.feature_blocks() == blocks
    for block in blocks:
        teacher.denoiser.get_submodule(block)


def test_feature_blocks_of_a_unet_are_peas(sd1_teacher):
    from xling.core import pea_blocks

    assert sd1_teacher.feature_blocks() == pea_blocks(sd1_teacher.unet)


@pytest.mark.parametrize("name", ["pixart", "sana", "sd3"])
def test_encode_images_scales_as_the_training_scripts(loaded, name):
    _, teacher, _ = loaded(name)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = teacher.encode_images(pixels, sample=False)
    assert latents.shape == (2, 4, 16, 16)
    config = teacher.vae.config
    with torch.no_grad():
        encoded = teacher.vae.encode(pixels)
        if name == "sana":  # AutoencoderDC: deterministic latents, no shift
            expected = encoded.latent * config.scaling_factor
            assert torch.equal(teacher.encode_images(pixels, sample=True), latents)
        else:
            expected = (encoded.latent_dist.mode() - (config.shift_factor or 0.0)) * config.scaling_factor
    if name == "sd3":
        assert config.shift_factor == 0.0609
    assert_close(latents, expected)
    with pytest.raises(ValueError, match="multiples of 2"):
        teacher.encode_images(pixels[..., :31])


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "drop", "missing"),
    [
        ("sd3", ("text_encoder_3",), ["text_encoder_3"]),
        ("flux", ("tokenizer_2",), ["tokenizer_2"]),
        ("pixart", ("transformer",), ["transformer"]),
    ],
)
def test_missing_components_per_family(request, tmp_path, name, drop, missing):
    path = request.getfixturevalue(FAMILY_FIXTURES[name])
    assert missing_components(path) == []
    broken = tmp_path / "broken"
    shutil.copytree(path, broken, ignore=shutil.ignore_patterns(*drop))
    assert missing_components(broken) == missing
    with pytest.raises(FileNotFoundError, match=f"missing {missing[0]}"):
        Teacher.from_pretrained(broken)


def test_detect_family_from_the_transformer_config(tiny_sana_path, tmp_path):
    """Without a pipeline class name, the transformer's ``_class_name`` decides (not SDXL's text_encoder_2 rule)."""
    import json

    copy = tmp_path / "sana"
    shutil.copytree(tiny_sana_path, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "DiffusionPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    assert detect_family(copy) == "sana"


def test_bad_constructor_arguments(loaded):
    pipe, _, _ = loaded("flux")
    with pytest.raises(ValueError, match="max_sequence_length"):
        Teacher.from_pipeline(pipe, max_sequence_length=600)
    with pytest.raises(ValueError, match="2 tokenizer"):
        Teacher(
            denoiser=pipe.transformer,
            vae=pipe.vae,
            scheduler=pipe.scheduler,
            tokenizers=[pipe.tokenizer],
            text_encoders=[pipe.text_encoder],
            family="flux",
        )


# ---------------------------------------------------------------------------------------------- SD3 without T5


def _drop_t5(path, out):
    """A copy of the SD3 folder with T5 dropped as diffusers saves it: both slots ``[null, null]``."""
    import json

    shutil.copytree(path, out, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((out / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (out / "model_index.json").write_text(json.dumps(index))
    return out


def test_sd3_without_t5_encodes_as_the_pipeline(tiny_sd3_path, tmp_path):
    """SD3 with T5 dropped (diffusers' documented memory saver): zeros of the transformer's width stand in
    for T5's states, ``max_sequence_length`` of them, exactly as the pipeline appends."""
    from diffusers import StableDiffusion3Pipeline

    path = _drop_t5(tiny_sd3_path, tmp_path / "no-t5")
    assert missing_components(path) == []
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", max_sequence_length=5
    )
    for teacher in (
        Teacher.from_pretrained(path, max_sequence_length=5),
        Teacher.from_pipeline(pipe, max_sequence_length=5),
    ):
        assert len(teacher.text_encoders) == 2 and teacher.max_length == 77 + 5
        cond, uncond = teacher.encode(PROMPTS), teacher.encode_unconditional(2)
        assert cond.prompt_embeds.shape == (2, 77 + 5, 48)
        assert_close(cond.prompt_embeds, embeds)
        assert_close(cond.pooled_prompt_embeds, pooled)
        assert_close(uncond.prompt_embeds, neg)
        assert_close(uncond.pooled_prompt_embeds, neg_pooled)
        assert torch.count_nonzero(cond.prompt_embeds[:, 77:]) == 0


def test_sd3_half_dropped_t5_is_incomplete(tiny_sd3_path, tmp_path):
    """Only the T5 pair together may be dropped: a null ``text_encoder_3`` beside a declared tokenizer is a
    broken folder, reported as such."""
    import json

    path = _drop_t5(tiny_sd3_path, tmp_path / "half")
    index = json.loads((path / "model_index.json").read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (path / "model_index.json").write_text(json.dumps(index))
    shutil.copytree(tiny_sd3_path / "tokenizer_3", path / "tokenizer_3")
    assert missing_components(path) == ["text_encoder_3"]
    with pytest.raises(FileNotFoundError, match="missing text_encoder_3"):
        Teacher.from_pretrained(path)
