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


def heldout_caption_pairs(limit: int | None = None, language: str = "zh") -> tuple[list[str], list[str]]:
    """Parallel canonical captions of the toy grammar's held-out single-object scenes: plain scene
    descriptions any SD model can draw.

    Args:
        limit: At most this many pairs (``None``: all).
        language: The target language (a code of ``toyworld.world.TARGET_LANGUAGES`` or ``"mixed"``).

    Returns:
        ``(en, target)``.
    """
    scenes = list(world.all_single_scenes(split="heldout"))[:limit]
    return [world.caption_en(s) for s in scenes], [world.caption(s, language) for s in scenes]


#: Two-object scenes an evaluation with pairs scores: a fixed subset of the 432 (both splits represented).
PAIR_SCENES = world.PAIR_EVAL_SCENES


def _scenes(
    max_scenes: int | None, kind: str = "single", max_pair_scenes: int = PAIR_SCENES
) -> tuple[list[Any], list[bool]]:
    """The evaluated scenes of ``kind`` (``"single"``, ``"pair"`` or ``"both"``: singles first) and whether each
    is held out: every single-object scene (train split, then held out; ``max_scenes`` of a fixed shuffle for a
    budget run), and ``max_pair_scenes`` two-object scenes of a fixed shuffle of all of them."""
    if kind not in ("single", "pair", "both"):
        raise ValueError(f"scene kind must be 'single', 'pair' or 'both', got {kind!r}")
    scenes: list[Any] = []
    heldout: list[bool] = []
    if kind in ("single", "both"):
        train = list(world.all_single_scenes(split="train"))
        held = list(world.all_single_scenes(split="heldout"))
        singles, flags = train + held, [False] * len(train) + [True] * len(held)
        if max_scenes is not None and max_scenes < len(singles):
            # A fixed shuffle keeps both splits represented in a budget run.
            order = np.random.default_rng(0).permutation(len(singles))[:max_scenes]
            singles, flags = [singles[i] for i in order], [flags[i] for i in order]
        scenes, heldout = singles, flags
    if kind in ("pair", "both"):
        pairs = world.pair_eval_scenes(max_pair_scenes)
        scenes += pairs
        heldout += [world.is_heldout(scene) for scene in pairs]
    return scenes, heldout


def _parallel_captions(
    scene: Any, rng: np.random.Generator | None, languages: Sequence[str] = ("zh",)
) -> tuple[str, list[str]]:
    """One English caption of ``scene`` and one in each of ``languages`` that say the same thing (the same
    paraphrase draw)."""
    if rng is None:
        return world.caption_en(scene), [world.caption(scene, lang) for lang in languages]
    # Generators in the same state make every grammar take the same template choice.
    state = int(rng.integers(2**31))
    return (
        world.caption_en(scene, rng=np.random.default_rng(state)),
        [world.caption(scene, lang, rng=np.random.default_rng(state)) for lang in languages],
    )


def student_languages(encoder: Any, languages: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The toy-world languages to score ``encoder`` in: ``languages`` when given, else the adapter's own
    (``encoder.config.language``), with the code-switched ``mixed`` prompts added for a multilingual one."""
    if languages is not None:
        return world.parse_languages(languages)
    recorded = getattr(getattr(encoder, "config", None), "language", None) or "zh"
    try:
        codes = world.parse_languages(recorded)
    except ValueError as err:
        raise ValueError(f"the adapter's language cannot be scored on the toy world: {err}") from None
    if len(codes) > 1 and world.MIXED not in codes:
        codes += (world.MIXED,)
    return codes


def _accuracy(verdicts: Sequence[Mapping[str, bool]]) -> dict[str, float]:
    """Fraction of verdicts with each attribute right (an empty list gives NaN); ``relation`` too when every
    verdict has it (two-object scenes)."""
    keys = ATTRIBUTES + (("relation",) if verdicts and all("relation" in v for v in verdicts) else ())
    if not verdicts:
        return {a: float("nan") for a in keys}
    return {a: float(np.mean([bool(v[a]) for v in verdicts])) for a in keys}


def group_summary(
    verdicts: Sequence[Mapping[str, bool]], reference: Sequence[Mapping[str, bool]] | None = None
) -> dict[str, Any]:
    """One row of :attr:`EvalResult.groups` from per-image checker verdicts (each with a ``heldout`` flag):
    accuracy per attribute, ``n``, the 95% bootstrap ``interval`` of ``all``, ``heldout_all`` and, with a
    ``reference`` (the English teacher's verdicts on the same images), the ratio ``relative`` and its paired
    ``relative_interval``. Verdicts pooled over several runs give the pooled row."""
    right = [bool(v["all"]) for v in verdicts]
    out: dict[str, Any] = {
        **_accuracy(verdicts),
        "n": len(verdicts),
        "interval": list(bootstrap_interval(right)),
        "heldout_all": _accuracy([v for v in verdicts if v.get("heldout")])["all"],
    }
    if reference is not None:
        ref = [bool(v["all"]) for v in reference]
        out["relative"] = float(np.mean(right) / np.mean(ref)) if any(ref) else None
        out["relative_interval"] = list(bootstrap_interval(right, ref))
    return out


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
    languages: str | Sequence[str] | None = None,
    scene_kind: str = "single",
    max_pair_scenes: int = PAIR_SCENES,
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
    ones alone) and, with ``scene_kind`` ``"pair"`` or ``"both"``, a fixed set of two-object scenes, each sampled
    at every seed in conditions that share the seeds:

    - ``<language>_student``: the student on the caption in each of ``languages`` (the first is the headline,
      reported as ``zh_student`` in ``accuracy`` whatever its language);
    - ``perfect_translation``: the teacher on the parallel English caption (same paraphrase);
    - ``en_teacher``: the teacher on the canonical English caption (the teacher's own accuracy; with
      ``paraphrase=False`` it is the same generation as ``perfect_translation`` and is not sampled twice).

    ``groups`` holds every (condition, scene kind) row with its interval and, for a student, its ratio to the
    teacher on the same kind. Alignment uses the headline language's held-out scenes: their rendered images
    are the pivots of the attention MSE.

    Args:
        encoder: The student (``xling.adapters.LanguageEncoder``; only its ``__call__`` is used).
        teacher: ``"toy"``, ``"toy-mmdit"``, a directory, a pipeline or an ``xling.core.Teacher``.
        seeds: Sampling seeds per scene.
        num_inference_steps: Sampler steps (``None``: the toy teacher's default).
        guidance_scale: Classifier-free guidance (``None``: the toy teacher's default).
        paraphrase: Draw one seeded paraphrase per scene (parallel in every language) instead of the
            canonical captions.
        max_scenes: Evaluate only the first N single-object scenes of a fixed shuffled order (budget runs).
        languages: Languages of the student's prompts (codes, ``"all"`` or ``"mixed"``, see
            :func:`xling.train.toyworld.world.parse_languages`); ``None``: the adapter's own, plus ``mixed``
            for a multilingual adapter (:func:`student_languages`).
        scene_kind: ``"single"``, ``"pair"`` or ``"both"``.
        max_pair_scenes: Two-object scenes scored (a fixed shuffle of all 432).
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
        ValueError: an unknown language or scene kind.
    """
    start = time.perf_counter()
    codes = student_languages(encoder, languages)
    scenes, heldout = _scenes(max_scenes, scene_kind, max_pair_scenes)
    default_steps, default_guidance = toy_sampler_defaults(teacher)
    steps = num_inference_steps or default_steps
    guidance = guidance_scale if guidance_scale is not None else default_guidance
    pipe = load_pipeline(teacher, device=device, variant=variant)
    check_fits(encoder, pipe, teacher_name(teacher))
    # Made before any sampling: wrapping freezes the modules in place, which can pick other float kernels, so
    # every generation of this pipeline (cached references included) runs on the same frozen modules.
    frozen = teacher if isinstance(teacher, Teacher) else pipeline_teacher(pipe)

    rng = np.random.default_rng(1234) if paraphrase else None
    captions = [_parallel_captions(scene, rng, codes) for scene in scenes]
    en_prompts = [en for en, _ in captions]
    prompts = {lang: [targets[k] for _, targets in captions] for k, lang in enumerate(codes)}
    canonical_en = [world.caption_en(scene) for scene in scenes]
    sampler = dict(num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size)
    # Every language's run shares the teacher's generations, so they are sampled once even without a cache.
    cache = reference_cache if reference_cache is not None else {}
    runs = {
        lang: compare(
            pipe,
            encoder,
            en_prompts,
            prompts[lang],
            seeds=seeds,
            clip_model=clip_model if lang == codes[0] else None,
            reference_cache=cache,
            **sampler,
        )
        for lang in codes
    }
    run = runs[codes[0]]
    canonical = run.teacher_samples
    if canonical_en != en_prompts:
        canonical = teacher_samples(pipe, canonical_en, run.rows, run.seeds, cache=cache, **sampler)

    def verdicts(samples: Samples) -> list[dict[str, bool]]:
        return [world.check(img, scenes[i]) for img, i in zip(samples.images, run.rows)]

    checks = {"en_teacher": verdicts(canonical), "perfect_translation": verdicts(run.teacher_samples)}
    checks.update({f"{lang}_student": verdicts(runs[lang].student_samples) for lang in codes})
    kinds = {"pair" if scenes[i].is_pair else "single" for i in run.rows}
    per_image: dict[str, list[dict[str, bool]]] = {}
    for kind in ("single", "pair"):
        if kind not in kinds:
            continue
        rows = [k for k, i in enumerate(run.rows) if scenes[i].is_pair == (kind == "pair")]
        for name, verdict in checks.items():
            per_image[f"{name}/{kind}"] = [{**verdict[k], "heldout": heldout[run.rows[k]]} for k in rows]
    groups = {
        name: group_summary(v, per_image[f"en_teacher/{name.split('/')[1]}"] if "_student/" in name else None)
        for name, v in per_image.items()
    }

    # The headline: the first language on the first scene kind, under the names every report reads.
    head = "single" if "single" in kinds else "pair"
    named = {
        "zh_student": f"{codes[0]}_student",
        "perfect_translation": "perfect_translation",
        "en_teacher": "en_teacher",
    }
    rows = {name: groups[f"{source}/{head}"] for name, source in named.items()}
    accuracy = {
        name: {a: row[a] for a in (*ATTRIBUTES, "relation") if a in row} for name, row in rows.items()
    }
    heldout_accuracy = {
        name: _accuracy([v for v in per_image[f"{named[name]}/{head}"] if v["heldout"]])
        for name in ("zh_student", "perfect_translation")
    }
    relative = rows["zh_student"]["relative"]
    intervals = {name: row["interval"] for name, row in rows.items()}
    intervals["relative"] = rows["zh_student"]["relative_interval"]

    # Alignment on the held-out single scenes (all evaluated scenes when none), their renders as pivots.
    singles = [i for i in range(len(scenes)) if not scenes[i].is_pair] or list(range(len(scenes)))
    probe = [i for i in singles if heldout[i]] or singles
    student, english = run.student_cond.rows(probe), run.teacher_cond.rows(probe)
    alignment = embedding_alignment(student, english)
    alignment["attention_mse"] = attention_alignment(
        frozen,
        student,
        english,
        _pivots([scenes[i] for i in probe], frozen.resolution),
        timesteps=attention_timesteps,
    )

    n_pairs = sum(s.is_pair for s in scenes)
    result = EvalResult(
        accuracy=accuracy,
        heldout_accuracy=heldout_accuracy,
        relative_accuracy=relative,
        intervals=intervals,
        groups=groups,
        verdicts=per_image,
        alignment=alignment,
        agreement=run.agreement,
        clip_score=run.clip_score,
        settings={
            "teacher": teacher_name(teacher),
            "languages": list(codes),
            "scene_kind": scene_kind,
            "scenes": len(scenes) - n_pairs,
            "heldout_scenes": int(sum(h for h, s in zip(heldout, scenes) if not s.is_pair)),
            "pair_scenes": n_pairs,
            "heldout_pair_scenes": int(sum(h for h, s in zip(heldout, scenes) if s.is_pair)),
            "seeds": [int(s) for s in seeds],
            "images_per_condition": len(run.rows),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "paraphrase": paraphrase,
            "scheduler": type(pipe.scheduler).__name__,
        },
        examples=examples(
            run,
            en_prompts,
            prompts[codes[0]],
            num_examples,
            checks["perfect_translation"],
            checks[f"{codes[0]}_student"],
        ),
    )
    result.seconds = time.perf_counter() - start
    return result
