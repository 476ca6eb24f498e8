"""The path every evaluation shares (condition, sample teacher and student at shared seeds, score) and
:func:`evaluate_pairs`, that path on any teacher and any parallel prompts."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xling.core import Conditioning, StudentEncoder, Teacher
from xling.train.evaluation.metrics import (
    agreement,
    attention_alignment,
    clip_score,
    embedding_alignment,
)
from xling.train.evaluation.results import EvalResult, Samples
from xling.train.evaluation.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    check_fits,
    load_pipeline,
    pipeline_teacher,
    sample,
    seeded_rows,
    student_conditioning,
    teacher_conditioning,
)


@dataclass
class Comparison:
    """A student and its teacher on parallel prompts, each prompt sampled at every seed by both.

    Attributes:
        rows: Prompt index of each generated image (``N * S``, prompt-major).
        seeds: Seed of each generated image.
        teacher_cond: The teacher's conditioning of the English prompts, ``[N, L_t, D]``.
        student_cond: The student's conditioning of the translations, ``[N, L_s, D]``.
        teacher_samples: The teacher on the English prompts ("perfect translation"), ``N * S`` images.
        student_samples: The student on the translations, at the same seeds.
        agreement: :func:`~xling.train.evaluation.agreement` of the two sample sets.
        clip_score: ``{"zh_student": s, "perfect_translation": s}``, or ``None`` without a CLIP model.
    """

    rows: list[int]
    seeds: list[int]
    teacher_cond: Conditioning
    student_cond: Conditioning
    teacher_samples: Samples
    student_samples: Samples
    agreement: dict[str, float]
    clip_score: dict[str, float] | None


def teacher_samples(
    pipe: Any,
    prompts: Sequence[str],
    rows: Sequence[int],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    conditioning: tuple[Conditioning, Conditioning] | None = None,
    cache: dict[Any, Samples] | None = None,
) -> Samples:
    """The teacher's generations of ``prompts[rows]`` at ``seeds``, kept in ``cache`` when one is given.

    They do not depend on the student, so a benchmark scoring many students samples them once.

    Args:
        pipe: A diffusers pipeline of a supported family (:func:`~xling.train.evaluation.load_pipeline`).
        prompts: ``N`` English prompts.
        rows: Prompt index of each image.
        seeds: Seed of each image.
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance.
        batch_size: Rows per pipeline call.
        conditioning: :func:`teacher_conditioning` of ``prompts`` when the caller has it already.
        cache: Generations by pipeline, prompts, rows, seeds and sampler.
    """
    key = (id(pipe), tuple(prompts), tuple(rows), tuple(seeds), num_inference_steps, guidance_scale)
    if cache is not None and key in cache:
        return cache[key]
    cond, uncond = conditioning or teacher_conditioning(pipe, prompts)
    sampler = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    out = sample(pipe, cond, uncond, seeds, rows=rows, **sampler)
    if cache is not None:
        cache[key] = out
    return out


def compare(
    pipe: Any,
    encoder: StudentEncoder,
    en_prompts: Sequence[str],
    zh_prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    clip_model: str | Path | None = None,
    reference_cache: dict[Any, Samples] | None = None,
) -> Comparison:
    """Condition teacher and student on parallel prompts, sample both at shared seeds and score agreement.

    Args:
        pipe: A diffusers pipeline of a supported family (:func:`~xling.train.evaluation.load_pipeline`).
        encoder: The student (only its ``__call__`` is used).
        en_prompts: ``N`` English captions.
        zh_prompts: Their translations, same order.
        seeds: ``S`` seeds; each prompt is sampled once per seed.
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance.
        batch_size: Rows per pipeline call.
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        reference_cache: See :func:`teacher_samples`.
    """
    sampler = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    t_cond, t_uncond = teacher_conditioning(pipe, en_prompts)
    s_cond, s_uncond = student_conditioning(encoder, zh_prompts)
    rows, seed_list = seeded_rows(len(en_prompts), seeds)
    reference = teacher_samples(
        pipe, en_prompts, rows, seed_list, conditioning=(t_cond, t_uncond), cache=reference_cache, **sampler
    )
    student = sample(pipe, s_cond, s_uncond, seed_list, rows=rows, **sampler)
    clip = None
    if clip_model is not None:
        en_rep = [en_prompts[i] for i in rows]
        clip = {
            "zh_student": clip_score(student.images, en_rep, clip_model),
            "perfect_translation": clip_score(reference.images, en_rep, clip_model),
        }
    return Comparison(
        rows, seed_list, t_cond, s_cond, reference, student, agreement(student, reference), clip
    )


def examples(
    run: Comparison,
    en: Sequence[str],
    zh: Sequence[str],
    limit: int,
    en_checks: Sequence[Mapping[str, bool]] | None = None,
    zh_checks: Sequence[Mapping[str, bool]] | None = None,
) -> list[dict[str, Any]]:
    """Grid items (:attr:`EvalResult.examples`): the first ``limit`` distinct prompts, each at every seed."""
    keep = sorted(set(run.rows), key=run.rows.index)[:limit]
    out = []
    for k, (i, s) in enumerate(zip(run.rows, run.seeds)):
        if i in keep:
            out.append(
                {
                    "en": en[i],
                    "zh": zh[i],
                    "seed": int(s),
                    "en_image": run.teacher_samples.images[k],
                    "zh_image": run.student_samples.images[k],
                    "en_check": None if en_checks is None else dict(en_checks[k]),
                    "zh_check": None if zh_checks is None else dict(zh_checks[k]),
                }
            )
    return out


def teacher_name(teacher: Any) -> str:
    """What the report calls ``teacher``: its path, else its denoiser's ``_name_or_path`` (the UNet, or the
    transformer of a PixArt / Sana / SD3 / Flux pipeline), else its type."""
    if isinstance(teacher, str | Path):
        return str(teacher)
    path = getattr(teacher, "path", None)
    for attr in ("unet", "transformer"):
        if not path:
            path = getattr(getattr(teacher, attr, None), "config", {}).get("_name_or_path")
    return str(path) if path else type(teacher).__name__


def evaluate_pairs(
    encoder: StudentEncoder,
    teacher: Any,
    en_prompts: Sequence[str],
    zh_prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    clip_model: str | Path | None = None,
    num_examples: int = 8,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    attention_timesteps: Sequence[int] = (100, 500, 900),
    variant: str | None = None,
) -> EvalResult:
    """Alignment (embedding cosine, attention MSE), agreement and optional CLIP score on parallel prompts.

    There are no scene renders off the toy world, so the attention MSE's pivots (the images the noised
    latents come from) are the teacher's own generations of the English prompts at the first seed: the image
    the teacher draws for a caption is the one its cross-attention should agree on for the translation.

    Args:
        encoder: The student (``xling.adapters.LanguageEncoder``), on ``device``.
        teacher: Anything :func:`~xling.train.evaluation.load_pipeline` accepts.
        en_prompts: ``N`` English captions.
        zh_prompts: Their translations, same order.
        seeds: Each prompt is sampled once per seed.
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance.
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        num_examples: Prompts kept for the PNG grid.
        batch_size: Rows per pipeline call.
        device: Where the pipeline runs.
        attention_timesteps: Timesteps of the attention-MSE probe (empty: not computed, and the report
            says so).
        variant: Weight-file variant of a teacher directory (``"fp16"``), see :func:`load_pipeline`.

    Raises:
        xling.adapters.WidthMismatchError: the student's head does not fit the teacher (before sampling).
    """
    start = time.perf_counter()
    if len(en_prompts) != len(zh_prompts) or not en_prompts:
        raise ValueError(
            f"en_prompts ({len(en_prompts)}) and zh_prompts ({len(zh_prompts)}) must be equal and > 0"
        )
    pipe = load_pipeline(teacher, device=device, variant=variant)
    check_fits(encoder, pipe, teacher_name(teacher))
    # Wrapped before any sampling, as evaluate_toy does: freezing the modules in place can pick other float
    # kernels, so every generation and the attention probe run on the same frozen modules.
    frozen = (
        (teacher if isinstance(teacher, Teacher) else pipeline_teacher(pipe)) if attention_timesteps else None
    )
    sampler = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    run = compare(pipe, encoder, en_prompts, zh_prompts, seeds=seeds, clip_model=clip_model, **sampler)
    alignment: dict[str, float | None] = {**embedding_alignment(run.student_cond, run.teacher_cond)}
    notes: dict[str, str] = {}
    if frozen is not None:
        first = [run.rows.index(i) for i in range(len(en_prompts))]  # each prompt's first-seed image
        pixels = torch.from_numpy(run.teacher_samples.images[first]).permute(0, 3, 1, 2)
        alignment["attention_mse"] = attention_alignment(
            frozen,
            run.student_cond,
            run.teacher_cond,
            pixels.float() / 127.5 - 1.0,
            timesteps=attention_timesteps,
        )
        notes["attention_pivots"] = (
            f"the teacher's own generation of each English prompt (seed {int(seeds[0])})"
        )
    else:
        alignment["attention_mse"] = None
        notes["attention_mse_note"] = "not computed (no attention timesteps were given)"
    result = EvalResult(
        alignment=alignment,
        agreement=run.agreement,
        clip_score=run.clip_score,
        settings={
            "teacher": teacher_name(teacher),
            "prompts": len(en_prompts),
            "seeds": [int(s) for s in seeds],
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            **notes,
        },
        examples=examples(run, en_prompts, zh_prompts, num_examples),
    )
    result.seconds = time.perf_counter() - start
    return result
