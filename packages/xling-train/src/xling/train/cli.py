"""The ``xling`` command line: ``xling <command> ...``.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its subcommand and sets ``func``
(``func(args) -> int``). Modules import torch and the models only inside ``func``, so ``xling --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Command modules, in the order ``xling --help`` lists them.
COMMANDS: list[str] = [
    "xling.train.commands.train",
    "xling.train.commands.generate",
    "xling.train.commands.eval",
    "xling.train.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    """The ``xling`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="xling",
        description="Teach a frozen English text-to-image diffusion model prompts in another language.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xling`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
