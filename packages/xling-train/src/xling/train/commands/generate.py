"""``xling generate --adapter DIR "红色的圆形" ...``: images from prompts in the adapter's language, to PNG.

The adapter (a ``LanguageEncoder`` directory) turns the prompts into the teacher's ``prompt_embeds``; the
teacher's own pipeline and sampler draw them, one image per prompt and seed. The default teacher is the one
the adapter records (the teacher it was trained with; the toy world's for an adapter that records none);
``--teacher`` overrides it, and the adapter's widths are checked against it before anything is sampled.
The toy teachers (UNet and MMDiT) sample at their own default steps and guidance; a PixArt-α/Σ, Sana, SD3 or Flux teacher at its
pipeline's own (Flux's guidance is its distilled guidance embedding, with no negative prompt); any other at 30
steps and guidance 7.5. Images come out at the teacher's native resolution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xling.train.commands import add_model_arguments


def register(subparsers: Any) -> None:
    """Add ``xling generate``."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images from prompts in the adapter's language",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompts in the adapter's language")
    add_model_arguments(parser)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="one image per seed"
    )
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
        "--out", type=Path, default=Path("outputs/generate"), metavar="DIR", help="output directory"
    )
    parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the saved PNGs")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from xling.train import evaluation

    if args.scale < 1:
        print("xling generate: error: --scale must be >= 1", file=sys.stderr)
        return 2
    try:
        paths = evaluation.generate_images(
            args.adapter,
            args.prompts,
            args.out,
            teacher=args.teacher,
            seeds=args.seeds,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            scale=args.scale,
            device=args.device,
            student_path=args.student_path,
            variant=args.variant,
        )
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"xling generate: error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
