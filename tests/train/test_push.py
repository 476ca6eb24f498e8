"""``xling push RUN_DIR REPO_ID`` on a tiny trained run, against the fake Hub on 127.0.0.1; the run's model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from tests.adapters._fakehub import FakeHub, point_hub_at, repo
from tests.train.conftest import tiny_config
from xling.adapters import LanguageEncoder
from xling.train.cli import main

ZH = ["左边的红色圆形", "右边的蓝色正方形"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_sd1_path, tiny_bert_path) -> Path:
    """One IAP update on toy-world data with the tiny SD-1 teacher, evaluated (report, metrics, grid)."""
    from xling.train.recipes import run_recipe

    out = tmp_path_factory.mktemp("push") / "run"
    config = tiny_config(
        tiny_sd1_path,
        tiny_bert_path,
        out,
        max_steps=1,
        data={"path": "toy", "num_samples": 8, "val_samples": 4},
        eval={"enabled": True, "num_prompts": 2, "seeds": [0], "num_inference_steps": 2},
    )
    result = run_recipe("iap", config)
    assert result.files["grid"].is_file()
    return result.output_dir


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as server:
        point_hub_at(monkeypatch, server)
        yield server


def _embeds(encoder: LanguageEncoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(ZH).prompt_embeds


def test_the_run_writes_the_card_with_its_report(run_dir: Path, tiny_sd1_path: Path) -> None:
    adapter = run_dir / "adapter"
    card = ModelCard.load(adapter / "README.md")
    assert card.data.tags == ["xling", "text-to-image", "diffusers", "iap", "linear"]
    assert card.data.language == ["zh", "en"] and card.data.license == "other"
    assert "recipe: iap" in card.text and "max_steps: 1" in card.text
    assert "### Alignment" in card.text and "| token cosine |" in card.text  # the report's table
    assert "](grid.png)" in card.text
    assert (adapter / "grid.png").read_bytes() == (run_dir / "grid.png").read_bytes()
    # where it ran is not the card's business
    assert "output_dir" not in card.text and str(run_dir) not in card.text and "## Data" not in card.text
    assert str(tiny_sd1_path) not in card.text and f"teacher: <local>/{tiny_sd1_path.name}" in card.text


def test_push_a_run_folder_then_load_the_repo(run_dir: Path, hub: FakeHub, tmp_path: Path, capsys) -> None:
    assert main(["push", str(run_dir), "org/run", "--private"]) == 0
    out = capsys.readouterr().out
    assert f"{hub.endpoint}/org/run/commit/" in out and hub.repos["org/run"].private
    files = hub.files("org/run")
    assert {
        "README.md",
        "grid.png",
        "config.json",
        "head/model.safetensors",
        "student/model.safetensors",
    } <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert (
        'attach(pipe, "org/run")' in card.text and "### Alignment" in card.text and "recipe: iap" in card.text
    )
    loaded = LanguageEncoder.from_pretrained(repo("run"), cache_dir=tmp_path / "cache")
    local = LanguageEncoder.from_pretrained(run_dir / "adapter")
    assert torch.equal(_embeds(loaded), _embeds(local))


def test_push_the_adapter_folder_with_options(run_dir: Path, hub: FakeHub, tmp_path: Path) -> None:
    args = ["push", str(run_dir / "adapter"), "org/run", "--license", "mit", "--revision", "v1"]
    assert main([*args, "--commit-message", "first zh adapter"]) == 0
    assert set(hub.repos["org/run"].refs) == {"main", "v1"} and hub.files("org/run", "main") == {}
    card = ModelCard(hub.files("org/run", "v1")["README.md"].decode())
    assert card.data.license == "mit" and "recipe: iap" in card.text  # the run's card, from inside the run
    loaded = LanguageEncoder.from_pretrained(repo("run"), revision="v1", cache_dir=tmp_path / "cache")
    assert json.loads(hub.files("org/run", "v1")["config.json"])["layout"]["student"] == "student"
    assert torch.equal(_embeds(loaded), _embeds(LanguageEncoder.from_pretrained(run_dir / "adapter")))


def test_bad_run_dirs_are_usage_errors(hub: FakeHub, tmp_path: Path, capsys) -> None:
    hub.requests.clear()
    assert main(["push", str(tmp_path / "nope"), "org/x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "config.yaml").write_text("recipe: iap\n")
    assert main(["push", str(unsaved), "org/x"]) == 2
    assert "run folder without an adapter" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["push", str(empty), "org/x"]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert hub.requests == [] and hub.repos == {}


def test_generate_takes_the_repo_id(run_dir: Path, hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # not the user's cache
    assert main(["push", str(run_dir), "org/gen"]) == 0
    out = tmp_path / "images"
    args = ["generate", "--adapter", "org/gen", ZH[0], "--seeds", "0", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    assert [p.name for p in out.glob("*.png")] == ["000-seed0.png"]
    assert any((tmp_path / "cache").glob("models--org--gen/snapshots/*/config.json"))
