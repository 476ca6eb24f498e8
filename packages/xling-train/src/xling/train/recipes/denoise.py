"""The plain denoising loss with a chosen trainable part.

``student``: the student encoder + linear head learn through the whole frozen UNet (the Taiyi / "original
loss" baseline of the IAP paper). ``kv``: the cross-attention ``to_k``/``to_v`` of the UNet train under a frozen
student (AltDiffusion stage 2; saved as a small safetensors file of those weights). ``unet``: the whole UNet.

    L = mean_b w_b * mean((UNet(z_t, t, E_zh) - target)^2)     (target: eps, v or x0; w_b: Min-SNR or 1)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig
from xling.core import Teacher
from xling.losses import denoising, weighted_sum
from xling.train.config import NoisedImagesConfig, RecipeConfig, option
from xling.train.data import Batch
from xling.train.noise import denoising_schedule, noisy_latents, time_ids
from xling.train.recipes.base import TrainStep, head_widths, load_teacher, student_encoder

SUMMARY = "plain denoising loss on the student, the cross-attention K/V or the UNet (needs images)"
NEEDS_IMAGES = True
#: The loss reads only the target captions and the images: a corpus needs no English column.
NEEDS_ENGLISH = False

#: Name fragments of the parameters ``trainable="kv"`` trains: the cross-attention key/value projections (UNets,
#: PixArt, Sana) ...
KV_SUFFIXES = ("attn2.to_k.weight", "attn2.to_k.bias", "attn2.to_v.weight", "attn2.to_v.bias")
#: ... or, in an MMDiT (SD3, Flux), the text stream's key/value projections of every joint attention (the single
#: blocks of Flux share theirs with the image tokens and stay frozen).
MMDIT_KV_SUFFIXES = (
    "attn.add_k_proj.weight",
    "attn.add_k_proj.bias",
    "attn.add_v_proj.weight",
    "attn.add_v_proj.bias",
)


def kv_suffixes(teacher: Teacher) -> tuple[str, ...]:
    """The parameter-name endings ``trainable="kv"`` trains on ``teacher``'s denoiser."""
    return MMDIT_KV_SUFFIXES if teacher.is_mmdit else KV_SUFFIXES


@dataclass
class DenoiseConfig(NoisedImagesConfig, RecipeConfig):
    """The plain denoising loss on a chosen trainable part: the student (Taiyi / "original loss" baseline),
    the cross-attention K/V (AltDiffusion stage 2) or the whole UNet."""

    lr: float = option(5e-5, "Peak learning rate (IAP's, so the two losses compare on equal terms).")
    trainable: Literal["student", "kv", "unet"] = option(
        "student",
        "'student', 'kv' (the text key/value projections only: attn2 to_k/to_v; SD3/Flux: the joint "
        "attentions' add_k_proj/add_v_proj) or 'unet' (the whole denoiser, UNet or transformer).",
    )
    adapter: str | None = option(
        None, "Adapter directory to start from (kv/unet: the frozen stage-1 student)."
    )
    snr_gamma: float | None = option(None, "Min-SNR weighting gamma (5.0 is usual; None: plain MSE).")


class DenoiseStep(TrainStep[DenoiseConfig]):
    """Trainable: the student (+ head), the cross-attention K/V, or the whole UNet."""

    def __init__(self, encoder: LanguageEncoder, teacher: Teacher, config: DenoiseConfig) -> None:
        super().__init__(encoder, teacher, config)
        if config.trainable != "student":
            self.unet = teacher.unet  # registered: it trains (and is checkpointed)

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        teacher, c = self.teacher, self.config
        z0, noise, t, z_t = noisy_latents(
            teacher, batch, seed=c.seed, t_min=c.timestep_min, t_max=c.timestep_max, latents=c.latents
        )
        student = self.encoder(batch.zh)
        pred = teacher.denoise(
            z_t,
            t,
            student,
            attention_mask=self.student_mask(student),
            time_ids=time_ids(teacher, batch, c.time_ids),
        )
        loss = denoising(
            pred.float(),
            noise=noise,
            sample=z0,
            timesteps=t,
            **denoising_schedule(teacher),
            snr_gamma=c.snr_gamma,
        )
        return weighted_sum({"denoise": loss}, require_finite=True)

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """The adapter, plus ``cross_attention_kv.safetensors`` (``kv``) or the UNet folder ``unet/`` (``unet``)."""
        output_dir = Path(output_dir)
        files = super().save(output_dir)
        if self.config.trainable == "kv":
            weights = {
                n: p.detach().float().cpu().contiguous()
                for n, p in self.unet.named_parameters()
                if n.endswith(kv_suffixes(self.teacher))
            }
            files["kv_weights"] = output_dir / "cross_attention_kv.safetensors"
            save_file(
                weights,
                str(files["kv_weights"]),
                metadata={"format": "pt", "xling": "text key/value projections"},
            )
        elif self.config.trainable == "unet":
            files["unet"] = output_dir / "unet"
            self.unet.save_pretrained(files["unet"], safe_serialization=True)
        return files


def build(config: DenoiseConfig, *, device: torch.device, dtype: torch.dtype) -> DenoiseStep:
    """Teacher (frozen but for the chosen part); student + ``LinearHead`` or a trained adapter (``adapter``)."""
    trains_unet = config.trainable != "student"
    # A UNet that trains keeps fp32 master weights; only the rest of the teacher runs in the half dtype.
    teacher = load_teacher(config, device=device, dtype=torch.float32 if trains_unet else dtype)
    if config.adapter is not None:
        encoder = LanguageEncoder.from_pretrained(config.adapter)
    else:
        head = LinearHead(LinearHeadConfig(**head_widths(teacher, config.student)))
        encoder = student_encoder(config, head)
    if trains_unet:
        encoder.requires_grad_(False)  # stage 2: the (possibly fine-tuned) stage-1 student stays as it is
        suffixes = kv_suffixes(teacher)
        for name, p in teacher.unet.named_parameters():
            p.requires_grad_(config.trainable == "unet" or name.endswith(suffixes))
        teacher.unet.train()
        for module in (teacher.vae, *teacher.text_encoders):
            module.to(dtype)
    else:
        encoder.set_trainable(backbone=True)
    return DenoiseStep(encoder, teacher, config)
