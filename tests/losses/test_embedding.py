"""cosine_alignment, pooled_kd and reconstruction: references, masks, reductions, gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xling.losses import cosine_alignment, pooled_kd, reconstruction

MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])  # [B=3, L=5]


def _tokens(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, 6, generator=g, dtype=dtype), torch.randn(3, 5, 6, generator=g, dtype=dtype)


def _with_garbage(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    y = x.detach().clone()
    y[~mask.bool()] = value
    return y.requires_grad_(x.requires_grad)


# ---------------------------------------------------------------- cosine


def test_cosine_matches_reference() -> None:
    s, t = _tokens(0)
    per_token = 1 - F.cosine_similarity(s, t, dim=-1)  # [B, L]
    torch.testing.assert_close(cosine_alignment(s, t), per_token.mean())
    real = [per_token[b, i] for b in range(3) for i in range(5) if MASK[b, i]]
    torch.testing.assert_close(cosine_alignment(s, t, MASK), torch.stack(real).mean())
    per_sample = torch.stack([per_token[b, MASK[b].bool()].mean() for b in range(3)])
    torch.testing.assert_close(cosine_alignment(s, t, MASK, reduction="none"), per_sample)
    torch.testing.assert_close(cosine_alignment(s, t, MASK, reduction="sum"), torch.stack(real).sum())
    # Pooled [B, D].
    torch.testing.assert_close(cosine_alignment(s[:, 0], t[:, 0]), per_token[:, 0].mean())


def test_cosine_is_scale_invariant_and_zero_on_equal() -> None:
    s, t = _tokens(1)
    torch.testing.assert_close(cosine_alignment(3.0 * s, t, MASK), cosine_alignment(s, t, MASK))
    assert cosine_alignment(t * 2.0, t, MASK).abs() < 1e-6
    assert cosine_alignment(-t, t).item() == pytest.approx(2.0, abs=1e-6)


def test_cosine_handles_zero_vectors() -> None:
    s, t = torch.zeros(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6)
    loss = cosine_alignment(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- pooled


def test_pooled_kd_matches_reference() -> None:
    g = torch.Generator().manual_seed(2)
    cls, pooled = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    proj = torch.nn.Linear(6, 3)
    torch.testing.assert_close(
        pooled_kd(cls, pooled, proj), ((cls @ proj.weight.T + proj.bias - pooled) ** 2).mean()
    )
    torch.testing.assert_close(pooled_kd(cls[:, :3], pooled), F.mse_loss(cls[:, :3], pooled))
    torch.testing.assert_close(
        pooled_kd(cls, pooled, proj, reduction="sum"), pooled_kd(cls, pooled, proj) * 12
    )
    torch.testing.assert_close(
        pooled_kd(cls, pooled, proj, reduction="none").mean(), pooled_kd(cls, pooled, proj)
    )
    assert pooled_kd(pooled, pooled.clone()) == 0


def test_pooled_kd_trains_the_projection() -> None:
    cls, pooled = torch.randn(4, 6), torch.randn(4, 3)
    proj = torch.nn.Linear(6, 3)
    pooled_kd(cls, pooled, proj).backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- reconstruction


def test_reconstruction_matches_reference() -> None:
    x, y = _tokens(3)
    torch.testing.assert_close(reconstruction(x, y), F.mse_loss(y, x))
    sq = ((x - y) ** 2).sum(-1)  # [B, L]
    n_real = int(MASK.sum())
    expected = sum(sq[b, i] for b in range(3) for i in range(5) if MASK[b, i]) / (n_real * 6)
    torch.testing.assert_close(reconstruction(x, y, MASK), expected)
    torch.testing.assert_close(reconstruction(x, y, MASK, reduction="sum"), expected * n_real * 6)
    per_sample = torch.stack([sq[b, MASK[b].bool()].sum() / (MASK[b].sum() * 6) for b in range(3)])
    torch.testing.assert_close(reconstruction(x, y, MASK, reduction="none"), per_sample)
    assert reconstruction(x, x.clone(), MASK) == 0


# ---------------------------------------------------------------- shared properties


@pytest.mark.parametrize("term", ["cosine", "reconstruction"])
@pytest.mark.parametrize("garbage", [1e4, -7.0, float("nan"), float("inf")])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_padding_never_changes_masked_loss_or_grads(
    term: str, garbage: float, mask_dtype: torch.dtype
) -> None:
    fn = cosine_alignment if term == "cosine" else reconstruction
    mask = MASK.to(mask_dtype)
    a, b = _tokens(4)
    a.requires_grad_(True)
    clean = fn(a, b, mask, reduction="none")
    (grad_clean,) = torch.autograd.grad(clean.sum(), a)
    a2, b2 = _with_garbage(a, MASK, garbage), _with_garbage(b, MASK, garbage)
    dirty = fn(a2, b2, mask, reduction="none")
    (grad_dirty,) = torch.autograd.grad(dirty.sum(), a2)
    torch.testing.assert_close(dirty, clean)
    torch.testing.assert_close(grad_dirty, grad_clean)
    assert torch.count_nonzero(grad_dirty[~MASK.bool()]) == 0


def test_sample_without_real_tokens_gives_zero() -> None:
    a, b = _tokens(5)
    mask = MASK.clone()
    mask[2] = 0
    assert cosine_alignment(a, b, mask, reduction="none")[2] == 0
    assert reconstruction(a, b, mask, reduction="none")[2] == 0


def test_gradcheck_embedding_terms() -> None:
    a, b = (x.requires_grad_(True) for x in _tokens(6, torch.float64))
    proj = torch.nn.Linear(6, 4).double()
    cls, pooled = (
        a[:, 0].detach().requires_grad_(True),
        torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
    )
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x, y, r=reduction: cosine_alignment(x, y, MASK, reduction=r), (a, b)
        )
        assert torch.autograd.gradcheck(lambda x, y, r=reduction: cosine_alignment(x, y, reduction=r), (a, b))
        assert torch.autograd.gradcheck(
            lambda x, y, r=reduction: reconstruction(x, y, MASK, reduction=r), (a, b)
        )
        assert torch.autograd.gradcheck(
            lambda x, y, r=reduction: pooled_kd(x, y, proj, reduction=r), (cls, pooled)
        )
