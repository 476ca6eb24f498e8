"""``xling bench``: every recipe on the toy world under identical conditions, written to ``docs/toyworld.md``.

Each recipe trains from its own toy student (the MLM-pretrained one; PEA: the aligned one, as its paper
starts from a multilingual CLIP) unless ``--student pretrained|random|aligned`` sets one for all, with the
same data order and seed, on its own toy budget unless ``--steps`` sets one. Every ``--eval-every`` updates
(and at the end) the adapter is scored on the toy world by :func:`xling.train.evaluation.evaluate_toy` with
the same scenes, seeds and sampler. The teacher's own generations are sampled once and shared by every
evaluation. The result is a table (recipe, student, trainable parameters, steps, training wall time,
Chinese-prompt accuracy per attribute, agreement with the teacher) and a plot of accuracy against training
steps, written between the bench markers of ``--doc`` (the rest of the document is kept), plus ``bench.json``
in ``--output-dir``.

``--seed 0 1 2`` trains each recipe at three seeds and pools their images into every number and interval;
``--language ja`` (or ``all``: one adapter on a mixed-language corpus, scored per language and on code-switched
prompts) and ``--scene-kind both`` add languages and two-object scenes to the table and the plot.

A tiny run for CI: ``xling bench --recipes align iap --steps 4 --eval-every 0 --max-scenes 4 --seeds 0``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xling.train.commands import add_scene_arguments
from xling.train.recipes import RECIPES
from xling.train.toyworld.names import TOY_STUDENTS, TOY_TEACHERS


def register(subparsers: Any) -> None:
    """Add ``xling bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="run every recipe on the toy world and write docs/toyworld.md",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES, metavar="RECIPE")
    parser.add_argument(
        "--teacher",
        choices=TOY_TEACHERS,
        default="toy",
        help="the toy teacher: 'toy' (UNet) or 'toy-mmdit' (SD3-family MMDiT); each has its own doc section",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer updates for every recipe (default: each recipe's toy budget, as `xling train` runs it)",
    )
    parser.add_argument(
        "--recipe-steps",
        nargs="*",
        default=[],
        metavar="RECIPE=N",
        help="per-recipe step budgets over --steps",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=100,
        help="evaluate every N updates of the first training seed (0: only at the end)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="sampling seeds")
    parser.add_argument("--max-scenes", type=int, default=None, help="evaluate a fixed subset of scenes")
    parser.add_argument(
        "--eval-steps", type=int, default=None, help="sampler steps (default: the toy teacher's)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="guidance (default: the toy teacher's)")
    parser.add_argument(
        "--student",
        choices=TOY_STUDENTS,
        default=None,
        help="toy student for every recipe (default: each recipe's own)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        metavar="SEED",
        help="training seeds, the same for every recipe: each recipe trains once per seed and every number "
        "pools their images (default: 0 1 2)",
    )
    parser.add_argument(
        "--language",
        default="zh",
        help="target language(s) to train and score: zh, ja, ko, es, ar, comma-separated for one adapter on a "
        "mixed-language corpus (scored per language and on code-switched prompts), or all",
    )
    add_scene_arguments(parser)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="[RECIPE:]KEY=VALUE",
        help="config overrides (all or one recipe)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="run folders, bench.json and the plot (default: runs/bench, runs/bench-toy-mmdit for toy-mmdit)",
    )
    parser.add_argument(
        "--doc", type=Path, default=Path("docs/toyworld.md"), metavar="FILE", help="'-': no doc"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: a shared CPU oversubscribes with more)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args)
    finally:
        torch.set_num_threads(threads)


def _bench(args: argparse.Namespace) -> int:
    from xling.train.bench import parse_overrides, run_bench
    from xling.train.evaluation import format_percent
    from xling.train.toyworld.world import parse_languages

    try:
        languages = parse_languages(args.language)
        overrides = parse_overrides(args.set, args.recipes)
        recipe_steps = {}
        for item in args.recipe_steps:
            name, sep, value = item.partition("=")
            if not sep or name not in args.recipes:
                raise ValueError(f"--recipe-steps {item!r} is not RECIPE=N for a benchmarked recipe")
            recipe_steps[name] = int(value)
    except ValueError as err:
        print(f"xling bench: error: {err}", file=sys.stderr)
        return 2
    outcomes = run_bench(
        args.recipes,
        teacher=args.teacher,
        steps=args.steps,
        recipe_steps=recipe_steps,
        eval_every=args.eval_every,
        seeds=args.seeds,
        max_scenes=args.max_scenes,
        num_inference_steps=args.eval_steps,
        guidance_scale=args.guidance,
        student=args.student,
        seed=args.seed,
        languages=args.language,
        scene_kind=args.scene_kind,
        max_pair_scenes=args.max_pair_scenes,
        overrides=overrides,
        output_dir=args.output_dir
        or Path("runs/bench" if args.teacher == "toy" else f"runs/bench-{args.teacher}"),
        doc=None if str(args.doc) == "-" else args.doc,
        command="xling bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "xling bench",
    )
    for o in outcomes:
        status = (
            o.error
            or f"{languages[0]} all {format_percent(o.accuracy.get('all'))}, of teacher "
            f"{format_percent(o.relative_accuracy)}"
        )
        print(f"{o.recipe}: {status}")
    return 1 if any(o.error for o in outcomes) else 0
