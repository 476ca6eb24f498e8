"""PEA-Diffusion (Ma et al., 2023, arXiv:2311.17086): a frozen student encoder + an MLP adapter, distilled
from the UNet.

The UNet runs twice on the same noisy latent: with the teacher's English embeddings (no grad) and with the
student's. Per row ``b``, as the public code (``train_sdxl_zh.py``, ``train_sd_zh.py``) computes it:

    den_b  = mean((eps_s_b - target_b)^2)                 plain denoising, target = the noise (epsilon teachers)
    out_b  = mean((eps_s_b - eps_t_b)^2)                  output KD
    feat_b = sum_j mean((F_s_j_b - F_t_j_b)^2)            feature KD over every down block, the mid block and
                                                          every up block
    L = (1 / B) sum_b [ w_den m_b den_b + m'_b (w_out out_b + w_feat feat_b) ]   (w = 1, 1, 0.1)

with ``m = m' = 1`` on every row, or with ``hybrid``: ``m_b = 1`` on culture-only rows (PEA's ``zh_or_not``),
``m'_b = 1 - m_b``. ``hybrid_normalisation: batch`` divides each masked term by the whole batch as PEA does;
``subset`` by its own rows. ``caption_dropout`` (PEA: 0.1) replaces the token embeddings of the same rows on
both sides with those of the empty prompt; the pooled vectors (SDXL) stay the captions' own, as in PEA.

On a transformer teacher (docs/families.md) the features are every transformer block's image-token output
(``Teacher.feature_blocks``; the MMDiTs' text tokens differ in length between the passes and are not compared), and
the denoising target is the family's (the velocity ``noise - z0`` for the flow-matching SD3, Flux and Sana).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from xling.adapters import MLPAdapter, MLPAdapterConfig
from xling.core import Conditioning, FeatureTap
from xling.losses import denoising, feature_kd, output_kd, weighted_sum
from xling.train.config import NoisedImagesConfig, RecipeConfig, option
from xling.train.data import Batch
from xling.train.noise import denoising_schedule, noisy_latents, row_generators, time_ids
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "PEA-Diffusion: frozen student + MLP adapter, denoising + UNet feature + output KD (needs images)"
NEEDS_IMAGES = True

#: PEA's hidden width for SD 1.x / 2.x (``train_sd_zh.py``: ``MLP(1024, 768, 2048)``).
SD_HIDDEN = 2048
#: PEA's noise offset for SDXL (``utils/universal.py`` ``--noise_offset 0.5``, read by ``train_sdxl_zh.py`` only).
SDXL_NOISE_OFFSET = 0.5


@dataclass
class PEAConfig(NoisedImagesConfig, RecipeConfig):
    """PEA-Diffusion: frozen student + MLP adapter, denoising + UNet feature KD + output KD (Ma et al., 2023).

    The defaults are the public code's (docs/fidelity.md); the shipped YAML adds its lr and step count.
    """

    batch_size: int = option(10, "Rows per process per micro-batch (PEA SDXL: 10 per GPU; SD 1.x: 40).")
    lr_scheduler: Literal["cosine", "constant", "linear", "polynomial"] = option(
        "polynomial",
        "'polynomial' (PEA: transformers' polynomial decay, power 1), 'cosine', 'constant' or 'linear'.",
    )
    warmup_steps: int = option(100, "Warmup steps (PEA: 100).")
    time_ids: Literal["square", "image"] = option(
        "image",
        "SDXL added time ids: each row's 'image' size before the resize and its crop corner (PEA) or 'square' "
        "(R, R, 0, 0, R, R).",
    )
    latents: Literal["mode", "sample"] = option(
        "sample",
        "Clean latents: a seeded 'sample' of the VAE posterior (PEA: latent_dist.sample()) or its 'mode' (what "
        "the latent cache stores; needed with it).",
    )
    # PEA's UNet attends to every position of the student's window (no encoder_attention_mask).
    student_padding_mask: bool = option(
        False,
        "Hide the student's padding tokens from the denoiser's cross-attention (PEA: no mask, as the pipelines "
        "generate; true: xling's masked training, docs/toyworld.md).",
    )
    feature_weight: float = option(0.1, "lambda_F, weight of the UNet feature KD (PEA: 0.1).")
    output_weight: float = option(1.0, "lambda_L, weight of the noise-prediction KD (PEA: 1.0).")
    denoise_weight: float = option(
        1.0,
        "Weight of the plain denoising loss (PEA: 1.0; every row, or the culture-only rows with --hybrid).",
    )
    hybrid: bool = option(False, "Culture-only rows get the denoising loss alone, the others KD alone.")
    hybrid_normalisation: Literal["batch", "subset"] = option(
        "batch",
        "With --hybrid: 'batch' divides each masked term by the whole batch (PEA), 'subset' by its own rows.",
    )
    caption_dropout: float = option(
        0.1, "Fraction of rows whose captions (student and teacher) become the empty prompt (PEA: 0.1)."
    )
    pooled: Literal["all", "masked"] = option(
        "all",
        "SDXL pooled vector: mean over 'all' window positions, padding included (PEA), or the 'masked' real "
        "tokens (does not depend on padding).",
    )
    noise_offset: float | None = option(
        None, "Offset-noise scale, noise += s * randn(B, C, 1, 1) (None: PEA's, 0.5 for SDXL, 0 otherwise)."
    )
    adapter_hidden: int | None = option(
        None,
        "MLP adapter hidden width (None: PEA's, 2048 for SD 1.x / 2.x, the student width for SDXL and for the "
        "transformer families, as PEA's newer SDXL script).",
    )


def _row_uniform(seed: int, batch: Batch, salt: str) -> Tensor:
    """One seeded ``U[0, 1)`` draw per row ``[B]``: a function of ``(seed, step, row)``, so resume is exact."""
    gens = row_generators(seed, batch.step, batch.index, salt)
    return torch.tensor([float(torch.rand((), generator=g)) for g in gens])


class PEAStep(TrainStep[PEAConfig]):
    """Trainable: the MLP adapter only (the student encoder is frozen)."""

    _empty_teacher: Conditioning | None = None

    def _denoise(
        self, z_t: Tensor, t: Tensor, conditioning: Conditioning, mask: Tensor | None, ids: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Noise prediction ``[B, C, h, w]`` and the tapped block outputs, in fp32."""
        with FeatureTap(self.teacher.denoiser, self.teacher.feature_blocks()) as tap:
            pred = self.teacher.denoise(z_t, t, conditioning, attention_mask=mask, time_ids=ids)
            features = tap.take()
        return pred.float(), {k: v.float() for k, v in features.items()}

    def _offset_noise(self, batch: Batch, z0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """PEA's offset noise ``noise + s * n [B, C, 1, 1]`` (seeded per row) and the latents it noises."""
        scale = self.config.noise_offset
        if scale is None:
            scale = SDXL_NOISE_OFFSET if self.teacher.family == "sdxl" else 0.0
        if scale == 0.0:
            return noise, self.teacher.add_noise(z0, noise, t)
        gens = row_generators(self.config.seed, batch.step, batch.index, "noise_offset")
        offset = torch.stack([torch.randn(z0.shape[1], generator=g) for g in gens]).to(noise)
        noise = noise + scale * offset[:, :, None, None]
        return noise, self.teacher.add_noise(z0, noise, t)

    def _empty_english(self) -> Conditioning:
        """The teacher's conditioning of ``""`` (``prompt_embeds [1, L, D]``, its mask for PixArt / Sana), encoded
        once."""
        if self._empty_teacher is None:
            with torch.no_grad():
                self._empty_teacher = self.teacher.encode([""])
        return self._empty_teacher

    def _student(self, batch: Batch, drop: Tensor) -> Conditioning:
        """The student's conditioning, the dropped rows' tokens (and mask) those of ``""``; pooled kept."""
        if not drop.any():
            return self.encoder(batch.zh)
        # "" is encoded in the same call, so it gets the batch's window count (filler windows) and, the adapter
        # training, a fresh gradient every step.
        both = self.encoder([*batch.zh, ""])
        n = len(batch)
        keep = ~drop.to(both.prompt_embeds.device)
        embeds = torch.where(keep[:, None, None], both.prompt_embeds[:n], both.prompt_embeds[n:])
        mask = torch.where(keep[:, None], both.attention_mask[:n], both.attention_mask[n:])
        pooled = both.pooled_prompt_embeds
        return Conditioning(embeds, None if pooled is None else pooled[:n], mask)

    def _reduce(self, per_row: Tensor, mask: Tensor) -> Tensor:
        """``sum_b mask_b x_b`` over the whole batch (``batch``) or over the masked rows (``subset``)."""
        weights = mask.to(per_row.dtype)
        if self.config.hybrid_normalisation == "subset":
            return (per_row * weights).sum() / weights.sum().clamp_min(1.0)
        return (per_row * weights).mean()

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, c = self.teacher, self.config
        drop = _row_uniform(c.seed, batch, "caption_dropout") < c.caption_dropout  # [B]
        with torch.no_grad():
            english = self.english(batch)
            if drop.any():
                rows = drop.to(english.prompt_embeds.device)
                empty = self._empty_english()
                mask = english.attention_mask
                if mask is not None and empty.attention_mask is not None:
                    mask = torch.where(rows[:, None], empty.attention_mask.to(mask), mask)
                english = Conditioning(
                    torch.where(
                        rows[:, None, None],
                        empty.prompt_embeds.to(english.prompt_embeds),
                        english.prompt_embeds,
                    ),
                    english.pooled_prompt_embeds,
                    mask,
                )
            z0, noise, t, _ = noisy_latents(
                teacher, batch, seed=c.seed, t_min=c.timestep_min, t_max=c.timestep_max, latents=c.latents
            )
            noise, z_t = self._offset_noise(batch, z0, noise, t)
            ids = time_ids(teacher, batch, c.time_ids)  # SDXL [B, 6], the same for both passes
            pred_t, feats_t = self._denoise(z_t, t, english, None, ids)
        student = self._student(batch, drop)
        pred_s, feats_s = self._denoise(z_t, t, student, self.student_mask(student), ids)

        culture = torch.zeros(len(batch), dtype=torch.bool, device=pred_s.device)
        if c.hybrid and batch.culture is not None:
            culture = batch.culture.to(pred_s.device)
        denoise_rows = culture if c.hybrid else torch.ones_like(culture)
        kd_rows = ~culture
        subset = c.hybrid and c.hybrid_normalisation == "subset"
        terms: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        if kd_rows.any() or not subset:
            terms["feature"] = self._reduce(feature_kd(feats_t, feats_s, reduction="none"), kd_rows)
            terms["output"] = self._reduce(output_kd(pred_t, pred_s, reduction="none"), kd_rows)
            weights.update(feature=c.feature_weight, output=c.output_weight)
        if denoise_rows.any() or not subset:
            per_row = denoising(
                pred_s,
                noise=noise,
                sample=z0,
                timesteps=t,
                **denoising_schedule(teacher),
                reduction="none",
            )
            terms["denoise"] = self._reduce(per_row, denoise_rows)
            weights["denoise"] = c.denoise_weight
        return weighted_sum(terms, weights, require_finite=True)


def build(config: PEAConfig, *, device: torch.device, dtype: torch.dtype) -> PEAStep:
    """Teacher (frozen), frozen student + ``MLPAdapter`` (fp32) with PEA's widths and pooled rule."""
    if not 0.0 <= config.caption_dropout < 1.0:
        raise ValueError(f"config key 'caption_dropout' must be in [0, 1), got {config.caption_dropout}")
    teacher = load_teacher(config, device=device, dtype=dtype)
    widths = head_widths(teacher, config.student)
    hidden = config.adapter_hidden
    if hidden is None:
        hidden = SD_HIDDEN if teacher.family in ("sd1", "sd2") else widths["student_width"]
    head = MLPAdapter(MLPAdapterConfig(**widths, hidden_width=hidden, pooled=config.pooled))
    encoder = student_encoder(config, head)
    encoder.set_trainable(backbone=False)
    return PEAStep(encoder, teacher, config)
