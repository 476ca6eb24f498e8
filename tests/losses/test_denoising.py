"""denoising: targets per prediction type and Min-SNR-gamma weights as diffusers' train_text_to_image.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xling.losses import compute_snr, denoising, denoising_target, min_snr_weights

# SD's scaled-linear schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2.
ALPHAS = torch.cumprod(
    1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, dim=0
).float()
TIMESTEPS = torch.tensor([0, 10, 500, 999])


def _batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(4, 2, 3, 3, generator=g, dtype=dtype) for _ in range(3))  # type: ignore[return-value]


def _diffusers_reference(pred, noise, sample, timesteps, prediction_type, snr_gamma):
    """A transcription of diffusers' examples/text_to_image/train_text_to_image.py loss (diffusers is not imported)."""
    a = ALPHAS[timesteps].double().reshape(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * sample
    else:
        target = sample
    if snr_gamma is None:
        return F.mse_loss(pred.double(), target.double(), reduction="mean")
    alpha, sigma = ALPHAS.double()[timesteps] ** 0.5, (1 - ALPHAS.double()[timesteps]) ** 0.5
    snr = (alpha / sigma) ** 2
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(pred.double(), target.double(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0, 0.5])
def test_denoising_matches_diffusers(prediction_type: str, snr_gamma: float | None) -> None:
    pred, noise, sample = _batch(0)
    got = denoising(
        pred,
        noise=noise,
        sample=sample,
        timesteps=TIMESTEPS,
        alphas_cumprod=ALPHAS,
        prediction_type=prediction_type,
        snr_gamma=snr_gamma,
    )
    expected = _diffusers_reference(pred, noise, sample, TIMESTEPS, prediction_type, snr_gamma)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoising_zero_at_the_target_and_reductions(prediction_type: str) -> None:
    _, noise, sample = _batch(1)
    kw = {"noise": noise, "sample": sample, "timesteps": TIMESTEPS, "alphas_cumprod": ALPHAS}
    target = denoising_target(prediction_type=prediction_type, **kw)
    assert denoising(target.clone(), prediction_type=prediction_type, snr_gamma=5.0, **kw) == 0
    pred = target + torch.randn_like(target)
    for gamma in (None, 5.0):
        mean = denoising(pred, prediction_type=prediction_type, snr_gamma=gamma, **kw)
        total = denoising(pred, prediction_type=prediction_type, snr_gamma=gamma, reduction="sum", **kw)
        none = denoising(pred, prediction_type=prediction_type, snr_gamma=gamma, reduction="none", **kw)
        torch.testing.assert_close(total, mean * pred.numel(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(none.mean(), mean)
        assert none.shape == (4,)


def test_v_target_recovers_noise_and_sample() -> None:
    _, noise, sample = _batch(2, torch.float64)
    a = ALPHAS.double()[TIMESTEPS].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * sample + (1 - a).sqrt() * noise
    v = denoising_target(
        noise=noise, sample=sample, timesteps=TIMESTEPS, alphas_cumprod=ALPHAS, prediction_type="v_prediction"
    )
    # x0 = sqrt(a) x_t - sqrt(1-a) v ;  eps = sqrt(1-a) x_t + sqrt(a) v
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, noise, rtol=1e-5, atol=1e-5)


def test_snr_and_weights_edge_cases() -> None:
    alphas = torch.tensor([1.0, 0.5, 0.0])  # SNR inf, 1, 0 (zero terminal SNR)
    snr = compute_snr(torch.tensor([0, 1, 2]), alphas)
    assert snr[0] == float("inf") and snr[1] == 1.0 and snr[2] == 0.0
    assert snr.dtype == torch.float32
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5, 0.0]))
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "sample"), torch.tensor([5.0, 1.0, 0.0]))
    torch.testing.assert_close(min_snr_weights(snr, 0.5, "epsilon"), torch.tensor([0.0, 0.5, 1.0]))


def test_gradcheck_denoising() -> None:
    pred, noise, sample = (x.requires_grad_(True) for x in _batch(3, torch.float64))
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        for gamma, reduction in ((None, "mean"), (5.0, "none"), (5.0, "sum")):
            assert torch.autograd.gradcheck(
                lambda p, n, s, pt=prediction_type, g=gamma, r=reduction: denoising(
                    p, noise=n, sample=s, timesteps=TIMESTEPS, alphas_cumprod=ALPHAS, prediction_type=pt,
                    snr_gamma=g, reduction=r,
                ),
                (pred, noise, sample),
            )  # fmt: skip


def test_flow_target_is_the_velocity_and_needs_no_schedule() -> None:
    torch.manual_seed(0)
    noise, sample = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.tensor([0, 500, 999])
    target = denoising_target(
        noise=noise, sample=sample, timesteps=t, alphas_cumprod=None, prediction_type="flow"
    )
    torch.testing.assert_close(target, noise - sample)
    # x_t = (1 - s) x0 + s eps moves along the target: d x_t / d s = eps - x0
    sigma = 0.3
    step = ((1 - sigma - 1e-3) * sample + (sigma + 1e-3) * noise) - ((1 - sigma) * sample + sigma * noise)
    torch.testing.assert_close(step / 1e-3, target, atol=1e-3, rtol=1e-3)
    pred = (noise - sample).requires_grad_(True)
    loss = denoising(
        pred, noise=noise, sample=sample, timesteps=t, alphas_cumprod=None, prediction_type="flow"
    )
    assert float(loss) == 0.0
    shifted = denoising(
        pred + 1.0, noise=noise, sample=sample, timesteps=t, alphas_cumprod=None, prediction_type="flow"
    )
    assert float(shifted) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Min-SNR"):
        denoising(
            pred,
            noise=noise,
            sample=sample,
            timesteps=t,
            alphas_cumprod=None,
            prediction_type="flow",
            snr_gamma=5.0,
        )
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        denoising(
            pred, noise=noise, sample=sample, timesteps=t, alphas_cumprod=None, prediction_type="epsilon"
        )
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        min_snr_weights(torch.ones(3), 5.0, "flow")
