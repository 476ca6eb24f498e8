"""LoRA heads through peft (saved in peft's own format) and training only the last k layers."""

from __future__ import annotations

import json

import pytest
import torch

from xling.adapters import LoraHeadConfig, apply_lora, default_lora_targets, unfreeze_last_layers

pytest.importorskip("peft")


def _bert(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def test_lora_defaults_and_trainable_set(tiny_bert_path):
    model = _bert(tiny_bert_path)
    assert default_lora_targets(model) == ["query", "key", "value", "attention.output.dense"]
    peft_model = apply_lora(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 4 projections x (A + B)
    assert len(trainable) == 2 * 4 * 2
    adapted = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"query", "key", "value", "dense"}
    a = next(p for n, p in peft_model.named_parameters() if n.endswith("query.lora_A.default.weight"))
    assert a.shape[0] == 16


def test_lora_saved_in_peft_format_is_read_by_peft(tiny_bert_path, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    peft_model = apply_lora(_bert(tiny_bert_path), LoraHeadConfig())
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    peft_model.save_pretrained(str(tmp_path / "lora"))
    files = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 64
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    expected = peft_model.eval()(input_ids=ids).last_hidden_state
    reread = PeftModel.from_pretrained(_bert(tiny_bert_path), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(reread(input_ids=ids).last_hidden_state, expected)
    assert not torch.allclose(_bert(tiny_bert_path)(input_ids=ids).last_hidden_state, expected)


def test_lora_custom_targets_and_validation(tiny_xlmr_path):
    from transformers import AutoModel

    model = apply_lora(
        AutoModel.from_pretrained(tiny_xlmr_path), LoraHeadConfig(r=2, alpha=4, target_modules=["value"])
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".value.lora_" in n for n in trainable)
    with pytest.raises(ValueError, match="target_modules"):
        LoraHeadConfig(target_modules=[])
    with pytest.raises(ValueError, match="`r`"):
        LoraHeadConfig(r=0)


@pytest.mark.parametrize("fixture", ["tiny_bert_path", "tiny_xlmr_path"])
def test_unfreeze_last_layers(fixture, request):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(request.getfixturevalue(fixture))
    names = unfreeze_last_layers(model, k=1)
    assert names and all(n.startswith("encoder.layer.1.") for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert not model.embeddings.word_embeddings.weight.requires_grad
    assert len(unfreeze_last_layers(model, k=2)) == 2 * len(names)
    with pytest.raises(ValueError, match=r"\[1, 2\].*got 3"):
        unfreeze_last_layers(model)  # default k=3 on a 2-layer model
