"""The feature tap captures PEA's block outputs for the teacher and the student pass and removes its hooks."""

from __future__ import annotations

import pytest
import torch

from tests.core._helpers import unet_inputs
from xling.core import FeatureTap, pea_blocks


def _hook_count(unet: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in unet.modules())


def test_pea_default_blocks(sd1_teacher, sdxl_teacher):
    assert pea_blocks(sd1_teacher.unet) == (
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    )
    assert len(pea_blocks(sdxl_teacher.unet)) == 5


def test_teacher_and_student_pass_features(sdxl_teacher):
    unet = sdxl_teacher.unet
    inputs = unet_inputs(sdxl_teacher)
    student = (
        inputs["encoder_hidden_states"] + 0.1 * torch.randn_like(inputs["encoder_hidden_states"])
    ).requires_grad_(True)
    hooks_before = _hook_count(unet)
    with FeatureTap(unet) as tap:
        assert _hook_count(unet) == hooks_before + len(tap.blocks)
        with torch.no_grad():
            unet(**inputs)
        teacher_feats = tap.take()
        assert tap.features == {}
        unet(**{**inputs, "encoder_hidden_states": student})
        student_feats = tap.take()
    assert _hook_count(unet) == hooks_before
    assert list(teacher_feats) == list(pea_blocks(unet))
    # down blocks return (hidden, residuals): the tap keeps the hidden states, [B, C, h, w]
    assert teacher_feats["down_blocks.0"].shape == (2, 8, 8, 8)
    assert teacher_feats["mid_block"].shape == (2, 16, 8, 8)
    assert teacher_feats["up_blocks.1"].shape == (2, 8, 16, 16)
    assert not teacher_feats["mid_block"].requires_grad
    loss = sum((student_feats[n] - teacher_feats[n]).pow(2).mean() for n in tap.blocks)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    # the student's conditioning changes features after the first cross-attention block
    assert not torch.allclose(student_feats["up_blocks.0"], teacher_feats["up_blocks.0"])


def test_chosen_blocks_and_errors(sd1_teacher):
    unet = sd1_teacher.unet
    with FeatureTap(unet, blocks=["mid_block"]) as tap:
        with pytest.raises(RuntimeError, match="mid_block"):
            tap.take()
        with torch.no_grad():
            unet(**unet_inputs(sd1_teacher))
        assert list(tap.take()) == ["mid_block"]
    with pytest.raises(ValueError, match=r"up_blocks\.9"):
        FeatureTap(unet, blocks=["mid_block", "up_blocks.9"])
