"""Entry points on a saved adapter directory: what ``xling eval``, ``xling generate`` and the end of
``xling train`` call."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from xling.adapters.encoder import LanguageEncoder
from xling.train.evaluation.pairs import evaluate_pairs
from xling.train.evaluation.report import write_images, write_report
from xling.train.evaluation.results import EvalResult
from xling.train.evaluation.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    load_pipeline,
    sample,
    sampler_defaults,
    seeded_rows,
    student_conditioning,
)
from xling.train.evaluation.toy import evaluate_toy, heldout_caption_pairs
from xling.train.toyworld.names import TOY


def read_prompt_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """``en`` / ``zh`` lists from a JSONL file (one ``{"en": ..., "zh": ...}`` object per line).

    Raises:
        ValueError: A line is not such an object, or the file holds none.
    """
    path = Path(path)
    en, zh = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            en.append(str(row["en"]))
            zh.append(str(row["zh"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected a JSON object with 'en' and 'zh' ({err})") from err
    if not en:
        raise ValueError(f"{path} holds no prompt pairs")
    return en, zh


def evaluate_adapter(
    adapter_dir: str | Path,
    teacher: str | Path = TOY,
    *,
    toy: bool | None = None,
    prompts: str | Path | None = None,
    num_prompts: int | None = None,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    paraphrase: bool = True,
    max_scenes: int | None = None,
    clip_model: str | Path | None = None,
    num_examples: int = 8,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Load an adapter and evaluate it: :func:`evaluate_toy` on the toy world, else :func:`evaluate_pairs`.

    Args:
        adapter_dir: A ``LanguageEncoder.save_pretrained`` directory.
        teacher: ``"toy"``, a diffusers directory or id.
        toy: Whether ``teacher`` is the toy world's (``None``: whether it is ``"toy"``).
        prompts: Off the toy world: a JSONL file of ``{"en", "zh"}`` pairs (:func:`read_prompt_pairs`);
            ``None``: the held-out captions of the toy grammar.
        num_prompts: Off the toy world: at most this many prompt pairs (``None``: all).
        seeds: Sampling seeds.
        num_inference_steps: Sampler steps (``None``: the toy world's, or 30 for another teacher).
        guidance_scale: Guidance (``None``: the toy world's, or 7.5 for another teacher).
        paraphrase: Toy world: seeded paraphrases instead of the canonical captions.
        max_scenes: Toy world: a fixed subset of this many scenes (``None``: all).
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        num_examples: Prompts kept for the PNG grid.
        device: Where the evaluation runs.
    """
    encoder = LanguageEncoder.from_pretrained(adapter_dir, device=device)
    common = dict(seeds=seeds, clip_model=clip_model, num_examples=num_examples, device=device)
    if (teacher == TOY) if toy is None else toy:
        return evaluate_toy(
            encoder,
            teacher,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            paraphrase=paraphrase,
            max_scenes=max_scenes,
            **common,
        )
    en, zh = read_prompt_pairs(prompts) if prompts is not None else heldout_caption_pairs()
    steps, guidance = sampler_defaults(teacher, num_inference_steps, guidance_scale)
    return evaluate_pairs(
        encoder,
        teacher,
        en[:num_prompts],
        zh[:num_prompts],
        num_inference_steps=steps,
        guidance_scale=guidance,
        **common,
    )


def write_run_report(
    *,
    adapter_dir: str | Path,
    output_dir: str | Path,
    teacher: str | Path = TOY,
    toy: bool = True,
    num_prompts: int = 8,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    max_scenes: int | None = None,
    device: str | torch.device = "cpu",
    title: str | None = None,
) -> dict[str, Path]:
    """The end-of-training evaluation ``run_recipe`` calls: load the adapter, evaluate, write the report.

    On the toy world (``toy``) it is :func:`evaluate_toy`; with any other teacher it is :func:`evaluate_pairs`
    on ``num_prompts`` parallel captions of the toy grammar (plain scene descriptions any SD model can draw).

    Args:
        adapter_dir: A ``LanguageEncoder.save_pretrained`` directory.
        output_dir: Where ``report.md``, ``metrics.json`` and ``grid.png`` go.
        teacher: ``"toy"``, a diffusers directory or id.
        toy: Whether ``teacher`` is the toy world's.
        num_prompts: Prompts shown in the grid (and evaluated, off the toy world).
        seeds: Sampling seeds.
        num_inference_steps: Sampler steps (``None``: the toy world's default).
        guidance_scale: Guidance (``None``: the toy world's default).
        max_scenes: Toy world: evaluate a fixed subset of this many scenes (``None``: all).
        device: Where the evaluation runs.
        title: Report title (default names the adapter directory).

    Returns:
        ``{"report": ..., "metrics": ..., "grid": ...}``.
    """
    result = evaluate_adapter(
        adapter_dir,
        teacher,
        toy=toy,
        num_prompts=num_prompts,
        seeds=seeds,
        # Off the toy world too, a run's report samples at the toy world's settings unless the config says.
        num_inference_steps=num_inference_steps or DEFAULT_STEPS,
        guidance_scale=guidance_scale if guidance_scale is not None else DEFAULT_GUIDANCE,
        max_scenes=max_scenes,
        num_examples=num_prompts,
        device=device,
    )
    title = title or f"xling evaluation of {Path(adapter_dir).name}"
    return write_report(result, output_dir, title=title)


def generate_images(
    adapter_dir: str | Path,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    teacher: str | Path = TOY,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scale: int = 1,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Images from prompts in the adapter's language, one per prompt and seed, written as PNGs.

    The adapter turns the prompts into the teacher's ``prompt_embeds``; the teacher's own pipeline and
    sampler draw them. ``out_dir`` gets ``{prompt:03d}-seed{seed}.png`` and ``images.json``.

    Args:
        adapter_dir: A ``LanguageEncoder.save_pretrained`` directory.
        prompts: ``N`` prompts.
        out_dir: Where the files go (created).
        teacher: ``"toy"``, a diffusers directory or id.
        seeds: ``S`` seeds; each prompt is drawn once per seed.
        num_inference_steps: Sampler steps (``None``: the toy world's, or 30 for another teacher).
        guidance_scale: Guidance (``None``: the toy world's, or 7.5 for another teacher).
        scale: Nearest-neighbour upscaling factor (>= 1) of the saved PNGs.
        device: Where the pipeline runs.

    Returns:
        The ``N * S`` PNG paths, prompt-major.
    """
    encoder = LanguageEncoder.from_pretrained(adapter_dir, device=device)
    pipe = load_pipeline(teacher, device=device)
    steps, guidance = sampler_defaults(teacher, num_inference_steps, guidance_scale)
    cond, uncond = student_conditioning(encoder, prompts)
    rows, seed_list = seeded_rows(len(prompts), seeds)
    samples = sample(
        pipe, cond, uncond, seed_list, rows=rows, num_inference_steps=steps, guidance_scale=guidance
    )
    settings = {"adapter": str(adapter_dir), "teacher": str(teacher), "steps": steps, "guidance": guidance}
    return write_images(samples, prompts, rows, seed_list, out_dir, scale=scale, settings=settings)
