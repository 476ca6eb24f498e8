"""SequenceDiscriminator, the non-saturating GAN losses and gradient reversal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xling.losses import (
    GradientReversal,
    SequenceDiscriminator,
    discriminator_loss,
    generator_loss,
    grad_reverse,
)

MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)  # [B=3, L=4]


def _disc(dtype: torch.dtype = torch.float32) -> SequenceDiscriminator:
    torch.manual_seed(0)
    return SequenceDiscriminator(6, hidden_dim=8, depth=2).to(dtype)


def test_discriminator_matches_reference() -> None:
    disc = _disc()
    x = torch.randn(3, 4, 6)
    lin1, lin2 = disc.token_mlp[0], disc.token_mlp[2]
    h = F.leaky_relu(
        F.leaky_relu(x @ lin1.weight.T + lin1.bias, 0.2) @ lin2.weight.T + lin2.bias, 0.2
    )  # [B, L, H]
    pooled = torch.stack([h[b, MASK[b]].mean(0) for b in range(3)])  # [B, H]
    expected = pooled @ disc.head.weight[0] + disc.head.bias[0]
    torch.testing.assert_close(disc(x, MASK), expected)
    torch.testing.assert_close(disc(x), h.mean(1) @ disc.head.weight[0] + disc.head.bias[0])
    # A pooled [B, D] vector is one token.
    torch.testing.assert_close(disc(x[:, 0]), disc(x[:, :1]))
    assert disc(x, MASK).shape == (3,)


@pytest.mark.parametrize("garbage", [float("nan"), 1e6])
def test_discriminator_ignores_padding(garbage: float) -> None:
    disc = _disc()
    x = torch.randn(3, 4, 6)
    clean = disc(x, MASK)
    x2 = x.clone()
    x2[~MASK] = garbage
    x2.requires_grad_(True)
    dirty = disc(x2, MASK.long())
    torch.testing.assert_close(dirty, clean)
    dirty.sum().backward()
    assert torch.count_nonzero(x2.grad[~MASK]) == 0
    assert all(torch.isfinite(p.grad).all() for p in disc.parameters())


def test_gan_losses_match_reference() -> None:
    real, fake = torch.randn(5), torch.randn(3)
    expected_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    torch.testing.assert_close(discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(
        discriminator_loss(real, fake, "sum"),
        -torch.log(torch.sigmoid(real)).sum() - torch.log(1 - torch.sigmoid(fake)).sum(),
    )
    torch.testing.assert_close(generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean())
    torch.testing.assert_close(generator_loss(fake, "sum"), generator_loss(fake) * 3)
    torch.testing.assert_close(generator_loss(fake, "none"), -torch.log(torch.sigmoid(fake)))
    zeros = torch.zeros(4)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))


def test_gan_losses_are_stable_for_large_logits() -> None:
    big = torch.tensor([200.0, -200.0], requires_grad=True)
    for loss in (discriminator_loss(big, big), generator_loss(big)):
        (grad,) = torch.autograd.grad(loss, big)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Non-saturating: a confidently rejected fake still gets a gradient of about -1 / B.
    fake = torch.tensor([-30.0], requires_grad=True)
    generator_loss(fake).backward()
    assert fake.grad.item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0, 3.0])
def test_grad_reverse_flips_and_scales(scale: float) -> None:
    x = torch.randn(2, 3, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4)
    y = grad_reverse(x, scale)
    torch.testing.assert_close(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -scale * upstream)
    x.grad = None
    module = GradientReversal(scale)
    module(x).backward(upstream)
    torch.testing.assert_close(x.grad, -scale * upstream)
    assert f"scale={float(scale)}" in repr(module)


def test_grad_reverse_trains_discriminator_and_fools_it_in_one_backward() -> None:
    disc = _disc()
    real, fake = torch.randn(3, 4, 6), torch.randn(3, 4, 6, requires_grad=True)
    discriminator_loss(disc(real, MASK), disc(grad_reverse(fake, 1.0), MASK)).backward()
    grad_reversed = fake.grad.clone()
    disc.zero_grad()
    fake.grad = None
    discriminator_loss(disc(real, MASK), disc(fake, MASK)).backward()
    # The translator side sees the discriminator's gradient with its sign flipped.
    torch.testing.assert_close(grad_reversed, -fake.grad)


def test_gradcheck_adversarial() -> None:
    disc = _disc(torch.float64)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: disc(t, MASK), (x,))
    assert torch.autograd.gradcheck(lambda t: disc(t), (x,))
    params = dict(disc.named_parameters())
    names = list(params)

    def by_params(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(disc, dict(zip(names, values, strict=True)), (x.detach(), MASK))

    assert torch.autograd.gradcheck(
        by_params, tuple(p.detach().requires_grad_(True) for p in params.values())
    )
    real = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum"):
        assert torch.autograd.gradcheck(lambda r, f, m=reduction: discriminator_loss(r, f, m), (real, fake))
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda f, m=reduction: generator_loss(f, m), (fake,))
    # Gradient reversal is, by design, not the derivative of its forward; with scale -1 it is the identity's.
    assert torch.autograd.gradcheck(lambda t: grad_reverse(t, -1.0), (x,))
    assert torch.autograd.gradcheck(lambda t: GradientReversal(-1.0)(t) * 0.5, (x,))
    # Its backward is itself differentiable (double backward through a GRL works).
    assert torch.autograd.gradgradcheck(lambda t: grad_reverse(t, -1.0) ** 2, (x,))
