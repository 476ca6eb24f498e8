"""One file format: bit-identical round trips, strict loading, clean failures on bad files, width checks."""

from __future__ import annotations

import json

import pytest
import torch

from xling.adapters import (
    LinearHead,
    LinearHeadConfig,
    MixerTranslator,
    MixerTranslatorConfig,
    MLPAdapter,
    MLPAdapterConfig,
    WidthMismatchError,
    check_widths,
    load_head,
)


def _heads():
    torch.manual_seed(0)
    return [
        MLPAdapter(
            MLPAdapterConfig(
                student_width=12,
                teacher_width=20,
                pooled_width=10,
                hidden_width=16,
                student_model="tiny-bert",
            )
        ),
        MixerTranslator(
            MixerTranslatorConfig(
                student_width=12, teacher_width=20, source_length=9, target_length=7, depth=2, mult=1.5
            )
        ),
        LinearHead(
            LinearHeadConfig(
                student_width=12, teacher_width=20, teacher_family="sd2", pooled_width=10, language="ja"
            )
        ),
    ]


@pytest.fixture
def saved_mlp(tmp_path):
    head = _heads()[0]
    head.save_pretrained(tmp_path / "mlp")
    return head, tmp_path / "mlp"


@pytest.mark.parametrize("index", [0, 1, 2], ids=["mlp", "mixer", "linear"])
def test_round_trip_is_bit_identical(tmp_path, index):
    head = _heads()[index].eval()
    head.save_pretrained(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    for key in (
        "head_type",
        "student_width",
        "teacher_width",
        "teacher_family",
        "pooled_width",
        "student_model",
        "language",
        "format_version",
    ):
        assert key in cfg
    h, mask = torch.randn(3, 9, 12), torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    expected = head(h, mask)
    for loaded in (type(head).from_pretrained(tmp_path / "h"), load_head(tmp_path / "h")):
        assert type(loaded) is type(head) and loaded.config == head.config
        got = loaded(h, mask)
        assert torch.equal(got.prompt_embeds, expected.prompt_embeds)
        if expected.pooled_prompt_embeds is not None:
            assert torch.equal(got.pooled_prompt_embeds, expected.pooled_prompt_embeds)


def test_loading_into_the_wrong_class_fails(saved_mlp):
    _, path = saved_mlp
    with pytest.raises(ValueError, match="holds a 'mlp' head, not a MixerTranslator"):
        MixerTranslator.from_pretrained(path)


def test_tampered_weights_fail_naming_the_file(saved_mlp):
    _, path = saved_mlp
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern inside a tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*weights_sha256"):
        load_head(path)


def test_truncated_weights_fail_naming_the_file(saved_mlp):
    _, path = saved_mlp
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_head(path)
    # without the recorded digest (opted out) the safetensors reader itself must refuse it, still naming the file
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("weights_sha256")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_head(path, verify_hashes=False)


def test_pickle_is_never_loaded(saved_mlp, tmp_path):
    head, path = saved_mlp
    torch.save(head.state_dict(), path / "model.safetensors")  # a pickle under the safetensors name
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("weights_sha256")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_head(path, verify_hashes=False)


def test_weights_of_another_shape_fail(saved_mlp):
    _, path = saved_mlp
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_width"] = 8
    cfg.pop("weights_sha256")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="wrong shape"):
        load_head(path, verify_hashes=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format_version=99), "format_version 99"),
        (lambda c: c.update(head_type="unet"), "unknown head_type"),
        (lambda c: c.update(extra_field=1), "unknown MLPAdapterConfig fields"),
        (lambda c: c.update(teacher_family="sdxl", pooled_width=None), "pooled_width"),
    ],
)
def test_bad_configs_fail_naming_the_file(saved_mlp, edit, message):
    _, path = saved_mlp
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_head(path)


def test_unparsable_or_missing_files(tmp_path, saved_mlp):
    _, path = saved_mlp
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_head(path)
    with pytest.raises(FileNotFoundError, match="no head config"):
        load_head(tmp_path / "nowhere")


def test_check_widths_names_each_width():
    cfg = MLPAdapterConfig(student_width=12, teacher_width=20, pooled_width=10, hidden_width=16)
    check_widths(cfg, cross_attention_dim=20, pooled_width=10, needs_pooled=True, student_width=12)
    with pytest.raises(WidthMismatchError) as err:
        check_widths(cfg, cross_attention_dim=32, pooled_width=16, needs_pooled=True, student_width=40)
    msg = str(err.value)
    assert "teacher_width 20 != unet.config.cross_attention_dim 32" in msg
    assert "pooled_width 10 != pooled width 16" in msg
    assert "student_width 12 != student hidden_size 40" in msg
    no_pool = LinearHeadConfig(student_width=12, teacher_width=20)
    with pytest.raises(WidthMismatchError, match="no pooled output"):
        check_widths(no_pool, cross_attention_dim=20, pooled_width=16, needs_pooled=True)
