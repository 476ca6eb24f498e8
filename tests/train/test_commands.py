"""``xling generate`` / ``xling eval`` / ``xling bench`` end to end on the toy world with a tiny budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xling.train import bench
from xling.train.cli import main


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised linear head on the pretrained toy student, saved as an adapter directory."""
    import torch

    from xling.adapters.config import LinearHeadConfig
    from xling.adapters.encoder import LanguageEncoder
    from xling.adapters.linear import LinearHead
    from xling.train.toyworld import teacher_path
    from xling.train.toyworld.student import student_path

    unet_config = json.loads((teacher_path() / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    student = student_path()
    width = json.loads((student / "config.json").read_text())["hidden_size"]
    head = LinearHead(LinearHeadConfig(student_width=width, teacher_width=unet_config["cross_attention_dim"]))
    return LanguageEncoder.from_student(student, head).save_pretrained(tmp_path_factory.mktemp("adapter"))


def test_generate_writes_seeded_pngs(adapter_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    args = ["generate", "--adapter", str(adapter_dir), "红色的圆形", "左边的蓝色正方形", "--seeds", "0", "1"]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files == ["000-seed0.png", "000-seed1.png", "001-seed0.png", "001-seed1.png"]
    index = json.loads((tmp_path / "a" / "images.json").read_text())
    assert [i["prompt"] for i in index["images"]] == ["红色的圆形"] * 2 + ["左边的蓝色正方形"] * 2
    first = [np.asarray(Image.open(tmp_path / d / "000-seed0.png")) for d in ("a", "b")]
    assert first[0].ndim == 3 and first[0].shape[2] == 3
    assert np.array_equal(*first)  # same seed, same image
    other = np.asarray(Image.open(tmp_path / "a" / "000-seed1.png"))
    assert not np.array_equal(first[0], other)


def test_generate_missing_adapter_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--adapter", str(tmp_path / "nope"), "红色的圆形", "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_eval_prints_and_writes_metrics(
    adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "eval"
    rc = main(
        [
            "eval",
            "--adapter",
            str(adapter_dir),
            "--max-scenes",
            "3",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"zh_student", "perfect_translation", "en_teacher"}
    for acc in metrics["accuracy"].values():
        assert set(acc) == {"color", "shape", "position", "all"} and all(0 <= v <= 1 for v in acc.values())
    assert metrics["settings"]["images_per_condition"] == 3
    assert metrics["alignment"]["attention_mse"] is None or metrics["alignment"]["attention_mse"] > 0
    assert (out / "grid.png").is_file() and (out / "report.md").is_file()
    assert "Checker accuracy" in capsys.readouterr().out


def test_bench_tiny_run_keeps_the_rest_of_the_doc(tmp_path: Path) -> None:
    doc = tmp_path / "toyworld.md"
    doc.write_text("# The toy world\n\n## Teacher\n\nTeacher numbers from C1.\n")
    rc = main(
        [
            "bench", "--recipes", "align", "--steps", "2", "--eval-every", "1", "--max-scenes", "2",
            "--seeds", "0", "--seed", "0", "--eval-steps", "2", "--output-dir", str(tmp_path / "runs"),
            "--doc", str(doc), "--set", "batch_size=4", "align:data.num_samples=8",
        ]
    )  # fmt: skip
    assert rc == 0
    text = doc.read_text()
    assert "Teacher numbers from C1." in text and bench.BEGIN in text and bench.END in text
    assert "| align |" in text and "English teacher" in text
    assert (tmp_path / "images" / "toyworld-bench.png").is_file()
    result = json.loads((tmp_path / "runs" / "bench.json").read_text())
    (align,) = result["recipes"]
    assert align["error"] is None and align["steps"] == 2 and align["trainable_parameters"] > 0
    assert [s for s, _ in align["curve"]] == [1, 2]
    # A second run replaces the section instead of appending another.
    bench.update_doc(doc, "### Results\n\nreplaced\n")
    assert doc.read_text().count(bench.BEGIN) == 1 and "replaced" in doc.read_text()


def test_bench_override_parsing() -> None:
    out = bench.parse_overrides(["lr=1e-4", "iap:data.path=C:/x.jsonl", "pea:hybrid=true"], ["iap", "pea"])
    assert out == {"iap": {"lr": "1e-4", "data.path": "C:/x.jsonl"}, "pea": {"lr": "1e-4", "hybrid": "true"}}
    with pytest.raises(ValueError, match="not benchmarked"):
        bench.parse_overrides(["mtn:lr=1"], ["iap"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.parse_overrides(["lr"], ["iap"])


# ---- a user's own adapter: recorded teacher, widths, moved student, run folders, weight variants -----------


def _bert_adapter(directory: Path, student: Path, *, teacher_width: int, teacher: str | None = None) -> Path:
    """A linear head on the tiny BERT student for a teacher of ``teacher_width``, saved to ``directory``."""
    import torch

    from xling.adapters.config import LinearHeadConfig
    from xling.adapters.encoder import LanguageEncoder
    from xling.adapters.linear import LinearHead

    torch.manual_seed(0)
    head = LinearHead(LinearHeadConfig(student_width=48, teacher_width=teacher_width))
    return LanguageEncoder.from_student(student, head).save_pretrained(directory, teacher=teacher)


def test_generate_checks_widths_before_sampling(
    tmp_path: Path, tiny_bert_path: Path, tiny_sdxl_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # an SD1-width adapter (32) that records no teacher: the toy teacher (64) is the default, and does not fit
    adapter = _bert_adapter(tmp_path / "sd1", tiny_bert_path, teacher_width=32)
    out = tmp_path / "out"
    assert main(["generate", "--adapter", str(adapter), "红色的圆形", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "xling generate: error: linear head (sd1) does not fit the teacher toy" in err
    assert "teacher_width 32 != unet.config.cross_attention_dim 64" in err
    assert not out.exists()  # failed before anything was sampled or written
    # on SDXL the same adapter also lacks the pooled output SDXL needs
    args = ["generate", "--adapter", str(adapter), "红色的圆形", "--teacher", str(tiny_sdxl_path)]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "the head has no pooled output but the teacher" in err and "pooled_prompt_embeds of width 32" in err
    )
    rc = main(["eval", "--adapter", str(adapter), "--max-scenes", "1", "--seeds", "0", "--out", str(out)])
    assert (
        rc == 2
        and "xling eval: error: linear head (sd1) does not fit the teacher toy" in capsys.readouterr().err
    )


def test_generate_defaults_to_the_recorded_teacher(
    tmp_path: Path, tiny_bert_path: Path, tiny_sd1_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter = _bert_adapter(tmp_path / "ad", tiny_bert_path, teacher_width=32, teacher=str(tiny_sd1_path))
    out = tmp_path / "out"
    assert main(["generate", "--adapter", str(adapter), "红色的圆形", "--steps", "2", "--out", str(out)]) == 0
    assert json.loads((out / "images.json").read_text())["teacher"] == str(tiny_sd1_path)
    # --teacher overrides the record (and the toy teacher's width does not fit)
    assert (
        main(["generate", "--adapter", str(adapter), "红色的圆形", "--teacher", "toy", "--out", str(out)])
        == 2
    )
    assert "does not fit the teacher toy" in capsys.readouterr().err
    # a recorded local teacher that is gone says so and how to fix it
    cfg = json.loads((adapter / "config.json").read_text())
    cfg["teacher"]["name_or_path"] = str(tmp_path / "gone")
    (adapter / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--adapter", str(adapter), "红色的圆形", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is not at {tmp_path / 'gone'}" in err and "--teacher" in err


def test_generate_and_eval_take_a_moved_student(
    tmp_path: Path, tiny_bert_path: Path, tiny_sd1_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    student = shutil.copytree(tiny_bert_path, tmp_path / "student")
    adapter = _bert_adapter(tmp_path / "ad", student, teacher_width=32, teacher=str(tiny_sd1_path))
    shutil.rmtree(student)
    out = tmp_path / "out"
    args = ["generate", "--adapter", str(adapter), "红色的圆形", "--steps", "2", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the student of {adapter} is not at {student}" in err and "--student-path" in err
    assert "Traceback" not in err
    assert main([*args, "--student-path", str(tiny_bert_path)]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"en": "a red circle", "zh": "红色的圆形"}, ensure_ascii=False) + "\n")
    eval_args = ["eval", "--adapter", str(adapter), "--prompts", str(pairs), "--seeds", "0", "--steps", "2"]
    assert main([*eval_args, "--out", str(tmp_path / "eval")]) == 2
    assert "--student-path" in capsys.readouterr().err
    rc = main([*eval_args, "--student-path", str(tiny_bert_path), "--out", str(tmp_path / "eval")])
    assert rc == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["teacher"] == str(tiny_sd1_path)  # the recorded teacher, no --teacher given


def test_generate_names_the_adapter_of_a_run_folder(
    adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    assert main(["generate", "--adapter", str(run), "红色的圆形", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{run} is a run folder (the output of `xling train`), not an adapter; pass {run / 'adapter'}" in err
    )


def test_generate_reads_a_weight_variant(
    tmp_path: Path, tiny_bert_path: Path, tiny_sd1_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from diffusers import DiffusionPipeline

    teacher = tmp_path / "teacher-fp16"
    DiffusionPipeline.from_pretrained(tiny_sd1_path).save_pretrained(teacher, variant="fp16")
    assert list(teacher.glob("unet/*.fp16.safetensors"))
    adapter = _bert_adapter(tmp_path / "ad", tiny_bert_path, teacher_width=32, teacher=str(teacher))
    args = ["generate", "--adapter", str(adapter), "红色的圆形", "--steps", "2"]
    assert main([*args, "--variant", "fp16", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "000-seed0.png").is_file()
    # without --variant diffusers looks for the plain weight files, which this folder does not have
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "xling generate: error:" in capsys.readouterr().err


def test_import_help_lists_the_three_sources(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["import", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for source, repo in (
        ("pea", "PEA-Diffusion"),
        ("gluegen", "salesforce/GlueGen"),
        ("altclip", "FlagAI-Open/FlagAI"),
    ):
        assert any(line.split()[:1] == [source] and repo in line for line in out.splitlines()), source
