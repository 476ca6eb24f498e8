"""What the ``xling`` command line prints: xling's own lines, not the libraries' chatter.

Loading a diffusion model prints a good deal that a user of ``xling`` cannot act on: diffusers' "should be
kept in float32" notes, transformers' nested "Loading weights" bars, deprecation warnings about how the
libraries call each other. :func:`quiet_third_party` hides all of it for the duration of a command and puts
everything back afterwards (so tests and programs that import xling are unaffected); ``xling --verbose``
leaves it on. :func:`xling_messages` shows xling's own log records (``logging.getLogger("xling....")``) as
``xling: ...`` lines written through ``tqdm.write``, so they never break an open progress bar, and
:func:`close_progress_bars` ends any bar still open, so an error message starts on a line of its own.

Example:
    >>> with xling_messages(verbose=False), quiet_third_party(verbose=False):  # doctest: +SKIP
    ...     run_the_command()
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

__all__ = [
    "QUIET_LOGGERS",
    "THIRD_PARTY",
    "close_progress_bars",
    "quiet_third_party",
    "xling_messages",
]

#: Top-level packages whose warnings are hidden even when they point (``stacklevel``) at xling's code: diffusers'
#: ``deprecate()``, for one, blames its caller.
THIRD_PARTY: frozenset[str] = frozenset(
    {
        "accelerate",
        "diffusers",
        "huggingface_hub",
        "numpy",
        "peft",
        "PIL",
        "safetensors",
        "tokenizers",
        "torch",
        "torchvision",
        "transformers",
    }
)

#: Plain ``logging`` loggers set to ERROR while quiet (transformers, diffusers, huggingface_hub and torch are
#: handled through their own switches, as they reset their loggers when imported).
QUIET_LOGGERS: tuple[str, ...] = (
    "accelerate",
    "filelock",
    "fsspec",
    "httpx",
    "peft",
    "PIL",
    "safetensors",
    "torchvision",
    "urllib3",
)

# A warning is kept only if the module it is attributed to is xling's (``module`` is matched from its start).
_NOT_XLING = r"(?!xling(\.|$))"
# Frames that sit between ``warnings.warn`` and ``showwarning`` (``_py_warnings`` from Python 3.14 on).
_WARNINGS_MODULES = frozenset({"warnings", "_py_warnings", __name__})

Undo = Callable[[], None]


def close_progress_bars() -> None:
    """Close every tqdm bar still open, so what is printed next starts on a fresh line.

    A bar closed this way keeps its last state on screen (``leave=True``, tqdm's default) and ends its line.
    Nothing is imported: without tqdm loaded there is no bar to close.
    """
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a half-built bar must not hide the error being reported
            bar.close()


@contextlib.contextmanager
def xling_messages(verbose: bool = False) -> Iterator[None]:
    """Show xling's log records on stderr as ``xling: ...`` lines while the block runs.

    INFO and above are shown (DEBUG too with ``verbose``); warnings read ``xling: warning: ...``. The lines
    go through ``tqdm.write``, which lifts an open bar out of the way and redraws it below. The ``xling``
    logger's level and handlers are restored on exit; records still propagate, so ``caplog`` and a
    program's own handlers see them as before.

    Args:
        verbose: also show DEBUG records.
    """
    logger = logging.getLogger("xling")
    handler = _TqdmWriteHandler()
    handler.setFormatter(_XlingFormatter())
    level = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_third_party(verbose: bool = False) -> Iterator[None]:
    """Hide third-party warnings, log records and progress bars while the block runs (unless ``verbose``).

    Hidden: Python warnings attributed to any module outside ``xling`` (and those raised inside
    :data:`THIRD_PARTY` packages on xling's behalf); records below ERROR from transformers, diffusers,
    huggingface_hub, torch and :data:`QUIET_LOGGERS`; the progress bars of transformers, diffusers and
    huggingface_hub (``Loading weights``, downloads). xling's own warnings, log records and bars stay.

    The libraries' own switches are used (``transformers.utils.logging.set_verbosity_error()`` and
    ``disable_progress_bar()``, the same in diffusers, ``huggingface_hub.utils.disable_progress_bars()``).
    A library not imported yet is not imported here (diffusers alone takes seconds): it is quieted the moment
    it finishes importing, because these libraries set their loggers' levels on import. Everything is put
    back on exit, a library first imported inside the block to its import-time defaults.

    Args:
        verbose: leave everything on; the block runs unchanged.
    """
    if verbose:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", module=_NOT_XLING)
        # torch's C++ warnings are attributed to whichever Python line called the op, often xling's.
        warnings.filterwarnings("ignore", message=r".*\(Triggered internally at ")
        shown = warnings.showwarning
        warnings.showwarning = _showwarning_unless_third_party(shown)

        for name in QUIET_LOGGERS:
            stack.callback(_set_level(logging.getLogger(name), logging.ERROR))

        hooks: dict[str, Callable[[ModuleType, bool], Undo]] = {
            "huggingface_hub.utils": _quiet_huggingface_hub,
            "transformers.utils.logging": _quiet_hf_library,
            "diffusers.utils.logging": _quiet_hf_library,
            "torch": _quiet_torch,
        }
        # The finder is removed before the undos run (LIFO), so nothing imported from here on is touched.
        finder = _AfterImport({})
        for name, quiet in hooks.items():
            module = sys.modules.get(name)
            if module is not None:
                stack.callback(_try(quiet, module, False))
            else:
                finder.callbacks[name] = lambda module, quiet=quiet: stack.callback(_try(quiet, module, True))
        sys.meta_path.insert(0, finder)
        stack.callback(_remove, sys.meta_path, finder)
        yield


def _try(quiet: Callable[[ModuleType, bool], Undo], module: ModuleType, fresh: bool) -> Undo:
    """``quiet(module, fresh)``, or nothing where the library's switches are not what this expects."""
    try:
        return quiet(module, fresh)
    except Exception:  # a library version without them stays chatty; the command itself must still run
        return lambda: None


def _remove(items: list[Any], item: Any) -> None:
    with contextlib.suppress(ValueError):
        items.remove(item)


def _set_level(logger: logging.Logger, level: int) -> Undo:
    previous = logger.level
    logger.setLevel(level)
    return lambda: logger.setLevel(previous)


def _quiet_huggingface_hub(utils: ModuleType, fresh: bool) -> Undo:
    level = utils.logging.get_verbosity()
    was_disabled = utils.are_progress_bars_disabled()
    utils.logging.set_verbosity_error()
    utils.disable_progress_bars()

    def undo() -> None:
        utils.logging.set_verbosity(level)
        # Set either way: transformers' enable_progress_bar(), undone before this, turns the hub's on too.
        if was_disabled:
            utils.disable_progress_bars()
        else:
            utils.enable_progress_bars()

    return undo


def _quiet_hf_library(log: ModuleType, fresh: bool) -> Undo:
    """transformers' or diffusers' ``utils.logging``: verbosity and progress bars."""
    level = log.get_verbosity()  # configures the library's root logger first: its import-time default
    # transformers takes its initial bar setting from huggingface_hub's, which is off already when
    # transformers is imported inside the block; left alone, both start with bars on.
    bars = fresh or log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()

    def undo() -> None:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()

    return undo


def _quiet_torch(torch: ModuleType, fresh: bool) -> Undo:
    # torch sets its "torch" logger to WARNING while importing (torch._logging), hence after import.
    return _set_level(logging.getLogger("torch"), logging.ERROR)


def _showwarning_unless_third_party(shown: Callable[..., Any]) -> Callable[..., None]:
    """``shown``, except for warnings raised inside a :data:`THIRD_PARTY` package.

    The filters only see the module a warning is attributed to, which ``stacklevel`` moves to the caller;
    the frame that called ``warnings.warn`` is the one that raised it.
    """

    def showwarning(*args: Any, **kwargs: Any) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__") in _WARNINGS_MODULES:
            frame = frame.f_back
        raiser = str(frame.f_globals.get("__name__", "")) if frame is not None else ""
        if raiser.partition(".")[0] not in THIRD_PARTY:
            shown(*args, **kwargs)

    return showwarning


class _AfterImport(importlib.abc.MetaPathFinder):
    """Call ``callbacks[name](module)`` once module ``name`` has finished importing (at most once each)."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], Any]]) -> None:
        self.callbacks = callbacks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        callback = self.callbacks.pop(fullname, None)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return None  # the regular finders take over; the library simply stays as chatty as it is
        exec_module = loader.exec_module

        def exec_then_call(module: ModuleType) -> None:
            exec_module(module)
            callback(module)

        loader.exec_module = exec_then_call  # type: ignore[method-assign]  # this spec's own loader
        return spec


class _TqdmWriteHandler(logging.Handler):
    """Writes records to the current ``sys.stderr`` with ``tqdm.write``, above any open bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)
        except Exception:
            self.handleError(record)


class _XlingFormatter(logging.Formatter):
    """``xling: message`` for INFO, ``xling: warning: message`` (``error: ``, ``debug: ``) for the others."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        label = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"xling: {label}{text}"
