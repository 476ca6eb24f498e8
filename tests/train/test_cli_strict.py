"""The command line takes options only as spelled in full, and suggests the closest key for a typo."""

from __future__ import annotations

import argparse

import pytest

from xling.train.cli import build_parser, iter_parsers, main
from xling.train.config import close_keys, load_config, set_key


def test_every_parser_rejects_abbreviations() -> None:
    parsers = list(iter_parsers(build_parser()))
    progs = {p.prog for p in parsers}
    # The top parser, the four commands and the recipes below `xling train` are all reached.
    assert {"xling", "xling train", "xling train iap", "xling generate", "xling eval", "xling bench"} <= progs
    assert all(not p.allow_abbrev for p in parsers), [p.prog for p in parsers if p.allow_abbrev]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "iap", "--max_step", "3"],
            "xling train iap: error: unrecognized arguments: --max_step 3; did you mean '--max_steps'? "
            "(see 'xling train iap --help')",
        ),
        (
            ["train", "iap", "--data.zh_colum", "x"],
            "xling train iap: error: unrecognized arguments: --data.zh_colum x; "
            "did you mean '--data.zh_column'? (see 'xling train iap --help')",
        ),
        (
            ["train", "iap", "--max_step=3", "--data.zh_colum", "x"],
            "xling train iap: error: unrecognized arguments: --max_step=3 --data.zh_colum x; did you mean "
            "'--max_steps' for '--max_step', '--data.zh_column' for '--data.zh_colum'? "
            "(see 'xling train iap --help')",
        ),
        (
            ["generate", "--adapter", "A", "--seed", "3", "p"],
            "xling generate: error: unrecognized arguments: --seed; did you mean '--seeds'? "
            "(see 'xling generate --help')",
        ),
        (
            ["eval", "--adapter", "A", "--clip-mod", "x"],
            "xling eval: error: unrecognized arguments: --clip-mod x; did you mean '--clip-model'? "
            "(see 'xling eval --help')",
        ),
        (
            ["bench", "--recipe", "iap"],
            "xling bench: error: unrecognized arguments: --recipe iap; did you mean '--recipes'? "
            "(see 'xling bench --help')",
        ),
        (
            ["train", "iap", "--zzzzqq", "1"],
            "xling train iap: error: unrecognized arguments: --zzzzqq 1 (see 'xling train iap --help')",
        ),
    ],
    ids=["train-prefix", "train-dotted-prefix", "train-two", "generate", "eval", "bench", "no-close-key"],
)
def test_a_prefix_is_an_error_with_a_suggestion(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


def test_options_spelled_in_full_still_parse() -> None:
    args, unknown = build_parser(["train", "iap"]).parse_known_args(
        ["train", "iap", "--max_steps", "3", "--data.zh_column", "x"]
    )
    assert unknown == []
    assert vars(args)["max_steps"] == "3" and vars(args)["data.zh_column"] == "x"


def test_a_command_parser_without_the_strict_class_is_made_strict(monkeypatch) -> None:
    # A command module that builds its own parser class still loses abbreviations.
    import types

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("plain")
        inner = parser.add_subparsers(dest="inner", parser_class=argparse.ArgumentParser)
        inner.add_parser("leaf").add_argument("--long-option")

    module = types.ModuleType("fake_plain_command")
    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "fake_plain_command", module)
    monkeypatch.setattr("xling.train.cli.COMMANDS", ["fake_plain_command"])
    parser = build_parser(["plain"])
    args, unknown = parser.parse_known_args(["plain", "leaf", "--long", "1"])
    assert unknown == ["--long", "1"] and getattr(args, "long_option", None) is None


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "max_step",
            "unknown config key 'max_step' for recipe 'iap'; did you mean 'max_steps'? Valid keys: ",
        ),
        (
            "data.zh_colum",
            "unknown config key 'data.zh_colum' for recipe 'iap'; did you mean 'data.zh_column'? ",
        ),
        ("zh_column", "unknown config key 'zh_column' for recipe 'iap'; did you mean 'data.zh_column'? "),
        ("zzzzqq", "unknown config key 'zzzzqq' for recipe 'iap'; valid keys: adam_beta1, "),
    ],
)
def test_set_key_suggests_the_closest_keys_first(key: str, message: str) -> None:
    config = load_config("iap")
    with pytest.raises(ValueError) as info:
        set_key(config, key, "3")
    assert str(info.value).startswith(message), str(info.value)
    assert "max_steps" in str(info.value).split("alid keys: ")[1]  # every key is still listed


def test_close_keys_keeps_only_the_best_matches() -> None:
    keys = ["data.en_column", "data.zh_column", "data.image_column", "max_steps", "warmup_steps"]
    assert close_keys("data.zh_colum", keys) == ["data.zh_column"]
    assert close_keys("max_step", keys) == ["max_steps"]
    assert close_keys("image_column", keys) == ["data.image_column"]
    assert close_keys("qqqq", keys) == []
