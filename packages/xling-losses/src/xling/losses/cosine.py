"""Cosine alignment of student embeddings to teacher embeddings (LoRA / last-layer fine-tuning of the student)."""

from __future__ import annotations

from torch import Tensor

from ._checks import (
    check_mask,
    check_ndim,
    check_nonempty,
    check_number,
    check_pair,
    check_reduction,
    check_tensor,
)
from ._reduce import acc_dtype, fill_padding, reduce_samples

__all__ = ["cosine_alignment"]


def cosine_alignment(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
    eps: float = 1e-8,
) -> Tensor:
    """One minus the cosine similarity between student and teacher embeddings, token-wise or pooled.

    The cosine fine-tuning baseline of cross-lingual text-to-image transfer (a LoRA on the student
    encoder, r=16 / alpha=64, or its last layers unfrozen) pulls each student token embedding toward
    the teacher's embedding of the parallel English prompt:

        cos(s, t) = <s, t> / (max(||s||, eps) * max(||t||, eps))
        L = sum_{b,l} m_bl * (1 - cos(s_bl, t_bl)) / sum_{b,l} m_bl

    Only the direction is matched, not the norm, so the student keeps its own scale.

    Args:
        student: ``[B, L, D]`` token embeddings, or ``[B, D]`` pooled vectors.
        teacher: Same shape, dtype and device as ``student``.
        mask: Optional ``[B, L]`` bool or 0/1 (True = real token), only for ``[B, L, D]`` inputs; padding
            tokens never change the loss or any gradient, whatever they hold.
        reduction: ``"mean"`` over real tokens (over ``B`` for pooled inputs), ``"sum"`` over them, or
            ``"none"``: the per-sample mean over its real tokens, ``[B]`` (0 for a sample with none).
        eps: Lower bound on each norm, which keeps a zero vector from dividing by zero.

    Returns:
        A scalar in ``[0, 2]`` per token on average (``[B]`` for ``"none"``).

    Raises:
        ValueError: Shapes or devices differ, inputs are not 2-D/3-D, the mask does not fit, or ``eps <= 0``.
        TypeError: Non-floating inputs or different dtypes.
    """
    fn = "cosine_alignment"
    reduction = check_reduction(fn, reduction)
    eps = check_number(fn, "eps", eps)
    if eps <= 0:
        raise ValueError(f"{fn}: eps must be > 0, got {eps}")
    check_tensor(fn, "student", student)
    check_tensor(fn, "teacher", teacher)
    check_pair(fn, student, teacher, ("student", "teacher"))
    check_ndim(fn, "student", student, (2, 3), "[B, L, D] or [B, D]")
    check_nonempty(fn, "student", student)
    if mask is not None and student.ndim != 3:
        raise ValueError(
            f"{fn}: mask applies to [B, L, D] inputs only, got student shape {tuple(student.shape)}"
        )
    keep = check_mask(fn, mask, student, "student")

    dtype = acc_dtype(student)
    s, t = student.to(dtype), teacher.to(dtype)
    if keep is not None:
        # Ones, not zeros, in padding: a finite, non-zero vector keeps the cosine and its backward tame.
        s, t = fill_padding(s, keep, 1.0), fill_padding(t, keep, 1.0)
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    per_token = 1.0 - (s * t).sum(dim=-1)  # [B, L] or [B]
    if per_token.ndim == 1:
        per_token = per_token[:, None]  # [B, 1]: a pooled vector is one token
    if keep is None:
        counts = per_token.new_full((per_token.shape[0],), float(per_token.shape[1]))
    else:
        per_token = per_token.masked_fill(~keep, 0.0)
        counts = keep.sum(dim=1).to(dtype)
    return reduce_samples(per_token.sum(dim=1), counts, reduction)
