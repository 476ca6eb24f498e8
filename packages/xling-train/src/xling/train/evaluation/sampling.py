"""The teacher's pipeline, the conditioning of teacher and student, and seeded sampling through it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xling.adapters.io import check_widths
from xling.adapters.pipeline import pipeline_widths
from xling.core import Conditioning, StudentEncoder, Teacher
from xling.train.evaluation.results import Samples
from xling.train.toyworld.names import TOY, resolve_teacher
from xling.train.toyworld.teacher import DEFAULT_GUIDANCE, DEFAULT_STEPS

#: Sampler settings for a teacher other than the toy one when the caller names none.
SD_STEPS = 30
SD_GUIDANCE = 7.5


def toy_sampler_defaults() -> tuple[int, float]:
    """The toy teacher's default sampler steps and guidance (the ones its accuracy was measured at)."""
    return DEFAULT_STEPS, DEFAULT_GUIDANCE


def sampler_defaults(teacher: Any, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance: the given ones, else the toy world's defaults (``teacher == "toy"``) or 30 / 7.5."""
    default_steps, default_guidance = toy_sampler_defaults() if teacher == TOY else (SD_STEPS, SD_GUIDANCE)
    return steps or default_steps, guidance if guidance is not None else default_guidance


def load_pipeline(
    teacher: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> Any:
    """A diffusers SD / SDXL pipeline for ``teacher``.

    Args:
        teacher: ``"toy"`` (the committed toy teacher), a diffusers directory or id, a pipeline (returned as
            is), or an ``xling.core.Teacher`` (its components, with the inference scheduler read from the
            directory it was loaded from).
        device: Device of the pipeline.
        dtype: Weight dtype.
        variant: Weight-file variant of a directory or id (``"fp16"`` reads ``*.fp16.safetensors``), as
            ``DiffusionPipeline.from_pretrained(..., variant=)``.
    """
    from diffusers import DiffusionPipeline

    if isinstance(teacher, DiffusionPipeline):
        pipe = teacher
    elif isinstance(teacher, str | Path):
        path = resolve_teacher(str(teacher))
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=variant).to(device)
    elif isinstance(teacher, Teacher):
        pipe = _pipeline_from_teacher(teacher)
    else:
        raise TypeError(
            f"teacher must be 'toy', a path, a DiffusionPipeline or an xling.core.Teacher, got {type(teacher).__name__}"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_fits(encoder: Any, pipe: Any, teacher: Any) -> None:
    """Raise before any sampling when the encoder's head does not fit the pipeline's widths.

    The same check (and error) as ``xling.adapters.attach``: the head's ``teacher_width`` against the UNet's
    ``cross_attention_dim`` and, for SDXL, its pooled width. A student without a head config (a test double,
    a custom ``StudentEncoder``) carries no widths and is not checked.

    Args:
        encoder: The student; its ``head.config`` (an ``xling.adapters`` ``HeadConfig``) is checked.
        pipe: A diffusers SD / SDXL pipeline.
        teacher: What the error calls the teacher (its name or path).

    Raises:
        xling.adapters.WidthMismatchError: a width differs; the message names each one.
    """
    head_config = getattr(getattr(encoder, "head", None), "config", None)
    if head_config is None or not hasattr(head_config, "teacher_width"):
        return
    cross_attention_dim, needs_pooled, pooled_width = pipeline_widths(pipe)
    check_widths(
        head_config,
        cross_attention_dim=cross_attention_dim,
        pooled_width=pooled_width,
        needs_pooled=needs_pooled,
        where=f"the teacher {teacher}",
    )


def _pipeline_from_teacher(teacher: Teacher) -> Any:
    """Assemble a pipeline around an ``xling.core.Teacher``'s modules (shared, not copied)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = teacher.inference_scheduler
    if scheduler is None:
        # Built from parts: DDIM over the training schedule is the deterministic sampler every SD accepts.
        scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    if len(teacher.text_encoders) == 2:
        return StableDiffusionXLPipeline(
            vae=teacher.vae,
            text_encoder=teacher.text_encoders[0],
            text_encoder_2=teacher.text_encoders[1],
            tokenizer=teacher.tokenizers[0],
            tokenizer_2=teacher.tokenizers[1],
            unet=teacher.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoders[0],
        tokenizer=teacher.tokenizers[0],
        unet=teacher.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def teacher_conditioning(pipe: Any, prompts: Sequence[str]) -> tuple[Conditioning, Conditioning]:
    """The teacher's conditioning of ``prompts`` and of the empty prompt, exactly as the pipeline makes them.

    Args:
        pipe: A diffusers SD / SDXL pipeline.
        prompts: ``B`` English prompts.

    Returns:
        ``(cond, uncond)``, each ``[B, L, D]`` (+ pooled ``[B, P]`` for SDXL).
    """
    prompts = list(prompts)
    with torch.no_grad():
        out = pipe.encode_prompt(
            prompt=prompts,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts),
        )
    # Every row's empty prompt is the same; one row repeated keeps it bit-identical across batch positions.
    first = [0] * len(prompts)
    if len(out) == 4:  # SDXL: embeds, negative, pooled, negative pooled
        return Conditioning(out[0], out[2]), Conditioning(out[1], out[3]).rows(first)
    return Conditioning(out[0]), Conditioning(out[1]).rows(first)


def student_conditioning(
    encoder: StudentEncoder, prompts: Sequence[str]
) -> tuple[Conditioning, Conditioning]:
    """The student's conditioning of ``prompts`` and of the empty prompt, padded to one length.

    The empty prompt is encoded in the same call so both come out with the same token count, which the
    pipelines require of ``prompt_embeds`` and ``negative_prompt_embeds``.

    Args:
        encoder: The student; only its ``__call__`` is used, in eval mode (its training mode is restored).
        prompts: ``B`` prompts in the student's language.

    Returns:
        ``(cond, uncond)``, each ``[B, L, D]`` (+ pooled ``[B, P]``, + attention mask ``[B, L]``).
    """
    prompts = list(prompts)
    training = getattr(encoder, "training", None)
    if training:
        encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(["", *prompts])
    finally:
        if training:
            encoder.train()
    embeds = out.prompt_embeds
    if embeds.ndim != 3 or embeds.shape[0] != len(prompts) + 1:
        raise ValueError(
            f"the student returned prompt_embeds {tuple(embeds.shape)} for {len(prompts) + 1} prompts; "
            "expected [B, L, D]"
        )
    whole = Conditioning(
        embeds, getattr(out, "pooled_prompt_embeds", None), getattr(out, "attention_mask", None)
    )
    return whole.rows(range(1, len(prompts) + 1)), whole.rows([0] * len(prompts))


def sample(
    pipe: Any,
    cond: Conditioning,
    uncond: Conditioning,
    seeds: Sequence[int],
    *,
    rows: Sequence[int] | None = None,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
) -> Samples:
    """Generate one image per row of ``cond`` with the pipeline's own sampler, each from its own seed.

    The initial noise of row ``i`` is drawn from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so a
    teacher and a student sampled with the same seeds start from identical latents.

    Args:
        pipe: A diffusers SD / SDXL pipeline.
        cond: Conditioning ``[B, L, D]``.
        uncond: Negative conditioning ``[B, L, D]`` (same length as ``cond``).
        seeds: ``B`` seeds.
        rows: Draw ``cond.rows(rows)`` instead (repeats allowed; ``seeds`` then has one seed per entry).
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale (<= 1 disables guidance).
        batch_size: Rows per pipeline call.

    Returns:
        Latents ``[B, C, h, w]`` and images ``[B, H, W, 3]`` uint8.
    """
    if rows is not None:
        cond, uncond = cond.rows(rows), uncond.rows(rows)
    if len(seeds) != len(cond) or len(uncond) != len(cond):
        raise ValueError(
            f"cond ({len(cond)}), uncond ({len(uncond)}) and seeds ({len(seeds)}) must have equal length"
        )
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latents, images = [], []
    for start in range(0, len(cond), batch_size):
        batch = list(range(start, min(start + batch_size, len(cond))))
        c, u = cond.rows(batch), uncond.rows(batch)
        kwargs: dict[str, Any] = {
            "prompt_embeds": c.prompt_embeds.to(device, dtype),
            "negative_prompt_embeds": u.prompt_embeds.to(device, dtype),
        }
        if c.pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = c.pooled_prompt_embeds.to(device, dtype)
            kwargs["negative_pooled_prompt_embeds"] = u.pooled_prompt_embeds.to(device, dtype)
        generators = [torch.Generator().manual_seed(int(seeds[i])) for i in batch]
        with torch.no_grad():
            z = pipe(
                **kwargs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent",
            ).images
            decoded = pipe.vae.decode(z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        latents.append(z.float().cpu())
        images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return Samples(torch.cat(latents), np.concatenate(images))


def seeded_rows(n_prompts: int, seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """Every prompt at every seed, prompt-major: the prompt index and the seed of each generated image.

    Args:
        n_prompts: ``N`` prompts.
        seeds: ``S`` seeds.

    Returns:
        ``(rows, seeds)``, each of length ``N * S``.
    """
    rows = [i for i in range(n_prompts) for _ in seeds]
    return rows, [int(s) for _ in range(n_prompts) for s in seeds]
