"""``--teacher toy-mmdit`` wherever ``toy`` works: train (IAP's MMDiT pivot), generate, eval, bench and demo on
the committed toy MMDiT teacher; and the two things it needed of the evaluation code, which hold for any SD3
folder: loading one whose T5 is dropped, and sampling with the teacher's own T5 length."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xling.train import bench
from xling.train.cli import main
from xling.train.toyworld import mmdit
from xling.train.toyworld.names import (
    TOY,
    TOY_MMDIT,
    is_toy_teacher,
    resolve_teacher,
    teacher_options,
    teacher_record,
)


def test_names() -> None:
    assert is_toy_teacher(TOY) and is_toy_teacher(TOY_MMDIT)
    assert not is_toy_teacher("toy-unet") and not is_toy_teacher(None)
    assert Path(resolve_teacher(TOY_MMDIT)) == mmdit.mmdit_teacher_path()
    assert teacher_record(TOY_MMDIT) == TOY_MMDIT  # recorded by name: the folder is inside the package
    assert teacher_options(TOY_MMDIT) == {"max_sequence_length": mmdit.T5_TOKENS}
    assert teacher_options(TOY) == {} and teacher_options("org/model") == {}


def test_toy_section_applies_to_the_mmdit_teacher() -> None:
    from xling.train.config import load_config

    unet, mm = (load_config("iap", None, {"teacher": t}) for t in (TOY, TOY_MMDIT))
    assert mm.data.path == TOY and mm.max_steps == unet.max_steps and mm.lr == unet.lr


def test_load_pipeline_of_an_sd3_folder_without_t5(tiny_sd3_path: Path, tmp_path: Path) -> None:
    """``DiffusionPipeline.from_pretrained`` refuses a T5-dropped SD3 folder unless told ``text_encoder_3=None``;
    ``load_pipeline`` reads the ``[null, null]`` entries and says so."""
    from xling.train.evaluation import load_pipeline

    path = tmp_path / "no-t5"
    shutil.copytree(tiny_sd3_path, path, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((path / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(path)
    assert pipe.text_encoder_3 is None and pipe.text_encoder_2 is not None


def test_a_teachers_t5_length_reaches_its_pipeline(tiny_sd3_path: Path) -> None:
    """A teacher loaded with its own ``max_sequence_length`` samples and is re-wrapped with that length, not
    the pipeline's default of 256."""
    from xling.core import Teacher
    from xling.train.evaluation import load_pipeline, pipeline_teacher, pipeline_text_options
    from xling.train.evaluation.sampling import teacher_conditioning

    teacher = Teacher.from_pretrained(tiny_sd3_path, max_sequence_length=7)
    pipe = load_pipeline(teacher)
    assert pipeline_text_options(pipe) == {"max_sequence_length": 7}
    cond, uncond = teacher_conditioning(pipe, ["a red circle"])
    assert cond.prompt_embeds.shape[1] == uncond.prompt_embeds.shape[1] == 77 + 7
    torch.testing.assert_close(cond.prompt_embeds, teacher.encode(["a red circle"]).prompt_embeds)
    assert pipeline_teacher(pipe).max_length == 77 + 7
    assert pipeline_text_options(load_pipeline(tiny_sd3_path)) == {}  # a folder: the pipeline's defaults


@pytest.fixture(scope="module")
def mmdit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``xling train iap --teacher toy-mmdit`` for 3 updates, its end-of-run report on 2 scenes."""
    out = tmp_path_factory.mktemp("iap-mmdit") / "run"
    args = ["train", "iap", "--teacher", TOY_MMDIT, "--max_steps", "3", "--output_dir", str(out)]
    assert main([*args, "--eval.max_scenes", "2", "--eval.seeds", "0"]) == 0
    return out


def test_iap_trains_on_the_mmdit_pivot(mmdit_run: Path) -> None:
    from xling.adapters import LanguageEncoder

    config = json.loads((mmdit_run / "adapter" / "config.json").read_text())
    assert config["teacher"]["name_or_path"] == TOY_MMDIT
    encoder = LanguageEncoder.from_pretrained(mmdit_run / "adapter")
    out = encoder(["左边的红色圆形"])
    length = 16 + mmdit.T5_TOKENS
    assert out.prompt_embeds.shape[-1] == 64 and out.pooled_prompt_embeds.shape == (1, 64)
    assert out.prompt_embeds.shape[1] in (length, 64)  # the head's own token count
    metrics = json.loads((mmdit_run / "metrics.json").read_text())
    assert metrics["settings"]["teacher"] == TOY_MMDIT
    assert metrics["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert "toy-mmdit" in (mmdit_run / "report.md").read_text()


def test_generate_and_eval_read_the_recorded_mmdit_teacher(mmdit_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    adapter = str(mmdit_run / "adapter")
    args = ["generate", "--adapter", adapter, "左边的红色圆形", "--seeds", "0", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "gen")]) == 0
    assert np.asarray(Image.open(tmp_path / "gen" / "000-seed0.png")).shape == (32, 32, 3)
    args = ["eval", "--adapter", adapter, "--max-scenes", "2", "--seeds", "0", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"zh_student", "perfect_translation", "en_teacher"}
    assert metrics["alignment"]["attention_mse"] > 0  # the joint-attention pivot's probe ran


def test_attach_generates_with_the_toy_mmdit_pipeline(mmdit_run: Path) -> None:
    from xling.adapters import attach
    from xling.train.evaluation import load_pipeline

    wrapped = attach(load_pipeline(TOY_MMDIT), mmdit_run / "adapter")
    images = wrapped(
        "左边的红色圆形", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert np.asarray(images).shape == (1, 32, 32, 3)


def test_bench_on_toy_mmdit_has_its_own_section(tmp_path: Path) -> None:
    doc = tmp_path / "toyworld.md"
    doc.write_text(f"# The toy world\n\n{bench.BEGIN}\nUNet numbers\n{bench.END}\n")
    rc = main(
        [
            "bench", "--teacher", TOY_MMDIT, "--recipes", "iap", "--steps", "1", "--eval-every", "0",
            "--max-scenes", "2", "--seeds", "0", "--seed", "0", "--eval-steps", "2", "--output-dir", str(tmp_path / "runs"),
            "--doc", str(doc), "--set", "batch_size=4",
        ]
    )  # fmt: skip
    assert rc == 0
    text = doc.read_text()
    begin, end = bench.markers(TOY_MMDIT)
    assert "UNet numbers" in text and text.count(begin) == 1 and end in text
    section = text.split(begin, 1)[1].split(end, 1)[0]
    assert "`toy-mmdit` teacher" in section and "| iap |" in section
    assert "FlowMatchEulerDiscreteScheduler" in section
    assert (tmp_path / "images" / "toyworld-bench-toy-mmdit.png").is_file()
    (iap,) = json.loads((tmp_path / "runs" / "bench.json").read_text())["recipes"]
    assert iap["error"] is None and iap["steps"] == 1


def test_demo_serves_the_committed_mmdit_adapter() -> None:
    from xling.train import demo

    model = demo.load_demo(None, TOY_MMDIT)
    assert model.teacher == TOY_MMDIT and Path(model.adapter) == demo.TOY_MMDIT_ADAPTER_DIR
    assert model.resolution == 32 and model.factor == 8
    assert (model.default_steps, model.default_guidance) == (mmdit.DEFAULT_STEPS, mmdit.DEFAULT_GUIDANCE)
    assert model.examples  # held-out toy scenes
