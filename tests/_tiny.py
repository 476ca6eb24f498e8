"""Tiny random models built from configs, the way diffusers' own tests build theirs.

Every builder writes a real model directory with ``save_pretrained`` so that the tests load it back through
the library's ``from_pretrained`` code, exactly as a user's checkpoint would be loaded. The tokenizers are
real ones with their own small vocabularies: a byte-level BPE for CLIP, a WordPiece for BERT and a Unigram
model for XLM-R, trained with the ``tokenizers`` library on :data:`BILINGUAL_TEXT`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from xling.train.toyworld.teacher import bytes_to_unicode

#: English and Chinese lines the tiny tokenizers are built from (the prompts the tests use among them).
BILINGUAL_TEXT: tuple[str, ...] = (
    "a cat wearing a hat",
    "一只戴帽子的猫",
    "a red circle on the left",
    "左边的红色圆形",
    "a blue square on the right",
    "右边的蓝色正方形",
    "a green triangle at the top",
    "上面的绿色三角形",
    "a yellow circle at the bottom",
    "下面的黄色圆形",
    "a photo of a dog running on the beach",
    "一张小狗在海滩上奔跑的照片",
    "an astronaut riding a horse on the moon",
    "宇航员在月球上骑马",
    "a bowl of noodles with chopsticks",
    "一碗面条和一双筷子",
    "a painting of mountains and rivers in ink",
    "水墨画中的山和河",
    "a dragon flying over the great wall at sunset",
    "日落时飞过长城的龙",
    "a small house under a big tree",
    "大树下的小房子",
    "two people drinking tea in a garden",
    "两个人在花园里喝茶",
)

# Seeds every builder so the fixtures are the same on every machine and every run.
_SEED = 0


def clip_tokenizer(text: tuple[str, ...] = BILINGUAL_TEXT):
    """A ``CLIPTokenizer`` loaded from the small vocabulary :func:`write_clip_tokenizer` writes."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp), text))


def write_clip_tokenizer(directory: Path, text: tuple[str, ...] = BILINGUAL_TEXT) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of a small CLIP byte-level BPE and save a ``CLIPTokenizer`` there.

    The vocabulary holds every byte symbol (alone and word-final ``</w>``), so any text encodes, plus merges
    that build each English word of ``text`` into one token, so the test prompts are not all single bytes.
    """
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    words = sorted({w for line in text for w in line.lower().split() if w.isascii()})
    for word in words:
        chars = [bytes_to_unicode()[b] for b in word.encode()]
        chars[-1] += "</w>"
        left = chars[0]
        for right in chars[1:]:
            merge, token = f"{left} {right}", left + right
            if merge not in merges:
                merges.append(merge)
            if token not in vocab:
                vocab.append(token)
            left = token
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(directory)
    return directory


def clip_text_config(tokenizer, hidden: int = 32, projection_dim: int = 32, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
    )


def build_sd(directory: Path, *, sd2: bool = False) -> Path:
    """Save a tiny SD-1-style (or, with ``sd2``, SD-2-style) ``StableDiffusionPipeline`` to ``directory``.

    SD-1 style: CLIP text encoder (quick_gelu) of width 32, conv-in/out projections in the transformer blocks,
    epsilon prediction. SD-2 style: gelu text encoder of width 32, linear projections in the transformer
    blocks, per-block head dims and v-prediction, as the real SD 2.x checkpoints differ from SD 1.x.
    Latents are 16x16 (images 32x32); the core tests count its ``attn2`` layers rather than assume them.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(_SEED)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 4,
        use_linear_projection=sd2,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_act="gelu" if sd2 else "quick_gelu"))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the vocab/merges files a real SD repo ships beside it.
    write_clip_tokenizer(directory / "tokenizer")
    return directory


def build_sdxl(directory: Path) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline``: two CLIP text encoders (32 + 32 = 64 wide), the second with
    a 32-wide projection for the pooled embedding, and ``text_time`` added conditions (6 time ids of 8 + 32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
    )
    config = clip_text_config(tokenizer, hidden_act="gelu")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        write_clip_tokenizer(directory / name)
    return directory


def _train_tokenizer_model(kind: str, text: tuple[str, ...]):
    """Train a WordPiece ("bert") or Unigram ("xlmr") model on ``text`` with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"
        )
    tok.train_from_iterator(list(text), trainer=trainer)
    return tok


def build_bert_student(directory: Path) -> Path:
    """Save a tiny BERT-like student (width 48, 2 layers, WordPiece tokenizer with per-character Chinese)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(_SEED)
    vocab = _train_tokenizer_model("bert", BILINGUAL_TEXT).get_vocab()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=32)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def build_xlmr_student(directory: Path) -> Path:
    """Save a tiny XLM-R-like student (width 40, 2 layers, SentencePiece-style Unigram tokenizer)."""
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    torch.manual_seed(_SEED)
    tok = _train_tokenizer_model("xlmr", BILINGUAL_TEXT)
    tokenizer = XLMRobertaTokenizer(vocab=_unigram_pieces(tok), model_max_length=32)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32 + 2,  # XLM-R positions start after padding_idx
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    XLMRobertaModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _unigram_pieces(tok) -> list[tuple[str, float]]:
    """The trained Unigram model's (piece, log-probability) list, read from its JSON serialisation."""
    return [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
