"""The ``xling`` command line: ``xling [--verbose] <command> ...``.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its subcommand and sets ``func``
(``func(args) -> int``). Modules import torch and the models only inside ``func`` (and the recipes' options only
for ``xling train``), so ``xling --help`` is fast.

:func:`main` runs ``func`` quietly (:mod:`xling.train.console`): third-party warnings, log records and
nested progress bars are hidden unless ``--verbose`` is given, before or after the command. An error a
command lets through is printed as ``xling <command>: error: <message>`` on a line of its own, after any open
progress bar is closed (with its traceback under ``--verbose``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from xling.train.console import close_progress_bars, quiet_third_party, xling_messages

#: Command modules, in the order ``xling --help`` lists them.
COMMANDS: list[str] = [
    "xling.train.commands.train",
    "xling.train.commands.generate",
    "xling.train.commands.eval",
    "xling.train.commands.bench",
]

#: The spellings of the global verbose flag, taken out of argv wherever they stand (see :func:`main`).
VERBOSE_FLAGS: tuple[str, ...] = ("-v", "--verbose")

#: Exit status of a command that failed on its input (a bad option, config key, file or dataset).
EXIT_USAGE = 2
#: Exit status of a run that started and then failed (a non-finite loss, an I/O failure).
EXIT_FAILED = 1
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``xling`` parser with every registered subcommand.

    Args:
        argv: the command line it will parse; unless it runs ``xling train``, the recipes' options (which
            import torch) are left out, so ``xling --help`` answers at once. ``None``: everything.
    """
    parser = argparse.ArgumentParser(
        prog="xling",
        description="Teach a frozen English text-to-image diffusion model prompts in another language.",
    )
    parser.add_argument(
        *VERBOSE_FLAGS,
        action="store_true",
        # Never set here (main takes the flag out of argv first), and kept out of the namespace, which
        # `xling train` turns into config overrides key by key.
        default=argparse.SUPPRESS,
        help="show the third-party libraries' warnings, log messages and progress bars, and the traceback "
        "of an error (hidden by default); accepted anywhere, e.g. 'xling train iap --verbose'",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    with_recipes = argv is None or "train" in argv
    for name in COMMANDS:
        module = importlib.import_module(name)
        if name == "xling.train.commands.train":
            module.register(subparsers, recipes=with_recipes)
        else:
            module.register(subparsers)
    return parser


def split_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without the verbose flags, and whether one was there.

    The flag belongs to ``xling`` itself, but users type it after the command (``xling train iap -v``),
    where the subcommand's parser would reject it; so it is taken out before parsing. Arguments after
    ``--`` are left alone.
    """
    rest: list[str] = []
    verbose = False
    for i, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in VERBOSE_FLAGS:
            verbose = True
        else:
            rest.append(arg)
    return rest, verbose


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xling`` console script; returns the exit status.

    Args:
        argv: the arguments after ``xling`` (default: ``sys.argv[1:]``).

    Returns:
        The command's status; 2 for a usage or config error, 1 for a run that failed, 130 after Ctrl-C.
        ``--help`` still exits through ``SystemExit(0)``, as argparse does.
    """
    argv, verbose = split_verbose(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exit_:
        if not exit_.code:  # --help
            raise
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE  # argparse printed the error
    if unknown:
        # argparse would blame the top-level parser ("xling: error: ..."); name the command instead.
        command = _command_name(args)
        print(
            f"{command}: error: unrecognized arguments: {' '.join(unknown)} (see '{command} --help')",
            file=sys.stderr,
        )
        return EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with xling_messages(verbose), quiet_third_party(verbose):
            return int(func(args) or 0)
    except BaseException as err:  # every failure closes the bars; _report re-raises all but user errors
        return _report(err, _command_name(args), verbose)


def _command_name(args: argparse.Namespace) -> str:
    """``xling train iap``: the words the user typed to pick the command."""
    words = ["xling", getattr(args, "command", None), getattr(args, "recipe_name", None)]
    return " ".join(w for w in words if w)


def _exit_status(err: BaseException) -> int | None:
    """The status for an error that is the user's to fix or a failed run; ``None`` for anything else."""
    loop = sys.modules.get("xling.train.loop")  # not loaded: the error cannot be one of its own
    if loop is not None and isinstance(err, loop.NonFiniteTrainingError):
        return EXIT_FAILED
    # DataError is a ValueError; a bad config key is a KeyError.
    if isinstance(
        err, (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError)
    ):
        return EXIT_USAGE
    if isinstance(err, OSError):
        return EXIT_FAILED
    return None


def _message(err: BaseException) -> str:
    # str(KeyError("x")) is "'x'": show the key's message as written.
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


def _report(err: BaseException, command: str, verbose: bool) -> int:
    """Close the open bars, then print ``err`` on its own line; re-raise what is not a user error."""
    close_progress_bars()
    if isinstance(err, KeyboardInterrupt):
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    status = _exit_status(err) if isinstance(err, Exception) else None
    if status is None:
        raise err  # a bug or a crash (SystemExit too): its traceback is the useful report
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    print(f"{command}: error: {_message(err)}", file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
