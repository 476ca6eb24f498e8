"""End to end with the real student of xling-adapters: it satisfies the protocol and one IAP step trains its head.

Skipped until ``xling.adapters`` exports ``LanguageEncoder``, ``LinearHead`` and ``LinearHeadConfig``.
"""

from __future__ import annotations

import pytest
import torch

from tests.core._helpers import unet_inputs
from xling.core import PivotTap, StudentEncoder, check_student_fits

adapters = pytest.importorskip("xling.adapters")
if not all(hasattr(adapters, n) for n in ("LanguageEncoder", "LinearHead", "LinearHeadConfig")):
    pytest.skip("xling.adapters does not export LanguageEncoder / LinearHead yet", allow_module_level=True)


def _encoder(student_path, teacher_width: int):
    head = adapters.LinearHead(adapters.LinearHeadConfig(student_width=48, teacher_width=teacher_width))
    return adapters.LanguageEncoder.from_student(student_path, head)


def test_language_encoder_is_a_student_and_one_iap_step_trains_its_head(tiny_bert_path, sd1_teacher):
    student = _encoder(tiny_bert_path, sd1_teacher.cross_attention_dim)
    assert isinstance(student, StudentEncoder)
    check_student_fits(sd1_teacher, student)
    inputs = unet_inputs(sd1_teacher)
    with PivotTap(sd1_teacher.unet) as tap:
        out = student(["左边的红色圆形", "右边的蓝色正方形"])
        tap.set_student(out.prompt_embeds, out.attention_mask)
        with torch.no_grad():
            sd1_teacher.unet(**inputs)
        loss = sum((o_s - o_t).pow(2).mean() for o_t, o_s in tap.pairs)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in sd1_teacher.unet.parameters())


def test_language_encoder_of_wrong_width_fails_naming_both(tiny_bert_path, sd1_teacher):
    with pytest.raises(ValueError, match="width 48 does not fit the teacher's cross_attention_dim 32"):
        check_student_fits(sd1_teacher, _encoder(tiny_bert_path, 48))
