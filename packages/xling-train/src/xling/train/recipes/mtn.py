"""MTN / GlueNet (Qin et al., 2023): a frozen student + a mixer translator with a mirror decoder.

Text only. The translator maps the student's sequence ``[B, S, d]`` to the teacher's ``[B, 77, D]``:

    L = w_mse * mean((T(h) - E_en)^2) + w_rec * mean_mask((Dec(T(h)) - h)^2) + w_adv * L_D
        (+ mean((pooled(T(h)) - pooled_en)^2) for SDXL teachers)

``L_D`` is the discriminator's loss (real: ``E_en``, fake: ``T(h)``) taken through a gradient-reversal layer
on the fake side (Ganin & Lempitsky, 2015): one backward trains the discriminator to tell them apart and the
translator to fool it, with one optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from xling.train.config import MTNConfig
from xling.train.recipes import _common
from xling.train.recipes.base import Batch, TrainStep

NEEDS_IMAGES = False


class MTNStep(TrainStep):
    """Trainable: the translator (encoder + decoder) and the discriminator."""

    def __init__(
        self, encoder: torch.nn.Module, teacher: object, config: MTNConfig, discriminator: torch.nn.Module
    ):
        super().__init__()
        self.encoder = encoder
        self.discriminator = discriminator
        self.frozen["teacher"] = teacher
        self.config = config

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        from xling.losses import discriminator_loss, grad_reverse, reconstruction, weighted_sum

        teacher, c = self.frozen["teacher"], self.config
        translator = self.encoder.head
        with torch.no_grad():
            cond = _common.teacher_conditioning(teacher, batch)
            target = cond.prompt_embeds.float()  # [B, 77, D]
            student = self.encoder.encode(batch.zh)  # hidden_states [B, L, d] (frozen)
        hidden = student.hidden_states.float()
        out = translator(hidden, student.attention_mask)  # prompt_embeds [B, 77, D]
        source, source_mask = translator.pad_source(hidden, student.attention_mask)  # [B, S, d], [B, S]
        recon = translator.reconstruct(out.prompt_embeds)  # [B, S, d]
        real = self.discriminator(target)
        fake = self.discriminator(grad_reverse(out.prompt_embeds, c.grl_scale))
        terms = {
            "mse": torch.nn.functional.mse_loss(out.prompt_embeds, target),
            "reconstruction": reconstruction(source, recon, source_mask),
            "adversarial": discriminator_loss(real, fake),
        }
        if cond.pooled_prompt_embeds is not None and out.pooled_prompt_embeds is not None:
            # SDXL: the translator's pooled projection feeds the UNet's added conditions; match it too.
            terms["pooled"] = torch.nn.functional.mse_loss(
                out.pooled_prompt_embeds.float(), cond.pooled_prompt_embeds.float()
            )
        weights = {
            "mse": c.mse_weight,
            "reconstruction": c.reconstruction_weight,
            "adversarial": c.adversarial_weight,
        }
        return weighted_sum(terms, weights, require_finite=True)

    def save(self, output_dir: Path) -> dict[str, Path]:
        return {"adapter": _common.save_adapter(self.config, self.encoder, output_dir)}


def build(config: MTNConfig, *, device: torch.device, dtype: torch.dtype) -> MTNStep:
    """Teacher text encoder (frozen), frozen student + ``MixerTranslator`` (fp32) + ``SequenceDiscriminator``."""
    from xling.adapters import MixerTranslator, MixerTranslatorConfig
    from xling.losses import SequenceDiscriminator

    teacher = _common.load_teacher(config, device=device, dtype=dtype)
    widths = _common.head_widths(teacher, config.student)
    extra = {"depth": config.num_blocks} if config.num_blocks is not None else {}
    target_length = int(teacher.tokenizers[0].model_max_length)
    head = MixerTranslator(
        MixerTranslatorConfig(
            **widths,
            # The encoder pads every window to at most 77 tokens; the translator pads that to 77.
            source_length=77,
            target_length=target_length,
            **extra,
        )
    )
    encoder = _common.build_encoder(config, head)
    _common.set_backbone_trainable(encoder, False)
    discriminator = SequenceDiscriminator(
        widths["teacher_width"], hidden_dim=min(256, 4 * widths["teacher_width"])
    )
    return MTNStep(encoder, teacher, config, discriminator)
