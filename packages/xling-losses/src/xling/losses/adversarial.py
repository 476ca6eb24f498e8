"""Adversarial alignment of translated embeddings to the teacher's (GlueGen / GlueNet, Qin et al., ICCV 2023; MTN).

A discriminator tells teacher embeddings ("real") from translated student embeddings ("fake"); the
translator learns to fool it. Two ways to train both sides:

- alternating, non-saturating GAN (Goodfellow et al., 2014): step the discriminator on
  ``discriminator_loss(D(real), D(fake.detach()))``, then the translator on ``generator_loss(D(fake))``;
- one backward with gradient reversal (Ganin & Lempitsky, 2015), as GlueNet does:
  ``discriminator_loss(D(real), D(grad_reverse(fake, scale)))`` trains the discriminator to separate and,
  through the reversed gradient, the translator to confuse it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_mask, check_ndim, check_nonempty, check_number, check_reduction, check_tensor
from ._reduce import acc_dtype, fill_padding

__all__ = [
    "GradientReversal",
    "SequenceDiscriminator",
    "discriminator_loss",
    "generator_loss",
    "grad_reverse",
]


class SequenceDiscriminator(nn.Module):
    """A small token-sequence discriminator: a per-token MLP, a masked mean pool, and a linear logit.

        h_bl = MLP(x_bl)                                   # [B, L, hidden_dim]
        logit_b = w . (sum_l m_bl h_bl / sum_l m_bl) + c    # [B]

    Args:
        dim: Width ``D`` of the embeddings it judges.
        hidden_dim: Width of the per-token MLP.
        depth: Number of ``Linear -> LeakyReLU`` layers in the per-token MLP (at least 1).
        negative_slope: Slope of the LeakyReLU for negative inputs.
    """

    def __init__(self, dim: int, hidden_dim: int = 256, depth: int = 2, negative_slope: float = 0.2) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SequenceDiscriminator: {name} must be a positive int, got {value!r}")
        negative_slope = check_number("SequenceDiscriminator", "negative_slope", negative_slope)
        self.dim = dim
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.LeakyReLU(negative_slope)]
            width = hidden_dim
        self.token_mlp = nn.Sequential(*layers)
        self.head = nn.Linear(hidden_dim, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scores each sequence.

        Args:
            x: ``[B, L, D]`` embeddings, or ``[B, D]`` pooled vectors (treated as one token).
            mask: Optional ``[B, L]`` bool or 0/1, True = real token; padding never changes a logit.

        Returns:
            ``[B]`` logits, positive for "real" (teacher).

        Raises:
            ValueError: ``x`` is not ``[B, L, D]``/``[B, D]`` with ``D == dim``, or the mask does not fit.
            TypeError: ``x`` is not a floating tensor.
        """
        fn = "SequenceDiscriminator"
        check_tensor(fn, "x", x)
        check_ndim(fn, "x", x, (2, 3), "[B, L, D] or [B, D]")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{fn}: x shape {tuple(x.shape)} has width {x.shape[-1]} != dim {self.dim}")
        if x.ndim == 2:
            if mask is not None:
                raise ValueError(f"{fn}: mask applies to [B, L, D] inputs only, got x shape {tuple(x.shape)}")
            x = x[:, None]  # [B, 1, D]
        keep = check_mask(fn, mask, x, "x")
        if keep is not None:
            # Zero padding before the MLP: a NaN there would otherwise reach the weight gradients.
            x = fill_padding(x, keep, 0.0)
        h = self.token_mlp(x)  # [B, L, H]
        if keep is None:
            pooled = h.mean(dim=1)  # [B, H]
        else:
            h = fill_padding(h, keep, 0.0)
            counts = keep.sum(dim=1, keepdim=True).clamp_min(1).to(h.dtype)  # [B, 1]
            pooled = h.sum(dim=1) / counts  # [B, H]
        return self.head(pooled).squeeze(-1)  # [B]


def _logits(fn: str, name: str, logits: Tensor) -> Tensor:
    check_tensor(fn, name, logits)
    check_nonempty(fn, name, logits)
    return logits.to(acc_dtype(logits))


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy of the discriminator: real is 1, fake is 0 (non-saturating GAN).

        L_D = mean(softplus(-D(real))) + mean(softplus(D(fake)))
            = -mean(log sigmoid(D(real))) - mean(log(1 - sigmoid(D(fake))))

    Args:
        real_logits: ``[B_r]`` (any shape) logits on teacher embeddings.
        fake_logits: ``[B_f]`` (any shape) logits on translated embeddings; ``B_f`` may differ from ``B_r``.
        reduction: ``"mean"`` (each half averaged over its own logits, then added) or ``"sum"``.

    Returns:
        A scalar; ``2 log 2`` when every logit is 0 (a discriminator that cannot tell).

    Raises:
        ValueError: Empty logits, devices differ, or an unknown reduction.
        TypeError: Non-floating logits or different dtypes.
    """
    fn = "discriminator_loss"
    reduction = check_reduction(fn, reduction, ("mean", "sum"))
    real = _logits(fn, "real_logits", real_logits)
    fake = _logits(fn, "fake_logits", fake_logits)
    if real_logits.dtype != fake_logits.dtype:
        raise TypeError(
            f"{fn}: real_logits dtype {real_logits.dtype} != fake_logits dtype {fake_logits.dtype} "
            f"(shapes {tuple(real_logits.shape)}, {tuple(fake_logits.shape)})"
        )
    if real_logits.device != fake_logits.device:
        raise ValueError(
            f"{fn}: real_logits device {real_logits.device} != fake_logits device {fake_logits.device} "
            f"(shapes {tuple(real_logits.shape)}, {tuple(fake_logits.shape)})"
        )
    real_term, fake_term = F.softplus(-real), F.softplus(fake)
    if reduction == "sum":
        return real_term.sum() + fake_term.sum()
    return real_term.mean() + fake_term.mean()


def generator_loss(fake_logits: Tensor, reduction: str = "mean") -> Tensor:
    """Non-saturating generator loss: the translator wants its output judged real.

        L_G = mean(softplus(-D(fake))) = -mean(log sigmoid(D(fake)))

    Unlike the saturating ``log(1 - sigmoid(D(fake)))``, its gradient stays large while the discriminator
    confidently rejects the fakes, which is when the translator most needs it.

    Args:
        fake_logits: ``[B]`` (any shape) discriminator logits on translated embeddings, with grad.
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` (the per-logit losses, same shape as the input).

    Returns:
        A scalar (input-shaped for ``"none"``).

    Raises:
        ValueError: Empty logits or an unknown reduction.
        TypeError: Non-floating logits.
    """
    fn = "generator_loss"
    reduction = check_reduction(fn, reduction)
    per_logit = F.softplus(-_logits(fn, "fake_logits", fake_logits))
    if reduction == "none":
        return per_logit
    return per_logit.sum() if reduction == "sum" else per_logit.mean()


class _GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Gradient reversal layer (Ganin & Lempitsky, 2015), as GlueNet uses it for adversarial alignment.

        forward: y = x                backward: dL/dx = -scale * dL/dy

    Put it between the translator and the discriminator: one ``discriminator_loss`` backward then trains
    the discriminator to separate real from fake and the translator, with the sign flipped, to confuse it.

    Args:
        x: Any tensor, e.g. ``[B, L, D]`` translated embeddings.
        scale: Strength ``lambda`` of the reversed gradient (often ramped from 0 to 1 over training).

    Returns:
        ``x`` unchanged (a view), with the reversed gradient attached.

    Raises:
        TypeError: ``x`` is not a floating tensor or ``scale`` is not a number.
        ValueError: ``scale`` is not finite.
    """
    check_tensor("grad_reverse", "x", x)
    scale = check_number("grad_reverse", "scale", scale)
    return _GradReverse.apply(x, scale)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`, for use inside ``nn.Sequential``.

    Args:
        scale: Strength ``lambda`` of the reversed gradient; a plain attribute, so a schedule can change it.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = check_number("GradientReversal", "scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        """Identity on ``x`` (any shape); the gradient coming back is multiplied by ``-scale``."""
        return grad_reverse(x, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
