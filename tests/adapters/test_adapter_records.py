"""What an adapter directory records and how loading fails for a newcomer: the teacher it was trained for,
a moved student, a run folder passed instead of ``run/adapter``, and the merged copy of a LoRA student."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from xling.adapters import LanguageEncoder, LoraHeadConfig, MLPAdapter, MLPAdapterConfig, attach
from xling.adapters.encoder import looks_like_local_path

pytest.importorskip("transformers")

CAT = "一只戴帽子的猫"


def _mlp(width=48, teacher=32, pooled=None):
    torch.manual_seed(0)
    return MLPAdapter(
        MLPAdapterConfig(
            student_width=width,
            teacher_width=teacher,
            teacher_family="sdxl" if pooled else "sd1",
            pooled_width=pooled,
            hidden_width=16,
        )
    )


def test_teacher_record_round_trips_and_old_adapters_have_none(tiny_bert_path, tmp_path):
    enc = LanguageEncoder.from_student(tiny_bert_path, _mlp(teacher=64, pooled=32)).eval()
    enc.save_pretrained(tmp_path / "old")
    assert "teacher" not in json.loads((tmp_path / "old" / "config.json").read_text())
    assert LanguageEncoder.from_pretrained(tmp_path / "old").teacher is None

    enc.save_pretrained(tmp_path / "new", teacher="org/sdxl-base")
    record = json.loads((tmp_path / "new" / "config.json").read_text())["teacher"]
    assert record == {
        "name_or_path": "org/sdxl-base",
        "family": "sdxl",
        "teacher_width": 64,
        "pooled_width": 32,
    }
    loaded = LanguageEncoder.from_pretrained(tmp_path / "new")
    assert loaded.teacher == record
    # saving a loaded adapter again keeps its record
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["teacher"] == record


def test_local_path_or_hub_id():
    assert not looks_like_local_path("org/model")
    assert not looks_like_local_path("bert-base-chinese")
    assert looks_like_local_path("/models/student")
    assert looks_like_local_path("./student")
    assert looks_like_local_path("runs/a/student")


def test_moved_student_names_the_recorded_path_and_the_fix(tiny_bert_path, tmp_path):
    student = shutil.copytree(tiny_bert_path, tmp_path / "student")
    enc = LanguageEncoder.from_student(student, _mlp()).eval()
    expected = enc([CAT]).prompt_embeds
    enc.save_pretrained(tmp_path / "ad")
    shutil.rmtree(student)
    with pytest.raises(FileNotFoundError) as err:
        LanguageEncoder.from_pretrained(tmp_path / "ad")
    message = str(err.value)
    assert str(student) in message and "recorded in" in message
    assert "student_path=" in message and "--student-path" in message
    with pytest.raises(FileNotFoundError, match="given as student_path"):
        LanguageEncoder.from_pretrained(tmp_path / "ad", student_path=tmp_path / "elsewhere")
    moved = LanguageEncoder.from_pretrained(tmp_path / "ad", student_path=tiny_bert_path)
    assert torch.equal(moved([CAT]).prompt_embeds, expected)


def test_run_folder_error_names_its_adapter_subfolder(tiny_bert_path, tiny_sd1_path, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    LanguageEncoder.from_student(tiny_bert_path, _mlp()).save_pretrained(tmp_path / "run" / "adapter")
    run = tmp_path / "run"
    hint = f"{run} is a run folder (the output of `xling train`), not an adapter; pass {run / 'adapter'}"
    with pytest.raises(FileNotFoundError) as err:
        LanguageEncoder.from_pretrained(run)
    assert str(err.value) == hint
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path, text_encoder=None)
    with pytest.raises(FileNotFoundError) as err:
        attach(pipe, run)
    assert str(err.value) == hint
    with pytest.raises(FileNotFoundError, match="no language-encoder config"):
        LanguageEncoder.from_pretrained(tmp_path / "empty")


def test_lora_adapter_writes_a_merged_copy_that_loads_without_peft(tiny_xlmr_path, tmp_path):
    pytest.importorskip("peft")
    enc = LanguageEncoder.from_student(tiny_xlmr_path, _mlp(width=40), lora=LoraHeadConfig())
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the student
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    enc.eval().save_pretrained(tmp_path / "ad")
    merged_dir = tmp_path / "ad" / "student_merged"
    assert (merged_dir / "model.safetensors").is_file()
    assert not list(merged_dir.glob("*.bin")) and not list(merged_dir.glob("*.pt"))
    layout = json.loads((tmp_path / "ad" / "config.json").read_text())["layout"]
    assert layout["student_merged"] == "student_merged" and layout["student_lora"] == "student_lora"
    # the live student is untouched by the merge: still a peft model with trainable LoRA weights
    assert any("lora_" in n for n, _ in enc.student.named_parameters())

    via_peft = LanguageEncoder.from_pretrained(tmp_path / "ad")  # peft is installed here
    merged = LanguageEncoder.from_pretrained(tmp_path / "ad", merged_lora=True)
    assert not any("lora_" in n for n, _ in merged.student.named_parameters())
    assert merged.config.student_weights == "unfrozen"
    assert not any(p.requires_grad for p in merged.parameters()) and not merged.training
    torch.testing.assert_close(merged([CAT]).prompt_embeds, via_peft([CAT]).prompt_embeds)
    # the merged copy is the whole student: it loads when the base student has moved away
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    cfg["encoder"]["student_model"] = str(tmp_path / "gone")
    (tmp_path / "ad" / "config.json").write_text(json.dumps(cfg))
    alone = LanguageEncoder.from_pretrained(tmp_path / "ad", merged_lora=True)
    torch.testing.assert_close(alone([CAT]).prompt_embeds, via_peft([CAT]).prompt_embeds)


def test_old_lora_adapter_without_merged_copy_asks_for_peft(tiny_xlmr_path, tmp_path):
    pytest.importorskip("peft")
    enc = LanguageEncoder.from_student(tiny_xlmr_path, _mlp(width=40), lora=LoraHeadConfig()).eval()
    enc.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    del cfg["layout"]["student_merged"]
    (tmp_path / "ad" / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(tmp_path / "ad" / "student_merged")
    with pytest.raises(FileNotFoundError, match=r"xling-adapters\[peft\]"):
        LanguageEncoder.from_pretrained(tmp_path / "ad", merged_lora=True)
    assert LanguageEncoder.from_pretrained(tmp_path / "ad").config.student_weights == "lora"
