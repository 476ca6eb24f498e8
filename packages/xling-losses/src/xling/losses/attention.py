"""Cross-attention output MSE with a shared image query (IAP, "Images as Pivots", 2024, eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._checks import check_reduction, check_weights
from ._reduce import Layer, layerwise_mse

__all__ = ["attention_mse"]


def attention_mse(
    pairs: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Distance between teacher and student cross-attention outputs, summed over layers.

    IAP ("Images as Pivots", 2024, eq. 3) runs the frozen UNet on a noisy image latent with the English
    prompt; at each cross-attention layer ``i`` the image query ``Q_i`` is shared by both languages:

        O_t_i = Attn(Q_i, K_en_i, V_en_i)      O_s_i = Attn(Q_i, K_zh_i, V_zh_i)
        L = sum_i w_i * mean((O_t_i - O_s_i)^2)

    Outputs are taken before the attention's output projection ``to_out``, as in the paper.

    Args:
        pairs: One ``(teacher, student)`` pair per cross-attention layer; both ``[B, H, N_i, d_i]`` (any
            ``[B, ...]`` layout works, as long as the two members of a pair agree). Layers may differ in shape.
            The teacher side is normally computed without grad (the fused kernel returns it as a constant).
        weights: Optional per-layer weights ``w_i`` (default 1.0 each); the layer term is multiplied by
            ``w_i`` before summing, so doubling ``w_i`` doubles that layer's contribution.
        reduction: How each layer's squared error is reduced before the weighted sum over layers:
            ``"mean"`` over all elements of the layer (the paper), ``"sum"`` over them, or ``"none"``: the
            per-sample mean ``[B]`` (so ``none.mean() == mean``; useful for per-timestep weighting).

    Returns:
        A scalar (``[B]`` for ``"none"``), float32 for half/bfloat16 inputs, else the input dtype.

    Raises:
        ValueError: ``pairs`` is empty, a pair's shapes or devices differ, layers disagree on the batch
            size, or ``weights`` has the wrong length.
        TypeError: A pair member is not a floating tensor or the two members' dtypes differ.
    """
    fn = "attention_mse"
    reduction = check_reduction(fn, reduction)
    pairs = list(pairs)
    if not pairs:
        raise ValueError(
            f"{fn}: pairs is empty; expected one (teacher, student) pair per cross-attention layer"
        )
    layer_weights = check_weights(fn, weights, len(pairs), "pairs")
    layers = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{fn}: pairs[{i}] must be a (teacher, student) pair, got {type(pair).__name__}")
        layers.append(Layer(f"pairs[{i}] ", ("teacher", "student"), pair[0], pair[1]))
    return layerwise_mse(fn, layers, layer_weights, reduction)
