"""Cosine alignment: LoRA heads (r 16, alpha 64) or the last k layers of the student, plus a linear head.

Text only. The student's and the teacher's sequences differ in length (and token-to-token pairing across two
languages has no meaning), so the sequences are compared through their mean token embedding (the teacher's
over its full 77-token window, which is what the UNet attends to; the student's over its real tokens):

    L = 1 - cos(mean_l E_zh, mean_l E_en)   (+ w_pooled * (1 - cos(pooled_zh, pooled_en)) for SDXL)

When the head already emits the teacher's length the comparison is token-wise (masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from xling.adapters import LinearHead, LinearHeadConfig, LoraHeadConfig
from xling.adapters.head import masked_mean
from xling.losses import cosine_alignment, weighted_sum
from xling.train.config import RecipeConfig, option
from xling.train.data import Batch
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "cosine alignment with LoRA (r16/a64) or the last k layers unfrozen (text)"
NEEDS_IMAGES = False


@dataclass
class AlignConfig(RecipeConfig):
    """Cosine alignment of student and teacher embeddings with LoRA heads (r 16, alpha 64) or the last k
    encoder layers unfrozen (the LoRA/unfreeze baselines of the IAP paper)."""

    batch_size: int = option(32, "Rows per process per micro-batch (text only: cheap rows).")
    method: Literal["lora", "unfreeze"] = option(
        "lora", "'lora' (LoRA heads) or 'unfreeze' (last k layers trainable)."
    )
    lora_r: int = option(16, "LoRA rank (IAP paper's baseline: 16).")
    lora_alpha: int = option(64, "LoRA alpha (IAP paper's baseline: 64).")
    unfreeze_layers: int = option(3, "Layers unfrozen with method=unfreeze (IAP paper's baseline: 3).")
    pooled_weight: float = option(1.0, "Weight of the pooled-embedding cosine (SDXL teachers only).")


class AlignStep(TrainStep[AlignConfig]):
    """Trainable: LoRA weights (or the last k layers) of the student and its linear head."""

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            english = self.english(batch)
        target = english.prompt_embeds.float()  # [B, 77, D]
        student = self.encoder(batch.zh)
        embeds = student.prompt_embeds.float()  # [B, L, D]
        if embeds.shape == target.shape:
            terms = {"cosine": cosine_alignment(embeds, target, student.attention_mask)}
        else:
            pooled_zh = masked_mean(embeds, student.attention_mask)  # [B, D]
            terms = {"cosine": cosine_alignment(pooled_zh, target.mean(dim=1))}
        weights = {}
        if english.pooled_prompt_embeds is not None and student.pooled_prompt_embeds is not None:
            terms["pooled"] = cosine_alignment(
                student.pooled_prompt_embeds.float(), english.pooled_prompt_embeds.float()
            )
            weights["pooled"] = self.config.pooled_weight
        return weighted_sum(terms, weights, require_finite=True)


def build(config: AlignConfig, *, device: torch.device, dtype: torch.dtype) -> AlignStep:
    """Teacher text encoder (frozen); student with LoRA (or last-k unfrozen) + ``LinearHead``."""
    teacher = load_teacher(config, device=device, dtype=dtype)
    head = LinearHead(LinearHeadConfig(**head_widths(teacher, config.student)))
    if config.method == "lora":
        lora = LoraHeadConfig(r=config.lora_r, alpha=config.lora_alpha)
        encoder = student_encoder(config, head, lora=lora)
    else:
        encoder = student_encoder(config, head, unfreeze_last=config.unfreeze_layers)
    return AlignStep(encoder, teacher, config)
