"""Shared helpers of the core tests."""

from __future__ import annotations

import torch
from torch import nn

from xling.core import Teacher
from xling.core.pivot import cross_attention_layers


def unet_inputs(teacher: Teacher, batch: int = 2, seed: int = 0) -> dict:
    """Deterministic ``unet(**inputs)`` arguments for a tiny teacher: latents, timesteps, English conditioning."""
    g = torch.Generator().manual_seed(seed)
    side = teacher.resolution // teacher.vae_scale_factor
    prompts = ["a red circle on the left", "a blue square on the right", "a cat wearing a hat"][:batch]
    cond = teacher.encode(prompts)
    inputs = {
        "sample": torch.randn(batch, teacher.unet.config.in_channels, side, side, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": cond.prompt_embeds,
    }
    extra = teacher.added_cond_kwargs(cond)
    if extra is not None:
        inputs["added_cond_kwargs"] = extra
    return inputs


def capture_attn2_inputs(unet: nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Forward pre-hooks recording the image-stream input of every cross-attention layer (remove the handles)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in cross_attention_layers(unet):

        def hook(module, args, kwargs, name=name):
            seen[name] = args[0] if args else kwargs["hidden_states"]

        handles.append(unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles
