"""The plain diffusion training loss, with optional Min-SNR-gamma weighting (Hang et al., ICCV 2023), for DDPM
teachers (epsilon / v / x0 targets) and flow-matching teachers (the velocity target of SD3, Flux and Sana)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_ndim, check_nonempty, check_number, check_pair, check_reduction, check_tensor
from ._reduce import acc_dtype, reduce_samples, squared_error

__all__ = ["compute_snr", "denoising", "denoising_target", "min_snr_weights"]

DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
PREDICTION_TYPES = (*DDPM_PREDICTION_TYPES, "flow")


def _alphas(fn: str, timesteps: Tensor, alphas_cumprod: Tensor, device: torch.device) -> Tensor:
    """``alphas_cumprod[timesteps]`` (at least float32) on ``device``, ``[B]``, after checking both arguments."""
    check_tensor(fn, "timesteps", timesteps, floating=False)
    check_tensor(fn, "alphas_cumprod", alphas_cumprod)
    check_ndim(fn, "timesteps", timesteps, (1,), "[B]")
    check_ndim(fn, "alphas_cumprod", alphas_cumprod, (1,), "[T]")
    check_nonempty(fn, "alphas_cumprod", alphas_cumprod)
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(
            f"{fn}: timesteps must be integer indices into alphas_cumprod, got dtype {timesteps.dtype}"
        )
    num_steps = alphas_cumprod.shape[0]
    # An out-of-range index on CUDA is a device-side assert that kills the process; refuse it here.
    if timesteps.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(timesteps))  # one sync
        if low < 0 or high >= num_steps:
            raise ValueError(
                f"{fn}: timesteps must lie in [0, {num_steps}) for alphas_cumprod shape "
                f"{tuple(alphas_cumprod.shape)}, got range [{low}, {high}]"
            )
    # The scheduler keeps alphas_cumprod on the CPU; gather where it lives, then move only the [B] result.
    picked = alphas_cumprod[timesteps.to(alphas_cumprod.device)]
    return picked.to(device=device, dtype=acc_dtype(picked))


def compute_snr(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio of the forward process at each timestep.

        SNR(t) = alpha_bar_t / (1 - alpha_bar_t)

    The same quantity as ``diffusers.training_utils.compute_snr`` (``(sqrt(a) / sqrt(1 - a))^2``), without
    needing a scheduler object.

    Args:
        timesteps: ``[B]`` integer timesteps, indices into ``alphas_cumprod``.
        alphas_cumprod: ``[T]`` cumulative products of the noise schedule (``scheduler.alphas_cumprod``), on any device.

    Returns:
        ``[B]`` float32 SNR on ``timesteps``' device (``inf`` where ``alpha_bar_t == 1``, 0 where it is 0).

    Raises:
        TypeError: ``timesteps`` is not an integer tensor or ``alphas_cumprod`` not a floating one.
        ValueError: Wrong ranks or a timestep out of range.
    """
    a = _alphas("compute_snr", timesteps, alphas_cumprod, timesteps.device)
    return (a / (1.0 - a)).float()


def min_snr_weights(snr: Tensor, snr_gamma: float, prediction_type: str = "epsilon") -> Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al., "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", ICCV 2023), as diffusers' ``train_text_to_image.py`` applies them to an MSE on the
    model's own target:

        epsilon:       w = min(SNR, gamma) / SNR
        v_prediction:  w = min(SNR, gamma) / (SNR + 1)
        sample:        w = min(SNR, gamma)

    At ``SNR == 0`` (a zero-terminal-SNR schedule) the epsilon weight takes its limit, 1.

    Args:
        snr: ``[B]`` SNR per sample (see :func:`compute_snr`).
        snr_gamma: Clamp ``gamma`` (5.0 in the paper), positive.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Returns:
        ``[B]`` weights, same dtype as ``snr``.

    Raises:
        ValueError: Non-positive ``snr_gamma`` or an unknown ``prediction_type``.
    """
    fn = "min_snr_weights"
    check_tensor(fn, "snr", snr)
    gamma = check_number(fn, "snr_gamma", snr_gamma)
    if gamma <= 0:
        raise ValueError(f"{fn}: snr_gamma must be > 0, got {gamma}")
    if prediction_type not in DDPM_PREDICTION_TYPES:
        raise ValueError(
            f"{fn}: prediction_type must be one of {DDPM_PREDICTION_TYPES}, got {prediction_type!r}"
        )
    clamped = snr.clamp_max(gamma)  # min(SNR, gamma)
    if prediction_type == "epsilon":
        return torch.where(snr == 0, torch.ones_like(snr), clamped / snr)
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped


def denoising_target(
    *,
    noise: Tensor,
    sample: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor | None,
    prediction_type: str = "epsilon",
) -> Tensor:
    """What the denoiser should predict for ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (DDPM) or
    ``x_t = (1 - sigma_t) x_0 + sigma_t eps`` (flow matching):

        epsilon:       eps
        v_prediction:  v = sqrt(a_t) eps - sqrt(1 - a_t) x_0      (Salimans & Ho, 2022)
        sample:        x_0
        flow:          eps - x_0, the velocity d x_t / d sigma   (rectified flow; Esser et al., 2024, SD3)

    Args:
        noise: ``[B, C, H, W]`` (any ``[B, ...]``) the noise ``eps`` added to the sample.
        sample: ``x_0``, same shape, dtype and device as ``noise`` (clean latents).
        timesteps: ``[B]`` integer timesteps.
        alphas_cumprod: ``[T]`` cumulative alphas of the training scheduler, on any device; ``None`` for ``flow``
            (its target does not depend on the timestep).
        prediction_type: The scheduler's ``config.prediction_type``, or ``"flow"``.

    Returns:
        The target, same shape and dtype as ``noise``.

    Raises:
        ValueError: Shape or device mismatch, an unknown prediction type, or timesteps that do not fit.
        TypeError: Wrong dtypes.
    """
    fn = "denoising_target"
    _check_inputs(fn, noise, sample, timesteps, prediction_type)
    a = _alphas_or_none(fn, timesteps, alphas_cumprod, noise.device, prediction_type)  # [B] | None
    return _target(a, noise, sample, prediction_type)


def _alphas_or_none(
    fn: str, timesteps: Tensor, alphas_cumprod: Tensor | None, device: torch.device, prediction_type: str
) -> Tensor | None:
    """``alphas_cumprod[timesteps]`` ``[B]``; ``None`` for ``flow``, whose target needs no schedule."""
    if prediction_type == "flow":
        return None
    if alphas_cumprod is None:
        raise ValueError(f"{fn}: prediction_type {prediction_type!r} needs alphas_cumprod, got None")
    return _alphas(fn, timesteps, alphas_cumprod, device)


def _target(a: Tensor | None, noise: Tensor, sample: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return sample
    if prediction_type == "flow":
        return noise - sample
    assert a is not None  # v_prediction
    a = a.to(acc_dtype(noise)).reshape(-1, *([1] * (noise.ndim - 1)))  # [B, 1, ...]
    return (a.sqrt() * noise - (1.0 - a).sqrt() * sample).to(noise.dtype)


def _check_inputs(fn: str, noise: Tensor, sample: Tensor, timesteps: Tensor, prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{fn}: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    check_tensor(fn, "noise", noise)
    check_tensor(fn, "sample", sample)
    check_pair(fn, noise, sample, ("noise", "sample"))
    if noise.ndim == 0:
        raise ValueError(f"{fn}: noise must be [B, ...], got a 0-d tensor")
    check_nonempty(fn, "noise", noise)
    check_tensor(fn, "timesteps", timesteps, floating=False)
    if timesteps.shape != (noise.shape[0],):
        raise ValueError(
            f"{fn}: timesteps shape {tuple(timesteps.shape)} != ({noise.shape[0]},), the batch of noise "
            f"shape {tuple(noise.shape)}"
        )


def denoising(
    pred: Tensor,
    *,
    noise: Tensor,
    sample: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor | None,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The diffusion training loss ("simple" loss of DDPM, Ho et al., 2020), optionally Min-SNR weighted.

        L = mean_b w_b * mean((pred_b - target_b)^2)

    with ``target`` from :func:`denoising_target` and ``w_b = 1``, or, with ``snr_gamma``, the Min-SNR-gamma
    weight of :func:`min_snr_weights` (Hang et al., ICCV 2023), exactly as diffusers'
    ``examples/text_to_image/train_text_to_image.py`` computes it.

    Args:
        pred: ``[B, C, H, W]`` (any ``[B, ...]``) the UNet's prediction at ``x_t``.
        noise: The noise ``eps`` that made ``x_t``, same shape, dtype and device as ``pred``.
        sample: The clean latents ``x_0``, same shape, dtype and device as ``pred``.
        timesteps: ``[B]`` integer timesteps.
        alphas_cumprod: ``[T]`` the training scheduler's ``alphas_cumprod`` (any device; it is gathered and moved);
            ``None`` for ``flow``.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (the scheduler's config), or ``"flow"``
            (a flow-matching teacher: target ``eps - x_0``).
        snr_gamma: ``None`` for the unweighted loss, or the Min-SNR clamp ``gamma`` (5.0 is usual); DDPM only.
        reduction: ``"mean"`` (over samples of the weighted per-sample means), ``"sum"`` (over samples of
            ``w_b`` times each sample's summed squared error), or ``"none"`` (the weighted per-sample means, ``[B]``).

    Returns:
        A scalar (``[B]`` for ``"none"``), float32 for half/bfloat16 inputs.

    Raises:
        ValueError: Shape or device mismatch, an unknown prediction type or reduction, timesteps that do not fit,
            or a non-positive ``snr_gamma``, or ``snr_gamma`` with ``flow`` (Min-SNR is defined on a DDPM schedule).
        TypeError: Non-floating tensors, non-integer timesteps, or mismatched dtypes.
    """
    fn = "denoising"
    reduction = check_reduction(fn, reduction)
    check_tensor(fn, "pred", pred)
    _check_inputs(fn, noise, sample, timesteps, prediction_type)
    check_pair(fn, pred, noise, ("pred", "noise"))
    if snr_gamma is not None and prediction_type == "flow":
        raise ValueError(
            f"{fn}: snr_gamma (Min-SNR weighting) needs a DDPM schedule, not prediction_type 'flow'"
        )
    a = _alphas_or_none(fn, timesteps, alphas_cumprod, pred.device, prediction_type)  # [B] | None
    sums, counts = squared_error(pred, _target(a, noise, sample, prediction_type))  # [B], [B]
    if snr_gamma is None:
        return reduce_samples(sums, counts, reduction)
    assert a is not None  # not flow (refused above)
    weights = min_snr_weights(a / (1.0 - a), snr_gamma, prediction_type).to(sums.dtype)  # [B]
    # Every sample has the same element count, so "mean" is diffusers' mean over the batch of w_b * mse_b.
    return reduce_samples(weights * sums, counts, reduction)
