"""MTN / GlueNet (Qin et al., 2023): a frozen student + a mixer translator with a mirror decoder.

Text only. The translator maps the student's sequence ``[B, S, d]`` to the teacher's ``[B, 77, D]``:

    L = w_mse * mean((T(h) - E_en)^2) + w_rec * mean_mask((Dec(T(h)) - h)^2) + w_adv * L_D
        (+ mean((pooled(T(h)) - pooled_en)^2) for SDXL teachers)

``L_D`` is the discriminator's loss (real: ``E_en``, fake: ``T(h)``) taken through a gradient-reversal layer
on the fake side (Ganin & Lempitsky, 2015): one backward trains the discriminator to tell them apart and the
translator to fool it, with one optimizer.

Captions longer than the student's window. The translator reads one window at a time, as every head does
(:meth:`xling.adapters.LanguageEncoder.forward` applies the head window by window and concatenates the
windows' ``[77, D]`` translations): a caption of ``C`` windows gives ``h`` of ``[B, C * W, d]``, cut back into
``C`` windows of ``W`` tokens, each translated to ``[77, D]``. The teacher's own CLIP tokenizer truncates the
English caption at 77 tokens, so ``E_en`` stands for the beginning of the caption only: the MSE, the
adversarial term and the SDXL pooled term compare the **first** window's translation with it, while the
reconstruction (which needs no teacher) runs over **every** window (filler windows of shorter captions in the
batch are masked out).
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
            student = self.encoder.encode(batch.zh)  # hidden_states [B, C*W, d] (frozen)
        b, c_windows = len(batch), student.num_chunks
        # One window at a time, as LanguageEncoder.forward applies the head at inference (module docstring).
        hidden = student.hidden_states.float().reshape(b * c_windows, -1, student.hidden_states.shape[-1])
        mask = student.attention_mask.reshape(b * c_windows, -1)  # [B*C, W], 0 on filler windows
        out = translator(hidden, mask)  # prompt_embeds [B*C, 77, D]
        source, source_mask = translator.pad_source(hidden, mask)  # [B*C, S, d], [B*C, S]
        recon = translator.reconstruct(out.prompt_embeds)  # [B*C, S, d]
        # The first window of each caption: what the teacher's 77-token English embedding stands for.
        first = out.prompt_embeds.reshape(b, c_windows, *out.prompt_embeds.shape[1:])[:, 0]  # [B, 77, D]
        real = self.discriminator(target)
        fake = self.discriminator(grad_reverse(first, c.grl_scale))
        terms = {
            "mse": F.mse_loss(first, target),
            "reconstruction": reconstruction(source, recon, source_mask),
            "adversarial": discriminator_loss(real, fake),
        }
        if english.pooled_prompt_embeds is not None and out.pooled_prompt_embeds is not None:
            # SDXL: the translator's pooled projection feeds the UNet's added conditions; match it too (the
            # encoder's pooled output is the first window's as well).
            pooled = out.pooled_prompt_embeds.reshape(b, c_windows, -1)[:, 0]
            terms["pooled"] = F.mse_loss(pooled.float(), english.pooled_prompt_embeds.float())
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
