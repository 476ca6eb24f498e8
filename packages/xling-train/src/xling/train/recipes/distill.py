"""AltDiffusion stage 1 (Chen et al., 2022; Ye et al., 2023): distil the teacher's pooled text vector.

Text only. A linear projection maps every student token to the teacher width; its [CLS] token is pulled to the
teacher's pooled vector (the final-layer [EOS] state of the CLIP text encoder; SDXL: its pooled embedding):

    L = mean((W h_[CLS] - t_pooled)^2)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from xling.train.config import DistillConfig
from xling.train.recipes import _common
from xling.train.recipes.base import Batch, TrainStep

NEEDS_IMAGES = False


class DistillStep(TrainStep):
    """Trainable: the student encoder (``train_encoder``) and the linear head."""

    def __init__(self, encoder: torch.nn.Module, teacher: object, config: DistillConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.frozen["teacher"] = teacher
        self.config = config

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        from xling.losses import pooled_kd, weighted_sum

        teacher = self.frozen["teacher"]
        with torch.no_grad():
            cond = _common.teacher_conditioning(teacher, batch)
            target = _common.teacher_pooled(teacher, batch.en, cond).float()  # [B, P]
        out = self.encoder(batch.zh)
        if cond.pooled_prompt_embeds is not None:
            student_cls = out.pooled_prompt_embeds  # SDXL: the head's pooled projection of [CLS]
        else:
            student_cls = out.prompt_embeds[:, 0]  # SD1/2: the token projection of [CLS], as AltDiffusion
        return weighted_sum({"pooled": pooled_kd(student_cls.float(), target)}, require_finite=True)

    def save(self, output_dir: Path) -> dict[str, Path]:
        return {"adapter": _common.save_adapter(self.config, self.encoder, output_dir)}


def build(config: DistillConfig, *, device: torch.device, dtype: torch.dtype) -> DistillStep:
    """Teacher text encoder (frozen); student + ``LinearHead`` (pooled projection for SDXL)."""
    from xling.adapters import LinearHead, LinearHeadConfig

    teacher = _common.load_teacher(config, device=device, dtype=dtype)
    head = LinearHead(LinearHeadConfig(**_common.head_widths(teacher, config.student)))
    encoder = _common.build_encoder(config, head)
    _common.set_backbone_trainable(encoder, config.train_encoder)
    return DistillStep(encoder, teacher, config)
