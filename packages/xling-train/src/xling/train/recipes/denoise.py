"""The plain denoising loss with a chosen trainable part.

``student``: the student encoder + linear head learn through the whole frozen UNet (the Taiyi / "original
loss" baseline of the IAP paper). ``kv``: the cross-attention ``to_k``/``to_v`` of the UNet train under a frozen
student (AltDiffusion stage 2; saved as a small safetensors file of those weights). ``unet``: the whole UNet.

    L = mean_b w_b * mean((UNet(z_t, t, E_zh) - target)^2)     (target: eps, v or x0; w_b: Min-SNR or 1)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from xling.train.config import DenoiseConfig
from xling.train.recipes import _common
from xling.train.recipes.base import Batch, TrainStep

NEEDS_IMAGES = True

#: Name fragments of the parameters ``trainable="kv"`` trains: the cross-attention key/value projections.
KV_SUFFIXES = ("attn2.to_k.weight", "attn2.to_k.bias", "attn2.to_v.weight", "attn2.to_v.bias")


class DenoiseStep(TrainStep):
    """Trainable: the student (+ head), the cross-attention K/V, or the whole UNet."""

    def __init__(self, encoder: torch.nn.Module, teacher: object, config: DenoiseConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.frozen["teacher"] = teacher
        if config.trainable == "student":
            self.frozen["unet"] = teacher.unet
        else:
            self.unet = teacher.unet  # registered: it trains (and is checkpointed)
        self.config = config

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        from xling.losses import denoising, weighted_sum

        teacher, c = self.frozen["teacher"], self.config
        unet = teacher.unet
        z0, noise, t, z_t = _common.noisy_latents(teacher, batch, c)
        student = self.encoder(batch.zh)
        dtype = _common.unet_dtype(teacher)
        pred = unet(
            z_t.to(dtype),
            t,
            encoder_hidden_states=student.prompt_embeds.to(dtype),
            encoder_attention_mask=_common.student_mask(c, student),
            **_common.unet_kwargs(teacher, len(batch), student.pooled_prompt_embeds, dtype),
        ).sample
        loss = denoising(
            pred.float(),
            noise=noise,
            sample=z0,
            timesteps=t,
            alphas_cumprod=teacher.scheduler.alphas_cumprod,
            prediction_type=teacher.scheduler.config.prediction_type,
            snr_gamma=c.snr_gamma,
        )
        return weighted_sum({"denoise": loss}, require_finite=True)

    def save(self, output_dir: Path) -> dict[str, Path]:
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        files = {"adapter": _common.save_adapter(self.config, self.encoder, output_dir)}
        if self.config.trainable == "kv":
            weights = {
                n: p.detach().float().cpu().contiguous()
                for n, p in self.unet.named_parameters()
                if n.endswith(KV_SUFFIXES)
            }
            files["kv_weights"] = output_dir / "cross_attention_kv.safetensors"
            save_file(
                weights, str(files["kv_weights"]), metadata={"format": "pt", "xling": "attn2 to_k/to_v"}
            )
        elif self.config.trainable == "unet":
            files["unet"] = output_dir / "unet"
            self.unet.save_pretrained(files["unet"], safe_serialization=True)
        return files


def build(config: DenoiseConfig, *, device: torch.device, dtype: torch.dtype) -> DenoiseStep:
    """Teacher (frozen but for the chosen part); student + ``LinearHead`` or a trained adapter (``adapter``)."""
    from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig

    trains_unet = config.trainable != "student"
    # A UNet that trains keeps fp32 master weights; only the rest of the teacher runs in the half dtype.
    teacher = _common.load_teacher(config, device=device, dtype=torch.float32 if trains_unet else dtype)
    if config.adapter is not None:
        encoder = LanguageEncoder.from_pretrained(config.adapter)
    else:
        encoder = _common.build_encoder(
            config, LinearHead(LinearHeadConfig(**_common.head_widths(teacher, config.student)))
        )
    _common.set_backbone_trainable(encoder, config.trainable == "student")
    if trains_unet:
        for p in encoder.parameters():
            p.requires_grad_(False)
        for name, p in teacher.unet.named_parameters():
            p.requires_grad_(config.trainable == "unet" or name.endswith(KV_SUFFIXES))
        teacher.unet.train()
        for module in (teacher.vae, *teacher.text_encoders):
            module.to(dtype)
    return DenoiseStep(encoder, teacher, config)
