"""Many languages and two-object scenes through training, evaluation and the bench, with tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xling.train import bench
from xling.train.cli import main
from xling.train.config import load_config
from xling.train.toyworld import world

TINY = {
    "max_steps": 3,
    "batch_size": 4,
    "data.num_samples": 12,
    "data.val_samples": 2,
    "validate_every": 0,
    "checkpoint_every": 0,
    "log_with": "none",
}


def test_language_option_is_checked_on_the_toy_world() -> None:
    assert load_config("iap", None, {"language": "ko"}).language == "ko"
    with pytest.raises(ValueError, match=r"config key 'language': unknown toy-world language 'de'"):
        load_config("iap", None, {"language": "de"})
    with pytest.raises(ValueError, match=r"'data\.pair_fraction' must be in"):
        load_config("iap", None, {"data.pair_fraction": 1.5})
    # A real corpus brings its own target column: any code is recorded as given.
    cfg = load_config("iap", None, {"teacher": "some/model", "data.path": "pairs.jsonl", "language": "de"})
    assert cfg.language == "de"


def test_rows_follow_the_language_and_pair_options() -> None:
    from xling.train.data.rows import load_rows

    cfg = load_config("iap", None, {"language": "ja,ar", "data.pair_fraction": 0.5, "data.num_samples": 40})
    train, val = load_rows(cfg, resolution=None, with_images=True)
    rows = [train[i] for i in range(40)]
    assert {r["language"] for r in rows} == {"ja", "ar"}
    assert 8 <= sum(r["scene"].is_pair for r in rows) <= 32
    assert all(r["target"] == world.caption(r["scene"], r["language"], None) or r["target"] for r in rows)
    assert not any(world.is_heldout(r["scene"]) for r in rows)
    assert all(world.is_heldout(val[i]["scene"]) for i in range(len(val)))
    from xling.train.data.batch import collate_rows

    batch = collate_rows([(i, r) for i, r in enumerate(rows[:4])])
    assert batch.zh == [r["target"] for r in rows[:4]]  # the target language, not the Chinese column


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step IAP run of one adapter on every toy language, its report scored on two scenes of each kind."""
    from xling.train.recipes import run_recipe

    out = tmp_path_factory.mktemp("iap-all")
    overrides = {
        **TINY,
        "student": "toy-multilingual",
        "language": "all",
        "data.pair_fraction": 0.25,
        "output_dir": str(out),
        "eval.max_scenes": 2,
        "eval.seeds": [0],
        "eval.num_inference_steps": 2,
        "eval.num_prompts": 2,
        "eval.scene_kind": "both",
        "eval.max_pair_scenes": 2,
    }
    cfg = load_config("iap", None, overrides)
    result = run_recipe("iap", cfg)
    assert result.steps == 3
    return out


def test_one_adapter_reads_every_language_and_reports_each(multilingual_run: Path) -> None:
    encoder = json.loads((multilingual_run / "adapter" / "config.json").read_text())["encoder"]
    assert encoder["language"] == "zh,ja,ko,es,ar"
    metrics = json.loads((multilingual_run / "metrics.json").read_text())
    assert metrics["settings"]["languages"] == [*world.TARGET_LANGUAGES, world.MIXED]
    groups = metrics["groups"]
    for language in (*world.TARGET_LANGUAGES, world.MIXED):
        for kind in ("single", "pair"):
            row = groups[f"{language}_student/{kind}"]
            assert row["n"] == 2 and 0 <= row["all"] <= 1 and len(row["interval"]) == 2
    assert "relation" in groups["ja_student/pair"] and "relation" not in groups["ja_student/single"]
    assert "relative" in groups["ko_student/single"] and "relative" not in groups["en_teacher/single"]
    report = (multilingual_run / "report.md").read_text()
    assert "### Per language and scene kind" in report and "| student, ar, two objects |" in report
    assert "| student, mixed, one object |" in report
    card = (multilingual_run / "adapter" / "README.md").read_text()
    assert "- ko" in card and "- ar" in card and "- en" in card


def test_eval_scores_the_languages_asked_for(multilingual_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    args = ["eval", "--adapter", str(multilingual_run / "adapter"), "--max-scenes", "2", "--seeds", "0"]
    assert main([*args, "--steps", "2", "--language", "es,mixed", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["groups"]) == {
        "en_teacher/single", "perfect_translation/single", "es_student/single", "mixed_student/single"
    }  # fmt: skip
    assert main([*args, "--language", "fr", "--out", str(out)]) == 2


def test_pooling_training_seeds_keeps_every_image() -> None:
    from xling.train.evaluation import EvalResult, group_summary

    def run(seed: int, right: list[bool]) -> tuple[bench.RecipeBench, EvalResult]:
        student = [{"color": r, "shape": True, "position": True, "all": r, "heldout": i < 2} for i, r in
                   enumerate(right)]  # fmt: skip
        teacher = [{"color": True, "shape": True, "position": True, "all": True, "heldout": i < 2} for i in
                   range(len(right))]  # fmt: skip
        result = EvalResult(
            verdicts={"zh_student/single": student, "en_teacher/single": teacher},
            settings={"languages": ["zh"], "scenes": len(right)},
        )
        outcome = bench.RecipeBench(
            "iap", steps=3, accuracy={"all": sum(right) / len(right)}, agreement={"psnr": 1.0 * seed},
            curve=[(3, sum(right) / len(right))], train_seeds=[seed],
        )  # fmt: skip
        return outcome, result

    one = run(0, [True] * 6 + [False] * 2)
    pooled = bench.pool_seeds([one, run(1, [True] * 4 + [False] * 4), run(2, [True] * 8)])
    assert pooled.train_seeds == [0, 1, 2] and pooled.seed_accuracy == [0.75, 0.5, 1.0]
    assert pooled.accuracy["all"] == pytest.approx(18 / 24) and pooled.relative_accuracy == pytest.approx(
        0.75
    )
    assert pooled.groups["zh_student/single"]["n"] == 24 and pooled.curve == [(3, pytest.approx(0.75))]
    assert pooled.agreement["psnr"] == pytest.approx(1.0)
    alone = group_summary(one[1].verdicts["zh_student/single"])
    width = pooled.intervals["zh_student"][1] - pooled.intervals["zh_student"][0]
    assert width < alone["interval"][1] - alone["interval"][0]  # three seeds' images: a narrower interval


def test_bench_over_seeds_languages_and_scene_kinds(tmp_path: Path) -> None:
    doc = tmp_path / "toyworld.md"
    rc = main(
        [
            "bench", "--recipes", "align", "--steps", "2", "--eval-every", "0", "--max-scenes", "2",
            "--max-pair-scenes", "2", "--scene-kind", "both", "--language", "ja,es", "--seed", "0", "1",
            "--seeds", "0", "--eval-steps", "2", "--output-dir", str(tmp_path / "runs"), "--doc", str(doc),
            "--set", "batch_size=4", "data.num_samples=8",
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "runs" / "bench.json").read_text())
    assert result["settings"]["train_seeds"] == [0, 1] and result["settings"]["languages"] == ["ja", "es"]
    (align,) = result["recipes"]
    assert align["error"] is None and align["student"] == "toy-multilingual"
    assert align["train_seeds"] == [0, 1] and len(align["seed_accuracy"]) == 2
    for name in ("ja_student/single", "es_student/pair", "mixed_student/single", "mixed_student/pair"):
        assert align["groups"][name]["n"] == 4, name  # 2 scenes x 1 sampling seed x 2 training seeds
    assert (tmp_path / "runs" / "align" / "seed1" / "adapter").is_dir()
    text = doc.read_text()
    assert "| align, ja, one object |" in text and "| align, es, two objects |" in text
    assert "| English teacher, two objects |" in text and "training seed(s) [0, 1]" in text
    assert (tmp_path / "images" / "toyworld-bench.png").is_file()
