"""IAP, "images as pivots" (Hu et al., 2023): the student reproduces the teacher's cross-attention outputs.

One denoiser forward with the English embeddings; in every cross-attention layer the pivot tap computes, with
the same image query ``Q``, the teacher output ``Attn(Q, K_en, V_en)`` (which flows on through the UNet) and the
MSE to the student output ``Attn(Q, K_zh, V_zh)``. Nothing in the teacher branch requires grad, so no UNet
activation is kept and no UNet backward runs: gradients reach the student only through ``K_zh, V_zh``.

    L = sum_i mean((Attn(Q_i, K_en_i, V_en_i) - Attn(Q_i, K_zh_i, V_zh_i))^2)   (+ pooled MSE for SDXL)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig
from xling.core import AttentionFn, PivotTap, Teacher
from xling.kernels import dual_attention_mse, dual_attention_mse_reference
from xling.losses import pooled_kd, weighted_sum
from xling.train.config import NoisedImagesConfig, RecipeConfig, option
from xling.train.data import Batch
from xling.train.noise import noisy_latents, time_ids
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "images as pivots: student encoder, cross-attention MSE with a shared query (needs images)"
NEEDS_IMAGES = True


@dataclass
class IAPConfig(NoisedImagesConfig, RecipeConfig):
    """IAP, "images as pivots": the student encoder + a linear head learn to reproduce, in every cross-attention
    layer, the teacher's output for the same image query (Hu et al., 2023)."""

    train_encoder: bool = option(
        True, "Fine-tune the whole student encoder (IAP); false trains the head only."
    )
    # docs/benchmarks.md (H100, SD1.5 shapes, batch 16): the IAP step took 96.8 ms with the SDPA reference
    # and 142.5 ms with the Triton kernel, so `auto` takes the reference until the kernel measures faster.
    attention: Literal["auto", "fused", "reference"] = option(
        "auto",
        "Dual attention in the pivot tap: 'fused' (Triton kernel), 'reference' (two PyTorch SDPA calls) or "
        "'auto' (the one docs/benchmarks.md measured faster on the device: the reference today).",
    )


def attention_fn(choice: str) -> AttentionFn:
    """The pivot tap's fused dual-attention MSE for ``config.attention``."""
    return dual_attention_mse if choice == "fused" else dual_attention_mse_reference


class IAPStep(TrainStep[IAPConfig]):
    """Trainable: the student encoder (or only its head) + a linear head to the teacher width."""

    def __init__(self, encoder: LanguageEncoder, teacher: Teacher, config: IAPConfig) -> None:
        super().__init__(encoder, teacher, config)
        self.tap = PivotTap(teacher.unet, attention_fn=attention_fn(config.attention), fused=True)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, c = self.teacher, self.config
        with torch.no_grad():
            english = self.english(batch)  # prompt_embeds [B, 77, D]
            _, _, t, z_t = noisy_latents(
                teacher, batch, seed=c.seed, t_min=c.timestep_min, t_max=c.timestep_max, latents=c.latents
            )
        student = self.encoder(batch.zh)  # prompt_embeds [B, L, D]
        with self.tap as tap:
            mask = student.attention_mask if c.student_padding_mask else None
            tap.set_student(student.prompt_embeds.to(teacher.dtype), mask)
            teacher.denoise(z_t, t, english, time_ids=time_ids(teacher, batch, c.time_ids))
            layer_losses = list(tap.losses)  # one fp32 scalar per cross-attention layer
        terms = {"attention": torch.stack([loss.float() for loss in layer_losses]).sum()}
        if english.pooled_prompt_embeds is not None and student.pooled_prompt_embeds is not None:
            terms["pooled"] = pooled_kd(
                student.pooled_prompt_embeds.float(), english.pooled_prompt_embeds.float()
            )
        return weighted_sum(terms, require_finite=True)


def build(config: IAPConfig, *, device: torch.device, dtype: torch.dtype) -> IAPStep:
    """Teacher (frozen, ``dtype``), student + ``LinearHead`` (fp32), pivot tap."""
    teacher = load_teacher(config, device=device, dtype=dtype)
    encoder = student_encoder(config, LinearHead(LinearHeadConfig(**head_widths(teacher, config.student))))
    encoder.set_trainable(backbone=config.train_encoder)
    return IAPStep(encoder, teacher, config)
