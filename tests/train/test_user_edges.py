"""The edges a newcomer hits with a model, a student and data of their own (issue 16): captions longer than the
student's window in ``mtn``, a corpus without English for ``denoise``, an fp16-variant teacher, the image size
and crop of a corpus, and a real teacher left without ``--data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests import _tiny
from tests.train.conftest import tiny_config
from xling.train.config import iter_fields, load_config
from xling.train.recipes import RECIPES, get_recipe, run_recipe


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _image_corpus(folder: Path, *, english: bool, n: int = 6) -> Path:
    """``n`` rows of a Chinese caption and a 40x48 PNG (not square: the crop matters), with English or not."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        en, zh = _tiny.BILINGUAL_TEXT[2 * (i % 12)], _tiny.BILINGUAL_TEXT[2 * (i % 12) + 1]
        rows.append({"en": en, "zh": zh, "image": f"{i}.png"} if english else {"zh": zh, "image": f"{i}.png"})
    return _write_jsonl(folder / "pairs.jsonl", rows)


def test_every_option_has_help():
    # `xling train <recipe> --help` prints metadata["help"]: an option without it is undocumented.
    for name in RECIPES:
        for key, f, _ in iter_fields(get_recipe(name).config_class):
            assert f.metadata.get("help"), (name, key)


# ---- 4. mtn on captions longer than the student's window ------------------------------------------------------


@pytest.mark.parametrize("windows", ["first", "all"])  # GlueGen's truncation, xling's every window
def test_mtn_trains_on_captions_longer_than_the_student_window(
    windows, tiny_sd1_path, tiny_bert_path, tmp_path
):
    from transformers import AutoTokenizer

    from xling.adapters import LanguageEncoder

    long_zh = "".join(_tiny.BILINGUAL_TEXT[1::2])  # every Chinese line in one caption
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_path))
    tokens = tokenizer(long_zh, add_special_tokens=False)["input_ids"]
    # Several of the tiny student's 32-token windows, more than the translator's 77 tokens in all: the case
    # that used to fail with "hidden_states has N tokens but this translator was built for source_length 77".
    assert len(tokens) > 77
    short_zh = _tiny.BILINGUAL_TEXT[1]
    rows = [{"en": "a cat wearing a hat", "zh": long_zh if i % 2 else short_zh} for i in range(6)]
    config = tiny_config(
        tiny_sd1_path, tiny_bert_path, tmp_path / "run", max_steps=2, batch_size=2, windows=windows
    )
    result = run_recipe("mtn", config, train_data=rows)
    assert result.steps == 2 and all(np.isfinite(result.losses))

    # Inference applies the trained translator window by window, as training did: 77 tokens per window.
    out = LanguageEncoder.from_pretrained(result.adapter_dir)([long_zh, short_zh])
    assert out.prompt_embeds.shape[1] > 77 and out.prompt_embeds.shape[1] % 77 == 0


# ---- 7. denoise on a corpus without English -------------------------------------------------------------------


def test_denoise_trains_on_a_corpus_without_english(tiny_sd1_path, tiny_bert_path, tmp_path):
    corpus = _image_corpus(tmp_path / "zh-only", english=False)
    config = tiny_config(
        tiny_sd1_path, tiny_bert_path, tmp_path / "run", max_steps=1, batch_size=2, data={"path": str(corpus)}
    )
    result = run_recipe("denoise", config)
    assert result.steps == 1 and all(np.isfinite(result.losses))


def test_a_recipe_that_reads_english_names_the_missing_column_and_file(
    tiny_sd1_path, tiny_bert_path, tmp_path
):
    corpus = _image_corpus(tmp_path / "zh-only", english=False)
    config = tiny_config(
        tiny_sd1_path, tiny_bert_path, tmp_path / "run", max_steps=1, batch_size=2, data={"path": str(corpus)}
    )
    with pytest.raises(ValueError, match=r"pairs\.jsonl has no column 'en' \(data\.en_column\)"):
        run_recipe("distill", config)


def test_needs_english_is_read_from_the_recipe_module():
    assert get_recipe("denoise").needs_english is False
    assert all(get_recipe(name).needs_english for name in RECIPES if name != "denoise")


# ---- 5. fp16-variant teacher, image size and crop -------------------------------------------------------------


def test_a_teacher_with_only_fp16_variant_files_trains(tiny_sd1_path, tiny_bert_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    variant_dir = tmp_path / "teacher-fp16"
    StableDiffusionPipeline.from_pretrained(str(tiny_sd1_path)).save_pretrained(variant_dir, variant="fp16")
    assert not list(variant_dir.rglob("diffusion_pytorch_model.safetensors"))  # only *.fp16.safetensors
    assert list(variant_dir.rglob("*.fp16.safetensors"))
    rows = [{"en": _tiny.BILINGUAL_TEXT[2 * i], "zh": _tiny.BILINGUAL_TEXT[2 * i + 1]} for i in range(4)]
    config = tiny_config(variant_dir, tiny_bert_path, tmp_path / "run", max_steps=1, batch_size=2)
    result = run_recipe("distill", config, overrides={"variant": "fp16"}, train_data=rows)
    assert result.steps == 1 and all(np.isfinite(result.losses))
    with pytest.raises((OSError, ValueError, FileNotFoundError)):
        run_recipe("distill", {**config, "output_dir": str(tmp_path / "plain")}, train_data=rows)


@pytest.mark.parametrize("crop", ["center", "random"])
def test_data_resolution_and_crop_reach_the_images(tiny_sd1_path, tiny_bert_path, tmp_path, crop):
    from xling.train.data import ImageTransform, load_rows

    corpus = _image_corpus(tmp_path / "pairs", english=True, n=10)
    data = {"path": str(corpus), "resolution": 16, "crop": crop, "val_samples": 1}
    cfg = load_config("denoise", tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path / "run", data=data))
    train, _ = load_rows(cfg, resolution=32, with_images=True, with_english=False)
    item = train[0]
    assert item["image"].shape == (3, 16, 16)  # data.resolution wins over the teacher's 32
    expected = ImageTransform(16, crop, cfg.seed).crop_box(19, 16, item["index"])  # 40x48 resized to 16x19
    assert tuple(item["crop_top_left"]) == expected
    assert train.dataset.transform.crop == crop


def test_data_resolution_is_checked():
    with pytest.raises(ValueError, match=r"data\.resolution"):
        load_config("denoise", {"data": {"resolution": 0}})
    with pytest.raises(ValueError, match=r"data\.crop"):
        load_config("denoise", {"data": {"crop": "left"}})


# ---- 6. a real teacher without --data -------------------------------------------------------------------------


def test_a_real_teacher_without_data_is_an_error_naming_the_fix(tiny_sd1_path, tiny_bert_path, tmp_path):
    config = tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path / "run")
    with pytest.raises(ValueError, match=r"--data PATH"):
        run_recipe("distill", config)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    # Rows of the caller's own need no data.path; an explicit 'toy' keeps the toy captions for any teacher.
    rows = [{"en": _tiny.BILINGUAL_TEXT[2 * i], "zh": _tiny.BILINGUAL_TEXT[2 * i + 1]} for i in range(4)]
    assert run_recipe("distill", {**config, "batch_size": 2, "max_steps": 1}, train_data=rows).steps == 1


def test_the_cli_without_data_for_a_real_teacher_names_the_fix(
    tiny_sd1_path, tiny_bert_path, tmp_path, capsys
):
    from xling.train.cli import main

    code = main(
        [
            *("train", "distill", "--teacher", str(tiny_sd1_path), "--student", str(tiny_bert_path)),
            *("--log_with", "none", "--eval.enabled", "false", "--output_dir", str(tmp_path / "run")),
        ]
    )
    assert code != 0 and "--data PATH" in capsys.readouterr().err


def test_the_toy_teacher_still_defaults_to_the_toy_data():
    cfg = load_config("iap")
    assert cfg.data.path == "toy"
    real = load_config("iap", {"teacher": "org/real-model"})
    # Unset, so a caller's rows or --data decide: never the toy captions unasked.
    assert real.data.path is None


def test_the_report_scores_the_validation_rows_of_a_corpus(tiny_sd1_path, tiny_bert_path, tmp_path):
    # Off the toy world the end-of-run report evaluates held-out rows of the user's own corpus (whose items
    # carry the target caption as "target"): without them it would sample nothing and draw no grid.
    rows = [{"en": _tiny.BILINGUAL_TEXT[i], "zh": _tiny.BILINGUAL_TEXT[i + 1]} for i in range(0, 24, 2)] * 2
    corpus = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = tiny_config(
        tiny_sd1_path,
        tiny_bert_path,
        tmp_path / "run",
        max_steps=1,
        batch_size=2,
        data={"path": str(corpus), "val_samples": 2},
        eval={"enabled": True, "num_prompts": 2, "seeds": [0], "num_inference_steps": 2},
    )
    result = run_recipe("distill", config)
    assert result.files["report"].is_file() and result.files["grid"].is_file()
