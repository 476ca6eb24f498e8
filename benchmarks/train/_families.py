"""Random transformer denoisers of each family for ``bench_iap_step.py --family``, and how their pipelines call them.

Sizes are small enough for the CPU (``cpu``: 64-256 image tokens, 4 blocks, width 128) or shaped like the released
models' blocks at reduced depth (``full``: the real widths and head counts, a few blocks, for a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Per family and size: the transformer's config, the teacher's text length and the latent side.
#: Per family: the small CPU config, and what the released model changes in it (``full``).
_CPU: dict[str, dict[str, Any]] = {
    "pixart": dict(
        sample_size=16,
        num_layers=4,
        patch_size=2,
        attention_head_dim=32,
        num_attention_heads=4,
        caption_channels=256,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=128,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ),
    "sana": dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=4,
        num_cross_attention_heads=4,
        cross_attention_head_dim=32,
        cross_attention_dim=128,
        caption_channels=256,
        sample_size=16,
        patch_size=1,
    ),
    "sd3": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=256,
        caption_projection_dim=128,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    ),
    "flux": dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=256,
        pooled_projection_dim=64,
        axes_dims_rope=(8, 12, 12),
    ),
}
_FULL: dict[str, dict[str, Any]] = {
    # PixArt-alpha 512: 28 x (16 heads x 72), caption 4096; 4 blocks here
    "pixart": dict(
        sample_size=64,
        attention_head_dim=72,
        num_attention_heads=16,
        caption_channels=4096,
        cross_attention_dim=1152,
    ),
    # Sana 1600M 1024px: 20 x (70 heads x 32), cross 20 x 112, caption 2304 (Gemma-2 2B); 4 blocks here
    "sana": dict(
        in_channels=32,
        out_channels=32,
        num_attention_heads=70,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
        caption_channels=2304,
        sample_size=32,
    ),
    # SD3-medium: 24 x (24 heads x 64), joint 4096, pooled 2048; 4 blocks here
    "sd3": dict(
        sample_size=128,
        in_channels=16,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    ),
    # FLUX.1: 19 double + 38 single x (24 heads x 128), joint 4096, pooled 768; 2 + 2 blocks here
    "flux": dict(
        in_channels=64,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
    ),
}
#: Per family and size: the transformer's config.
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    family: {"cpu": cpu, "full": {**cpu, **_FULL[family]}} for family, cpu in _CPU.items()
}
#: Latent side (Flux: before the 2x2 packing) and teacher text length per size.
LATENT = {"cpu": 16, "full": 64}
TEXT = {"pixart": 120, "sana": 300, "sd3": 333, "flux": 512}
CLASSES = {
    "pixart": "PixArtTransformer2DModel",
    "sana": "SanaTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}


def build(family: str, size: str) -> nn.Module:
    """A random transformer of ``family`` at ``size`` (``"cpu"`` or ``"full"``)."""
    import diffusers

    return getattr(diffusers, CLASSES[family])(**CONFIGS[family][size])


def widths(family: str, transformer: nn.Module) -> tuple[int, int | None]:
    """``(D, P)``: the conditioning width the student must give and the pooled width (``None``: no pooled input)."""
    cfg = transformer.config
    if family in ("pixart", "sana"):
        return int(cfg.caption_channels), None
    return int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)


def latent_channels(family: str, transformer: nn.Module) -> int:
    """Channels of the unpacked latents (Flux packs 2x2 patches into its ``in_channels``)."""
    channels = int(transformer.config.in_channels)
    return channels // 4 if family == "flux" else channels


def _pack(z: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 packing ``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4C]`` (FluxPipeline._pack_latents)."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def _image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def call(
    family: str,
    transformer: nn.Module,
    z_t: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One denoiser forward as the family's pipeline makes it (timestep in [0, 1000); Flux packed, t / 1000)."""
    if family == "pixart":
        return transformer(
            z_t,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
    if family == "sana":
        return transformer(z_t, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t).sample
    if family == "sd3":
        return transformer(
            hidden_states=z_t, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t
        ).sample
    h, w = z_t.shape[-2:]
    txt_ids = torch.zeros(embeds.shape[1], 3, device=z_t.device, dtype=z_t.dtype)
    return transformer(
        hidden_states=_pack(z_t),
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=t.to(z_t.dtype) / 1000,
        img_ids=_image_ids(h, w, z_t.device, z_t.dtype),
        txt_ids=txt_ids,
    ).sample


def attention_layers(family: str, transformer: nn.Module) -> list[nn.Module]:
    """The attention modules the pivot taps: every ``attn2`` (PixArt, Sana) or every joint attention (SD3, Flux)."""
    if family in ("pixart", "sana"):
        return [m for n, m in transformer.named_modules() if n.endswith("attn2")]
    blocks = list(transformer.transformer_blocks) + list(
        getattr(transformer, "single_transformer_blocks", [])
    )
    return [block.attn for block in blocks]


def capture_image_outputs(family: str, transformer: nn.Module, sink: list[torch.Tensor]) -> list[Any]:
    """Hooks appending each tapped layer's image-token attention output to ``sink`` (the naive method's loss)."""
    handles = []
    if family in ("pixart", "sana"):
        for layer in attention_layers(family, transformer):
            handles.append(layer.to_out[0].register_forward_pre_hook(lambda _m, a: sink.append(a[0])))
        return handles
    for block in transformer.transformer_blocks:
        # a double-stream attention returns (image, text) outputs
        handles.append(block.attn.register_forward_hook(lambda _m, _a, out: sink.append(out[0])))
    for block in getattr(transformer, "single_transformer_blocks", []):
        # a single-stream block attends over [text; image]: its attention's image tokens are the last N
        text = {}

        def remember(_m: nn.Module, _a: Any, kwargs: dict, text: dict = text) -> None:
            text["len"] = kwargs["encoder_hidden_states"].shape[1]

        def slice_image(_m: nn.Module, _a: Any, out: torch.Tensor, text: dict = text) -> None:
            sink.append(out[:, text["len"] :])

        handles.append(block.register_forward_pre_hook(remember, with_kwargs=True))
        handles.append(block.attn.register_forward_hook(slice_image))
    return handles
