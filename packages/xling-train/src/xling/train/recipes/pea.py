"""PEA-Diffusion (Ma et al., 2023): a frozen student encoder + an MLP adapter, distilled from the UNet.

The UNet runs twice on the same noisy latent: with the teacher's English embeddings (no grad) and with the
student's. Block outputs (``FeatureTap``) and the noise predictions are matched:

    L = lambda_F * sum_j mean((F_t_j - F_s_j)^2) + lambda_L * mean((eps_t - eps_s)^2)

``hybrid``: rows flagged culture-only (no trustworthy English) skip the distillation and use the plain
denoising loss of the student-conditioned prediction instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xling.adapters import MLPAdapter, MLPAdapterConfig
from xling.core import Conditioning, FeatureTap
from xling.losses import denoising, feature_kd, output_kd, weighted_sum
from xling.train.config import NoisedImagesConfig, RecipeConfig, option
from xling.train.data import Batch
from xling.train.noise import noisy_latents
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "PEA-Diffusion: frozen student + MLP adapter, UNet feature + output KD (needs images)"
NEEDS_IMAGES = True


@dataclass
class PEAConfig(NoisedImagesConfig, RecipeConfig):
    """PEA-Diffusion: frozen student + MLP adapter, UNet feature KD + output KD (Ma et al., 2023)."""

    feature_weight: float = option(0.1, "lambda_F, weight of the UNet feature KD (PEA paper: 0.1).")
    output_weight: float = option(1.0, "lambda_L, weight of the noise-prediction KD (PEA paper: 1.0).")
    hybrid: bool = option(False, "Culture-only rows use the plain denoising loss instead of KD.")
    denoise_weight: float = option(1.0, "Weight of the denoising loss on culture-only rows (--hybrid).")
    adapter_hidden: int | None = option(None, "MLP adapter hidden width (None: the student width).")


class PEAStep(TrainStep[PEAConfig]):
    """Trainable: the MLP adapter only (the student encoder is frozen)."""

    def _denoise(
        self, z_t: Tensor, t: Tensor, conditioning: Conditioning, mask: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Noise prediction ``[B, C, h, w]`` and the tapped block outputs, in fp32."""
        with FeatureTap(self.teacher.unet) as tap:
            pred = self.teacher.denoise(z_t, t, conditioning, attention_mask=mask)
            features = tap.take()
        return pred.float(), {k: v.float() for k, v in features.items()}

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, c = self.teacher, self.config
        with torch.no_grad():
            english = self.english(batch)
            z0, noise, t, z_t = noisy_latents(
                teacher, batch, seed=c.seed, t_min=c.timestep_min, t_max=c.timestep_max
            )
            pred_t, feats_t = self._denoise(z_t, t, english, None)
        student = self.encoder(batch.zh)
        pred_s, feats_s = self._denoise(
            z_t, t, student, student.attention_mask if c.student_padding_mask else None
        )

        culture = torch.zeros(len(batch), dtype=torch.bool)
        if c.hybrid and batch.culture is not None:
            culture = batch.culture
        culture = culture.to(pred_s.device)
        kd = ~culture
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if kd.any():
            terms["feature"] = feature_kd(
                {k: v[kd] for k, v in feats_t.items()}, {k: v[kd] for k, v in feats_s.items()}
            )
            terms["output"] = output_kd(pred_t[kd], pred_s[kd])
            weights.update(feature=c.feature_weight, output=c.output_weight)
        if culture.any():
            terms["denoise"] = denoising(
                pred_s[culture],
                noise=noise[culture],
                sample=z0[culture],
                timesteps=t[culture],
                alphas_cumprod=teacher.scheduler.alphas_cumprod,
                prediction_type=teacher.prediction_type,
            )
            weights["denoise"] = c.denoise_weight
        return weighted_sum(terms, weights, require_finite=True)


def build(config: PEAConfig, *, device: torch.device, dtype: torch.dtype) -> PEAStep:
    """Teacher (frozen), frozen student + ``MLPAdapter`` (fp32)."""
    teacher = load_teacher(config, device=device, dtype=dtype)
    widths = head_widths(teacher, config.student)
    hidden = config.adapter_hidden or widths["student_width"]
    encoder = student_encoder(config, MLPAdapter(MLPAdapterConfig(**widths, hidden_width=hidden)))
    encoder.set_trainable(backbone=False)
    return PEAStep(encoder, teacher, config)
