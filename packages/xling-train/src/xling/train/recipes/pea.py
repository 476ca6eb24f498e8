"""PEA-Diffusion (Ma et al., 2023): a frozen student encoder + an MLP adapter, distilled from the UNet.

The UNet runs twice on the same noisy latent: with the teacher's English embeddings (no grad) and with the
student's. Block outputs (``FeatureTap``) and the noise predictions are matched:

    L = lambda_F * sum_j mean((F_t_j - F_s_j)^2) + lambda_L * mean((eps_t - eps_s)^2)

``hybrid``: rows flagged culture-only (no trustworthy English) skip the distillation and use the plain
denoising loss of the student-conditioned prediction instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from xling.train.config import PEAConfig
from xling.train.recipes import _common
from xling.train.recipes.base import Batch, TrainStep

NEEDS_IMAGES = True


class PEAStep(TrainStep):
    """Trainable: the MLP adapter only (the student encoder is frozen)."""

    def __init__(self, encoder: torch.nn.Module, teacher: object, config: PEAConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.frozen["teacher"] = teacher
        self.config = config

    def _unet(self, z_t: Tensor, t: Tensor, embeds: Tensor, mask: Tensor | None, pooled: Tensor | None):
        from xling.core import FeatureTap

        teacher = self.frozen["teacher"]
        dtype = _common.unet_dtype(teacher)
        with FeatureTap(teacher.unet) as tap:
            pred = teacher.unet(
                z_t.to(dtype),
                t,
                encoder_hidden_states=embeds.to(dtype),
                encoder_attention_mask=mask,
                **_common.unet_kwargs(teacher, z_t.shape[0], pooled, dtype),
            ).sample
            features = tap.take()
        return pred.float(), {k: v.float() for k, v in features.items()}

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        from xling.losses import denoising, feature_kd, output_kd, weighted_sum

        teacher, c = self.frozen["teacher"], self.config
        with torch.no_grad():
            cond = _common.teacher_conditioning(teacher, batch)
            z0, noise, t, z_t = _common.noisy_latents(teacher, batch, c)
            pred_t, feats_t = self._unet(z_t, t, cond.prompt_embeds, None, cond.pooled_prompt_embeds)
        student = self.encoder(batch.zh)
        pred_s, feats_s = self._unet(
            z_t, t, student.prompt_embeds, _common.student_mask(c, student), student.pooled_prompt_embeds
        )

        culture = (
            batch.culture
            if (c.hybrid and batch.culture is not None)
            else torch.zeros(len(batch), dtype=torch.bool)
        )
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
                prediction_type=teacher.scheduler.config.prediction_type,
            )
            weights["denoise"] = c.denoise_weight
        return weighted_sum(terms, weights, require_finite=True)

    def save(self, output_dir: Path) -> dict[str, Path]:
        return {"adapter": _common.save_adapter(self.config, self.encoder, output_dir)}


def build(config: PEAConfig, *, device: torch.device, dtype: torch.dtype) -> PEAStep:
    """Teacher (frozen), frozen student + ``MLPAdapter`` (fp32)."""
    from xling.adapters import MLPAdapter, MLPAdapterConfig

    teacher = _common.load_teacher(config, device=device, dtype=dtype)
    widths = _common.head_widths(teacher, config.student)
    extra = (
        {"hidden_width": config.adapter_hidden}
        if config.adapter_hidden
        else {"hidden_width": widths["student_width"]}
    )
    head = MLPAdapter(MLPAdapterConfig(**widths, **extra))
    encoder = _common.build_encoder(config, head)
    _common.set_backbone_trainable(encoder, False)
    return PEAStep(encoder, teacher, config)
