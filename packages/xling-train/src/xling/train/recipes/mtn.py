"""MTN / GlueNet (Qin et al., 2023): a frozen student + a mixer translator with a mirror decoder.

Text only. The translator maps the student's sequence ``[B, S, d]`` to the teacher's ``[B, 77, D]``:

    L = w_mse * mean((T(h) - E_en)^2) + w_rec * mean_mask((Dec(T(h)) - h)^2) + w_adv * L_D
        (+ mean((pooled(T(h)) - pooled_en)^2) for SDXL teachers)

``L_D`` is the discriminator's loss (real: ``E_en``, fake: ``T(h)``) taken through a gradient-reversal layer
on the fake side (Ganin & Lempitsky, 2015): one backward trains the discriminator to tell them apart and the
translator to fool it, with one optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xling.adapters import LanguageEncoder, MixerTranslator, MixerTranslatorConfig
from xling.core import Teacher
from xling.losses import SequenceDiscriminator, discriminator_loss, grad_reverse, reconstruction, weighted_sum
from xling.train.config import RecipeConfig, option
from xling.train.data import Batch
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "MTN / GlueNet: frozen student + mixer translator, MSE + reconstruction + adversarial (text)"
NEEDS_IMAGES = False


@dataclass
class MTNConfig(RecipeConfig):
    """MTN / GlueNet: frozen student + mixer translator with a decoder; MSE to the teacher embeddings,
    reconstruction and an adversarial term (Qin et al., 2023)."""

    batch_size: int = option(32, "Rows per process per micro-batch (text only: cheap rows).")
    mse_weight: float = option(1.0, "Weight of the MSE to the teacher embeddings.")
    reconstruction_weight: float = option(1.0, "Weight of the reconstruction through the decoder.")
    adversarial_weight: float = option(
        0.1, "Weight of the adversarial term (gradient reversal into the translator)."
    )
    grl_scale: float = option(1.0, "Gradient-reversal scale between the translator and the discriminator.")
    num_blocks: int | None = option(None, "Mixer blocks (None: the translator's default, GlueNet's 5).")


class MTNStep(TrainStep[MTNConfig]):
    """Trainable: the translator (encoder + decoder) and the discriminator."""

    def __init__(
        self, encoder: LanguageEncoder, teacher: Teacher, config: MTNConfig, discriminator: nn.Module
    ) -> None:
        super().__init__(encoder, teacher, config)
        self.discriminator = discriminator

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        translator = self.encoder.head
        with torch.no_grad():
            english = self.english(batch)
            target = english.prompt_embeds.float()  # [B, 77, D]
            student = self.encoder.encode(batch.zh)  # hidden_states [B, L, d] (frozen)
        hidden = student.hidden_states.float()
        out = translator(hidden, student.attention_mask)  # prompt_embeds [B, 77, D]
        source, source_mask = translator.pad_source(hidden, student.attention_mask)  # [B, S, d], [B, S]
        recon = translator.reconstruct(out.prompt_embeds)  # [B, S, d]
        real = self.discriminator(target)
        fake = self.discriminator(grad_reverse(out.prompt_embeds, c.grl_scale))
        terms = {
            "mse": F.mse_loss(out.prompt_embeds, target),
            "reconstruction": reconstruction(source, recon, source_mask),
            "adversarial": discriminator_loss(real, fake),
        }
        if english.pooled_prompt_embeds is not None and out.pooled_prompt_embeds is not None:
            # SDXL: the translator's pooled projection feeds the UNet's added conditions; match it too.
            terms["pooled"] = F.mse_loss(
                out.pooled_prompt_embeds.float(), english.pooled_prompt_embeds.float()
            )
        weights = {
            "mse": c.mse_weight,
            "reconstruction": c.reconstruction_weight,
            "adversarial": c.adversarial_weight,
        }
        return weighted_sum(terms, weights, require_finite=True)


def build(config: MTNConfig, *, device: torch.device, dtype: torch.dtype) -> MTNStep:
    """Teacher text encoder (frozen), frozen student + ``MixerTranslator`` (fp32) + ``SequenceDiscriminator``."""
    teacher = load_teacher(config, device=device, dtype=dtype)
    widths = head_widths(teacher, config.student)
    depth = {"depth": config.num_blocks} if config.num_blocks is not None else {}
    translator = MixerTranslator(
        # The encoder pads every window to at most 77 tokens; the translator pads that to 77.
        MixerTranslatorConfig(**widths, source_length=77, target_length=teacher.max_length, **depth)
    )
    encoder = student_encoder(config, translator)
    encoder.set_trainable(backbone=False)
    width = widths["teacher_width"]
    return MTNStep(encoder, teacher, config, SequenceDiscriminator(width, hidden_dim=min(256, 4 * width)))
