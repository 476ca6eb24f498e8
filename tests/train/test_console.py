"""The quiet command line: third-party noise hidden unless --verbose, xling's lines kept, errors on their own line."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xling.train import cli
from xling.train.cli import main, split_verbose
from xling.train.console import _AfterImport, close_progress_bars, quiet_third_party, xling_messages


def _recorded(verbose: bool, emit: Callable[[], None]) -> list[str]:
    """The messages of the warnings ``emit`` raises inside ``quiet_third_party(verbose)``."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with quiet_third_party(verbose):
            emit()
    return [str(w.message) for w in log]


def _warn_from(module: str) -> Callable[[], None]:
    return lambda: warnings.warn_explicit("noise", FutureWarning, "lib.py", 1, module=module)


@pytest.mark.parametrize(
    "module", ["diffusers.models", "transformers.modeling_utils", "torchvision.io", "other"]
)
def test_a_third_party_warning_is_hidden_unless_verbose(module: str) -> None:
    assert _recorded(False, _warn_from(module)) == []
    assert _recorded(True, _warn_from(module)) == ["noise"]


def test_an_xling_warning_stays_visible() -> None:
    assert _recorded(False, _warn_from("xling.train.loop")) == ["noise"]


def _function_in(module: str, source: str) -> Callable[[], None]:
    namespace: dict[str, Any] = {"__name__": module, "warnings": warnings}
    exec(textwrap.dedent(source), namespace)
    return namespace["run"]


def test_a_library_warning_that_blames_xling_code_is_hidden() -> None:
    # diffusers' deprecate() warns with a stacklevel that attributes the warning to its caller.
    deprecate = _function_in(
        "diffusers.utils.deprecation_utils",
        "def run():\n    warnings.warn('deprecated', FutureWarning, stacklevel=2)\n",
    )
    caller = _function_in("xling.core.fake", "def run():\n    deprecate()\n")
    caller.__globals__["deprecate"] = deprecate
    assert _recorded(False, caller) == []
    assert _recorded(True, caller) == ["deprecated"]


def test_the_warning_filters_are_restored() -> None:
    filters, showwarning = list(warnings.filters), warnings.showwarning
    with quiet_third_party(False):
        assert warnings.filters != filters
    assert warnings.filters == filters
    assert warnings.showwarning is showwarning


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("library", ["transformers", "diffusers"])
def test_library_loggers_and_bars_are_quiet_then_restored(library: str) -> None:
    log = pytest.importorskip(f"{library}.utils.logging")
    level, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    records = _Records()
    root = logging.getLogger(library)
    root.addHandler(records)
    try:
        with quiet_third_party(False):
            log.get_logger(f"{library}.models.fake").warning("should be kept in float32: []")
            assert log.get_verbosity() == logging.ERROR
            assert not log.is_progress_bar_enabled()
        assert records.messages == []
        assert (log.get_verbosity(), log.is_progress_bar_enabled()) == (level, bars)
        with quiet_third_party(True):
            log.get_logger(f"{library}.models.fake").warning("shown")
        assert records.messages == (["shown"] if level <= logging.WARNING else [])
    finally:
        root.removeHandler(records)


def test_plain_library_loggers_are_quiet_then_restored() -> None:
    accelerate = logging.getLogger("accelerate")
    level = accelerate.level
    with quiet_third_party(False):
        assert not accelerate.isEnabledFor(logging.WARNING)
        assert accelerate.isEnabledFor(logging.ERROR)
    assert accelerate.level == level


def test_a_library_imported_inside_the_block_is_quieted_then_restored() -> None:
    # A fresh interpreter, so huggingface_hub (cheap to import) is first imported inside the block.
    code = textwrap.dedent(
        """
        import logging, sys
        from xling.train.console import quiet_third_party
        assert "huggingface_hub" not in sys.modules
        with quiet_third_party(False):
            import huggingface_hub.utils as hub
            inside = (hub.logging.get_verbosity(), hub.are_progress_bars_disabled())
        after = (hub.logging.get_verbosity(), hub.are_progress_bars_disabled())
        print(*inside, *after)
        """
    )
    # The library's defaults, not a setting of the machine running the tests.
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(logging.ERROR), "True", str(logging.WARNING), "False"]


def test_the_after_import_hook_runs_once_the_module_is_loaded(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "xling_console_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[int] = []
    finder = _AfterImport({"xling_console_probe": lambda module: seen.append(module.VALUE)})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.delitem(sys.modules, "xling_console_probe", raising=False)
    import xling_console_probe  # noqa: F401

    assert seen == [42]
    assert finder.callbacks == {}


def test_xling_messages_are_shown_in_a_clean_format(capsys) -> None:
    logger = logging.getLogger("xling.train.fake")
    with xling_messages(False):
        logger.info("cache written")
        logger.warning("12 rows skipped")
        logger.debug("hidden detail")
    with xling_messages(True):
        logger.debug("shown detail")
    logger.info("not shown outside the block")
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "xling: cache written",
        "xling: warning: 12 rows skipped",
        "xling: debug: shown detail",
    ]


def test_an_xling_message_does_not_break_an_open_bar(capsys) -> None:
    from tqdm import tqdm

    with xling_messages(False):
        bar = tqdm(total=3, desc="xling train toy", file=sys.stderr)
        bar.update(1)
        logging.getLogger("xling.train.fake").info("resumed")
        bar.update(2)
        bar.close()
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])xling: resumed\n", err), err


def test_split_verbose_takes_the_flag_from_anywhere() -> None:
    assert split_verbose(["train", "iap", "--verbose", "--lr", "1"]) == (["train", "iap", "--lr", "1"], True)
    assert split_verbose(["-v", "train"]) == (["train"], True)
    assert split_verbose(["train", "iap"]) == (["train", "iap"], False)
    assert split_verbose(["generate", "--", "-v"]) == (["generate", "--", "-v"], False)


def test_a_bad_config_key_is_an_error_line_and_status_2(capsys) -> None:
    assert main(["train", "align", "--no_such_key", "1"]) == 2
    err = capsys.readouterr().err
    assert "xling train align: error: unrecognized arguments: --no_such_key 1" in err.splitlines()[-1]
    assert "Traceback" not in err


def _fake_command(monkeypatch, func: Callable[[argparse.Namespace], int]) -> None:
    """Make ``xling boom`` run ``func``."""

    def build_parser(argv: object = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="xling")
        parser.add_subparsers(dest="command").add_parser("boom").set_defaults(func=func)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)


def _raise_under_a_bar(err: BaseException) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        from tqdm import tqdm

        bar = tqdm(total=10, desc="xling boom", file=sys.stderr)
        bar.update(3)
        raise err

    return func


@pytest.mark.parametrize(
    ("err", "status", "message"),
    [
        (ValueError("lr must be > 0"), 2, "lr must be > 0"),
        (KeyError("unknown config key 'x'"), 2, "unknown config key 'x'"),
        (FileNotFoundError("no such file: pairs.jsonl"), 2, "no such file: pairs.jsonl"),
        (PermissionError("output_dir is read-only"), 1, "output_dir is read-only"),
    ],
)
def test_a_user_error_is_printed_on_its_own_line_after_the_bar(
    monkeypatch, capsys, err: Exception, status: int, message: str
) -> None:
    _fake_command(monkeypatch, _raise_under_a_bar(err))
    assert main(["boom"]) == status
    err_text = capsys.readouterr().err
    assert "xling boom" in err_text  # the bar was drawn
    assert err_text.endswith(f"\nxling boom: error: {message}\n"), err_text
    assert "Traceback" not in err_text


def test_a_failed_run_is_status_1() -> None:
    from xling.train.loop import NonFiniteTrainingError

    err = NonFiniteTrainingError(3, ["mse"], None, "")
    assert cli._exit_status(err) == 1


def test_verbose_prints_the_traceback_too(monkeypatch, capsys) -> None:
    _fake_command(monkeypatch, _raise_under_a_bar(ValueError("bad value")))
    assert main(["boom", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.endswith("\nxling boom: error: bad value\n")


def test_a_bug_keeps_its_traceback_but_the_bar_is_closed_first(monkeypatch, capsys) -> None:
    _fake_command(monkeypatch, _raise_under_a_bar(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["boom"])
    assert capsys.readouterr().err.endswith("\n")  # the bar ended its line


def test_a_command_that_reports_its_own_error_keeps_doing_so(monkeypatch, capsys) -> None:
    def func(args: argparse.Namespace) -> int:
        print("xling boom: error: handled here", file=sys.stderr)
        return 2

    _fake_command(monkeypatch, func)
    assert main(["boom"]) == 2
    assert capsys.readouterr().err == "xling boom: error: handled here\n"


def test_close_progress_bars_closes_what_is_open(capsys) -> None:
    from tqdm import tqdm

    bar = tqdm(total=2, file=sys.stderr)
    close_progress_bars()
    assert bar.disable  # tqdm marks a closed bar disabled
    assert capsys.readouterr().err.endswith("\n")


def test_verbose_is_accepted_after_the_subcommand(capsys) -> None:
    assert main(["train", "align", "--verbose", "--max_steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err
    assert "max_steps" in err  # the config was checked: the flag did not reach it


def test_a_quiet_toy_run_keeps_only_xling_lines(tmp_path: Path, capfd) -> None:
    args = ["train", "align", "--max_steps", "2", "--eval.enabled", "false", "--log_with", "none"]
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        assert main([*args, "--output_dir", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "trained align: 2 steps" in out
    assert "xling train align" in err  # xling's own bar
    for noise in ("Loading weights", "should be kept in float32", "Warning"):
        assert noise not in err, err
    assert [f"{w.filename}: {w.message}" for w in log if "xling" not in Path(w.filename).parts] == []


class _Stop(Exception):
    pass


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the libraries' own, not under test
def test_the_training_bar_is_closed_when_the_run_fails(tmp_path: Path) -> None:
    from tqdm import tqdm

    from xling.train.recipes import run_recipe

    def on_step(*args: Any) -> None:
        raise _Stop

    overrides = {"max_steps": 3, "eval.enabled": False, "log_with": "none", "output_dir": str(tmp_path)}
    with pytest.raises(_Stop) as raised:  # holds the frames, so an unclosed bar would still be alive
        run_recipe("align", overrides=overrides, on_step=on_step)  # the toy world
    assert raised.traceback
    assert [bar for bar in list(tqdm._instances) if "xling train" in str(bar.desc)] == []
