"""IAP, "images as pivots" (Hu et al., 2023): the student reproduces the teacher's cross-attention outputs.

One denoiser forward with the English embeddings; in every cross-attention layer the pivot tap computes, with
the same image query ``Q``, the teacher output ``Attn(Q, K_en, V_en)`` (which flows on through the UNet) and the
MSE to the student output ``Attn(Q, K_zh, V_zh)``. Nothing in the teacher branch requires grad, so no UNet
activation is kept and no UNet backward runs: gradients reach the student only through ``K_zh, V_zh``.

    L = sum_i mean((Attn(Q_i, K_en_i, V_en_i) - Attn(Q_i, K_zh_i, V_zh_i))^2)   (+ pooled MSE for SDXL, SD3, Flux)

The same step runs on every teacher family (docs/families.md): on the cross-attention DiTs (PixArt, Sana) the tap
is the UNet's, after the transformer's frozen caption projection; on the MMDiTs (SD3, Flux) it is the
teacher-forced joint-attention pivot (``xling.core.JointPivotTap``): image queries against [image keys; English
text keys] vs [image keys; student text keys], the student's text stream advanced through the frozen text-stream
weights, the image stream never back-propagated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig
from xling.core import AttentionFn, Teacher
from xling.kernels import (
    dual_attention_mse,
    dual_attention_mse_reference,
    joint_dual_attention_mse,
    joint_dual_attention_mse_reference,
)
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
    # MMDiT teachers: the merged joint attention measured 2.95-3.25x faster than the concatenated reference on
    # the CPU in the pivot's case; it is unmeasured on a GPU, so `auto` takes it on the CPU only.
    attention: Literal["auto", "fused", "reference"] = option(
        "auto",
        "Dual attention in the pivot tap: 'fused' (Triton kernel; on SD3/Flux the joint attention with the image "
        "part computed once and merged by log-sum-exp), 'reference' (PyTorch SDPA per branch; on SD3/Flux over "
        "concatenated keys) or 'auto' (the one docs/benchmarks.md measured faster on the device: the reference "
        "today, except the merged joint attention on the CPU).",
    )


def attention_fn(choice: str, *, joint: bool = False, device: torch.device | None = None) -> AttentionFn:
    """The pivot tap's fused attention MSE for ``config.attention`` (``joint``: the MMDiT pivot's)."""
    if joint:
        merged = choice == "fused" or (choice == "auto" and device is not None and device.type == "cpu")
        return joint_dual_attention_mse if merged else joint_dual_attention_mse_reference
    return dual_attention_mse if choice == "fused" else dual_attention_mse_reference


class IAPStep(TrainStep[IAPConfig]):
    """Trainable: the student encoder (or only its head) + a linear head to the teacher width."""

    def __init__(self, encoder: LanguageEncoder, teacher: Teacher, config: IAPConfig) -> None:
        super().__init__(encoder, teacher, config)
        fn = attention_fn(config.attention, joint=teacher.is_mmdit, device=teacher.device)
        self.tap = teacher.pivot_tap(fn, fused=True)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, c = self.teacher, self.config
        with torch.no_grad():
            english = self.english(batch)  # prompt_embeds [B, 77, D]
            _, _, t, z_t = noisy_latents(
                teacher, batch, seed=c.seed, t_min=c.timestep_min, t_max=c.timestep_max, latents=c.latents
            )
        student = self.encoder(batch.zh)  # prompt_embeds [B, L, D]
        with self.tap as tap:
            # PixArt / Sana attend with the T5 / Gemma padding mask, so their students keep theirs too
            keep_mask = c.student_padding_mask or teacher.needs_attention_mask
            tap.set_student(
                student.prompt_embeds.to(teacher.dtype), student.attention_mask if keep_mask else None
            )
            teacher.denoise(z_t, t, english, time_ids=time_ids(teacher, batch, c.time_ids))
            layer_losses = list(tap.losses)  # one fp32 scalar per tapped attention layer
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
