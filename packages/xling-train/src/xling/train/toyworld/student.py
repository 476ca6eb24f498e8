"""The toy world's students: tiny character-level BERTs with real fast tokenizers.

Five variants are committed under ``toyworld/assets/``, all in Hugging Face format (``config.json``,
``model.safetensors``, ``tokenizer.json``) so that ``AutoModel`` / ``AutoTokenizer`` load them like any hub
student:

- ``student-random``: the architecture at its seeded random initialisation;
- ``student-pretrained``: the same initialisation after masked-language-model pretraining on the world's
  Chinese captions (training split only, so held-out combinations stay unseen), as the IAP paper compares a
  scratch student with a pretrained one;
- ``student-aligned``: the pretrained student after the ``distill`` recipe (AltCLIP's teacher learning: its
  ``[CLS]`` regressed onto the toy teacher's pooled text embedding), a toy "multilingual CLIP" encoder, the
  kind of frozen student PEA-Diffusion builds on;
- ``student-multilingual``: one student for every target language of the world (Chinese, Japanese, Korean,
  Spanish, Arabic), its tokenizer one token per character over every script, MLM-pretrained on all of their
  training-split captions (the code-switched ``mixed`` captions are not in the corpus, so mixed prompts are
  scored zero-shot);
- ``student-multilingual-aligned``: it, after ``distill`` on captions of every target language.

All are written by ``scripts/pretrain_toy_student.py``; the functions here do the work so the script is a
thin command line and the tests can build a miniature student the same way.

The Chinese students' tokenizer is a WordPiece model whose vocabulary is one token per character: BERT's
pre-tokenizer already splits every CJK character into its own word, so a character vocabulary is exactly
"character level" and needs no trained merges. Kana, Hangul and Latin letters are not split that way, and
BERT's accent stripping would take Hangul syllables apart into jamo (NFD) and drop Japanese voicing marks, so
the multilingual tokenizer (:func:`build_multilingual_tokenizer`) isolates every character itself, composes
(NFC) and lower-cases, and maps each character to one id. Both cover every character their grammars write,
plus ASCII letters, digits and common punctuation so that stray input maps to real tokens rather than
``[UNK]``.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from xling.train.toyworld.names import TOY_STUDENTS

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "ToyStudentConfig",
    "build_multilingual_tokenizer",
    "build_student_model",
    "build_student_tokenizer",
    "mask_tokens",
    "pretrain_mlm",
    "save_student",
    "student_path",
    "world_captions",
    "world_chinese_captions",
]

#: BERT's special tokens, in the order (and so with the ids 0..4) the vocabulary starts with.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Always in the vocabulary beside the grammar's characters: lower-case ASCII (the normaliser lower-cases),
# digits and the punctuation a user is likely to type, half- and full-width.
_BASE_CHARS: str = string.ascii_lowercase + string.digits + ",.:;!?-'\"()" + "，。、：；！？（）"

_ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class ToyStudentConfig:
    """Architecture and pretraining settings of the toy student.

    Attributes:
        hidden_size: Width of the encoder (the student width ``d``; a head projects it to the teacher's).
        num_hidden_layers: Transformer layers.
        num_attention_heads: Attention heads per layer (must divide ``hidden_size``).
        intermediate_size: Width of each feed-forward block.
        max_length: Token window, ``[CLS]`` and ``[SEP]`` included; also the position-embedding table size.
        seed: Seeds the initialisation, the masking and the batch order of pretraining.
        mlm_steps: Optimiser steps of masked-language-model pretraining.
        mlm_batch_size: Captions per pretraining step.
        mlm_lr: Peak AdamW learning rate (linear warmup over 5% of the steps, then cosine to zero).
        mlm_probability: Fraction of non-special tokens selected for prediction (BERT: 0.15, of which 80% become
            ``[MASK]``, 10% a random token, 10% stay).
    """

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 64
    seed: int = 0
    mlm_steps: int = 400
    mlm_batch_size: int = 64
    mlm_lr: float = 1e-3
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.max_length < 4:
            raise ValueError(f"max_length must be at least 4, got {self.max_length}")


def student_path(variant: str = "pretrained") -> Path:
    """Directory of a committed toy student, loadable with ``AutoModel`` / ``AutoTokenizer``.

    Args:
        variant: One of :data:`xling.train.toyworld.TOY_STUDENTS`: ``"pretrained"`` (MLM), ``"random"`` (the
            initialisation) or ``"aligned"`` (MLM, then aligned to the toy teacher's text encoder).

    Returns:
        The variant's directory inside the installed package.

    Raises:
        ValueError: Unknown variant.
        FileNotFoundError: The variant has not been written (run ``scripts/pretrain_toy_student.py``).
    """
    if variant not in TOY_STUDENTS:
        raise ValueError(f"unknown toy student {variant!r}; expected one of {TOY_STUDENTS}")
    path = _ASSETS / f"student-{variant}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"toy student {path} is missing; write it with scripts/pretrain_toy_student.py"
        )
    return path


def world_captions(
    split: str = "train", variants: int = 8, seed: int = 0, languages: Sequence[str] = ("zh",)
) -> list[str]:
    """Every distinct caption the toy grammars write in ``languages`` for the scenes of one split.

    Each scene of the split (single objects and two-object compositions) is written once in canonical form and
    ``variants`` times with a seeded paraphrase generator in each language, then duplicates are dropped (order
    kept).

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"`` (both).
        variants: Paraphrase draws per scene and language beside the canonical caption.
        seed: Seeds the paraphrase generator.
        languages: Language codes (``xling.train.toyworld.world.LANGUAGES``, or ``"mixed"``).

    Returns:
        The captions, deterministic for a given ``(split, variants, seed, languages)``.
    """
    import numpy as np

    from xling.train.toyworld import world

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if variants < 0:
        raise ValueError(f"variants must be >= 0, got {variants}")
    scenes = _world_scenes(world, split)
    rng = np.random.default_rng(seed)
    captions: dict[str, None] = {}
    for scene in scenes:
        for language in languages:
            captions[world.caption(scene, language)] = None
            for _ in range(variants):
                captions[world.caption(scene, language, rng=rng)] = None
    return list(captions)


def world_chinese_captions(split: str = "train", variants: int = 8, seed: int = 0) -> list[str]:
    """:func:`world_captions` in Chinese alone (the Chinese students' corpus)."""
    return world_captions(split, variants, seed, languages=("zh",))


def _world_scenes(world, split: str) -> list:
    """Scenes of one split from the world module: single objects and, when the world offers them, pairs."""
    splits = ("train", "heldout") if split == "all" else (split,)
    scenes: list = []
    for name in splits:
        scenes.extend(world.all_single_scenes(split=name))
        if hasattr(world, "all_pair_scenes"):
            scenes.extend(world.all_pair_scenes(split=name))
    return scenes


def build_student_tokenizer(
    texts: Iterable[str], max_length: int = 64, extra_chars: str = _BASE_CHARS
) -> PreTrainedTokenizerBase:
    """A fast BERT tokenizer with one WordPiece token per character of ``texts`` (plus ``extra_chars``).

    Args:
        texts: Text whose characters must all be in the vocabulary (whitespace is skipped; Latin letters are
            lower-cased as the normaliser does).
        max_length: ``model_max_length`` of the tokenizer.
        extra_chars: Characters always added after the text's own.

    Returns:
        A ``transformers`` fast ``BertTokenizer`` (tokenizers backend), ready for ``save_pretrained``.
    """
    from transformers import BertTokenizer

    chars: dict[str, None] = {}
    for text in texts:
        for ch in text.lower():
            if not ch.isspace():
                chars[ch] = None
    for ch in extra_chars:
        chars[ch] = None
    # Sorted so the ids do not depend on the order the captions came in.
    vocab = list(SPECIAL_TOKENS) + sorted(c for c in chars if c not in SPECIAL_TOKENS)
    tokenizer = BertTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        do_lower_case=True,
        tokenize_chinese_chars=True,
        model_max_length=max_length,
    )
    return tokenizer


def build_multilingual_tokenizer(
    texts: Iterable[str], max_length: int = 64, extra_chars: str = _BASE_CHARS
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with exactly one token per character of ``texts`` (plus ``extra_chars``), any script.

    Normalisation is NFC then lower case; every non-space character is its own piece (spaces only separate);
    the template is BERT's (``[CLS] text [SEP]``, the same special tokens and ids 0..4), so a ``BertModel``
    reads it as it reads the Chinese tokenizer. Saved, it is ``tokenizer.json`` with ``tokenizer_class``
    ``PreTrainedTokenizerFast``, which ``AutoTokenizer`` loads as it is.

    Args:
        texts: Text whose characters must all be in the vocabulary.
        max_length: ``model_max_length`` of the tokenizer.
        extra_chars: Characters always added after the text's own.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``, ready for ``save_pretrained``.
    """
    import unicodedata

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars: dict[str, None] = {}
    for text in (*texts, extra_chars):
        for ch in unicodedata.normalize("NFC", text).lower():
            if not ch.isspace():
                chars[ch] = None
    vocab = list(SPECIAL_TOKENS) + sorted(c for c in chars if c not in SPECIAL_TOKENS)
    ids = {token: i for i, token in enumerate(vocab)}
    backend = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def build_student_model(tokenizer: PreTrainedTokenizerBase, config: ToyStudentConfig) -> BertModel:
    """The randomly initialised toy student (``BertModel`` with its pooler), seeded by ``config.seed``."""
    from transformers import BertModel

    torch.manual_seed(config.seed)
    return BertModel(_bert_config(tokenizer, config)).eval()


def _bert_config(tokenizer: PreTrainedTokenizerBase, config: ToyStudentConfig):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_length,
        pad_token_id=tokenizer.pad_token_id,
    )


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    first_regular_id: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick ``probability`` of the non-special tokens; 80% ``[MASK]``, 10% random, 10% kept.

    At least one token per row is picked so no caption contributes an empty target.

    Args:
        input_ids: Token ids ``[B, L]``.
        special_mask: ``[B, L]`` bool, True at ``[CLS]``, ``[SEP]`` and padding (never picked).
        mask_token_id: Id of ``[MASK]``.
        vocab_size: Size of the vocabulary (random replacements draw from ``[first_regular_id, vocab_size)``).
        first_regular_id: First id that is not a special token.
        probability: Selection probability in ``(0, 1)``.
        generator: Seeded generator for every random draw.

    Returns:
        ``(inputs [B, L], labels [B, L])``: the corrupted ids, and the original ids at picked positions with
        ``-100`` elsewhere (ignored by the cross-entropy).
    """
    if input_ids.shape != special_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and special_mask {tuple(special_mask.shape)} differ in shape"
        )
    scores = torch.rand(input_ids.shape, generator=generator)
    scores = scores.masked_fill(special_mask, 2.0)
    picked = scores < probability
    # Guarantee one target per row: the lowest-scoring regular token.
    first = scores.argmin(dim=1, keepdim=True)  # [B, 1]
    has_regular = (~special_mask).any(dim=1, keepdim=True)
    picked.scatter_(1, first, has_regular | picked.gather(1, first))
    labels = input_ids.masked_fill(~picked, -100)
    action = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[picked & (action < 0.8)] = mask_token_id
    swap = picked & (action >= 0.8) & (action < 0.9)
    inputs[swap] = torch.randint(first_regular_id, vocab_size, (int(swap.sum()),), generator=generator)
    return inputs, labels


def pretrain_mlm(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    config: ToyStudentConfig,
    *,
    log_every: int = 100,
    log=print,
) -> tuple[BertModel, dict[str, float]]:
    """Masked-language-model pretraining of the toy student on ``captions`` (CPU-sized, seeded).

    The MLM model starts from the same seeded weights as :func:`build_student_model`; after training, its
    encoder is copied into a ``BertModel`` whose pooler keeps that seeded initialisation (MLM never trains it).

    Args:
        tokenizer: The student tokenizer.
        captions: Chinese captions to sample batches from (with replacement, seeded).
        config: Architecture and optimisation settings.
        log_every: Steps between progress lines (0 disables them).
        log: Callable receiving each progress line.

    Returns:
        ``(model, stats)``: the pretrained ``BertModel`` in eval mode, and ``stats`` with the final smoothed
        loss, masked-token accuracy on a fixed probe batch before and after training, steps and seconds.
    """
    import time

    from transformers import BertForMaskedLM

    if not captions:
        raise ValueError("captions is empty: MLM pretraining needs at least one caption")
    start = time.perf_counter()
    base = build_student_model(tokenizer, config)
    mlm = BertForMaskedLM(base.config)
    # Same starting encoder as the random variant, so the two committed students differ only by pretraining.
    mlm.bert.load_state_dict(base.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(config.seed)
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    first_regular = max(special_ids) + 1

    def batch(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = tokenizer(
            list(texts), padding=True, truncation=True, max_length=config.max_length, return_tensors="pt"
        )
        special = torch.isin(enc["input_ids"], torch.tensor(special_ids))
        inputs, labels = mask_tokens(
            enc["input_ids"],
            special,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            first_regular_id=first_regular,
            probability=config.mlm_probability,
            generator=generator,
        )
        return inputs, enc["attention_mask"], labels, enc["input_ids"]

    probe_texts = [captions[i % len(captions)] for i in range(min(len(captions), 256))]
    probe = batch(probe_texts)

    def probe_accuracy() -> float:
        mlm.eval()
        with torch.no_grad():
            logits = mlm(input_ids=probe[0], attention_mask=probe[1]).logits
        target = probe[2] != -100
        return float((logits.argmax(-1)[target] == probe[2][target]).float().mean())

    accuracy_before = probe_accuracy()
    optimizer = torch.optim.AdamW(mlm.parameters(), lr=config.mlm_lr, weight_decay=0.01)
    warmup = max(1, config.mlm_steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.mlm_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    smoothed = float("nan")
    mlm.train()
    for step in range(config.mlm_steps):
        rows = torch.randint(len(captions), (config.mlm_batch_size,), generator=generator).tolist()
        inputs, attention_mask, labels, _ = batch([captions[i] for i in rows])
        loss = mlm(input_ids=inputs, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mlm.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smoothed = (
            float(loss.detach()) if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * float(loss.detach())
        )
        if log_every and (step + 1) % log_every == 0:
            log(f"mlm step {step + 1}/{config.mlm_steps} loss {smoothed:.4f}")
    accuracy_after = probe_accuracy()

    base.load_state_dict(mlm.bert.state_dict(), strict=False)
    stats = {
        "mlm_loss": smoothed,
        "probe_masked_accuracy_before": accuracy_before,
        "probe_masked_accuracy_after": accuracy_after,
        "steps": float(config.mlm_steps),
        "seconds": time.perf_counter() - start,
    }
    return base.eval(), stats


def save_student(
    directory: str | Path,
    model: BertModel,
    tokenizer: PreTrainedTokenizerBase,
    config: ToyStudentConfig,
    metadata: dict | None = None,
) -> Path:
    """Write a student directory: model (safetensors), tokenizer, and ``toy_student.json`` describing it.

    Args:
        directory: Target directory (created).
        model: The ``BertModel`` to save.
        tokenizer: Its tokenizer.
        config: The settings it was built with (recorded).
        metadata: Extra JSON-serialisable facts to record (variant, pretraining stats, corpus size).

    Returns:
        ``directory`` as a ``Path``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    record = {"config": asdict(config), **(metadata or {})}
    (directory / "toy_student.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return directory
