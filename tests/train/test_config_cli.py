"""Configs (shipped YAMLs, overrides, errors) and the ``xling train`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from xling.train.cli import main
from xling.train.config import choices, default_config_path, flat_dict, iter_fields, load_config, shipped_yaml
from xling.train.recipes import RECIPES, get_recipe

PAPER = {
    ("iap", "lr"): 5e-5,
    ("pea", "lr"): 1e-5,
    ("pea", "feature_weight"): 0.1,
    ("mtn", "lr"): 1e-4,
    ("mtn", "num_blocks"): 5,  # GlueNet's depth, for every real-teacher run
    ("align", "lora_r"): 16,
    ("align", "lora_alpha"): 64,
    ("align", "unfreeze_layers"): 3,
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_shipped_yaml_holds_only_what_differs_from_the_dataclass(recipe):
    path = default_config_path(recipe)
    assert path.read_text().startswith("#"), "the YAML must open with a comment naming its source"
    cls = get_recipe(recipe).config_class
    fields = {k: f for k, f, _ in iter_fields(cls)}
    defaults = flat_dict(cls())
    paper, toy = shipped_yaml(recipe)
    assert set(toy) >= {"lr", "max_steps", "batch_size"}
    for key in {*paper, *toy}:
        assert key in fields, f"{path.name}: {key!r} is not an option of {cls.__name__}"
    for key, value in paper.items():
        # The dataclass is the one home of every default: the YAML repeats none of them.
        assert value != defaults[key], f"{path.name}: {key}: {value!r} repeats the dataclass default"
    cfg = load_config(recipe)
    assert cfg.recipe == recipe and cfg.teacher == "toy" and cfg.data.path == "toy"
    assert cfg.output_dir == f"runs/{recipe}"
    # PEA starts from a CLIP-aligned encoder, as its paper does; every other recipe from the MLM student.
    assert cfg.student == ("toy-aligned" if recipe == "pea" else "toy")
    # The toy section is a CPU-sized run (10 minutes at most): image recipes run the UNet every step, text-only
    # ones are ~5x cheaper.
    assert cfg.max_steps <= (300 if get_recipe(recipe).needs_images else 1500)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_option_has_help_and_choices_come_from_literals(recipe):
    import typing

    cls = get_recipe(recipe).config_class
    for key, f, tp in iter_fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{key} has no help text"
        allowed = choices(tp)
        if allowed is not None:
            assert typing.get_origin(tp) is typing.Literal
            with pytest.raises(ValueError, match=f"'{key}' must be one of"):
                load_config(recipe, overrides={key: "no-such-choice"})


def test_paper_defaults_and_the_toy_section():
    for (recipe, key), value in PAPER.items():
        assert flat_dict(load_config(recipe, {"teacher": "org/real-model"}))[key] == value, (recipe, key)
    real, toy = load_config("iap", {"teacher": "org/real-model"}), load_config("iap")
    assert (real.max_steps, toy.max_steps) == (20000, 300) and toy.lr != real.lr
    assert load_config("mtn").num_blocks == 2  # a translator sized for the toy teacher
    # What the caller sets wins over the toy section, whichever way it is set.
    assert load_config("iap", overrides=["--lr", "1e-4"]).lr == 1e-4
    assert load_config("iap", {"max_steps": 7}).max_steps == 7
    assert Path("configs/iap.yaml").resolve() == default_config_path("iap").resolve()


def test_overrides_parse_and_check_types():
    cfg = load_config(
        "pea", overrides=["--lr", "1e-4", "--data.path=x.jsonl", "--hybrid", "true", "eval.seeds=[3, 4]"]
    )
    assert cfg.lr == 1e-4 and cfg.data.path == "x.jsonl" and cfg.hybrid is True and cfg.eval.seeds == [3, 4]
    cfg = load_config("iap", {"data": "pairs.tsv", "timestep_max": "null", "max_steps": 7})
    assert cfg.data.path == "pairs.tsv" and cfg.timestep_max is None and cfg.max_steps == 7
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        load_config("iap", overrides={"lrr": 1})
    with pytest.raises(TypeError, match="'max_steps' expects an int"):
        load_config("iap", overrides={"max_steps": "many"})
    with pytest.raises(ValueError, match="'mixed_precision' must be one of"):
        load_config("iap", overrides={"mixed_precision": "fp8"})
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config("nope")
    with pytest.raises(ValueError, match="is for recipe 'pea'"):
        load_config("iap", {"recipe": "pea"})


def test_xling_help_is_fast(capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("recipe", RECIPES)
def test_train_recipe_help_lists_every_option(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", recipe, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key, _, _ in iter_fields(get_recipe(recipe).config_class):
        if key != "recipe":
            assert f"--{key}" in out, key


def test_cli_trains_from_a_jsonl_file(tiny_sd1_path, tiny_bert_path, tmp_path, capsys):
    from tests import _tiny

    data = tmp_path / "pairs.jsonl"
    text = _tiny.BILINGUAL_TEXT
    data.write_text(
        "".join(
            json.dumps({"english": text[i], "chinese": text[i + 1]}, ensure_ascii=False) + "\n"
            for i in range(0, len(text), 2)
        )
    )
    out = tmp_path / "cli-run"
    code = main(
        [
            "train",
            "distill",
            "--teacher",
            str(tiny_sd1_path),
            "--student",
            str(tiny_bert_path),
            "--data",
            str(data),
            "--data.en_column",
            "english",
            "--data.zh_column",
            "chinese",
            "--max_steps",
            "2",
            "--batch_size",
            "4",
            "--log_with",
            "none",
            "--eval.enabled",
            "false",
            "--output_dir",
            str(out),
            "--train_encoder",
            "false",
        ]
    )
    assert code == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "trained distill: 2 steps" in printed
    assert (out / "adapter" / "config.json").is_file() and (out / "config.yaml").is_file()
    assert "train_encoder: false" in (out / "config.yaml").read_text()


def test_cli_reports_a_bad_option(capsys):
    code = main(["train", "iap", "--max_steps", "0"])
    assert code == 2
    assert "'max_steps' must be >= 1" in capsys.readouterr().err


def test_image_corpus_with_latent_and_embedding_caches(tiny_sd1_path, tiny_bert_path, tmp_path):
    import numpy as np
    from PIL import Image

    from tests import _tiny
    from tests.train.conftest import tiny_config
    from xling.train.recipes import run_recipe

    rng = np.random.default_rng(0)
    text = _tiny.BILINGUAL_TEXT
    lines = []
    for i in range(0, len(text), 2):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
        lines.append(json.dumps({"en": text[i], "zh": text[i + 1], "image": name}, ensure_ascii=False))
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    caches = {
        "path": str(data),
        "latent_cache": str(tmp_path / "lat"),
        "embedding_cache": str(tmp_path / "emb"),
    }
    config = tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path / "run", max_steps=2, data=caches)
    first = run_recipe("iap", config)
    assert (tmp_path / "lat" / "index.json").is_file() and (tmp_path / "emb" / "index.json").is_file()
    stamp = (tmp_path / "lat" / "index.json").stat().st_mtime_ns
    second = run_recipe("iap", {**config, "output_dir": str(tmp_path / "run2")})
    assert (tmp_path / "lat" / "index.json").stat().st_mtime_ns == stamp  # a hit: not rebuilt
    assert first.losses == second.losses  # cached latents/embeddings == the ones computed on the fly


def test_xling_help_imports_no_torch():
    """A cold ``xling --help`` stays fast: the recipes' options (whose modules import torch) are built only for
    ``xling train``."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom xling.train.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'xling.train.recipes.iap' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "False False", done.stderr
