"""Tiny random pipelines of the transformer families: PixArt-α/Σ, Sana, SD3 and Flux.

Like :mod:`tests._tiny`, every builder writes a complete pipeline folder with ``save_pretrained``
(``model_index.json`` + components, safetensors only) that the family's diffusers pipeline loads offline, and
that generates 32x32 images on CPU in about a second. The configs follow diffusers' own pipeline tests, but
every tokenizer is built here from :data:`tests._tiny.BILINGUAL_TEXT`: a Unigram model for T5, a BPE for
Gemma, the byte-level CLIP BPE of :mod:`tests._tiny`.

The widths are small but all different, so that a width mixed up in the code under test shows as a shape
error rather than passing silently:

- PixArt: T5 d_model (= ``caption_channels``) 32, transformer inner dim 24, latents 4 x 16 x 16 (patch 2:
  8 x 8 tokens), learned-sigma output (8 channels).
- Sana: Gemma2 hidden (= ``caption_channels``) 16, transformer inner dim 8, ``AutoencoderDC`` latents
  4 x 16 x 16 (patch 2: 8 x 8 tokens), DPM-Solver flow scheduler (``flow_shift`` 3).
- SD3: CLIP-L 16 + CLIP-G 20 = 36 wide (zero-padded to T5's 48 = ``joint_attention_dim``), pooled 12 + 20 = 32
  (``pooled_projection_dim``), latents 4 x 16 x 16 (patch 2).
- Flux: T5 d_model (= ``joint_attention_dim``) 40, CLIP hidden (= ``pooled_projection_dim``) 20, latents
  4 x 16 x 16 packed 2x2 into 8 x 8 tokens of 16, guidance embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests._tiny import (
    _SEED,
    BILINGUAL_TEXT,
    _train_tokenizer_model,
    _unigram_pieces,
    clip_text_config,
    clip_tokenizer,
    write_clip_tokenizer,
)

# The length the T5 tokenizers accept; the pipelines pass their own ``max_sequence_length`` (120 for
# PixArt-α, 300 for Σ, 256 for SD3, 512 for Flux) and T5's relative positions work at any length.
_T5_MAX_LENGTH = 512


def t5_tokenizer():
    """A ``T5Tokenizer`` over the Unigram pieces trained on :data:`BILINGUAL_TEXT` (no sentinel tokens).

    T5's fast tokenizer fixes ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, so the trained pieces are put after
    those three, in their trained order.
    """
    from transformers import T5Tokenizer

    special = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    trained = _unigram_pieces(_train_tokenizer_model("xlmr", BILINGUAL_TEXT))
    pieces = special + [p for p in trained if p[0] not in {"<s>", "<pad>", "</s>", "<unk>", "<mask>"}]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def t5_encoder(tokenizer, d_model: int):
    """A tiny T5 v1.1-style encoder (gated GELU, 2 layers, 4 heads of 8) of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def gemma_tokenizer():
    """A ``GemmaTokenizer`` whose BPE ``vocab`` + ``merges`` are trained on :data:`BILINGUAL_TEXT`.

    The ids follow Gemma's layout (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4), then the
    256 ``<0xNN>`` byte tokens that Gemma's byte fallback needs to encode any text (Sana's long default
    instruction among it), then the trained symbols. Spaces are ``▁`` and ``<bos>`` starts every encoding, as
    in the real tokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Merges stay within words (each starting with its "▁"), as in the real vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(
        list(BILINGUAL_TEXT), trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=special)
    )
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in special + [f"<0x{b:02X}>" for b in range(256)] + list(model["vocab"]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(
        vocab=vocab, merges=merges, model_max_length=8192, add_bos_token=True, add_eos_token=False
    )


def _kl_vae(latent_channels: int = 4, *, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A two-block ``AutoencoderKL`` (scale factor 2: 32x32 images to 16x16 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=32,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def build_pixart(directory: Path, *, sigma: bool = False) -> Path:
    """Save a tiny ``PixArtAlphaPipeline`` (or, with ``sigma``, ``PixArtSigmaPipeline``) to ``directory``.

    T5 width 32 = ``caption_channels``, inner dim 24 (3 heads of 8), 2 layers, learned-sigma output,
    DPM-Solver++ scheduler (linear betas) as the real repos ship. ``sample_size`` is 16, so (like the 256 and
    512 px checkpoints, and as the pipelines decide from ``sample_size == 128``) no added resolution /
    aspect-ratio conditions.
    """
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(_SEED)
    tokenizer = t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(tokenizer, 32),
        vae=_kl_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def build_sana(directory: Path) -> Path:
    """Save a tiny ``SanaPipeline``: Gemma2 of width 16 (= ``caption_channels``), a 1-layer transformer of
    inner dim 8 with patch 2, an ``AutoencoderDC`` (scale 2, 4 latent channels) and the real repos'
    DPM-Solver scheduler in flow mode (``use_flow_sigmas``, ``flow_shift`` 3, ``flow_prediction``)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(_SEED)
    tokenizer = gemma_tokenizer()
    transformer = SanaTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=16,
        sample_size=16,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    scheduler = DPMSolverMultistepScheduler(
        flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction", beta_schedule="linear"
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=Gemma2Model(config),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def build_sd3(directory: Path) -> Path:
    """Save a tiny ``StableDiffusion3Pipeline``.

    CLIP-L is 16 wide (projection 12), CLIP-G 20 wide (projection 20), T5 48 wide: the pipeline concatenates
    the CLIP penultimate states (36) and zero-pads them to 48 before appending T5's states, so
    ``joint_attention_dim`` is 48 and ``pooled_projection_dim`` 12 + 20 = 32. The VAE has SD3's shift and
    scale factors; flow-matching Euler scheduler with shift 3, as SD3 ships.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_projection_dim=24,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_kl_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(clip, hidden=16, projection_dim=12)),
        tokenizer=clip,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(clip, hidden=20, projection_dim=20)),
        tokenizer_2=clip,
        text_encoder_3=t5_encoder(t5, 48),
        tokenizer_3=t5,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the vocab/merges files a real SD3 repo ships beside it.
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(Path(directory) / name)
    return Path(directory)


def build_flux(directory: Path, *, guidance_embeds: bool = True) -> Path:
    """Save a tiny ``FluxPipeline``.

    CLIP (20 wide; its pooler output is ``pooled_projection_dim``) and T5 (40 wide = ``joint_attention_dim``).
    Latents 4 x 16 x 16, packed 2x2 into 8 x 8 tokens of 16 channels; 1 double + 1 single block of 2 heads of
    16 (rope axes 4 + 4 + 8). With ``guidance_embeds`` (default, as FLUX.1-dev) the transformer takes the
    distilled guidance value. Dynamic-shift flow-matching scheduler with Flux's shift settings. The transformer
    config records ``sample_size`` 16 (see the comment below).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(_SEED)
    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=40,
        pooled_projection_dim=20,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    # FluxTransformer2DModel takes no sample_size (FluxPipeline's default side is 128 latents); recorded in the
    # config (diffusers keeps the extra key, with a warning at loading) so ``Teacher.resolution`` is 32 px here
    # like every other fixture rather than 256.
    transformer.register_to_config(sample_size=16)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_kl_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(clip_text_config(clip, hidden=20, projection_dim=20)),
        tokenizer=clip,
        text_encoder_2=t5_encoder(t5, 40),
        tokenizer_2=t5,
        transformer=transformer,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    write_clip_tokenizer(Path(directory) / "tokenizer")
    return Path(directory)
