"""Subcommands of the ``xling`` command line; each module exposes ``register(subparsers)``, parses its
arguments and calls library code."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser, *, adapter_default: str | None = None) -> None:
    """``--adapter``, ``--teacher``, ``--student-path`` and ``--variant``: what runs a trained adapter.

    Args:
        parser: the command's parser.
        adapter_default: what ``--adapter`` stands for when it is not given (its help says so); ``None``: the
            option is required.
    """
    default = f" (default: {adapter_default})" if adapter_default else ""
    parser.add_argument(
        "--adapter",
        required=adapter_default is None,
        default=None,
        metavar="DIR|REPO",
        help=f"adapter folder (RUN/adapter of xling train) or Hub repo id{default}",
    )
    parser.add_argument(
        "--teacher",
        default=None,
        metavar="T",
        help="'toy', 'toy-mmdit', a diffusers model folder or Hub id (default: the one the adapter records, "
        "else toy)",
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


def add_scene_arguments(parser: argparse.ArgumentParser) -> None:
    """``--scene-kind`` and ``--max-pair-scenes``: which toy-world scenes are scored."""
    parser.add_argument(
        "--scene-kind",
        choices=("single", "pair", "both"),
        default="single",
        help="toy world: score single-object scenes, a fixed set of two-object ones, or both",
    )
    parser.add_argument(
        "--max-pair-scenes", type=int, default=48, help="toy world: two-object scenes scored (a fixed set)"
    )
