"""Report writers: the Markdown report, ``metrics.json``, the labelled PNG grid and generated images."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from xling.train.data.accounting import RowAccounting
from xling.train.evaluation.results import ATTRIBUTES, EvalResult, Samples


def write_grid(result: EvalResult, path: str | Path, *, max_columns: int = 16) -> Path:
    """A labelled PNG: top row the teacher on English captions, bottom row the student on Chinese prompts.

    Columns are (prompt, seed) pairs, identical seeds above each other; a column title gives the English
    caption and the seed, and a cell's frame is green (red) when the checker accepts (rejects) it. Chinese
    glyphs are not drawn (no CJK font is assumed); the report lists the Chinese prompts by column.

    Args:
        result: An evaluation with ``examples``.
        path: The PNG to write.
        max_columns: At most this many columns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = result.examples[:max_columns]
    if not examples:
        raise ValueError("the result has no examples to draw")
    n = len(examples)
    # A bare Figure (no pyplot) draws with Agg and leaves the caller's backend and figure list alone.
    fig = Figure(figsize=(1.4 * n + 0.8, 3.6))
    axes = fig.subplots(2, n, squeeze=False)
    for col, ex in enumerate(examples):
        for row, (key, check) in enumerate((("en_image", "en_check"), ("zh_image", "zh_check"))):
            ax = axes[row][col]
            ax.imshow(ex[key], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if ex[check] is not None:
                color = "#1a9850" if ex[check]["all"] else "#d73027"
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(3)
            if row == 0:
                ax.set_title(f"{col + 1}. {_wrap(ex['en'])}\nseed {ex['seed']}", fontsize=6)
    axes[0][0].set_ylabel("English\n(teacher)", fontsize=8)
    axes[1][0].set_ylabel("Chinese\n(student)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _wrap(text: str, width: int = 18) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def format_percent(x: float | None) -> str:
    """``x`` as a percentage with one decimal (``0.875`` -> ``"87.5%"``); ``"n/a"`` for ``None`` or NaN."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def format_interval(interval: Sequence[float] | None) -> str:
    """A ``[low, high]`` fraction interval as ``"87.5-100.0%"``; ``""`` when absent or NaN."""
    if not interval or any(math.isnan(x) for x in interval):
        return ""
    low, high = interval
    return f"{100 * low:.1f}-{100 * high:.1f}%"


def _num(x: float | None, fmt: str = ".4g") -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else format(x, fmt)


_CONDITION_LABELS = {
    "en_teacher": "English teacher (canonical English captions)",
    "perfect_translation": "Perfect translation (teacher, parallel English captions)",
    "zh_student": "Student (Chinese prompts)",
}


def group_label(name: str) -> str:
    """``"ja_student/pair"`` -> ``"student, ja, two objects"``."""
    condition, _, kind = name.partition("/")
    scene = {"single": "one object", "pair": "two objects"}.get(kind, kind)
    if condition.endswith("_student"):
        return f"student, {condition.removesuffix('_student')}, {scene}"
    return f"{_CONDITION_LABELS.get(condition, condition).split(' (')[0]}, {scene}"


def group_table(
    groups: Mapping[str, Mapping[str, Any]], label: Callable[[str], str] = group_label
) -> list[str]:
    """Markdown lines of :attr:`EvalResult.groups`: one row per condition, language and scene kind, each named
    by ``label``."""
    lines = [
        "### Per language and scene kind",
        "",
        "| condition | color | shape | position | relation | all | all, 95% interval | held-out all "
        "| of teacher | of teacher, 95% interval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, g in groups.items():
        cells = [format_percent(g.get(a)) for a in ("color", "shape", "position")]
        cells.append(format_percent(g["relation"]) if "relation" in g else "-")
        cells += [
            f"**{format_percent(g['all'])}**",
            format_interval(g.get("interval")) or "-",
            format_percent(g.get("heldout_all")),
            format_percent(g["relative"]) if g.get("relative") is not None else "-",
            format_interval(g.get("relative_interval")) or "-",
        ]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def report_markdown(
    result: EvalResult, *, title: str = "xling evaluation", grid: str | None = "grid.png"
) -> str:
    """The Markdown report of ``result`` (what :func:`write_report` writes to ``report.md``).

    Args:
        result: An evaluation.
        title: The level-1 heading.
        grid: The grid PNG the report links to (``None``: no image link).
    """
    s = result.settings
    lines = [f"# {title}", ""]
    lines.append(
        f"Teacher `{s.get('teacher', '?')}`; sampler {s.get('scheduler', 'pipeline default')}, "
        f"{s.get('num_inference_steps')} steps, guidance {s.get('guidance_scale')}; seeds {s.get('seeds')}."
    )
    if "scenes" in s:
        pairs = s.get("pair_scenes") or 0
        scenes = f"{s['scenes']} single-object scenes ({s['heldout_scenes']} held out)"
        if pairs:
            scenes += f" and {pairs} two-object scenes ({s.get('heldout_pair_scenes', 0)} held out)"
        lines.append(
            f"{scenes} x {len(s['seeds'])} seeds = {s['images_per_condition']} images per condition; "
            f"paraphrased captions: {s['paraphrase']}."
        )
        if s.get("languages", ["zh"]) != ["zh"]:
            lines.append(f"Student prompts in: {', '.join(s['languages'])} (the first is the headline).")
    lines.append("")
    if result.accuracy:
        lines += [
            "## Checker accuracy",
            "",
            "| condition | color | shape | position | all |",
            "|---|---|---|---|---|",
        ]
        for name in ("en_teacher", "perfect_translation", "zh_student"):
            acc = result.accuracy.get(name)
            if acc:
                lines.append(
                    f"| {_CONDITION_LABELS[name]} | "
                    + " | ".join(format_percent(acc[a]) for a in ATTRIBUTES)
                    + " |"
                )
        for name, acc in result.heldout_accuracy.items():
            lines.append(
                f"| {_CONDITION_LABELS[name]}, held-out scenes | "
                + " | ".join(format_percent(acc[a]) for a in ATTRIBUTES)
                + " |"
            )
        interval = format_interval(result.intervals.get("relative"))
        lines += [
            "",
            f"Student / English teacher, all attributes: **{format_percent(result.relative_accuracy)}**"
            + (f" (95% bootstrap interval over scenes x seeds: {interval})." if interval else "."),
            "",
        ]
        if len(result.groups) > 3:  # more than one language or scene kind: the full breakdown
            lines += group_table(result.groups)
    a = result.alignment
    lines += [
        "## Alignment" + (" (held-out scenes)" if result.accuracy else ""),
        "",
        "| token cosine | mean-token cosine | pooled cosine | attention MSE (sum over layers) |",
        "|---|---|---|---|",
        f"| {_num(a.get('token_cosine'), '.4f')} | {_num(a.get('mean_cosine'), '.4f')} | "
        f"{_num(a.get('pooled_cosine'), '.4f')} | {_num(a.get('attention_mse'))} |",
        "",
    ]
    # Off the toy world the report says what the attention MSE was measured on, or why it is n/a.
    if "attention_pivots" in s:
        lines += [f"Attention-MSE pivots: {s['attention_pivots']}.", ""]
    if a.get("attention_mse") is None and "attention_mse_note" in s:
        lines += [f"Attention MSE n/a: {s['attention_mse_note']}.", ""]
    lines += [
        "## Paired-generation agreement (student vs teacher on the parallel English caption, same seeds)",
        "",
        "| latent MSE | PSNR (dB) |",
        "|---|---|",
        f"| {_num(result.agreement.get('latent_mse'))} | {_num(result.agreement.get('psnr'), '.2f')} |",
        "",
    ]
    if result.clip_score is not None:
        lines += [
            "## CLIP score (against the English captions)",
            "",
            "| condition | CLIP score |",
            "|---|---|",
        ]
        lines += [f"| {_CONDITION_LABELS[k]} | {v:.2f} |" for k, v in result.clip_score.items()]
        lines.append("")
    if result.examples:
        lines += ["## Examples", ""]
        if grid:
            lines += [f"![English (top) vs Chinese (bottom) at the same seeds]({grid})", ""]
        lines += ["| column | English | Chinese | seed |", "|---|---|---|---|"]
        for k, ex in enumerate(result.examples):
            lines.append(f"| {k + 1} | {ex['en']} | {ex['zh']} | {ex['seed']} |")
        lines.append("")
    lines.append(f"Evaluation time: {result.seconds:.1f} s.")
    return "\n".join(lines) + "\n"


def write_report(
    result: EvalResult,
    out_dir: str | Path,
    *,
    title: str = "xling evaluation",
    grid: bool = True,
    rows: RowAccounting | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.json`` and (with examples) ``grid.png`` into ``out_dir``.

    Args:
        result: An evaluation.
        out_dir: The report directory (created).
        title: The report's heading.
        grid: Draw ``grid.png`` when the result has examples.
        rows: A training run's row accounting: a ``## Data`` section of the report and ``rows`` in the metrics.

    Returns:
        ``{"report": ..., "metrics": ..., "grid": ...}`` (``grid`` only when written).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if grid and result.examples:
        paths["grid"] = write_grid(result, out_dir / "grid.png")
    paths["report"] = out_dir / "report.md"
    text = report_markdown(result, title=title, grid="grid.png" if "grid" in paths else None)
    paths["report"].write_text(text + (f"\n{rows.to_markdown()}" if rows is not None else ""))
    metrics = {**result.to_dict(), **({"rows": rows.to_dict()} if rows is not None else {})}
    paths["metrics"] = out_dir / "metrics.json"
    paths["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return paths


def write_images(
    samples: Samples,
    prompts: Sequence[str],
    rows: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    scale: int = 1,
    settings: Mapping[str, Any] | None = None,
) -> list[Path]:
    """One PNG per generated image, ``{prompt:03d}-seed{seed}.png``, and ``images.json`` indexing them.

    Args:
        samples: ``B`` generations, images ``[B, H, W, 3]`` uint8.
        prompts: The prompts the rows index.
        rows: Prompt index of each image.
        seeds: Seed of each image.
        out_dir: Where the files go (created).
        scale: Nearest-neighbour upscaling factor (>= 1) of the saved PNGs.
        settings: Written at the top level of ``images.json`` beside ``images``.

    Returns:
        The PNG paths, in row order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, index = [], []
    for k, (i, seed) in enumerate(zip(rows, seeds)):
        image = Image.fromarray(samples.images[k])
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        path = out_dir / f"{i:03d}-seed{seed}.png"
        image.save(path)
        paths.append(path)
        index.append({"file": path.name, "prompt": prompts[i], "seed": seed})
    (out_dir / "images.json").write_text(
        json.dumps({**(settings or {}), "images": index}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    return paths
