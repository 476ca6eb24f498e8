"""AltDiffusion stage 1 (Chen et al., 2022; Ye et al., 2023): distil the teacher's pooled text vector.

Text only. A linear projection maps every student token to the teacher width; its [CLS] token is pulled to the
teacher's pooled vector (the final-layer [EOS] state of the CLIP text encoder; SDXL: its pooled embedding):

    L = mean((W LN(h_[CLS]) - t_pooled)^2)

As AltCLIP's ``KDmodel`` (FlagAI ``examples/AltCLIP/hf_altclip/modeling_kd.py``): the LayerNorm ``LN`` is its
trainable ``pre_LN`` (``pre_norm``), and the student runs without dropout (``student_dropout``). The public-code
comparison, row by row: docs/fidelity.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from xling.adapters import LinearHead, LinearHeadConfig
from xling.core import CROSS_ATTENTION_DIT_FAMILIES
from xling.losses import pooled_kd, weighted_sum
from xling.train.config import RecipeConfig, option
from xling.train.data import Batch
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "AltDiffusion stage 1: projected [CLS] to the teacher's pooled vector (text)"
NEEDS_IMAGES = False


@dataclass
class DistillConfig(RecipeConfig):
    """AltDiffusion stage 1: MSE between the projected student [CLS] and the teacher's pooled vector
    (Chen et al., 2022 / Ye et al., 2023)."""

    batch_size: int = option(32, "Rows per process per micro-batch (text only: cheap rows).")
    train_encoder: bool = option(True, "Fine-tune the student encoder with the projection.")
    pre_norm: bool = option(
        True,
        "A trainable LayerNorm on the student states before the projection (AltCLIP's pre_LN; false: the "
        "plain projection).",
    )
    student_dropout: bool = option(
        False,
        "Keep the student's dropout on while it trains (false: off, as AltCLIP sets its dropout "
        "probabilities to 0 for the distillation, so a batch's loss does not depend on the dropout draw).",
    )


class DistillStep(TrainStep[DistillConfig]):
    """Trainable: the student encoder (``train_encoder``) and the linear head."""

    def train(self, mode: bool = True) -> DistillStep:
        super().train(mode)
        if mode and not self.config.student_dropout:
            self.encoder.student.eval()  # XLM-R / BERT: eval() only turns dropout off
        return self

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            english = self.english(batch)
            target = self.teacher.pooled(batch.en, english).float()  # [B, P]
        out = self.encoder(batch.zh)
        if english.pooled_prompt_embeds is not None:
            student_cls = out.pooled_prompt_embeds  # SDXL: the head's pooled projection of [CLS]
        else:
            student_cls = out.prompt_embeds[:, 0]  # SD1/2: the token projection of [CLS], as AltDiffusion
        return weighted_sum({"pooled": pooled_kd(student_cls.float(), target)}, require_finite=True)


def build(config: DistillConfig, *, device: torch.device, dtype: torch.dtype) -> DistillStep:
    """Teacher text encoder (frozen); student + ``LinearHead`` (``pre_norm``; pooled projection for SDXL)."""
    from transformers import AutoConfig

    teacher = load_teacher(config, device=device, dtype=dtype)
    if teacher.pooled_dim is None and teacher.family in CROSS_ATTENTION_DIT_FAMILIES:
        raise ValueError(
            f"recipe distill needs the teacher's pooled text vector (AltDiffusion distils CLIP's [EOS] state), but a "
            f"{teacher.family} teacher conditions on T5 / Gemma token states only and has none; train this family "
            "with iap, pea, mtn, align or denoise"
        )
    widths = head_widths(teacher, config.student)
    # pre_LN takes the student's own epsilon (AltCLIP: config.layer_norm_eps)
    eps = float(getattr(AutoConfig.from_pretrained(widths["student_model"]), "layer_norm_eps", 1e-5))
    head = LinearHead(LinearHeadConfig(**widths, pre_norm=config.pre_norm, layer_norm_eps=eps))
    encoder = student_encoder(config, head)
    encoder.set_trainable(backbone=config.train_encoder)
    return DistillStep(encoder, teacher, config)
