"""Subcommands of the ``xling`` command line; each module exposes ``register(subparsers)``."""
