"""``xling eval --adapter DIR``: alignment, paired-generation agreement, toy-world accuracy, CLIP score.

The teacher is the one the adapter records (``--teacher`` overrides it; toy for an adapter that records
none), and the adapter's widths are checked against it before anything is sampled.
With the toy teacher every single-object scene (``--scene-kind pair|both``: two-object scenes too) is
generated from its caption in each language the adapter reads (``--language``) by the student and from the
parallel English caption by the teacher, at the same seeds, and the checker scores both.
With another ``--teacher``, ``--prompts`` gives parallel captions (JSONL with ``en`` and ``zh`` keys; default:
captions of the toy grammar) and the report has alignment, agreement and, with ``--clip-model``, CLIP score.
Metrics are printed and written to ``--out`` as ``report.md``, ``metrics.json`` and ``grid.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xling.train.commands import add_model_arguments, add_scene_arguments


def register(subparsers: Any) -> None:
    """Add ``xling eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an adapter against its teacher (alignment, agreement, accuracy)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--clip-model", default=None, metavar="PATH", help="CLIP model for the CLIP score")
    parser.add_argument(
        "--prompts", type=Path, default=None, metavar="FILE", help="JSONL of {en, zh} (non-toy)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="SEED", help="sampling seeds")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: the toy world's, the pipeline's own for PixArt/Sana/SD3/Flux, else 30)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default: toy world's, the pipeline's own for PixArt/Sana/SD3/Flux, else 7.5)",
    )
    parser.add_argument(
        "--max-scenes", type=int, default=None, help="toy world: evaluate a fixed subset of scenes"
    )
    parser.add_argument("--no-paraphrase", action="store_true", help="toy world: canonical captions only")
    parser.add_argument(
        "--language",
        default=None,
        help="toy world: languages to score, comma-separated (zh, ja, ko, es, ar, mixed, all; default: the "
        "adapter's own, plus mixed for a multilingual adapter)",
    )
    add_scene_arguments(parser)
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="report directory (default: runs/eval/NAME)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from xling.train import evaluation

    out = args.out or Path("runs/eval") / Path(args.adapter).resolve().name
    try:
        result = evaluation.evaluate_adapter(
            args.adapter,
            args.teacher,
            prompts=args.prompts,
            seeds=args.seeds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            paraphrase=not args.no_paraphrase,
            max_scenes=args.max_scenes,
            languages=args.language,
            scene_kind=args.scene_kind,
            max_pair_scenes=args.max_pair_scenes,
            clip_model=args.clip_model,
            device=args.device,
            student_path=args.student_path,
            variant=args.variant,
        )
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        print(f"xling eval: error: {err}", file=sys.stderr)
        return 2
    paths = evaluation.write_report(result, out, title=f"xling eval: {Path(args.adapter).name}")
    print(evaluation.report_markdown(result, grid=None))
    for name, path in sorted(paths.items()):
        print(f"{name}: {path}")
    return 0
