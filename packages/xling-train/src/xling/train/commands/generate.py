"""``xling generate --adapter DIR "红色的圆形" ...``: images from prompts in the adapter's language, to PNG.

The adapter (a ``LanguageEncoder`` directory) turns the prompts into the teacher's ``prompt_embeds``; the
teacher's own pipeline and sampler draw them, one image per prompt and seed. The default teacher is the toy
world's, with its default sampler steps and guidance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add ``xling generate``."""
    parser = subparsers.add_parser(
        "generate",
        help="generate images from prompts in the adapter's language",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompts in the adapter's language")
    parser.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory (xling train output)"
    )
    parser.add_argument(
        "--teacher", default="toy", metavar="PATH", help="diffusers model directory (default: toy)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="one image per seed"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="sampler steps (default: the toy world's, or 30)"
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: toy world's, or 7.5)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/generate"), metavar="DIR", help="output directory"
    )
    parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour upscaling of the saved PNGs")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.set_defaults(func=_run)


def sampler_defaults(teacher: str, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance: the given ones, else the toy world's defaults (toy) or 30 / 7.5."""
    from xling.train import evaluation

    if teacher == "toy":
        default_steps, default_guidance = evaluation.toy_sampler_defaults()
    else:
        default_steps, default_guidance = 30, 7.5
    return steps or default_steps, guidance if guidance is not None else default_guidance


def _run(args: argparse.Namespace) -> int:
    from PIL import Image

    from xling.adapters.encoder import LanguageEncoder
    from xling.train import evaluation

    if args.scale < 1:
        print("xling generate: error: --scale must be >= 1", file=sys.stderr)
        return 2
    try:
        encoder = LanguageEncoder.from_pretrained(args.adapter, device=args.device)
        pipe = evaluation.load_pipeline(args.teacher, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"xling generate: error: {err}", file=sys.stderr)
        return 2
    steps, guidance = sampler_defaults(args.teacher, args.steps, args.guidance)
    cond, uncond = evaluation.student_conditioning(encoder, args.prompts)
    rows = [i for i in range(len(args.prompts)) for _ in args.seeds]
    seeds = [s for _ in args.prompts for s in args.seeds]
    samples = evaluation.sample(
        pipe, cond.rows(rows), uncond.rows(rows), seeds, num_inference_steps=steps, guidance_scale=guidance
    )
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for k, (i, seed) in enumerate(zip(rows, seeds)):
        image = Image.fromarray(samples.images[k])
        if args.scale > 1:
            image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
        path = args.out / f"{i:03d}-seed{seed}.png"
        image.save(path)
        index.append({"file": path.name, "prompt": args.prompts[i], "seed": seed})
        print(path)
    settings = {"adapter": str(args.adapter), "teacher": args.teacher, "steps": steps, "guidance": guidance}
    (args.out / "images.json").write_text(
        json.dumps({**settings, "images": index}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return 0
