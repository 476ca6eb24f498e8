"""MTN / GlueNet (Qin et al., 2023): a frozen student + a mixer translator with a decoder.

Text only. The translator ``T`` maps the student's sequence ``h [B, S, d]`` to the teacher's ``[B, 77, D]``.
The defaults are GlueGen's ``multilingual-gluenet/train_gluenet_multi.py``; with ``x = s h`` (``s``:
``student_scale``, GlueGen 1/3), ``n_p`` the per-position output scale (``output_norms``: GlueGen's CLIP
ViT-L/14 norms / 2, so the translator learns ``E_en / n`` and ``n * T(x)`` feeds the UNet) and ``w_p`` the
per-position distillation weights (``distill_weights``):

    L = w_mse * mean_{b,p,c}(w_p (T(x) - E_en / n_p)^2) + w_rec * mean((Dec(T(x)) - x)^2) + w_adv * L_D
        (+ mean((pooled(n T(x)) - pooled_en)^2) for SDXL teachers, a term GlueGen, SD 1.x only, has not)

    w_p = u_p / mean(u),  u_p = mean_c |mean_b E_en[b, p, c] - mean_b E_en[b, 76, c]|,  w_76 = (w_75 + w_74) / 2

``L_D`` is the discriminator's loss (real: ``E_en``, fake: ``T(x)``) taken through a gradient-reversal layer
(scale ``grl_scale``) on the fake side (Ganin & Lempitsky, 2015): one backward trains the discriminator to tell
them apart and the translator to fool it, with one optimizer. GlueGen's discriminator judges every token on its
own (``Linear, BatchNorm1d, ReLU, Linear`` to two classes, NLL with English 0 / translated 1, which is the
binary cross-entropy of the logit difference). ``positions="all"`` translates (and reconstructs) every position
of the 77-token window, padding included, as GlueGen does; ``"masked"`` zeroes padding. The ``toy:`` section of
``configs/mtn.yaml`` holds xling's variant (pre-norm translator, masked padding, no scalings, uniform weights):
what reached 100% in the toy world.

Captions longer than the student's window. The translator reads one window at a time, as every head does
(:meth:`xling.adapters.LanguageEncoder.forward` applies the head window by window and concatenates the
windows' ``[77, D]`` translations): a caption of ``C`` windows gives ``h`` of ``[B, C * W, d]``, cut back into
``C`` windows of ``W`` tokens, each translated to ``[77, D]``. The teacher's own CLIP tokenizer truncates the
English caption at 77 tokens, so ``E_en`` stands for the beginning of the caption only: the MSE, the
adversarial term and the SDXL pooled term compare the **first** window's translation with it, while the
reconstruction (which needs no teacher) runs over **every** window with ``windows: all`` (filler windows of
shorter captions in the batch are masked out). ``windows: first``, the default, trains on the first window
alone, as GlueGen, which truncates the caption there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xling.adapters import LanguageEncoder, MixerTranslator, MixerTranslatorConfig
from xling.adapters.mixer import GLUEGEN_INPUT_SCALE, GLUEGEN_OUTPUT_SCALE
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
    reconstruction and an adversarial term (Qin et al., 2023). The defaults are GlueGen's public training
    script (``multilingual-gluenet/train_gluenet_multi.py``); docs/fidelity.md lists each one."""

    batch_size: int = option(32, "Rows per process per micro-batch (text only: cheap rows; GlueGen: 32).")
    lr_scheduler: Literal["cosine", "constant", "linear", "polynomial", "step"] = option(
        "step",
        "'step' (GlueGen's StepLR, halved every epoch over 4: the run cut into lr_decay_stages equal stages, "
        "stage k at lr * lr_decay_gamma ** k; set max_steps to 4 epochs of your corpus), or 'cosine', "
        "'constant', 'linear', 'polynomial' (see RecipeConfig).",
    )
    warmup_steps: int = option(0, "Linear warmup steps (GlueGen: none).")
    max_grad_norm: float = option(0.0, "Gradient clipping norm (0 disables; GlueGen clips nothing).")
    translator: Literal["gluenet", "xling"] = option(
        "gluenet",
        "'gluenet': GlueGen's post-norm translator (a LayerNorm after every Linear, each block GELU(block(x) + x)); "
        "its checkpoints load into it. 'xling': pre-norm MLPs and plain residual blocks, which got every toy scene right "
        "in the toy world (the toy section's choice).",
    )
    num_blocks: int = option(5, "Residual mixer blocks of the translator and of its decoder (GlueNet: 5).")
    positions: Literal["all", "masked"] = option(
        "all",
        "'all': translate and reconstruct every position of the 77-token window, padding included (GlueGen); "
        "'masked': zero padded positions first, so the padding's content does not matter (xling).",
    )
    student_scale: float = option(
        GLUEGEN_INPUT_SCALE, "Factor on the student's hidden states before the translator (GlueGen: 1/3)."
    )
    output_norms: Literal["gluegen", "none"] = option(
        "gluegen",
        "'gluegen': the translator learns the teacher's embeddings divided by norm_p / 2 per position and its "
        "output is multiplied back (norm_p: GlueGen's 77 per-position norms of CLIP ViT-L/14, SD 1.x's text "
        "encoder); 'none': it translates at the teacher's scale.",
    )
    distill_weights: Literal["gluegen", "uniform"] = option(
        "gluegen",
        "'gluegen': weight position p of the MSE by how far the batch-mean teacher embedding there is from the "
        "last (padding) position's, normalised to mean 1; 'uniform': a plain MSE.",
    )
    mse_weight: float = option(1e4, "Weight of the MSE to the teacher embeddings (GlueGen: 10000).")
    reconstruction_weight: float = option(
        1e4, "Weight of the reconstruction through the decoder (GlueGen: 10000)."
    )
    adversarial_weight: float = option(0.1, "Weight of the adversarial term (GlueGen: 0.1).")
    grl_scale: float = option(
        0.1, "Gradient-reversal scale between the translator and the discriminator (GlueGen: 0.1)."
    )
    windows: Literal["first", "all"] = option(
        "first",
        "Captions longer than one student window: train on the 'first' window only (GlueGen truncates at 77 "
        "tokens) or reconstruct 'all' of them (the MSE always compares the first with the 77-token English).",
    )
    discriminator: Literal["gluegen", "xling"] = option(
        "gluegen",
        "'gluegen': a per-token discriminator, Linear(D, D/4), BatchNorm1d, ReLU, Linear(D/4, 2) (GlueGen); "
        "'xling': SequenceDiscriminator, one logit per sequence from a masked mean of a per-token MLP.",
    )


class TokenDiscriminator(nn.Module):
    """GlueGen's discriminator: every token judged on its own, ``[B, L, D] -> [B * L]`` logits.

    ``Linear(D, D/4) -> BatchNorm1d -> ReLU -> Linear(D/4, 2)``; the logit is ``z_real - z_fake``, so
    :func:`~xling.losses.discriminator_loss` on it equals GlueGen's NLL of the two-way log-softmax.
    """

    def __init__(self, dim: int, mult: float = 0.25) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.BatchNorm1d(inner), nn.ReLU(), nn.Linear(inner, 2))

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x.reshape(-1, x.shape[-1]))  # [B*L, 2]
        return z[:, 0] - z[:, 1]  # [B*L]


def gluegen_position_weights(target: Tensor) -> Tensor:
    """GlueGen's per-position distillation weights from a batch of teacher embeddings ``[B, T, D] -> [1, T, 1]``.

    ``u_p = mean_c |m_p - m_{T-1}|`` with ``m = mean_b target`` (distance of each position's batch-mean embedding
    from the last, padding, position's), ``w = u / mean(u)``, then the last position (0 by construction) gets
    ``(w_{T-2} + w_{T-3}) / 2``.
    """
    m = target.mean(dim=0)  # [T, D]
    u = (m - m[-1]).abs().mean(dim=-1)  # [T]
    w = u / u.mean().clamp_min(torch.finfo(u.dtype).tiny)
    w = torch.cat([w[:-1], ((w[-2] + w[-3]) / 2).reshape(1)])
    return w.reshape(1, -1, 1)


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
        if c.windows == "first" and c_windows > 1:  # GlueGen: the caption cut at one window
            hidden = hidden.reshape(b, c_windows, *hidden.shape[1:])[:, 0]
            mask, c_windows = mask.reshape(b, c_windows, -1)[:, 0], 1
        source, source_mask = translator.pad_source(hidden, mask)  # [B*C, S, d] (scaled), [B*C, S]
        translated = translator.encoder(source)  # [B*C, 77, D], before the output scale
        recon = translator.reconstruct(translated)  # [B*C, S, d]
        # The first window of each caption: what the teacher's 77-token English embedding stands for.
        first = translated.reshape(b, c_windows, *translated.shape[1:])[:, 0]  # [B, 77, D]
        scale = translator.output_scale
        goal = target / scale if scale is not None else target  # [B, 77, D]
        weights = gluegen_position_weights(target) if c.distill_weights == "gluegen" else 1.0
        real = self.discriminator(target)
        fake = self.discriminator(grad_reverse(first, c.grl_scale))
        terms = {
            "mse": ((first - goal) ** 2 * weights).mean(),
            "reconstruction": reconstruction(source, recon, source_mask),
            "adversarial": discriminator_loss(real, fake),
        }
        pooled = translator.head_output(first).pooled_prompt_embeds
        if english.pooled_prompt_embeds is not None and pooled is not None:
            # SDXL: the translator's pooled projection feeds the UNet's added conditions; match it too (the
            # encoder's pooled output is the first window's as well).
            terms["pooled"] = F.mse_loss(pooled.float(), english.pooled_prompt_embeds.float())
        loss_weights = {
            "mse": c.mse_weight,
            "reconstruction": c.reconstruction_weight,
            "adversarial": c.adversarial_weight,
        }
        return weighted_sum(terms, loss_weights, require_finite=True)


def translator_config(config: MTNConfig, teacher: Teacher) -> MixerTranslatorConfig:
    """The ``MixerTranslatorConfig`` ``config`` asks for on ``teacher`` (widths from the teacher and the student).

    Raises:
        ValueError: ``output_norms="gluegen"`` on a teacher whose embeddings are not 77 tokens long; a student
            window over the translator's 77 source positions.
    """
    if config.student_max_length > 77:
        raise ValueError(
            f"config key 'student_max_length' is {config.student_max_length}, but the translator reads windows of "
            "at most 77 student tokens"
        )
    widths = head_widths(teacher, config.student)
    target = teacher.max_length
    if config.output_norms == "gluegen" and target != len(GLUEGEN_OUTPUT_SCALE):
        raise ValueError(
            f"output_norms 'gluegen' holds {len(GLUEGEN_OUTPUT_SCALE)} per-position norms but the teacher's "
            f"embeddings have {target} positions; set --output_norms none"
        )
    return MixerTranslatorConfig(
        **widths,
        # The encoder pads every window to at most 77 tokens; the translator pads that to 77.
        source_length=77,
        target_length=target,
        depth=config.num_blocks,
        translator=config.translator,
        positions=config.positions,
        input_scale=config.student_scale,
        output_scale=list(GLUEGEN_OUTPUT_SCALE) if config.output_norms == "gluegen" else None,
    )


def build(config: MTNConfig, *, device: torch.device, dtype: torch.dtype) -> MTNStep:
    """Teacher text encoder (frozen), frozen student + ``MixerTranslator`` (fp32) + discriminator."""
    teacher = load_teacher(config, device=device, dtype=dtype)
    translator = MixerTranslator(translator_config(config, teacher))
    encoder = student_encoder(config, translator)
    encoder.set_trainable(backbone=False)
    width = translator.config.teacher_width
    discriminator = (
        TokenDiscriminator(width)
        if config.discriminator == "gluegen"
        else SequenceDiscriminator(width, hidden_dim=min(256, 4 * width))
    )
    return MTNStep(encoder, teacher, config, discriminator)
