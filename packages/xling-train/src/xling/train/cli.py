"""The ``xling`` command line: ``xling [--verbose] <command> ...``.

Each module in :data:`COMMANDS` exposes ``register(subparsers)``, which adds its subcommand and sets ``func``
(``func(args) -> int``). Modules import torch and the models only inside ``func`` (and the recipes' options only
for ``xling train``), so ``xling --help`` is fast.

:func:`main` runs ``func`` quietly (:mod:`xling.train.console`): third-party warnings, log records and
nested progress bars are hidden unless ``--verbose`` is given, before or after the command. An error a
command lets through is printed as ``xling <command>: error: <message>`` on a line of its own, after any open
progress bar is closed (with its traceback under ``--verbose``).

No parser of the command line takes an abbreviated option (:class:`StrictParser`): ``--max_step 3`` is an
error, ``xling train iap: error: unrecognized arguments: --max_step 3; did you mean '--max_steps'?``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from xling.train.console import close_progress_bars, quiet_third_party, xling_messages

#: Command modules, in the order ``xling --help`` lists them.
COMMANDS: list[str] = [
    "xling.train.commands.train",
    "xling.train.commands.generate",
    "xling.train.commands.eval",
    "xling.train.commands.bench",
    "xling.train.commands.importing",
    "xling.train.commands.push",
    "xling.train.commands.demo",
]

#: The spellings of the global verbose flag, taken out of argv wherever they stand (see :func:`main`).
VERBOSE_FLAGS: tuple[str, ...] = ("-v", "--verbose")

#: Exit status of a command that failed on its input (a bad option, config key, file or dataset).
EXIT_USAGE = 2
#: Exit status of a run that started and then failed (a non-finite loss, an I/O failure).
EXIT_FAILED = 1
#: Exit status after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


class StrictParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that takes options only as spelled in full.

    argparse's default ``allow_abbrev=True`` takes any unique prefix, so ``--max_step 3`` would silently set
    ``max_steps`` and ``--data.zh_colum`` ``data.zh_column``; a typo must be an error instead (with a
    suggestion, see :func:`main`). ``add_subparsers`` makes its sub-parsers of the parser's own class, so every
    parser the command modules add below the top one is strict too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``xling`` parser with every registered subcommand; no parser in it accepts abbreviated options.

    Args:
        argv: the command line it will parse; unless it runs ``xling train``, the recipes' options (which
            import torch) are left out, so ``xling --help`` answers at once. ``None``: everything.
    """
    parser = StrictParser(
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
    for sub in iter_parsers(parser):
        # A command module may pass its own parser_class (or a plain ArgumentParser) to add_subparsers.
        sub.allow_abbrev = False
    return parser


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every parser reachable from it through sub-commands, depth first."""
    yield parser
    for action in parser._actions:  # argparse exposes sub-parsers only through its private action list
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:  # an alias maps a second name to the same parser
                    seen.add(id(sub))
                    yield from iter_parsers(sub)


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` was parsed for (``xling train iap``'s, not ``xling``'s)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None) if action.dest != argparse.SUPPRESS else None
            if name in action.choices:
                return command_parser(action.choices[name], args)
    return parser


def unknown_option_hint(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """``"; did you mean '--max_steps'?"`` for the unrecognized options closest to one of ``parser``'s.

    Args:
        parser: the parser of the command the user ran.
        unknown: the unrecognized arguments; values and positionals are skipped.

    Returns:
        The hint, starting with ``"; "``, or ``""`` when no option is close to any of them.
    """
    from xling.train.config import close_keys  # only on this error path: the config module loads yaml

    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if not name.startswith("--") or name == "--":
            continue
        # Compare without the dashes so the ranking weighs the words, not the shared "--" prefix.
        close = ["--" + o for o in close_keys(name[2:], [o[2:] for o in options], n=2)]
        if close:
            hints.append((name, close))
    if not hints:
        return ""
    if len(hints) == 1:
        return f"; did you mean {' or '.join(repr(o) for o in hints[0][1])}?"
    return (
        "; did you mean " + ", ".join(f"{' or '.join(repr(o) for o in c)} for {n!r}" for n, c in hints) + "?"
    )


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
        hint = unknown_option_hint(command_parser(parser, args), unknown)
        print(
            f"{command}: error: unrecognized arguments: {' '.join(unknown)}{hint} (see '{command} --help')",
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
