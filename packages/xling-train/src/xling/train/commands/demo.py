"""``xling demo [--adapter DIR|REPO] [--teacher T] [--port P]``: a web page that draws a prompt in the adapter's
language beside its English counterpart.

The teacher draws the English prompt, the same teacher conditioned by the adapter draws the translated one, at
the same seeds; steps, guidance, seed and number of images are set on the page, examples fill both prompts,
and the adapter's model-card facts are listed. With no arguments it serves the toy world: the toy teacher and
the committed toy IAP adapter, on CPU. The page is served on 127.0.0.1 unless --host says otherwise; the URL
is printed once it answers, and Ctrl-C stops it. Needs the ``demo`` extra (gradio):
``pip install "xling-train[demo]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

from xling.train.commands import add_model_arguments


def register(subparsers: Any) -> None:
    """Add ``xling demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a web page comparing the teacher on English with the student on the adapter's language",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, adapter_default="the committed toy IAP adapter; 'toy' says the same")
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        metavar="P",
        help="port to serve on (default: first free from 7860)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 serves the network)",
    )
    parser.add_argument("--device", default="cpu", metavar="D", help="torch device (default: cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: 1 for the toy world on CPU, whose tiny tensors gain nothing from "
        "more; else torch's default)",
    )
    parser.set_defaults(func=_run)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {port}")
    return port


def _run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        print(
            'xling demo: error: the demo needs gradio; install it with pip install "xling-train[demo]"',
            file=sys.stderr,
        )
        return 2
    from xling.train import demo

    return demo.serve(
        args.adapter,
        args.teacher,
        host=args.host,
        port=args.port,
        device=args.device,
        student_path=args.student_path,
        variant=args.variant,
        threads=args.threads,
    )
