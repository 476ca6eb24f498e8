"""The student protocol is structural, and a student whose widths do not fit the teacher fails early."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from xling.core import (
    Conditioning,
    StudentEncoder,
    StudentHiddenStates,
    check_conditioning_fits,
    check_student_fits,
)


@dataclass
class _Hidden:
    hidden_states: Tensor
    attention_mask: Tensor
    pooled: Tensor


class _ToyStudent(nn.Module):
    """Character-embedding student with a linear head to width ``out`` (+ a pooled head of width ``pooled``)."""

    def __init__(self, hidden: int = 12, out: int = 32, pooled: int | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.embed = nn.Embedding(256, hidden)
        self.head = nn.Linear(hidden, out)
        self.pool_head = nn.Linear(hidden, pooled) if pooled else None

    def encode(self, prompts: Sequence[str]) -> _Hidden:
        length = max(len(p.encode()) for p in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p.encode())] = torch.tensor(list(p.encode()))
            mask[i, : len(p.encode())] = 1
        hidden = self.embed(ids)
        return _Hidden(hidden, mask, hidden[:, 0])

    def forward(self, prompts: Sequence[str]) -> Conditioning:
        h = self.encode(prompts)
        pooled = None if self.pool_head is None else self.pool_head(h.pooled)
        return Conditioning(self.head(h.hidden_states), pooled, h.attention_mask)


@dataclass
class _Shape:
    cross_attention_dim: int
    pooled_dim: int | None = None


def test_protocols_are_structural():
    student = _ToyStudent()
    assert isinstance(student, StudentEncoder)
    assert isinstance(student.encode(["ab"]), StudentHiddenStates)
    out = student(["ab", "一只猫"])
    assert isinstance(out, Conditioning)
    assert out.prompt_embeds.shape == (2, 9, 32)
    assert not isinstance(object(), StudentEncoder)


def test_fitting_student_passes_on_real_teacher(sd1_teacher, sdxl_teacher):
    out = check_student_fits(sd1_teacher, _ToyStudent(out=32))
    assert out.prompt_embeds.shape[-1] == 32 and not out.prompt_embeds.requires_grad
    check_student_fits(sdxl_teacher, _ToyStudent(out=64, pooled=32))


def test_wrong_width_names_both_widths(sd1_teacher, sdxl_teacher):
    with pytest.raises(
        ValueError, match="student prompt_embeds width 48 does not fit the teacher's cross_attention_dim 32"
    ):
        check_student_fits(sd1_teacher, _ToyStudent(out=48))
    with pytest.raises(ValueError, match=r"no pooled_prompt_embeds.*pooled_dim 32"):
        check_student_fits(sdxl_teacher, _ToyStudent(out=64))
    with pytest.raises(
        ValueError, match="pooled_prompt_embeds width 16 does not fit the teacher's pooled_dim 32"
    ):
        check_student_fits(sdxl_teacher, _ToyStudent(out=64, pooled=16))
    with pytest.raises(TypeError, match="StudentEncoder"):
        check_student_fits(sd1_teacher, nn.Linear(2, 2))


def test_conditioning_check_without_a_forward():
    good = Conditioning(torch.zeros(1, 3, 768), None, torch.ones(1, 3))
    check_conditioning_fits(_Shape(768), good)
    with pytest.raises(ValueError, match="width 768 does not fit the teacher's cross_attention_dim 1024"):
        check_conditioning_fits(_Shape(1024), good)
    with pytest.raises(ValueError, match=r"\[B, L, D\]"):
        check_conditioning_fits(_Shape(768), Conditioning(torch.zeros(3, 768), None, torch.ones(1, 3)))
