"""What a student text path must give, as structural ``Protocol``s, and the check that it fits a teacher.

The one Hugging Face implementation (``xling.adapters.LanguageEncoder``) satisfies these protocols without
importing core, so inference needs only ``xling-adapters``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from xling.core.conditioning import Conditioning


@runtime_checkable
class StudentHiddenStates(Protocol):
    """The student encoder's own output, before its head.

    Attributes:
        hidden_states: ``[B, L, d]`` token states, ``d`` the student's ``hidden_size``.
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        pooled: ``[B, d]`` the [CLS] / pooled vector.
    """

    hidden_states: Tensor
    attention_mask: Tensor
    pooled: Tensor


@runtime_checkable
class StudentEncoder(Protocol):
    """A student text path: tokenizer + encoder (+ LoRA) + head, prompts in, teacher-shaped conditioning out.

    Attributes:
        hidden_size: the encoder width ``d``.
    """

    hidden_size: int

    def encode(self, prompts: Sequence[str]) -> StudentHiddenStates:
        """Encoder states of ``B`` prompts: ``hidden_states [B, L, d]``, ``attention_mask [B, L]``, ``pooled [B, d]``."""
        ...

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning of ``B`` prompts: ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, P] | None`` and
        ``attention_mask [B, L]`` (an ``xling.adapters.Conditioning``: the same fields)."""
        ...


class TeacherShape(Protocol):
    """The two widths a student must match (``xling.core.Teacher`` has them)."""

    @property
    def cross_attention_dim(self) -> int: ...

    @property
    def pooled_dim(self) -> int | None: ...


def check_conditioning_fits(teacher: TeacherShape, conditioning: Conditioning) -> None:
    """Raise when a student's conditioning cannot condition the teacher's UNet.

    Args:
        teacher: gives ``cross_attention_dim`` ``D`` and ``pooled_dim`` ``P`` (``None`` when no pooled input).
        conditioning: ``prompt_embeds [B, L, D']`` and ``pooled_prompt_embeds [B, P'] | None``.

    Raises:
        ValueError: ``D' != D``; or the teacher needs a pooled embedding and there is none or ``P' != P``.
            The message names both widths.
    """
    embeds = conditioning.prompt_embeds
    if embeds.ndim != 3:
        raise ValueError(f"student prompt_embeds must be [B, L, D], got {tuple(embeds.shape)}")
    if embeds.shape[-1] != teacher.cross_attention_dim:
        raise ValueError(
            f"student prompt_embeds width {embeds.shape[-1]} does not fit the teacher's "
            f"cross_attention_dim {teacher.cross_attention_dim}"
        )
    pooled_dim = teacher.pooled_dim
    if pooled_dim is None:
        return
    pooled = conditioning.pooled_prompt_embeds
    if pooled is None:
        raise ValueError(
            f"student gives no pooled_prompt_embeds but the teacher needs them (pooled_dim {pooled_dim})"
        )
    if pooled.ndim != 2 or pooled.shape[-1] != pooled_dim:
        raise ValueError(
            f"student pooled_prompt_embeds width {pooled.shape[-1]} does not fit the teacher's pooled_dim {pooled_dim}"
        )


def check_student_fits(
    teacher: TeacherShape, student: StudentEncoder, *, probe: Sequence[str] = ("a",)
) -> Conditioning:
    """Run ``student`` once on ``probe`` (no grad) and check its output widths against ``teacher``.

    Call it when a recipe is built, so a mismatched head fails before any data is read.

    Args:
        teacher: gives ``cross_attention_dim`` and ``pooled_dim``.
        student: any :class:`StudentEncoder`.
        probe: prompts for the probe forward.

    Returns:
        The probe's conditioning (handy for logging the student's sequence length).

    Raises:
        TypeError: ``student`` does not satisfy :class:`StudentEncoder`.
        ValueError: a width does not fit, e.g. "student prompt_embeds width 48 does not fit the teacher's
            cross_attention_dim 32".
    """
    if not isinstance(student, StudentEncoder):
        raise TypeError(
            f"`student` must satisfy StudentEncoder (hidden_size, encode(prompts), __call__(prompts)), "
            f"got {type(student).__name__}"
        )
    with torch.no_grad():
        conditioning = student(list(probe))
    check_conditioning_fits(teacher, conditioning)
    return conditioning
