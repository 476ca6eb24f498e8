"""Reconstruction through the translator's decoder (MTN / GlueNet)."""

from __future__ import annotations

from torch import Tensor

from ._checks import check_mask, check_ndim, check_nonempty, check_pair, check_reduction, check_tensor
from ._reduce import reduce_samples, squared_error

__all__ = ["reconstruction"]


def reconstruction(
    source: Tensor,
    reconstructed: Tensor,
    mask: Tensor | None = None,
    *,
    reduction: str = "mean",
) -> Tensor:
    """Masked MSE between source features and their reconstruction through a decoder.

    GlueNet (Qin et al., 2023) and the mixer translation network (MTN) map the source encoder's features
    ``x`` into the teacher's space with an encoder ``f`` and back with a decoder ``g``; the reconstruction
    term keeps ``f`` from discarding what the source said:

        L = sum_{b,l} m_bl * ||x_bl - g(f(x))_bl||^2 / (D * sum_{b,l} m_bl)

    Args:
        source: ``[B, L, D]`` source features (or ``[B, D]`` pooled), normally detached.
        reconstructed: Same shape, dtype and device: the decoder's output.
        mask: Optional ``[B, L]`` bool or 0/1 (True = real token), only for ``[B, L, D]`` inputs; padding
            tokens never change the loss or any gradient, whatever they hold.
        reduction: ``"mean"`` over the elements of real tokens, ``"sum"`` over them, or ``"none"``: the
            per-sample mean over its real elements, ``[B]`` (0 for a sample with none).

    Returns:
        A scalar (``[B]`` for ``"none"``).

    Raises:
        ValueError: Shapes or devices differ, inputs are not 2-D/3-D, or the mask does not fit.
        TypeError: Non-floating inputs or different dtypes.
    """
    fn = "reconstruction"
    reduction = check_reduction(fn, reduction)
    check_tensor(fn, "source", source)
    check_tensor(fn, "reconstructed", reconstructed)
    check_pair(fn, source, reconstructed, ("source", "reconstructed"))
    check_ndim(fn, "source", source, (2, 3), "[B, L, D] or [B, D]")
    check_nonempty(fn, "source", source)
    if mask is not None and source.ndim != 3:
        raise ValueError(
            f"{fn}: mask applies to [B, L, D] inputs only, got source shape {tuple(source.shape)}"
        )
    keep = check_mask(fn, mask, source, "source")
    sums, counts = squared_error(source, reconstructed, keep)  # [B], [B]
    return reduce_samples(sums, counts, reduction)
