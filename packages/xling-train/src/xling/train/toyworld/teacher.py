"""The toy world's tiny English teacher: components, their configs, and where the committed weights live.

The teacher is a plain ``StableDiffusionPipeline`` directory: a ``UNet2DConditionModel`` with cross-attention,
a ``CLIPTextModel`` with a real byte-level BPE ``CLIPTokenizer`` whose merges build every word of the English
grammar into one token, a zero-terminal-SNR v-prediction DDIM scheduler, and an ``AutoencoderKL`` whose
weights are set (not trained) so that it is the identity: latents are the pixels in [-1, 1]. The UNet thus
diffuses in pixel space at 32x32 while every standard SD code path (``vae.encode``, ``vae.decode``,
``scaling_factor``) runs unchanged.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from xling.train.toyworld import world

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "TeacherConfig",
    "build_identity_vae",
    "build_scheduler",
    "build_text_encoder",
    "build_unet",
    "english_words",
    "teacher_path",
    "write_tokenizer",
]

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


def teacher_path() -> Path:
    """Directory of the committed teacher (``StableDiffusionPipeline.from_pretrained(teacher_path())``)."""
    return Path(__file__).parent / "assets" / "teacher"


@dataclass
class TeacherConfig:
    """Architecture of the toy teacher.

    Attributes:
        resolution: Image (and latent) side in pixels.
        block_out_channels: UNet channels per resolution level (32, 16, 8 for three levels at 32x32).
        layers_per_block: ResNet (+ transformer) layers per UNet level.
        attention_head_dim: Heads per attention layer (diffusers' SD-1 naming).
        text_width: Width of the CLIP text encoder, which is also the UNet's cross_attention_dim.
        text_layers: Transformer layers of the text encoder.
        text_heads: Attention heads of the text encoder.
        max_length: Tokenizer ``model_max_length`` (prompt_embeds are ``[B, max_length, text_width]``).
    """

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 4
    text_width: int = 64
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 77
    # Cross-attention on every level but the full-resolution one, where self-attention over 1024 tokens is
    # costly and layout is not decided anyway.
    down_block_types: tuple[str, ...] = field(
        default=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    )
    up_block_types: tuple[str, ...] = field(default=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


# ---------------------------------------------------------------------------------------------- tokenizer


def english_words() -> list[str]:
    """Every word (and punctuation mark) the English grammar writes, sorted."""
    words: set[str] = set()
    rng = np.random.default_rng(0)
    scenes = world.all_single_scenes() + world.all_pair_scenes()
    for scene in scenes:
        for r in (None, rng, rng, rng, rng, rng, rng):
            words.update(re.findall(r"[a-z]+", world.caption_en(scene, r)))
    return sorted(words)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _bpe(chars: list[str], merges: list[str]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is in ``merges``."""
    ranks = {m: i for i, m in enumerate(merges)}
    pieces = [*chars[:-1], chars[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(f"{a} {b}", 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def write_tokenizer(directory: Path, max_length: int = 77) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` (and the saved tokenizer) of the teacher's CLIP BPE to ``directory``.

    Every byte symbol is in the vocabulary (alone and word-final), so any text encodes; merges build each
    grammar word left to right into a single token, as CLIP's own BPE would after training on the grammar.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = bytes_to_unicode()
    symbols = list(table.values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    # Merges are applied by rank, so a word's left-to-right chain can be cut by an earlier word's pair
    # ("r i" of "right" inside "triangle"); re-encode each word with the merges so far and chain its pieces.
    for _ in range(8):
        changed = False
        for word in english_words():
            pieces = _bpe([table[b] for b in word.encode()], merges)
            left = pieces[0]
            for right in pieces[1:]:
                merges.append(f"{left} {right}")
                left = left + right
                if left not in vocab:
                    vocab.append(left)
                changed = True
        if not changed:
            break
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(directory)
    return tokenizer


# ---------------------------------------------------------------------------------------------- components


def build_text_encoder(tokenizer: CLIPTokenizer, config: TeacherConfig) -> CLIPTextModel:
    """A randomly initialised ``CLIPTextModel`` sized by ``config`` for ``tokenizer``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
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


def build_unet(config: TeacherConfig) -> UNet2DConditionModel:
    """A randomly initialised pixel-space ``UNet2DConditionModel`` (3 channels in and out)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=config.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=16,
    )


def build_scheduler() -> DDIMScheduler:
    """DDIM, v-prediction, cosine betas rescaled to zero terminal SNR, trailing timesteps.

    Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed") makes
    the last training step pure noise, so the layout an image will have can only come from the text; with a
    non-zero terminal SNR the first tried teacher read the layout from the leaked low frequencies instead and
    ignored the caption at high noise.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
    )


_VAE_CONST = 256.0  # constant channel that pins each GroupNorm's statistics (error ~ 3 / (2 K^2))
_VAE_SHIFT = 24.0  # bias before SiLU: SiLU(x + 24) = x + 24 up to ~1e-9


def build_identity_vae(channels: int = 8, shift_factor: float | None = None) -> AutoencoderKL:
    """An ``AutoencoderKL`` whose encoder mean and decoder are the identity on images in [-1, 1].

    Every resnet and attention layer is residual with a zeroed output projection, so it passes its input on.
    The only non-residual parts are the final GroupNorm + SiLU of encoder and decoder; the image enters them
    as ``[x, -x, K, -K]`` so each group has mean 0 and standard deviation ``K/2 (1 + O(x^2 / K^2))``, which the
    norm's scale undoes, and a shift of 24 puts SiLU in its linear range. Round trip error is below 1e-4.
    The encoder's log-variance is -30 (the clamp floor), so a sampled latent equals the mean.
    ``shift_factor`` is recorded in the config (SD3's pipeline reads it and needs a number: 0.0).
    """
    from diffusers import AutoencoderKL

    if channels != 8:
        raise ValueError(f"channels must be 8 ([x, -x, K, -K] for 3 colour channels), got {channels}")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(channels,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=1,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=shift_factor,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    k, shift = _VAE_CONST, _VAE_SHIFT
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        for coder, n_out in ((vae.encoder, 6), (vae.decoder, 3)):
            conv_in = coder.conv_in  # 3 -> 8: [x, -x, K, -K]
            for c in range(3):
                conv_in.weight[c, c, 1, 1] = 1.0
                conv_in.weight[3 + c, c, 1, 1] = -1.0
            conv_in.bias[6], conv_in.bias[7] = k, -k
            # GroupNorm over 8 channels: var = K^2/4 + mean(x^2)*3/4 / ... ~ K^2/4, so scale K/2 restores x.
            coder.conv_norm_out.weight.fill_(k / 2)
            coder.conv_norm_out.bias.fill_(shift)
            conv_out = coder.conv_out  # 8 -> n_out, reads the x channels back and removes the shift
            for c in range(3):
                conv_out.weight[c, c, 1, 1] = 1.0
                conv_out.bias[c] = -shift
            if n_out == 6:  # encoder: [mean, logvar]
                conv_out.bias[3:6] = -30.0
    return vae
