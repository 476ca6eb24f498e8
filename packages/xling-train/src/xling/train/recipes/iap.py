"""IAP, "images as pivots" (Li et al., 2024): the student reproduces the teacher's cross-attention outputs.

One UNet forward with the English embeddings; in every cross-attention layer the pivot tap computes, with the
same image query ``Q``, the teacher output ``Attn(Q, K_en, V_en)`` (which flows on through the UNet) and the
fused MSE to the student output ``Attn(Q, K_zh, V_zh)``. Nothing in the teacher branch requires grad, so no UNet
activation is kept and no UNet backward runs: gradients reach the student only through ``K_zh, V_zh``.

    L = sum_i mean((Attn(Q_i, K_en_i, V_en_i) - Attn(Q_i, K_zh_i, V_zh_i))^2)   (+ pooled MSE for SDXL)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from xling.train.config import IAPConfig
from xling.train.recipes import _common
from xling.train.recipes.base import Batch, TrainStep

NEEDS_IMAGES = True


class IAPStep(TrainStep):
    """Trainable: the student encoder (or only its head) + a linear head to the teacher width."""

    def __init__(
        self, encoder: torch.nn.Module, teacher: object, config: IAPConfig, attention_fn: object
    ) -> None:
        super().__init__()
        from xling.core import PivotTap

        self.encoder = encoder
        self.frozen["teacher"] = teacher
        self.config = config
        self.tap = PivotTap(teacher.unet, attention_fn=attention_fn, fused=True)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        from xling.losses import pooled_kd, weighted_sum

        teacher, c = self.frozen["teacher"], self.config
        with torch.no_grad():
            cond = _common.teacher_conditioning(teacher, batch)  # prompt_embeds [B, 77, D]
            _, _, t, z_t = _common.noisy_latents(teacher, batch, c)
        student = self.encoder(batch.zh)  # prompt_embeds [B, L, D]
        dtype = _common.unet_dtype(teacher)
        with self.tap as tap:
            tap.set_student(student.prompt_embeds.to(dtype), _common.student_mask(c, student))
            teacher.unet(
                z_t.to(dtype),
                t,
                encoder_hidden_states=cond.prompt_embeds.to(dtype),
                **_common.unet_kwargs(teacher, len(batch), cond.pooled_prompt_embeds, dtype),
            )
            layer_losses = list(tap.losses)  # one fp32 scalar per cross-attention layer
        terms = {"attention": torch.stack([loss.float() for loss in layer_losses]).sum()}
        if cond.pooled_prompt_embeds is not None and student.pooled_prompt_embeds is not None:
            terms["pooled"] = pooled_kd(
                student.pooled_prompt_embeds.float(), cond.pooled_prompt_embeds.float()
            )
        return weighted_sum(terms, require_finite=True)

    def save(self, output_dir: Path) -> dict[str, Path]:
        return {"adapter": _common.save_adapter(self.config, self.encoder, output_dir)}


def build(config: IAPConfig, *, device: torch.device, dtype: torch.dtype) -> IAPStep:
    """Teacher (frozen, ``dtype``), student + ``LinearHead`` (fp32), fused pivot tap."""
    from xling.adapters import LinearHead, LinearHeadConfig

    teacher = _common.load_teacher(config, device=device, dtype=dtype)
    head = LinearHead(LinearHeadConfig(**_common.head_widths(teacher, config.student)))
    encoder = _common.build_encoder(config, head)
    _common.set_backbone_trainable(encoder, config.train_encoder)
    return IAPStep(encoder, teacher, config, _common.attention_fn(config, device))
