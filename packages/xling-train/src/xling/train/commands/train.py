"""``xling train <recipe> [--key VALUE ...]``: run one recipe.

Every config key is an option: ``--lr 1e-4``, ``--data.path pairs.jsonl`` (short: ``--data pairs.jsonl``),
``--eval.enabled false``; a bool alone (``--hybrid``) means true. ``--config FILE.yaml`` starts from a copy of
a shipped config. Values are parsed as YAML scalars and checked against the key's type.

``--resume latest|PATH`` continues from the run's config as its checkpoint recorded it: the options given with it
are overrides of that config, and only those a resume may change are accepted
(``xling.train.checkpoint.RESUME_MAY_CHANGE``; any other key is an error that names it).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
from typing import Any

from xling.train.config import default_config_path, iter_fields, shipped_yaml
from xling.train.recipes import RECIPES, get_recipe


def _add_recipe_parser(subparsers: Any, recipe: str) -> None:
    entry = get_recipe(recipe)
    cls = entry.config_class
    parser = subparsers.add_parser(
        recipe,
        help=entry.summary,
        description=f"{inspect.cleandoc(cls.__doc__ or '')}\n\nShipped defaults: {default_config_path(recipe)} "
        "(paper values; its 'toy' section applies when --teacher is toy, the default)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML config to start from (a copy of the shipped one)."
    )
    shipped, toy = shipped_yaml(recipe)
    groups: dict[str, Any] = {}
    for key, f, tp in iter_fields(cls):
        if key == "recipe":
            continue
        section = key.split(".")[0] if "." in key else "recipe options"
        group = groups.get(section) or parser.add_argument_group(section)
        groups[section] = group
        default = shipped.get(
            key, f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        )
        if key == "output_dir":
            default = default or f"runs/{recipe}"  # what load_config fills in
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


def register(subparsers: Any, *, recipes: bool = True) -> None:
    """Add ``xling train`` with one sub-command per recipe.

    Args:
        subparsers: the ``xling`` parser's sub-commands.
        recipes: add the recipes' sub-commands; their options come from the recipe modules, whose import takes
            torch, so ``xling --help`` and the other commands leave them out.
    """
    parser = subparsers.add_parser(
        "train",
        help="train a language adapter with one of the recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if recipes:
        recipe_parsers = parser.add_subparsers(dest="recipe_name", metavar="<recipe>")
        for recipe in RECIPES:
            _add_recipe_parser(recipe_parsers, recipe)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _resumed_config(recipe: str, cfg: Any, config_file: str | None, overrides: dict[str, Any]) -> Any:
    """The config a resume continues with: the checkpoint's own, under what the command line (and ``--config``)
    set; ``cfg`` itself when ``--resume latest`` finds no checkpoint yet."""
    import yaml

    from xling.train.checkpoint import read_manifest, resolve_resume
    from xling.train.config import flatten, load_config

    checkpoint = resolve_resume(cfg.resume, cfg.output_dir)
    if checkpoint is None:
        return cfg
    given: dict[str, Any] = {}
    if config_file:
        with open(config_file, encoding="utf-8") as fh:
            given = {k: v for k, v in flatten(yaml.safe_load(fh) or {}).items() if not k.startswith("toy.")}
    explicit = {**given, **overrides}
    # The run folder is the one the checkpoint was found in (its recorded output_dir may be relative to where
    # that run started); --overwrite is never inherited.
    folder = explicit.get("output_dir") or (
        cfg.output_dir if cfg.resume == "latest" else checkpoint.parent.parent
    )
    fixed = {"output_dir": str(folder), "overwrite": explicit.get("overwrite", False)}
    return load_config(recipe, read_manifest(checkpoint)["config"], {**explicit, **fixed})


def _run(args: argparse.Namespace) -> int:
    import torch

    from xling.train.config import load_config
    from xling.train.recipes import run_recipe
    from xling.train.toyworld.names import is_toy_teacher

    # Errors (a bad key or value, missing files, a non-finite loss) reach `xling.train.cli.main`, which prints
    # them on a line of their own after the progress bar and returns 2 or 1.
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("func", "recipe", "recipe_name", "command", "config")
    }
    cfg = load_config(args.recipe, args.config, overrides)
    if cfg.resume is not None:
        cfg = _resumed_config(args.recipe, cfg, args.config, overrides)
    if is_toy_teacher(cfg.teacher) and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # The toy models are far too small to gain from intra-op threads, and on a shared 2-core machine a
        # second thread made the default run several times slower (docs/toyworld.md).
        torch.set_num_threads(1)
    result = run_recipe(args.recipe, cfg)
    last = f"{result.losses[-1]:.6g}" if result.losses else "n/a"
    print(f"trained {result.recipe}: {result.steps} steps, final loss {last}, {result.wall_time_s:.1f} s")
    if result.adapter_dir is not None:
        print(f"adapter: {result.adapter_dir}")
    print(f"config:  {result.config_path}")
    if result.rows is not None:
        print(result.rows.summary())
    for name, path in sorted(result.files.items()):
        print(f"{name}: {path}")
    return 0
