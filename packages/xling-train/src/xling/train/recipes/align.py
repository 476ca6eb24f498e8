"""Cosine alignment: LoRA heads (r 16, alpha 64) or the last k layers of the student, plus a linear head.

Text only. The student's and the teacher's sequences differ in length (and token-to-token pairing across two
languages has no meaning), so the sequences are compared through their mean token embedding (the teacher's
over its full 77-token window, which is what the UNet attends to; the student's over its real tokens):

    L = 1 - cos(mean_l E_zh, mean_l E_en)   (+ w_pooled * (1 - cos(pooled_zh, pooled_en)) for SDXL)

When the head already emits the teacher's length the comparison is token-wise (masked).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from xling.train.config import AlignConfig
from xling.train.recipes import _common
from xling.train.recipes.base import Batch, TrainStep

NEEDS_IMAGES = False


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class AlignStep(TrainStep):
    """Trainable: LoRA weights (or the last k layers) of the student and its linear head."""

    def __init__(self, encoder: torch.nn.Module, teacher: object, config: AlignConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.frozen["teacher"] = teacher
        self.config = config

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        from xling.losses import cosine_alignment, weighted_sum

        teacher, c = self.frozen["teacher"], self.config
        with torch.no_grad():
            cond = _common.teacher_conditioning(teacher, batch)
        target = cond.prompt_embeds.float()  # [B, 77, D]
        student = self.encoder(batch.zh)
        embeds = student.prompt_embeds.float()  # [B, L, D]
        if embeds.shape == target.shape:
            terms = {"cosine": cosine_alignment(embeds, target, student.attention_mask)}
        else:
            terms = {
                "cosine": cosine_alignment(_masked_mean(embeds, student.attention_mask), target.mean(dim=1))
            }
        weights = {}
        if cond.pooled_prompt_embeds is not None and student.pooled_prompt_embeds is not None:
            terms["pooled"] = cosine_alignment(
                student.pooled_prompt_embeds.float(), cond.pooled_prompt_embeds.float()
            )
            weights["pooled"] = c.pooled_weight
        return weighted_sum(terms, weights, require_finite=True)

    def save(self, output_dir: Path) -> dict[str, Path]:
        return {"adapter": _common.save_adapter(self.config, self.encoder, output_dir)}


def build(config: AlignConfig, *, device: torch.device, dtype: torch.dtype) -> AlignStep:
    """Teacher text encoder (frozen); student with LoRA (or last-k unfrozen) + ``LinearHead``."""
    from xling.adapters import LinearHead, LinearHeadConfig, LoraHeadConfig

    teacher = _common.load_teacher(config, device=device, dtype=dtype)
    head = LinearHead(LinearHeadConfig(**_common.head_widths(teacher, config.student)))
    if config.method == "lora":
        encoder = _common.build_encoder(
            config, head, lora=LoraHeadConfig(r=config.lora_r, alpha=config.lora_alpha)
        )
    else:
        encoder = _common.build_encoder(config, head, unfreeze_last=config.unfreeze_layers)
    return AlignStep(encoder, teacher, config)
