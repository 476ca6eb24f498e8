"""UNet knowledge distillation: block features and the noise prediction (PEA-Diffusion, 2023, eqs. 2 and 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ._checks import check_number, check_reduction, check_weights
from ._reduce import Layer, layerwise_mse

__all__ = ["feature_kd", "output_kd"]


def feature_kd(
    teacher: Sequence[Tensor] | Mapping[str, Tensor],
    student: Sequence[Tensor] | Mapping[str, Tensor],
    weights: Sequence[float] | Mapping[str, float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Feature distillation over a set of UNet block outputs (PEA-Diffusion, eq. 3).

    The UNet is run once with the teacher's English embeddings and once with the student's; ``F_t_j`` and
    ``F_s_j`` are the outputs of block ``j``:

        L_feat = sum_j w_j * mean((F_t_j - F_s_j)^2)

    The paper writes the squared L2 norm ``||F_t_j - F_s_j||^2``; ``reduction="sum"`` gives exactly that (summed
    over the batch), ``"mean"`` normalises it by the number of elements so that blocks of different sizes
    weigh alike.

    Args:
        teacher: Teacher features, one ``[B, C_j, H_j, W_j]`` (any ``[B, ...]``) tensor per block, as a sequence,
            or a mapping from block name to tensor (what ``xling.core.FeatureTap.features`` returns).
        student: Student features, the same blocks with the same shapes; for mappings the same names.
        weights: Optional per-block weights ``w_j`` (default 1.0): a sequence for sequences, or a mapping by
            block name for mappings (blocks it leaves out weigh 1.0).
        reduction: ``"mean"`` (per block, over its elements), ``"sum"``, or ``"none"`` (per-sample mean, ``[B]``).

    Returns:
        A scalar (``[B]`` for ``"none"``).

    Raises:
        ValueError: No blocks, different block counts or names, a shape or device mismatch, or ``weights``
            that do not fit the blocks.
        TypeError: Mixed sequence/mapping arguments, non-floating tensors, or a dtype mismatch.
    """
    fn = "feature_kd"
    reduction = check_reduction(fn, reduction)
    if isinstance(teacher, Mapping) or isinstance(student, Mapping):
        if not (isinstance(teacher, Mapping) and isinstance(student, Mapping)):
            raise TypeError(
                f"{fn}: teacher and student must both be sequences or both mappings, got "
                f"{type(teacher).__name__} and {type(student).__name__}"
            )
        if set(teacher) != set(student):
            raise ValueError(
                f"{fn}: teacher and student name different blocks: only in teacher {sorted(set(teacher) - set(student))}, "
                f"only in student {sorted(set(student) - set(teacher))}"
            )
        names = list(teacher)
        if weights is None:
            layer_weights = [1.0] * len(names)
        elif isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ValueError(
                    f"{fn}: weights names blocks {unknown} that are not in teacher/student {names}"
                )
            layer_weights = [check_number(fn, f"weights[{n!r}]", weights.get(n, 1.0)) for n in names]
        else:
            raise TypeError(f"{fn}: weights must be a mapping by block name when features are mappings")
        layers = [Layer("", (f"teacher[{n!r}]", f"student[{n!r}]"), teacher[n], student[n]) for n in names]
        if not layers:
            raise ValueError(f"{fn}: teacher and student are empty; expected at least one block")
        return layerwise_mse(fn, layers, layer_weights, reduction)

    if isinstance(teacher, Tensor) or isinstance(student, Tensor):
        raise TypeError(
            f"{fn}: teacher and student must be sequences of tensors (one per block), not a tensor"
        )
    teacher, student = list(teacher), list(student)
    if len(teacher) != len(student):
        raise ValueError(f"{fn}: teacher has {len(teacher)} blocks != student has {len(student)} blocks")
    if not teacher:
        raise ValueError(f"{fn}: teacher and student are empty; expected at least one block")
    if isinstance(weights, Mapping):
        raise TypeError(f"{fn}: weights must be a sequence when features are sequences, got a mapping")
    layer_weights = check_weights(fn, weights, len(teacher), "teacher")
    layers = [
        Layer("", (f"teacher[{j}]", f"student[{j}]"), t, s)
        for j, (t, s) in enumerate(zip(teacher, student, strict=True))
    ]
    return layerwise_mse(fn, layers, layer_weights, reduction)


def output_kd(teacher_pred: Tensor, student_pred: Tensor, reduction: str = "mean") -> Tensor:
    """Output ("logit") distillation of the UNet's prediction (PEA-Diffusion, eq. 2).

        L_out = mean((eps_t - eps_s)^2)

    where ``eps_t`` is the UNet's prediction (noise, v or sample, whatever the model predicts) conditioned
    on the teacher's embeddings and ``eps_s`` the same UNet conditioned on the student's.

    Args:
        teacher_pred: ``[B, C, H, W]`` (any ``[B, ...]``), normally computed without grad.
        student_pred: Same shape, dtype and device.
        reduction: ``"mean"`` over all elements, ``"sum"``, or ``"none"`` (per-sample mean, ``[B]``).

    Returns:
        A scalar (``[B]`` for ``"none"``).

    Raises:
        ValueError: Shapes or devices differ, or the inputs are empty.
        TypeError: Non-floating inputs or different dtypes.
    """
    fn = "output_kd"
    reduction = check_reduction(fn, reduction)
    layer = Layer("", ("teacher_pred", "student_pred"), teacher_pred, student_pred)
    return layerwise_mse(fn, [layer], [1.0], reduction)
