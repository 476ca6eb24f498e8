"""Pooled-vector distillation: the student's [CLS] onto the teacher's pooled [EOS] (AltCLIP / AltDiffusion)."""

from __future__ import annotations

from torch import Tensor, nn

from ._checks import check_ndim, check_nonempty, check_pair, check_reduction, check_tensor
from ._reduce import reduce_samples, squared_error

__all__ = ["pooled_kd"]


def pooled_kd(
    student_cls: Tensor,
    teacher_pooled: Tensor,
    projection: nn.Module | None = None,
    *,
    reduction: str = "mean",
) -> Tensor:
    """MSE between a projection of the student's [CLS] vector and the teacher's pooled vector.

    AltCLIP (Chen et al., 2022) and its diffusion use, AltDiffusion (Ye et al., 2023), distil the English CLIP
    text tower into a multilingual student ("teacher learning"): a linear map ``W`` on the student's
    [CLS] hidden state regresses the teacher's pooled [EOS] embedding of the parallel English sentence:

        L = mean((W h_cls - p_eos)^2)

    Args:
        student_cls: ``[B, d]`` student [CLS] vectors.
        teacher_pooled: ``[B, P]`` teacher pooled vectors, normally computed without grad.
        projection: Optional module mapping ``[B, d]`` to ``[B, P]`` (the trainable ``W``); without it ``d`` must
            equal ``P``.
        reduction: ``"mean"`` over all ``B * P`` elements, ``"sum"``, or ``"none"`` (per-sample mean, ``[B]``).

    Returns:
        A scalar (``[B]`` for ``"none"``).

    Raises:
        ValueError: Inputs are not 2-D, or the (projected) student shape or device differs from the teacher's.
        TypeError: ``projection`` is not a module, non-floating inputs, or different dtypes.
    """
    fn = "pooled_kd"
    reduction = check_reduction(fn, reduction)
    check_tensor(fn, "student_cls", student_cls)
    check_tensor(fn, "teacher_pooled", teacher_pooled)
    check_ndim(fn, "student_cls", student_cls, (2,), "[B, d]")
    check_ndim(fn, "teacher_pooled", teacher_pooled, (2,), "[B, P]")
    check_nonempty(fn, "teacher_pooled", teacher_pooled)
    student = student_cls
    name = "student_cls"
    if projection is not None:
        if not isinstance(projection, nn.Module):
            raise TypeError(f"{fn}: projection must be an nn.Module or None, got {type(projection).__name__}")
        student = projection(student_cls)  # [B, P]
        name = f"projection(student_cls {tuple(student_cls.shape)})"
        check_tensor(fn, name, student)
    check_pair(fn, student, teacher_pooled, (name, "teacher_pooled"))
    sums, counts = squared_error(student, teacher_pooled)  # [B], [B]
    return reduce_samples(sums, counts, reduction)
