"""The toy world's second teacher: a tiny SD3-family MMDiT with joint attention (``--teacher toy-mmdit``).

A plain ``StableDiffusion3Pipeline`` directory: an ``SD3Transformer2DModel`` on 32x32 pixels in patches of 4
(64 image tokens) whose every block attends jointly over image and text tokens, SD3's two CLIP text encoders
(each ``CLIPTextModelWithProjection``; the prompt is their penultimate states side by side, the pooled
vector their projections side by side) sharing the toy teacher's one-token-per-word tokenizer, a
flow-matching Euler scheduler, and the identity ``AutoencoderKL`` of the UNet teacher, so latents are pixels.

T5 is dropped as diffusers documents for SD3 (``text_encoder_3=None``): the pipeline then appends
``max_sequence_length`` zero tokens after the CLIP ones. The teacher was trained with
:data:`T5_TOKENS` of them, so every call must pass ``max_sequence_length=T5_TOKENS``
(:data:`PIPELINE_KWARGS`); xling does so wherever it loads ``toy-mmdit``. The pipeline's default of 256
would give the transformer 256 copies of a token it saw once per prompt in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "PIPELINE_KWARGS",
    "T5_TOKENS",
    "MMDiTConfig",
    "build_flow_scheduler",
    "build_text_encoders",
    "build_transformer",
    "mmdit_teacher_path",
]

#: Zero "T5" tokens after the 16 CLIP ones: the prompt is ``[B, 16 + T5_TOKENS, 64]``.
T5_TOKENS = 1
#: What every call of the toy MMDiT pipeline (and ``Teacher.from_pretrained``) is given.
PIPELINE_KWARGS: dict[str, Any] = {"max_sequence_length": T5_TOKENS}
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def mmdit_teacher_path() -> Path:
    """Directory of the committed toy MMDiT teacher (``StableDiffusion3Pipeline.from_pretrained(...)``)."""
    return Path(__file__).parent / "assets" / "teacher-mmdit"


@dataclass
class MMDiTConfig:
    """Architecture of the toy MMDiT teacher.

    Attributes:
        resolution: Image side in pixels (latents are pixels).
        patch_size: Pixels per patch side; ``(resolution / patch_size) ** 2`` image tokens.
        layers: Joint-attention blocks (the last one is SD3's ``context_pre_only`` block).
        heads: Attention heads per block.
        head_dim: Width of each head; the transformer is ``heads * head_dim`` wide.
        text_width: Width of each of the two CLIP encoders; ``joint_attention_dim`` is twice it.
        text_layers: Layers of each CLIP encoder (the prompt is read one layer before the last, as SD3 does).
        text_heads: Heads of each CLIP encoder.
        max_length: CLIP tokenizer ``model_max_length``: the longest toy caption is 15 tokens with BOS/EOS.
    """

    resolution: int = 32
    patch_size: int = 4
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    text_width: int = 32
    text_layers: int = 3
    text_heads: int = 2
    max_length: int = 16


def build_transformer(config: MMDiTConfig) -> SD3Transformer2DModel:
    """A randomly initialised pixel-space ``SD3Transformer2DModel`` (3 channels in and out)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=config.resolution,
        patch_size=config.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=config.layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.heads,
        joint_attention_dim=2 * config.text_width,
        caption_projection_dim=config.heads * config.head_dim,
        pooled_projection_dim=2 * config.text_width,
        pos_embed_max_size=config.resolution // config.patch_size,
    )


def build_text_encoders(
    tokenizer: CLIPTokenizer, config: MMDiTConfig
) -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """SD3's "CLIP-L" and "CLIP-G", both ``CLIPTextModelWithProjection`` of ``config.text_width``, randomly
    initialised (each from the global RNG, so the two differ)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def one() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.text_width,
                intermediate_size=config.text_width * 4,
                num_attention_heads=config.text_heads,
                num_hidden_layers=config.text_layers,
                max_position_embeddings=config.max_length,
                hidden_act="quick_gelu",
                projection_dim=config.text_width,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    return one(), one()


def build_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's flow-matching Euler sampler with shift 1: at 64 image tokens there is no resolution to shift for
    (SD3 ships shift 3 for 1024 px), and sigma 1 is pure noise, so layout can only come from the text."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
