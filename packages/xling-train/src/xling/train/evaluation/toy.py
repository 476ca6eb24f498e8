"""The toy-world evaluation: the checker's accuracy per attribute, plus alignment and agreement."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xling.core import StudentEncoder, Teacher
from xling.train.evaluation.metrics import attention_alignment, bootstrap_interval, embedding_alignment
from xling.train.evaluation.pairs import compare, examples, teacher_name, teacher_samples
from xling.train.evaluation.results import ATTRIBUTES, EvalResult, Samples
from xling.train.evaluation.sampling import check_fits, load_pipeline, pipeline_teacher, toy_sampler_defaults
from xling.train.toyworld import world
from xling.train.toyworld.names import TOY


def heldout_caption_pairs(limit: int | None = None) -> tuple[list[str], list[str]]:
    """Parallel canonical captions of the toy grammar's held-out single-object scenes: plain scene
    descriptions any SD model can draw.

    Args:
        limit: At most this many pairs (``None``: all).

    Returns:
        ``(en, zh)``.
    """
    scenes = list(world.all_single_scenes(split="heldout"))[:limit]
    return [world.caption_en(s) for s in scenes], [world.caption_zh(s) for s in scenes]


def _scenes(max_scenes: int | None) -> tuple[list[Any], list[bool]]:
    """Every single-object scene (train split, then held out) and whether each is held out."""
    train = list(world.all_single_scenes(split="train"))
    held = list(world.all_single_scenes(split="heldout"))
    scenes, heldout = train + held, [False] * len(train) + [True] * len(held)
    if max_scenes is not None and max_scenes < len(scenes):
        # A fixed shuffle keeps both splits represented in a budget run.
        order = np.random.default_rng(0).permutation(len(scenes))[:max_scenes]
        scenes, heldout = [scenes[i] for i in order], [heldout[i] for i in order]
    return scenes, heldout


def _parallel_captions(scene: Any, rng: np.random.Generator | None) -> tuple[str, str]:
    """One English and one Chinese caption of ``scene`` that say the same thing (same paraphrase draw)."""
    if rng is None:
        return world.caption_en(scene), world.caption_zh(scene)
    # Two generators in the same state make the two grammars take the same template choice.
    state = int(rng.integers(2**31))
    return (
        world.caption_en(scene, rng=np.random.default_rng(state)),
        world.caption_zh(scene, rng=np.random.default_rng(state)),
    )


def _accuracy(verdicts: Sequence[Mapping[str, bool]]) -> dict[str, float]:
    """Fraction of verdicts with each attribute right (an empty list gives NaN)."""
    if not verdicts:
        return {a: float("nan") for a in ATTRIBUTES}
    return {a: float(np.mean([bool(v[a]) for v in verdicts])) for a in ATTRIBUTES}


def _pivots(scenes: Sequence[Any], resolution: int) -> torch.Tensor:
    """The scenes rendered at the teacher's resolution, ``[B, 3, H, W]`` in ``[-1, 1]``."""
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(world.render(s, size=resolution))).permute(2, 0, 1) for s in scenes]
    )
    return pixels.float() / 127.5 - 1.0


def evaluate_toy(
    encoder: StudentEncoder,
    teacher: Any = TOY,
    *,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    paraphrase: bool = True,
    max_scenes: int | None = None,
    attention_timesteps: Sequence[int] = (100, 500, 900),
    clip_model: str | Path | None = None,
    num_examples: int = 8,
    batch_size: int = 48,
    device: str | torch.device = "cpu",
    reference_cache: dict[Any, Samples] | None = None,
    variant: str | None = None,
) -> EvalResult:
    """Evaluate a student on the toy world: checker accuracy, alignment, agreement, optional CLIP score.

    Scenes: every single-object scene of the world (both splits; ``heldout_accuracy`` reports the held-out
    ones alone), each sampled at every seed in three conditions that share the seeds:

    - ``zh_student``: the student on the Chinese caption;
    - ``perfect_translation``: the teacher on the parallel English caption (same paraphrase);
    - ``en_teacher``: the teacher on the canonical English caption (the teacher's own accuracy; with
      ``paraphrase=False`` it is the same generation as ``perfect_translation`` and is not sampled twice).

    Alignment uses the held-out scenes: their rendered images are the pivots of the attention MSE.

    Args:
        encoder: The student (``xling.adapters.LanguageEncoder``; only its ``__call__`` is used).
        teacher: ``"toy"``, ``"toy-mmdit"``, a directory, a pipeline or an ``xling.core.Teacher``.
        seeds: Sampling seeds per scene.
        num_inference_steps: Sampler steps (``None``: the toy teacher's default).
        guidance_scale: Classifier-free guidance (``None``: the toy teacher's default).
        paraphrase: Draw one seeded paraphrase per scene (parallel in both languages) instead of the
            canonical captions.
        max_scenes: Evaluate only the first N scenes of a fixed shuffled order (budget runs).
        attention_timesteps: Timesteps of the attention-MSE probe.
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        num_examples: Scenes kept for the PNG grid.
        batch_size: Rows per pipeline call.
        device: Where the pipeline runs.
        reference_cache: A dict to keep the teacher's generations in between calls with the same pipeline,
            scenes and sampler (they do not depend on the student): a benchmark evaluating many students
            samples the teacher once.
        variant: Weight-file variant of a teacher directory (``"fp16"``), see :func:`load_pipeline`.

    Raises:
        xling.adapters.WidthMismatchError: the student's head does not fit the teacher (before sampling).
    """
    start = time.perf_counter()
    default_steps, default_guidance = toy_sampler_defaults(teacher)
    steps = num_inference_steps or default_steps
    guidance = guidance_scale if guidance_scale is not None else default_guidance
    pipe = load_pipeline(teacher, device=device, variant=variant)
    check_fits(encoder, pipe, teacher_name(teacher))
    # Made before any sampling: wrapping freezes the modules in place, which can pick other float kernels, so
    # every generation of this pipeline (cached references included) runs on the same frozen modules.
    frozen = teacher if isinstance(teacher, Teacher) else pipeline_teacher(pipe)

    scenes, heldout = _scenes(max_scenes)
    rng = np.random.default_rng(1234) if paraphrase else None
    captions = [_parallel_captions(scene, rng) for scene in scenes]
    en_prompts, zh_prompts = [en for en, _ in captions], [zh for _, zh in captions]
    canonical_en = [world.caption_en(scene) for scene in scenes]
    sampler = dict(num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size)
    run = compare(
        pipe,
        encoder,
        en_prompts,
        zh_prompts,
        seeds=seeds,
        clip_model=clip_model,
        reference_cache=reference_cache,
        **sampler,
    )
    canonical = run.teacher_samples
    if canonical_en != en_prompts:
        canonical = teacher_samples(pipe, canonical_en, run.rows, run.seeds, cache=reference_cache, **sampler)

    checks = {
        name: [world.check(img, scenes[i]) for img, i in zip(samples.images, run.rows)]
        for name, samples in (
            ("zh_student", run.student_samples),
            ("perfect_translation", run.teacher_samples),
            ("en_teacher", canonical),
        )
    }
    accuracy = {name: _accuracy(v) for name, v in checks.items()}
    held_rows = [k for k, i in enumerate(run.rows) if heldout[i]]
    heldout_accuracy = {
        name: _accuracy([checks[name][k] for k in held_rows])
        for name in ("zh_student", "perfect_translation")
    }
    teacher_all = accuracy["en_teacher"]["all"]
    relative = accuracy["zh_student"]["all"] / teacher_all if teacher_all > 0 else None
    right = {name: [bool(v["all"]) for v in verdicts] for name, verdicts in checks.items()}
    intervals = {name: list(bootstrap_interval(v)) for name, v in right.items()}
    intervals["relative"] = list(bootstrap_interval(right["zh_student"], right["en_teacher"]))

    # Alignment on the held-out scenes (all scenes when the budget left none), their renders as pivots.
    probe = [i for i in range(len(scenes)) if heldout[i]] or list(range(len(scenes)))
    student, english = run.student_cond.rows(probe), run.teacher_cond.rows(probe)
    alignment = embedding_alignment(student, english)
    alignment["attention_mse"] = attention_alignment(
        frozen,
        student,
        english,
        _pivots([scenes[i] for i in probe], frozen.resolution),
        timesteps=attention_timesteps,
    )

    result = EvalResult(
        accuracy=accuracy,
        heldout_accuracy=heldout_accuracy,
        relative_accuracy=relative,
        intervals=intervals,
        alignment=alignment,
        agreement=run.agreement,
        clip_score=run.clip_score,
        settings={
            "teacher": teacher_name(teacher),
            "scenes": len(scenes),
            "heldout_scenes": int(sum(heldout)),
            "seeds": [int(s) for s in seeds],
            "images_per_condition": len(run.rows),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "paraphrase": paraphrase,
            "scheduler": type(pipe.scheduler).__name__,
        },
        examples=examples(
            run, en_prompts, zh_prompts, num_examples, checks["perfect_translation"], checks["zh_student"]
        ),
    )
    result.seconds = time.perf_counter() - start
    return result
