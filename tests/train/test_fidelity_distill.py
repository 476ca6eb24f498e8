"""The distill preset against AltCLIP's public KD code (FlagAI ``examples/AltCLIP/hf_altclip/modeling_kd.py``,
``modeling_xlmr.py``): the loss of one fixed tiny batch, computed here from AltCLIP's formula, must equal the
recipe step's; ``pre_LN`` is part of the head; the student runs without dropout, so two passes agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.conftest import FIXED_EN as EN
from tests.train.conftest import FIXED_ZH as ZH
from tests.train.conftest import tiny_config
from xling.train.config import load_config
from xling.train.data import Batch
from xling.train.recipes import get_recipe


def _step(tmp_path, teacher, student, **overrides):
    cfg = load_config("distill", tiny_config(teacher, student, tmp_path / "run", **overrides))
    return get_recipe("distill").build(cfg, device=torch.device("cpu"), dtype=torch.float32)


def test_real_teacher_config_is_the_public_code():
    cfg = load_config("distill", {"teacher": "org/real-model"})
    # modeling_kd.py: no dropout for the MSE KD, the whole student trains; modeling_xlmr.py: pre_LN
    assert (cfg.pre_norm, cfg.student_dropout, cfg.train_encoder) == (True, False, True)


def test_preset_loss_is_altclips_mse(tmp_path, tiny_sd1_path, tiny_bert_path):
    step = _step(tmp_path, tiny_sd1_path, tiny_bert_path)
    head = step.encoder.head
    assert isinstance(head.norm, torch.nn.LayerNorm) and head.norm.weight.requires_grad
    with torch.no_grad():  # off the identity initialisation, so the test sees the LayerNorm's affine part
        g = torch.Generator().manual_seed(3)
        head.norm.weight.copy_(1 + 0.5 * torch.randn(head.norm.weight.shape, generator=g))
        head.norm.bias.copy_(0.5 * torch.randn(head.norm.bias.shape, generator=g))
    step.train()
    total, logs = step(Batch(en=EN, zh=ZH, index=torch.arange(4)))

    teacher = step.teacher
    t_tok = teacher.tokenizers[0](
        EN, padding="max_length", max_length=teacher.max_length, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        # CLIPTextModel(...).pooler_output: the final-LayerNorm state at each prompt's [EOS]
        t_pooled = teacher.text_encoders[0](t_tok.input_ids).pooler_output  # [B, P]
    tok = step.encoder.tokenizer(ZH, padding=True, return_tensors="pt")
    h = step.encoder.student(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state[
        :, 0
    ]
    eps = step.encoder.student.config.layer_norm_eps
    normed = F.layer_norm(h, (h.shape[-1],), head.norm.weight, head.norm.bias, eps)  # pre_LN
    s_pooled = normed @ head.proj.weight.T + head.proj.bias  # transformation of [CLS]
    expected = ((s_pooled - t_pooled) ** 2).mean()  # torch.nn.MSELoss()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["pooled"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("student_dropout", [False, True])
def test_two_passes_agree_without_student_dropout(student_dropout, tmp_path, tiny_sd1_path, tiny_bert_path):
    step = _step(tmp_path, tiny_sd1_path, tiny_bert_path, student_dropout=student_dropout)
    assert step.encoder.student.config.hidden_dropout_prob > 0  # the fixture has dropout to turn off
    step.train()
    assert step.encoder.head.training  # only the student's mode changes
    batch = Batch(en=EN, zh=ZH, index=torch.arange(4))
    torch.manual_seed(0)
    first = step(batch)[0]
    second = step(batch)[0]
    assert torch.equal(first, second) is not student_dropout
    assert first.requires_grad


def test_plain_projection_switch(tmp_path, tiny_sd1_path, tiny_bert_path):
    step = _step(tmp_path, tiny_sd1_path, tiny_bert_path, pre_norm=False)
    assert step.encoder.head.norm is None and not step.encoder.head.config.pre_norm


def test_pre_norm_head_normalises_tokens_and_pooled():
    from xling.adapters import LinearHead, LinearHeadConfig

    cfg = LinearHeadConfig(
        student_width=8, teacher_width=6, teacher_family="sdxl", pooled_width=5, pre_norm=True
    )
    head = LinearHead(cfg)
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
        head.norm.bias.uniform_(-1, 1)
    h = torch.randn(2, 4, 8) * 3 + 1
    out = head(h, torch.ones(2, 4, dtype=torch.long))
    normed = F.layer_norm(h, (8,), head.norm.weight, head.norm.bias, 1e-5)
    torch.testing.assert_close(out.prompt_embeds, F.linear(normed, head.proj.weight, head.proj.bias))
    pooled = F.linear(normed[:, 0], head.pooled_proj.weight, head.pooled_proj.bias)
    torch.testing.assert_close(out.pooled_prompt_embeds, pooled)
