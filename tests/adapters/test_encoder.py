"""LanguageEncoder: tokenisation in windows, chunked long prompts, pooling, heads, save / load per student mode."""

from __future__ import annotations

import json

import pytest
import torch

from xling.adapters import (
    LanguageEncoder,
    LinearHead,
    LinearHeadConfig,
    LoraHeadConfig,
    MixerTranslator,
    MixerTranslatorConfig,
    MLPAdapter,
    MLPAdapterConfig,
    WidthMismatchError,
)

pytest.importorskip("transformers")

CAT = "一只戴帽子的猫"
LONG = "一张小狗在海滩上奔跑的照片，" * 4  # > 32 tokens: needs several windows


def _mlp(width=48, teacher=32, pooled=None):
    torch.manual_seed(0)
    family = "sdxl" if pooled else "sd1"
    return MLPAdapter(
        MLPAdapterConfig(
            student_width=width,
            teacher_width=teacher,
            teacher_family=family,
            pooled_width=pooled,
            hidden_width=16,
        )
    )


@pytest.fixture
def bert_encoder(tiny_bert_path):
    return LanguageEncoder.from_student(tiny_bert_path, _mlp()).eval()


def test_encode_shapes_and_cls_pooling(bert_encoder):
    assert bert_encoder.hidden_size == 48 and bert_encoder.window == 32 and bert_encoder.pooling == "cls"
    out = bert_encoder.encode([CAT, "a cat wearing a hat"])
    assert (
        out.hidden_states.shape == (2, 32, 48) and out.attention_mask.shape == (2, 32) and out.num_chunks == 1
    )
    torch.testing.assert_close(out.pooled, out.hidden_states[:, 0])
    n_tokens = len(bert_encoder.tokenizer(CAT)["input_ids"])  # with [CLS] and [SEP]
    assert int(out.attention_mask[0].sum()) == n_tokens


def test_call_gives_teacher_shaped_embeds(bert_encoder):
    out = bert_encoder([CAT])
    assert out.prompt_embeds.shape == (1, 32, 32) and out.pooled_prompt_embeds is None
    assert out.attention_mask.shape == (1, 32)


def test_long_prompts_are_chunked_not_cut(bert_encoder):
    ids, mask, valid = bert_encoder.tokenize([LONG, CAT])
    body = list(bert_encoder.tokenizer(LONG, add_special_tokens=False)["input_ids"])
    c = ids.shape[1]
    assert c == -(-len(body) // 30) > 1  # 30 body tokens per 32-token window
    # every body token survives, in order, between each window's [CLS] ... [SEP]
    rebuilt = []
    for j in range(c):
        window = ids[0, j][mask[0, j].bool()].tolist()
        assert (
            window[0] == bert_encoder.tokenizer.cls_token_id
            and window[-1] == bert_encoder.tokenizer.sep_token_id
        )
        rebuilt += window[1:-1]
    assert rebuilt == body
    assert valid[0].all() and valid[1].tolist() == [True] + [False] * (c - 1)  # fillers for the short prompt
    out = bert_encoder([LONG, CAT])
    assert out.prompt_embeds.shape == (2, c * 32, 32)
    assert int(out.attention_mask[1, 32:].sum()) == 0
    # the short prompt's first window does not depend on what it was batched with
    alone = bert_encoder([CAT])
    torch.testing.assert_close(out.prompt_embeds[1, :32], alone.prompt_embeds[0], atol=1e-5, rtol=1e-5)


def test_empty_prompt_and_bad_prompts(bert_encoder):
    out = bert_encoder([""])
    assert out.prompt_embeds.shape == (1, 32, 32) and int(out.attention_mask.sum()) == 2  # [CLS] [SEP]
    with pytest.raises(TypeError, match="prompts"):
        bert_encoder([1, 2])
    with pytest.raises(ValueError, match="empty"):
        bert_encoder([])


def test_xlmr_student_with_linear_pooled_head(tiny_xlmr_path):
    head = LinearHead(
        LinearHeadConfig(student_width=40, teacher_width=64, teacher_family="sdxl", pooled_width=32)
    )
    enc = LanguageEncoder.from_student(tiny_xlmr_path, head).eval()
    assert enc.window == 32 and enc.pooling == "cls"
    out = enc([CAT, LONG])
    assert out.prompt_embeds.shape[0] == 2 and out.prompt_embeds.shape[2] == 64
    student = enc.encode([CAT, LONG])
    torch.testing.assert_close(out.pooled_prompt_embeds, head.pooled_proj(student.pooled))


def test_mixer_head_maps_each_window_to_77_tokens(tiny_bert_path):
    head = MixerTranslator(
        MixerTranslatorConfig(student_width=48, teacher_width=32, source_length=32, depth=1, mult=1.0)
    )
    enc = LanguageEncoder.from_student(tiny_bert_path, head).eval()
    assert enc([CAT]).prompt_embeds.shape == (1, 77, 32)
    long = enc([LONG])
    assert long.prompt_embeds.shape[1] == 77 * enc.tokenize([LONG])[0].shape[1]


def test_width_mismatch_between_head_and_student(tiny_bert_path):
    with pytest.raises(WidthMismatchError, match="student_width 40 != student hidden_size 48"):
        LanguageEncoder.from_student(tiny_bert_path, _mlp(width=40))
    with pytest.raises(ValueError, match="not both"):
        LanguageEncoder.from_student(tiny_bert_path, _mlp(), lora=LoraHeadConfig(), unfreeze_last=1)


def _no_pickles(directory):
    assert not [p for p in directory.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


def test_frozen_round_trip(bert_encoder, tmp_path, tiny_bert_path):
    assert not any(p.requires_grad for p in bert_encoder.student.parameters())
    assert all(p.requires_grad for p in bert_encoder.head.parameters())
    bert_encoder.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    assert cfg["format"] == "xling-language-encoder" and cfg["format_version"] == 1
    assert cfg["layout"]["student"] is None and cfg["encoder"]["student_weights"] == "frozen"
    assert not (tmp_path / "ad" / "student").exists()
    _no_pickles(tmp_path / "ad")
    expected = bert_encoder([CAT, LONG]).prompt_embeds
    for loaded in (
        LanguageEncoder.from_pretrained(tmp_path / "ad"),
        LanguageEncoder.from_pretrained(tmp_path / "ad", student_path=tiny_bert_path),
    ):
        assert torch.equal(loaded([CAT, LONG]).prompt_embeds, expected)
        assert not any(p.requires_grad for p in loaded.parameters())


def test_lora_round_trip_and_gradients(tiny_xlmr_path, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    enc = LanguageEncoder.from_student(
        tiny_xlmr_path, _mlp(width=40, teacher=64, pooled=32), lora=LoraHeadConfig()
    )
    out = enc([CAT])
    (out.prompt_embeds.sum() + out.pooled_prompt_embeds.sum()).backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n or n.startswith("head.") for n in grads)
    assert any("lora_" in n for n in grads)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    enc.eval().save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "student_lora" / "adapter_model.safetensors").is_file()
    _no_pickles(tmp_path / "ad")
    loaded = LanguageEncoder.from_pretrained(tmp_path / "ad")
    assert isinstance(loaded.student, PeftModel)
    a, b = enc([CAT, LONG]), loaded([CAT, LONG])
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and torch.equal(
        a.pooled_prompt_embeds, b.pooled_prompt_embeds
    )
    # include_student also copies the base weights; the adapter is then applied once on load
    enc.save_pretrained(tmp_path / "full", include_student=True)
    full = LanguageEncoder.from_pretrained(tmp_path / "full", student_path="/nonexistent")
    assert torch.equal(full([CAT]).prompt_embeds, enc([CAT]).prompt_embeds)


def test_unfrozen_round_trip(tiny_bert_path, tmp_path):
    enc = LanguageEncoder.from_student(tiny_bert_path, _mlp(), unfreeze_last=1)
    trainable = {n for n, p in enc.student.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)
    with torch.no_grad():
        enc.student.encoder.layer[1].output.dense.weight.add_(0.5)  # "training"
    enc.eval().save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "student" / "model.safetensors").is_file()
    _no_pickles(tmp_path / "ad")
    loaded = LanguageEncoder.from_pretrained(tmp_path / "ad", student_path="/nonexistent")  # self-contained
    assert torch.equal(loaded([CAT]).prompt_embeds, enc([CAT]).prompt_embeds)


def test_set_trainable_records_the_mode_that_saving_reads(tiny_bert_path, tmp_path):
    enc = LanguageEncoder.from_student(tiny_bert_path, _mlp())
    enc.set_trainable(backbone=True)
    trainable = {n for n, p in enc.student.named_parameters() if p.requires_grad}
    # Everything but the student's own pooler, which the head never reads (DDP would wait for its gradient).
    assert trainable and not any(n.startswith("pooler.") for n in trainable)
    assert {n for n, _ in enc.student.named_parameters()} - trainable == {
        n for n, _ in enc.student.named_parameters() if n.startswith("pooler.")
    }
    with torch.no_grad():
        enc.student.encoder.layer[0].output.dense.weight.add_(0.5)  # "training"
    enc.save_pretrained(tmp_path / "unfrozen")
    cfg = json.loads((tmp_path / "unfrozen" / "config.json").read_text())
    assert cfg["encoder"]["student_weights"] == "unfrozen" and cfg["layout"]["student"] == "student"
    loaded = LanguageEncoder.from_pretrained(tmp_path / "unfrozen", student_path="/nonexistent")
    assert torch.equal(loaded([CAT]).prompt_embeds, enc([CAT]).prompt_embeds)

    # Freezing again keeps the record: the weights already differ from the base student's.
    enc.set_trainable(backbone=False)
    assert not any(p.requires_grad for p in enc.student.parameters())
    assert all(p.requires_grad for p in enc.head.parameters())
    assert enc.config.student_weights == "unfrozen"

    frozen = LanguageEncoder.from_student(tiny_bert_path, _mlp())
    frozen.set_trainable(backbone=False)
    assert frozen.config.student_weights == "frozen"
    # Flipping requires_grad behind the encoder's back is refused at save time instead of losing the weights.
    frozen.student.encoder.layer[0].output.dense.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="set_trainable"):
        frozen.save_pretrained(tmp_path / "bad")


def test_set_trainable_keeps_a_lora_student_on_its_lora_weights(tiny_xlmr_path):
    pytest.importorskip("peft")
    enc = LanguageEncoder.from_student(tiny_xlmr_path, _mlp(width=40), lora=LoraHeadConfig())
    before = {n for n, p in enc.student.named_parameters() if p.requires_grad}
    enc.set_trainable(backbone=False)
    assert {n for n, p in enc.student.named_parameters() if p.requires_grad} == before
    assert before and all("lora_" in n for n in before) and enc.config.student_weights == "lora"
    with pytest.raises(ValueError, match="LoRA"):
        enc.set_trainable(backbone=True)


def test_from_pretrained_rejects_other_directories(tmp_path, bert_encoder):
    bert_encoder.head.save_pretrained(tmp_path / "head_only")
    with pytest.raises(ValueError, match="not a language-encoder config"):
        LanguageEncoder.from_pretrained(tmp_path / "head_only")
    bert_encoder.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "config.json").read_text())
    cfg["format_version"] = 7
    (tmp_path / "ad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 7"):
        LanguageEncoder.from_pretrained(tmp_path / "ad")


def test_hidden_layer_selects_the_state_fed_to_the_head(tiny_bert_path):
    last = LanguageEncoder.from_student(tiny_bert_path, _mlp()).eval()
    penultimate = LanguageEncoder.from_student(tiny_bert_path, _mlp(), hidden_layer=-2).eval()
    h_last, h_pen = last.encode([CAT]).hidden_states, penultimate.encode([CAT]).hidden_states
    assert not torch.allclose(h_last, h_pen)
    ids, mask, _ = last.tokenize([CAT])
    states = last.student(
        input_ids=ids[:, 0], attention_mask=mask[:, 0], output_hidden_states=True
    ).hidden_states
    torch.testing.assert_close(h_pen, states[-2])
