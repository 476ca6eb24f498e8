"""Entry points on a saved adapter directory: what ``xling eval``, ``xling generate`` and the end of
``xling train`` call."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xling.adapters.encoder import LanguageEncoder, looks_like_local_path
from xling.train.data.accounting import RowAccounting
from xling.train.evaluation.pairs import evaluate_pairs
from xling.train.evaluation.report import write_images, write_report
from xling.train.evaluation.results import EvalResult
from xling.train.evaluation.sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    check_fits,
    load_pipeline,
    sample,
    sampler_defaults,
    seeded_rows,
    student_conditioning,
)
from xling.train.evaluation.toy import PAIR_SCENES, evaluate_toy, heldout_caption_pairs
from xling.train.toyworld.names import TOY, is_toy_teacher


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


def prompt_pairs_from_rows(rows: Any, limit: int | None = None) -> list[tuple[str, str]] | None:
    """``(en, zh)`` pairs from the first rows of a map-style dataset of dicts (a run's validation split).

    Rows are read in order until ``limit`` pairs are found (a row may carry an image, which costs a decode);
    rows without both captions (a ``denoise`` corpus has no English) are skipped. Corpus rows name the
    captions ``en`` / ``target``, toy-world rows ``en`` / ``zh``.

    Args:
        rows: Map-style rows, or ``None`` (a streamed corpus has no split).
        limit: Stop after this many pairs (``None``: read every row).

    Returns:
        The pairs, or ``None`` when there are none (or the rows are not dicts).
    """
    if rows is None or not hasattr(rows, "__len__"):
        return None
    pairs: list[tuple[str, str]] = []
    for i in range(len(rows)):
        if limit is not None and len(pairs) >= limit:
            break
        row = rows[i]
        if not isinstance(row, Mapping):
            return None  # rows of a caller's own shape: the report stays unscored
        en, zh = row.get("en") or row.get("english"), row.get("zh") or row.get("target")
        if en and zh:
            pairs.append((str(en), str(zh)))
    return pairs or None


def adapter_teacher(encoder: LanguageEncoder, teacher: str | Path | None, adapter_dir: str | Path) -> str:
    """The teacher to run an adapter with: ``teacher`` when given, else the one its ``config.json`` records,
    else (an adapter saved before teachers were recorded) ``"toy"``.

    Raises:
        FileNotFoundError: the recorded teacher is a local folder that is no longer there.
    """
    if teacher is not None:
        return str(teacher)
    record = encoder.teacher or {}
    name = str(record.get("name_or_path", TOY))
    if not is_toy_teacher(name) and looks_like_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"the teacher recorded in {Path(adapter_dir) / 'config.json'} is not at {name}; "
            "pass its location with --teacher (teacher= in Python)"
        )
    return name


def load_adapter(
    adapter_dir: str | Path,
    teacher: str | Path | None,
    *,
    student_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[LanguageEncoder, str]:
    """``(encoder, teacher)``: the adapter in eval mode and :func:`adapter_teacher`'s teacher for it."""
    encoder = LanguageEncoder.from_pretrained(adapter_dir, student_path=student_path, device=device)
    return encoder, adapter_teacher(encoder, teacher, adapter_dir)


def evaluate_adapter(
    adapter_dir: str | Path,
    teacher: str | Path | None = None,
    *,
    toy: bool | None = None,
    prompts: str | Path | None = None,
    prompt_pairs: Sequence[tuple[str, str]] | None = None,
    num_prompts: int | None = None,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    paraphrase: bool = True,
    max_scenes: int | None = None,
    languages: str | Sequence[str] | None = None,
    scene_kind: str = "single",
    max_pair_scenes: int = PAIR_SCENES,
    clip_model: str | Path | None = None,
    num_examples: int = 8,
    device: str | torch.device = "cpu",
    student_path: str | Path | None = None,
    variant: str | None = None,
) -> EvalResult:
    """Load an adapter and evaluate it: :func:`evaluate_toy` on the toy world, else :func:`evaluate_pairs`.

    The head's widths are checked against the teacher before anything is sampled.

    Args:
        adapter_dir: A ``LanguageEncoder.save_pretrained`` directory.
        teacher: ``"toy"``, a diffusers directory or id; ``None``: the teacher the adapter records
            (:func:`adapter_teacher`).
        toy: Whether ``teacher`` is the toy world's (``None``: whether it is ``"toy"``).
        prompts: Off the toy world: a JSONL file of ``{"en", "zh"}`` pairs (:func:`read_prompt_pairs`);
            ``None``: ``prompt_pairs``, else the held-out captions of the toy grammar.
        prompt_pairs: Off the toy world: ``(en, zh)`` pairs, when ``prompts`` is ``None``.
        num_prompts: Off the toy world: at most this many prompt pairs (``None``: all).
        seeds: Sampling seeds.
        num_inference_steps: Sampler steps (``None``: :func:`~xling.train.evaluation.sampler_defaults`).
        guidance_scale: Guidance (``None``: :func:`~xling.train.evaluation.sampler_defaults`).
        paraphrase: Toy world: seeded paraphrases instead of the canonical captions.
        max_scenes: Toy world: a fixed subset of this many scenes (``None``: all).
        languages: Toy world: the languages to score (``None``: the adapter's own, see :func:`evaluate_toy`).
        scene_kind: Toy world: ``"single"``, ``"pair"`` or ``"both"``.
        max_pair_scenes: Toy world: two-object scenes scored (a fixed set).
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        num_examples: Prompts kept for the PNG grid.
        device: Where the evaluation runs.
        student_path: Where the base student of a frozen or LoRA adapter lives now (default: the recorded one).
        variant: Weight-file variant of the teacher (``"fp16"``), see :func:`load_pipeline`.

    Raises:
        xling.adapters.WidthMismatchError: the adapter does not fit the teacher.
        FileNotFoundError: no adapter, a run folder instead of its ``adapter/``, or a moved student.
    """
    encoder, teacher = load_adapter(adapter_dir, teacher, student_path=student_path, device=device)
    common = dict(
        seeds=seeds, clip_model=clip_model, num_examples=num_examples, device=device, variant=variant
    )
    if is_toy_teacher(teacher) if toy is None else toy:
        return evaluate_toy(
            encoder,
            teacher,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            paraphrase=paraphrase,
            max_scenes=max_scenes,
            languages=languages,
            scene_kind=scene_kind,
            max_pair_scenes=max_pair_scenes,
            **common,
        )
    if prompts is not None:
        en, zh = read_prompt_pairs(prompts)
    elif prompt_pairs is not None:
        en, zh = [str(p[0]) for p in prompt_pairs], [str(p[1]) for p in prompt_pairs]
    else:
        en, zh = heldout_caption_pairs()
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
    scene_kind: str = "single",
    max_pair_scenes: int = PAIR_SCENES,
    device: str | torch.device = "cpu",
    title: str | None = None,
    prompt_pairs: Sequence[tuple[str, str]] | None = None,
    rows: RowAccounting | None = None,
) -> dict[str, Path]:
    """The end-of-training evaluation ``run_recipe`` calls: load the adapter, evaluate, write the report.

    On the toy world (``toy``) it is :func:`evaluate_toy`. With any other teacher it is :func:`evaluate_pairs`
    on the first ``num_prompts`` of ``prompt_pairs`` (held-out rows of the user's corpus), attention MSE
    included; without them nothing is sampled and ``report.md`` says which metrics need prompts and how to
    get them (the toy grammar's captions say nothing about a model trained on another corpus).

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
        scene_kind: Toy world: ``"single"``, ``"pair"`` or ``"both"`` (every language the adapter reads is
            scored, plus code-switched prompts for a multilingual one).
        max_pair_scenes: Toy world: two-object scenes scored (a fixed set).
        device: Where the evaluation runs.
        title: Report title (default names the adapter directory).
        prompt_pairs: ``(en, zh)`` pairs of held-out rows (the validation split), scored off the toy world.
        rows: The run's row accounting, written into ``report.md`` (``## Data``) and ``metrics.json`` (``rows``).

    Returns:
        ``{"report": ..., "metrics": ..., "grid": ...}``; only ``{"report": ...}`` off the toy world without
        ``prompt_pairs``.
    """
    title = title or f"xling evaluation of {Path(adapter_dir).name}"
    if not toy and not prompt_pairs:
        return {"report": _write_unscored_report(adapter_dir, output_dir, teacher, title, rows)}
    result = evaluate_adapter(
        adapter_dir,
        teacher,
        toy=toy,
        prompt_pairs=None if toy else prompt_pairs,
        num_prompts=num_prompts,
        seeds=seeds,
        # Off the toy world too, a run's report samples at the toy world's settings unless the config says.
        num_inference_steps=num_inference_steps or DEFAULT_STEPS,
        guidance_scale=guidance_scale if guidance_scale is not None else DEFAULT_GUIDANCE,
        max_scenes=max_scenes,
        **({"scene_kind": scene_kind, "max_pair_scenes": max_pair_scenes} if toy else {}),
        num_examples=num_prompts,
        device=device,
    )
    return write_report(result, output_dir, title=title, rows=rows)


def _write_unscored_report(
    adapter_dir: str | Path,
    output_dir: str | Path,
    teacher: str | Path,
    title: str,
    rows: RowAccounting | None,
) -> Path:
    """``report.md`` of a real-teacher run given no held-out prompts: what needs them, how to score later."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = (
        f"# {title}\n\n"
        f"Teacher `{teacher}`. No held-out prompt pairs were given, so nothing was scored: the alignment "
        "(token, mean-token and pooled cosine, attention MSE), the paired-generation agreement (latent MSE, "
        "PSNR) and the CLIP score all need parallel English / translated prompts.\n\n"
        f"Score the adapter on them with `xling eval --adapter {adapter_dir} --prompts pairs.jsonl` "
        '(one `{"en": ..., "zh": ...}` object per line; the adapter records its teacher).\n'
    ) + (f"\n{rows.to_markdown()}" if rows is not None else "")
    path = out / "report.md"
    path.write_text(text, encoding="utf-8")
    return path


def generate_images(
    adapter_dir: str | Path,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    teacher: str | Path | None = None,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    scale: int = 1,
    device: str | torch.device = "cpu",
    student_path: str | Path | None = None,
    variant: str | None = None,
) -> list[Path]:
    """Images from prompts in the adapter's language, one per prompt and seed, written as PNGs.

    The adapter turns the prompts into the teacher's ``prompt_embeds``; the teacher's own pipeline and
    sampler draw them. ``out_dir`` gets ``{prompt:03d}-seed{seed}.png`` and ``images.json``.

    Args:
        adapter_dir: A ``LanguageEncoder.save_pretrained`` directory.
        prompts: ``N`` prompts.
        out_dir: Where the files go (created).
        teacher: ``"toy"``, a diffusers directory or id; ``None``: the teacher the adapter records
            (:func:`adapter_teacher`).
        seeds: ``S`` seeds; each prompt is drawn once per seed.
        num_inference_steps: Sampler steps (``None``: :func:`~xling.train.evaluation.sampler_defaults`).
        guidance_scale: Guidance (``None``: :func:`~xling.train.evaluation.sampler_defaults`).
        scale: Nearest-neighbour upscaling factor (>= 1) of the saved PNGs.
        device: Where the pipeline runs.
        student_path: Where the base student of a frozen or LoRA adapter lives now (default: the recorded one).
        variant: Weight-file variant of the teacher (``"fp16"``), see :func:`load_pipeline`.

    Returns:
        The ``N * S`` PNG paths, prompt-major.

    Raises:
        xling.adapters.WidthMismatchError: the adapter does not fit the teacher (checked before sampling).
        FileNotFoundError: no adapter, a run folder instead of its ``adapter/``, or a moved student.
    """
    encoder, teacher = load_adapter(adapter_dir, teacher, student_path=student_path, device=device)
    pipe = load_pipeline(teacher, device=device, variant=variant)
    check_fits(encoder, pipe, teacher)
    steps, guidance = sampler_defaults(teacher, num_inference_steps, guidance_scale)
    cond, uncond = student_conditioning(encoder, prompts)
    rows, seed_list = seeded_rows(len(prompts), seeds)
    samples = sample(
        pipe, cond, uncond, seed_list, rows=rows, num_inference_steps=steps, guidance_scale=guidance
    )
    settings = {"adapter": str(adapter_dir), "teacher": str(teacher), "steps": steps, "guidance": guidance}
    return write_images(samples, prompts, rows, seed_list, out_dir, scale=scale, settings=settings)
