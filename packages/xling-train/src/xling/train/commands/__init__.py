"""Subcommands of the ``xling`` command line; each module exposes ``register(subparsers)``, parses its
arguments and calls library code."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapter``, ``--teacher``, ``--student-path`` and ``--variant``: what runs a trained adapter."""
    parser.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory (xling train output)"
    )
    parser.add_argument(
        "--teacher",
        default=None,
        metavar="PATH",
        help="diffusers model directory or Hub id (default: the one the adapter records, else toy)",
    )
    parser.add_argument(
        "--student-path",
        default=None,
        metavar="DIR",
        help="where the adapter's student lives now, when it moved (frozen and LoRA adapters)",
    )
    parser.add_argument(
        "--variant", default=None, help="teacher weight-file variant, e.g. fp16 (*.fp16.safetensors)"
    )
