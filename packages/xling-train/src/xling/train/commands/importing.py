"""``xling import SOURCE SRC --teacher T --output DIR``: a released checkpoint as an xling adapter.

Sources (the public layout each reads is documented in docs/fidelity.md):
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _sources() -> str:
    from xling.train.importers import IMPORTERS

    return "\n".join(f"  {name:<9} {summary}" for name, (_, summary) in IMPORTERS.items())


def register(subparsers: Any) -> None:
    """Add ``xling import``."""
    from xling.train.importers import IMPORTERS

    parser = subparsers.add_parser(
        "import",
        help="turn a released PEA / GlueGen / AltCLIP checkpoint into an xling adapter",
        description=__doc__ + _sources(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", choices=list(IMPORTERS), help="whose checkpoint SRC is")
    parser.add_argument("src", type=Path, metavar="SRC", help="the released weights file or directory")
    parser.add_argument(
        "--teacher",
        required=True,
        metavar="PATH",
        help="the teacher it was trained for (diffusers dir, Hub id)",
    )
    parser.add_argument(
        "--output", required=True, type=Path, metavar="DIR", help="adapter directory to write"
    )
    parser.add_argument(
        "--student",
        default=None,
        metavar="PATH",
        help="the student encoder the checkpoint was trained on, where SRC does not hold it (see above)",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from xling.train.importers import import_checkpoint

    out = import_checkpoint(
        args.source, args.src, teacher=args.teacher, output=args.output, student=args.student
    )
    print(f"wrote {out} (load it with xling generate --adapter {out})")
    return 0
