"""``xling train <recipe> [--key VALUE ...]``: run one recipe.

Every config key is an option: ``--lr 1e-4``, ``--data.path pairs.jsonl`` (short: ``--data pairs.jsonl``),
``--eval.enabled false``; a bool alone (``--hybrid``) means true. ``--config FILE.yaml`` starts from a copy of
a shipped config. Values are parsed as YAML scalars and checked against the key's type.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Any

from xling.train.config import (
    RECIPES,
    TOY_SECTION,
    config_class,
    default_config_path,
    iter_fields,
    shipped_yaml,
)

_SUMMARY = {
    "iap": "images as pivots: student encoder, cross-attention MSE with a shared query (needs images)",
    "pea": "PEA-Diffusion: frozen student + MLP adapter, UNet feature + output KD (needs images)",
    "mtn": "MTN / GlueNet: frozen student + mixer translator, MSE + reconstruction + adversarial (text)",
    "align": "cosine alignment with LoRA (r16/a64) or the last k layers unfrozen (text)",
    "distill": "AltDiffusion stage 1: projected [CLS] to the teacher's pooled vector (text)",
    "denoise": "plain denoising loss on the student, the cross-attention K/V or the UNet (needs images)",
}


def _defaults(recipe: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shipped YAML of ``recipe`` flattened to dotted keys, and its toy-world section (for ``--help``)."""
    raw = shipped_yaml(recipe)
    toy = raw.pop(TOY_SECTION, None) or {}
    return _flat(raw), _flat(toy)


def _flat(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(raw, "")
    return out


def _add_recipe_parser(subparsers: Any, recipe: str) -> None:
    cls = config_class(recipe)
    parser = subparsers.add_parser(
        recipe,
        help=_SUMMARY[recipe],
        description=f"{inspect.cleandoc(cls.__doc__ or '')}\n\nShipped defaults: {default_config_path(recipe)} "
        "(paper values; its 'toy' section applies when --teacher is toy, the default)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config to start from (a copy of the shipped one)."
    )
    shipped, toy = _defaults(recipe)
    groups: dict[str, Any] = {}
    for key, f, tp in iter_fields(cls):
        if key == "recipe":
            continue
        section = key.split(".")[0] if "." in key else "recipe options"
        group = groups.get(section) or parser.add_argument_group(section)
        groups[section] = group
        default = shipped.get(key, f.default if f.default is not f.default_factory else None)
        names = [f"--{key}"]
        if key == "data.path":
            names.append("--data")
        kwargs: dict[str, Any] = {
            "dest": key,
            "default": argparse.SUPPRESS,
            "metavar": "VALUE",
            "help": f"{f.metadata.get('help', '')} (default: {default}"
            + (f"; toy world: {toy[key]})" if key in toy else ")"),
        }
        if tp is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        group.add_argument(*names, **kwargs)
    parser.set_defaults(func=_run, recipe=recipe)


def register(subparsers: Any) -> None:
    """Add ``xling train`` with one sub-command per recipe."""
    parser = subparsers.add_parser(
        "train",
        help="train a language adapter with one of the recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipes = parser.add_subparsers(dest="recipe_name", metavar="<recipe>")
    for recipe in RECIPES:
        _add_recipe_parser(recipes, recipe)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run(args: argparse.Namespace) -> int:
    import torch

    from xling.train.config import TOY, load_config
    from xling.train.loop import NonFiniteTrainingError
    from xling.train.recipes import run_recipe

    overrides = {
        k: v for k, v in vars(args).items() if k not in ("func", "recipe", "recipe_name", "command", "config")
    }
    try:
        cfg = load_config(args.recipe, args.config, overrides)
        if cfg.teacher == TOY and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
            # The toy models are far too small to gain from intra-op threads, and on a shared 2-core machine a
            # second thread made the default run several times slower (docs/toyworld.md).
            torch.set_num_threads(1)
        result = run_recipe(args.recipe, cfg)
    except NonFiniteTrainingError as err:
        print(f"xling train {args.recipe}: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"xling train {args.recipe}: error: {err}", file=sys.stderr)
        return 2
    last = f"{result.losses[-1]:.6g}" if result.losses else "n/a"
    print(f"trained {result.recipe}: {result.steps} steps, final loss {last}, {result.wall_time_s:.1f} s")
    if result.adapter_dir is not None:
        print(f"adapter: {result.adapter_dir}")
    print(f"config:  {result.config_path}")
    for name, path in sorted(result.files.items()):
        print(f"{name}: {path}")
    return 0
