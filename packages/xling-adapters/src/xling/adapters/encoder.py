"""The one Hugging Face student encoder: tokenizer + ``AutoModel`` + optional LoRA + head.

Training and inference use this same class. It satisfies ``xling.core``'s ``StudentEncoder`` protocol
structurally (``hidden_size``, ``encode``, ``__call__``) without importing ``xling.core``.

Tokenisation and long prompts
    Every prompt is cut into windows of ``window`` tokens (``min(max_length, the student's own limit)``),
    each window ``prefix + body + suffix`` with the student's own special tokens (``[CLS] ... [SEP]`` for
    BERT, ``<s> ... </s>`` for XLM-R) and right-padded to ``window``, as CLIP pads to 77. A prompt longer
    than one window is **encoded in chunks** (never silently cut): window ``c`` holds body tokens
    ``[c * body, (c + 1) * body)``, each window is encoded and mapped by the head on its own, and the
    results are concatenated along the sequence, the way diffusers' long-prompt community pipelines
    concatenate 77-token CLIP chunks. In a batch whose prompts need different numbers of windows, the
    shorter prompts get filler windows holding the encoding of the empty prompt with attention mask 0.

Pooled vector (``encode().pooled``), per student type (``pooling="auto"``)
    * BERT, RoBERTa, XLM-R and any tokenizer that adds a start token: the first token of the first window
      ([CLS] / ``<s>``), as AltDiffusion does.
    * CLIP text encoders: the end-of-text token of the first window (CLIP's own pooling).
    * Students without a start token (T5 / mT5 encoders): the mean of every real token.
    The SDXL ``pooled_prompt_embeds`` come from the head applied to the first window.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xling.adapters.card import ModelCardFacts, write_model_card
from xling.adapters.config import FORMAT_VERSION, LoraHeadConfig
from xling.adapters.head import AdapterHead, masked_mean
from xling.adapters.io import (
    WeightFileError,
    check_model_folder,
    check_widths,
    load_head,
    record_weights,
)

#: ``config.json`` ``format`` value of a saved language encoder directory.
ENCODER_FORMAT = "xling-language-encoder"
StudentWeights = Literal["frozen", "lora", "unfrozen"]
Pooling = Literal["auto", "cls", "eos", "mean"]
_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "altclip")
#: Keys of the ``teacher`` record in an encoder's ``config.json``.
TEACHER_KEYS = ("name_or_path", "family", "teacher_width", "pooled_width")


def looks_like_local_path(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` names a folder on disk rather than a Hugging Face Hub id.

    A Hub id is ``name`` or ``namespace/name``; an absolute path, one starting with ``.`` or ``~``, one with a
    backslash or more than one ``/``, or any name that exists on disk is a local path.
    """
    text = os.fspath(name)
    if Path(text).exists():
        return True
    return Path(text).is_absolute() or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1


def _resolve_adapter_dir(directory: Path) -> Path:
    """``directory`` itself; a run folder (``xling train`` output) fails with the folder to pass instead.

    Transformers' ``from_pretrained`` does not look into subfolders unless told, so neither does this: the
    error names ``DIR/adapter`` so the caller can fix the path at once.
    """
    cfg_path = directory / "config.json"
    if cfg_path.is_file():
        return directory
    nested = directory / "adapter" / "config.json"
    if nested.is_file():
        raise FileNotFoundError(
            f"{directory} is a run folder (the output of `xling train`), not an adapter; "
            f"pass {directory / 'adapter'}"
        )
    raise FileNotFoundError(f"no language-encoder config at {cfg_path}")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'the language encoder needs transformers: pip install "xling-adapters[transformers]"'
        ) from e
    return transformers


@dataclass
class StudentHiddenStates:
    """The student encoder's own output, before the head (what :meth:`LanguageEncoder.encode` returns).

    Attributes:
        hidden_states: ``[B, C * W, d]`` student hidden states, ``C`` windows of ``W`` tokens.
        attention_mask: ``[B, C * W]`` 1 for real tokens (special tokens included), 0 for padding and fillers.
        pooled: ``[B, d]`` the pooled vector (see the module docstring for the rule per student type).
        num_chunks: ``C``.
    """

    hidden_states: Tensor
    attention_mask: Tensor
    pooled: Tensor
    num_chunks: int = 1


@dataclass
class Conditioning:
    """Teacher-shaped text conditioning, what calling a :class:`LanguageEncoder` returns.

    ``xling.core.Conditioning`` (the teacher's) has the same fields; the two packages may not import each other.

    Attributes:
        prompt_embeds: ``[B, C * L', D]`` teacher-width embeddings (``L'`` tokens per window from the head).
        pooled_prompt_embeds: ``[B, P]`` (SDXL), or ``None`` when the head has no pooled output.
        attention_mask: ``[B, C * L']`` 1 where the embedding stands for real input.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None
    attention_mask: Tensor


@dataclass
class LanguageEncoderConfig:
    """How a :class:`LanguageEncoder` tokenises, which hidden layer it reads, and how its student was trained.

    Attributes:
        student_model: name or path of the student encoder (the base weights of a frozen or LoRA student).
        language: language code of the prompts (``"zh"``).
        max_length: window length ``W`` in tokens, special tokens included (capped by the student's limit).
        hidden_layer: which hidden state feeds the head: ``-1`` the final output (``last_hidden_state``),
            ``-2`` the penultimate layer (as SDXL reads CLIP), etc.
        pooling: ``"auto"``, ``"cls"``, ``"eos"`` or ``"mean"`` (see the module docstring).
        student_weights: ``"frozen"`` (PEA, MTN), ``"lora"`` (LoRA heads) or ``"unfrozen"`` (last layers or the
            whole student trained, as in IAP and AltDiffusion).
        format_version: on-disk format version.
    """

    student_model: str
    language: str = "zh"
    max_length: int = 77
    hidden_layer: int = -1
    pooling: Pooling = "auto"
    student_weights: StudentWeights = "frozen"
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.student_model, str) or not self.student_model:
            raise ValueError(f"`student_model` must be a non-empty str, got {self.student_model!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 3:
            raise ValueError(f"`max_length` must be an int >= 3, got {self.max_length!r}")
        if isinstance(self.hidden_layer, bool) or not isinstance(self.hidden_layer, int):
            raise ValueError(f"`hidden_layer` must be an int, got {self.hidden_layer!r}")
        if self.pooling not in ("auto", "cls", "eos", "mean"):
            raise ValueError(f"`pooling` must be 'auto', 'cls', 'eos' or 'mean', got {self.pooling!r}")
        if self.student_weights not in ("frozen", "lora", "unfrozen"):
            raise ValueError(
                f"`student_weights` must be 'frozen', 'lora' or 'unfrozen', got {self.student_weights!r}"
            )


def _load_student_model(path: str | os.PathLike[str]) -> nn.Module:
    """Load the encoder part of a student: ``AutoModel``, the T5 encoder alone, or CLIP's text model.

    Only safetensors load, from a local folder or the Hub, and the folder's own code (``auto_map``) never
    runs. A local folder is checked first (:func:`~xling.adapters.io.check_model_folder`: no pickles, each
    header readable), so a bad file fails naming itself; hashes are checked by the caller, before this.

    Raises:
        WeightFileError: only pickled weights, or an unreadable (truncated) file.
        ValueError: transformers cannot load the folder; the message names it.
    """
    transformers = _require_transformers()
    local = Path(os.fspath(path)).expanduser()
    is_local = local.is_dir()
    if is_local:
        check_model_folder(local)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    model_type = config.model_type
    if model_type in ("t5", "mt5", "umt5"):
        name = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}[model_type]
        cls = getattr(transformers, name)
    elif model_type == "clip":
        cls = transformers.CLIPTextModel
    else:
        cls = transformers.AutoModel
    try:
        return cls.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    except torch.cuda.OutOfMemoryError:  # a RuntimeError, but not the folder's fault
        raise
    except (OSError, RuntimeError, ValueError) as e:  # a SafetensorError is caught by the header check
        if not is_local:
            raise
        raise ValueError(f"cannot load the student in {local}: {e}") from e


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _as_prompt_list(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"`{name}` must be a str or a sequence of str, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"`{name}` is empty")
    return list(prompts)


class LanguageEncoder(nn.Module):
    """Prompts in the student's language -> the teacher's ``prompt_embeds`` (+ pooled for SDXL).

    Build with :meth:`from_student` (training) or :meth:`from_pretrained` (a saved adapter directory).

    Args:
        tokenizer: the student's Hugging Face tokenizer.
        student: the student encoder (``PreTrainedModel``, or a peft ``PeftModel`` around one).
        head: an :class:`~xling.adapters.head.AdapterHead` whose ``student_width`` is the student's width.
        config: a :class:`LanguageEncoderConfig`.
    """

    def __init__(
        self, tokenizer: Any, student: nn.Module, head: AdapterHead, config: LanguageEncoderConfig
    ) -> None:
        super().__init__()
        if not isinstance(head, AdapterHead):
            raise TypeError(f"`head` must be an AdapterHead, got {type(head).__name__}")
        self.tokenizer = tokenizer
        self.student = student
        self.head = head
        self.config = config
        #: The teacher the encoder was trained for (``TEACHER_KEYS``), or ``None`` when not recorded.
        self.teacher: dict[str, Any] | None = None
        #: The adapter directory it was loaded from (:meth:`from_pretrained`); its forward then refuses
        #: non-finite embeddings, naming it. ``None`` while training (the loop checks the loss instead).
        self.source: Path | None = None
        base_config = _base_model(student).config
        self.model_type: str = getattr(base_config, "model_type", "")
        check_widths(head.config, student_width=self.hidden_size, where="the student")
        self._prefix, self._suffix = self._special_tokens()
        self.window: int = self._window()
        if self.window - len(self._prefix) - len(self._suffix) < 1:
            raise ValueError(f"window {self.window} leaves no room between the special tokens")
        pad = tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else (tokenizer.eos_token_id or 0)

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the student's hidden states."""
        cfg = _base_model(self.student).config
        return int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def pooling(self) -> str:
        """The pooling rule in force (``"auto"`` resolved)."""
        if self.config.pooling != "auto":
            return self.config.pooling
        if self.model_type.startswith("clip"):
            return "eos"
        return "cls" if self._prefix else "mean"

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """Ids the tokenizer puts before and after a text (found by tokenising a probe with and without)."""
        probe = "a"
        full = list(self.tokenizer(probe, add_special_tokens=True)["input_ids"])
        plain = list(self.tokenizer(probe, add_special_tokens=False)["input_ids"])
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        raise ValueError(f"cannot locate the special tokens of {type(self.tokenizer).__name__}")

    def _window(self) -> int:
        limits = [self.config.max_length]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limits.append(tok_max)
        cfg = _base_model(self.student).config
        positions = getattr(cfg, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            # RoBERTa-style position ids start after padding_idx, so pad_token_id + 1 positions are unusable.
            offset = (getattr(cfg, "pad_token_id", 0) or 0) + 1 if self.model_type in _ROBERTA_LIKE else 0
            limits.append(positions - offset)
        return min(limits)

    # ---- tokenisation -----------------------------------------------------------------------------------
    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Cut prompts into padded windows.

        Returns:
            ``input_ids [B, C, W]``, ``token_mask [B, C, W]`` (what the student attends to, filler windows
            included) and ``chunk_valid [B, C]`` (False for filler windows).
        """
        prompts = _as_prompt_list(prompts)
        body = self.window - len(self._prefix) - len(self._suffix)
        # verbose=False: over-long prompts are expected here (they are chunked), not an error
        ids = self.tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        chunks = [[seq[i : i + body] for i in range(0, len(seq), body)] or [[]] for seq in ids]
        c = max(len(ch) for ch in chunks)
        input_ids = torch.full((len(prompts), c, self.window), self._pad_id, dtype=torch.long)
        token_mask = torch.zeros((len(prompts), c, self.window), dtype=torch.long)
        chunk_valid = torch.zeros((len(prompts), c), dtype=torch.bool)
        for b, prompt_chunks in enumerate(chunks):
            for j in range(c):
                piece = prompt_chunks[j] if j < len(prompt_chunks) else []  # filler = the empty prompt
                toks = self._prefix + list(piece) + self._suffix
                input_ids[b, j, : len(toks)] = torch.tensor(toks, dtype=torch.long)
                token_mask[b, j, : len(toks)] = 1
                chunk_valid[b, j] = j < len(prompt_chunks)
        return input_ids, token_mask, chunk_valid

    # ---- forward ----------------------------------------------------------------------------------------
    def _run_student(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Student on every window: ``hidden [B*C, W, d]``, ``token_mask [B*C, W]``, ``chunk_valid [B, C]``,
        ``per-window pooled [B*C, d]``."""
        input_ids, token_mask, chunk_valid = self.tokenize(prompts)
        b, c, w = input_ids.shape
        device = self.device
        flat_ids = input_ids.view(b * c, w).to(device)
        flat_mask = token_mask.view(b * c, w).to(device)
        want_all = self.config.hidden_layer != -1
        out = self.student(input_ids=flat_ids, attention_mask=flat_mask, output_hidden_states=want_all)
        hidden = (
            out.hidden_states[self.config.hidden_layer] if want_all else out.last_hidden_state
        )  # [B*C, W, d]
        rule = self.pooling
        if rule == "cls":
            pooled = hidden[:, 0]
        elif rule == "eos":
            last = flat_mask.sum(dim=1).clamp_min(1) - 1  # index of the final real token
            pooled = hidden[torch.arange(b * c, device=device), last]
        else:
            pooled = masked_mean(hidden, flat_mask)
        return hidden, flat_mask, chunk_valid.to(device), pooled

    def encode(self, prompts: str | Sequence[str]) -> StudentHiddenStates:
        """Student hidden states of ``prompts``.

        Returns:
            :class:`StudentHiddenStates`: ``hidden_states [B, C*W, d]``, ``attention_mask [B, C*W]``,
            ``pooled [B, d]``, ``num_chunks C``.
        """
        hidden, mask, valid, pooled = self._run_student(prompts)
        b, c = valid.shape
        w = hidden.shape[1]
        mask = (mask.view(b, c, w) * valid.unsqueeze(-1)).view(b, c * w)
        if self.pooling == "mean":
            pooled_out = masked_mean(hidden.reshape(b, c * w, -1), mask)
        else:
            pooled_out = pooled.view(b, c, -1)[:, 0]
        return StudentHiddenStates(
            hidden_states=hidden.reshape(b, c * w, -1), attention_mask=mask, pooled=pooled_out, num_chunks=c
        )

    def forward(self, prompts: str | Sequence[str]) -> Conditioning:
        """Teacher-shaped embeddings of ``prompts`` (the head applied window by window).

        Returns:
            :class:`Conditioning`: ``prompt_embeds [B, C*L', D]``, ``pooled_prompt_embeds [B, P]`` or
            ``None`` (from the first window), ``attention_mask [B, C*L']``.
        """
        hidden, mask, valid, pooled = self._run_student(prompts)
        b, c = valid.shape
        head_dtype = next(self.head.parameters()).dtype
        out = self.head(hidden.to(head_dtype), mask, pooled=pooled.to(head_dtype))
        embeds = out.prompt_embeds  # [B*C, L', D]
        n = embeds.shape[1]
        out_mask = out.attention_mask if out.attention_mask is not None else torch.ones_like(mask)
        out_mask = (out_mask.view(b, c, n) * valid.unsqueeze(-1)).view(b, c * n)
        pooled_out = out.pooled_prompt_embeds
        if pooled_out is not None:
            pooled_out = pooled_out.view(b, c, -1)[:, 0]
        if self.source is not None:
            self._check_finite(embeds, pooled_out)
        return Conditioning(
            prompt_embeds=embeds.reshape(b, c * n, -1),
            pooled_prompt_embeds=pooled_out,
            attention_mask=out_mask,
        )

    def _check_finite(self, embeds: Tensor, pooled: Tensor | None) -> None:
        """Refuse NaN / inf output of a loaded adapter: a pipeline would turn it into a black image."""
        finite = torch.isfinite(embeds).all()
        if pooled is not None:
            finite = finite & torch.isfinite(pooled).all()
        if not bool(finite):  # one device sync per call
            raise ValueError(
                f"the adapter {self.source} produced non-finite prompt_embeds (NaN or inf) in {embeds.dtype}: "
                "its weights are damaged (a file modified after saving, or a run that diverged) or overflow "
                "in this dtype; no image is made from them"
            )

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_student(
        cls,
        student_path: str | os.PathLike[str],
        head: AdapterHead,
        *,
        lora: LoraHeadConfig | None = None,
        unfreeze_last: int | None = None,
        max_length: int = 77,
        hidden_layer: int = -1,
        pooling: Pooling = "auto",
        language: str | None = None,
        device: torch.device | str | None = None,
    ) -> LanguageEncoder:
        """Build a trainable encoder from a Hugging Face student directory (or hub name) and a head.

        The student is frozen, LoRA-adapted (``lora``) or trained in its last ``unfreeze_last`` layers;
        the head is always trainable.

        Args:
            student_path: directory (or name) with the student's config, weights and tokenizer.
            head: the head; its ``student_width`` must equal the student's hidden size.
            lora: LoRA on the student's attention projections (needs ``[peft]``).
            unfreeze_last: train the student's last ``k`` layers instead.
            max_length: window length in tokens (capped by the student's own limit).
            hidden_layer: which hidden state feeds the head (``-1`` last).
            pooling: pooled-vector rule (see the module docstring).
            language: prompt language; defaults to the head's ``language``.
            device: where to put student and head.

        Raises:
            ValueError: both ``lora`` and ``unfreeze_last``; the head's width differs from the student's.
        """
        transformers = _require_transformers()
        from xling.adapters.lora import apply_lora, unfreeze_last_layers

        if lora is not None and unfreeze_last is not None:
            raise ValueError("pass either `lora` or `unfreeze_last`, not both")
        tokenizer = transformers.AutoTokenizer.from_pretrained(student_path, trust_remote_code=False)
        model = _load_student_model(student_path)
        model.requires_grad_(False)
        mode: StudentWeights = "frozen"
        if lora is not None:
            model = apply_lora(model, lora)
            mode = "lora"
        elif unfreeze_last is not None:
            unfreeze_last_layers(model, unfreeze_last)
            mode = "unfrozen"
        if head.config.student_model is None:
            head.config.student_model = str(student_path)
        config = LanguageEncoderConfig(
            student_model=str(student_path),
            language=language or head.config.language,
            max_length=max_length,
            hidden_layer=hidden_layer,
            pooling=pooling,
            student_weights=mode,
        )
        encoder = cls(tokenizer, model, head, config)
        return encoder.to(device) if device is not None else encoder

    def set_trainable(self, backbone: bool) -> None:
        """Choose what trains: the head always; the student's own weights too when ``backbone``.

        Training the backbone is recorded in ``config.student_weights`` (``"unfrozen"``), which is how
        :meth:`save_pretrained` knows that the student's weights must be written; freezing it again keeps that
        record, since the weights may already differ from the base student's. A LoRA student keeps ``"lora"``
        with only its LoRA weights trainable.

        The student's own pooler (BERT/XLM-R ``pooler.dense``) stays frozen: the head pools from the hidden
        states, so the pooler never gets a gradient, and a trainable parameter without one stalls DDP's reduction.

        Raises:
            ValueError: ``backbone`` on a LoRA student (train its LoRA weights, or build it without LoRA).
        """
        lora = self.config.student_weights == "lora"
        if backbone and lora:
            raise ValueError(
                "a LoRA student trains its LoRA weights only; build it without `lora` to train it all"
            )
        for name, p in self.student.named_parameters():
            p.requires_grad_((backbone and ".pooler." not in f".{name}") or (lora and "lora_" in name))
        self.head.requires_grad_(True)
        if backbone:
            self.config.student_weights = "unfrozen"

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        include_student: bool = False,
        teacher: str | os.PathLike[str] | None = None,
        card: ModelCardFacts | None = None,
    ) -> Path:
        """Write a self-contained adapter directory.

        Layout::

            config.json        {"format": "xling-language-encoder", "format_version": 1, "layout": {...},
                                "encoder": {...}, "teacher": {...}}
            README.md          the Hub model card (xling.adapters.card): metadata, parts, recipe, usage
            grid.png           the run's image grid the card shows, when ``card.grid`` names one
            head/              config.json + model.safetensors
            tokenizer/         the student's tokenizer (save_pretrained)
            student/           the student's weights (safetensors), when it was trained or include_student
            student_lora/      peft adapter (adapter_config.json + adapter_model.safetensors), for a LoRA student
            student_merged/    a LoRA student with its LoRA merged in (safetensors): inference without peft

        A frozen student is not copied unless ``include_student``: loading reads it from ``student_model``.
        ``config.json["weights_sha256"]`` maps each weight file under ``student/``, ``student_lora/`` and
        ``student_merged/`` (path relative to the directory) to its SHA-256; ``head/config.json`` records the
        head's. :meth:`from_pretrained` checks them before reading a tensor.

        Args:
            directory: created if missing.
            include_student: also copy a frozen (or a LoRA student's base) student's weights.
            teacher: the path or Hub id of the teacher the encoder was trained for (``"toy"`` for the toy
                world's). Recorded as ``config.json["teacher"]`` with the head's family and widths, so
                ``xling generate`` / ``xling eval`` default to it; ``None`` keeps :attr:`teacher` (the record
                of a loaded adapter), if any.
            card: what the model card adds to the folder's own record (recipe, config, evaluation, grid,
                license, repo id; :class:`~xling.adapters.card.ModelCardFacts`); ``None``: a card of the folder's
                record alone.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.head.save_pretrained(directory / "head")
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        mode = self.config.student_weights
        base = _base_model(self.student)
        if mode == "frozen" and any(p.requires_grad for p in base.parameters()):
            # Saved as frozen, the trained weights would be replaced by the base student's on load.
            raise ValueError(
                "the student has trainable weights but its config says 'frozen'; call "
                "set_trainable(backbone=True) before training it so that saving writes its weights"
            )
        layout: dict[str, str | None] = {
            "head": "head",
            "tokenizer": "tokenizer",
            "student": None,
            "student_lora": None,
        }
        if mode == "lora":
            from xling.adapters.lora import save_lora

            save_lora(self.student, directory / "student_lora")
            layout["student_lora"] = "student_lora"
            # Inference copy: a deep copy is merged so the live student keeps training its LoRA weights.
            merged = copy.deepcopy(self.student).merge_and_unload()
            merged.save_pretrained(str(directory / "student_merged"), safe_serialization=True)
            layout["student_merged"] = "student_merged"
            if include_student:
                # the base weights alone, so the peft adapter is applied once on load
                _save_plain(base, directory / "student")
                layout["student"] = "student"
        elif mode == "unfrozen" or include_student:
            base.save_pretrained(str(directory / "student"), safe_serialization=True)
            layout["student"] = "student"
        encoder_cfg = dataclasses.asdict(self.config)
        parts = [
            directory / layout[k] for k in ("student", "student_lora", "student_merged") if layout.get(k)
        ]
        payload: dict[str, Any] = {
            "format": ENCODER_FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": layout,
            "encoder": encoder_cfg,
            "weights_sha256": record_weights(directory, *parts),
        }
        if teacher is not None:
            hc = self.head.config
            self.teacher = {
                "name_or_path": os.fspath(teacher),
                "family": hc.teacher_family,
                "teacher_width": hc.teacher_width,
                "pooled_width": hc.pooled_width,
            }
        if self.teacher is not None:
            payload["teacher"] = self.teacher
        (directory / "config.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        write_model_card(directory, card)
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        include_student: bool = False,
        teacher: str | os.PathLike[str] | None = None,
        card: ModelCardFacts | None = None,
        license: str | None = None,
    ) -> Any:
        """Save the adapter (:meth:`save_pretrained`) into a temporary folder and upload it to ``repo_id``.

        As transformers' ``push_to_hub``: the repo is created when missing (``private`` sets its visibility), a
        ``revision`` branch is created from the default branch when missing, ``create_pr`` opens a pull request
        instead of committing. The model card names ``repo_id`` in its usage snippet. Load it back with
        ``LanguageEncoder.from_pretrained(repo_id)`` or ``attach(pipe, repo_id)``.

        Args:
            repo_id: ``"org/name"``.
            commit_message: default ``"Upload xling adapter"``.
            private: visibility of a repo this creates.
            token: a Hub token with write access (``None``: the one ``huggingface_hub`` finds).
            revision: the branch to commit to (default: the default branch).
            create_pr: open a pull request with the upload.
            include_student: upload a frozen (or a LoRA student's base) student too. Without it, a loader reads
                the student from ``config.student_model``: a Hub id works anywhere, a local path only where it
                exists (a warning says so).
            teacher: as :meth:`save_pretrained`.
            card: the model card's facts (recipe, config, evaluation, grid); ``repo_id`` and ``license`` are set
                from the arguments.
            license: the card's license (default ``"apache-2.0"`` for the toy teacher, ``"other"`` otherwise).

        Returns:
            ``huggingface_hub``'s ``CommitInfo`` (a ``str`` subclass: the commit URL; ``.repo_url``,
            ``.oid``, ``.pr_url``).

        Raises:
            ConnectionError: ``HF_HUB_OFFLINE`` is set (checked before anything is saved).
        """
        import tempfile
        import warnings

        from xling.adapters.hub import require_online, upload_adapter

        require_online(repo_id)
        if (
            not include_student
            and self.config.student_weights in ("frozen", "lora")
            and looks_like_local_path(self.config.student_model)
        ):
            warnings.warn(
                f"pushing {repo_id} without its student, which is the local folder {self.config.student_model}: "
                "whoever loads the adapter needs that student (student_path=...); pass include_student=True "
                "to upload it too",
                stacklevel=2,
            )
        facts = dataclasses.replace(card or ModelCardFacts(), repo_id=repo_id)
        if license is not None:
            facts.license = license
        with tempfile.TemporaryDirectory(prefix="xling-push-") as tmp:
            self.save_pretrained(tmp, include_student=include_student, teacher=teacher, card=facts)
            return upload_adapter(
                tmp,
                repo_id,
                commit_message=commit_message,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        student_path: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        merged_lora: bool | None = None,
        verify_hashes: bool = True,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> LanguageEncoder:
        """Load a directory written by :meth:`save_pretrained`, or a Hub repo holding one (in eval mode).

        ``name_or_path`` is a local folder, or a Hub repo id (``"org/name"``, see :func:`looks_like_local_path`)
        downloaded through ``huggingface_hub`` into its cache (:func:`xling.adapters.hub.resolve_pretrained`):
        only the files this load reads (config, head, tokenizer and the student parts it uses, not a student
        it does not need). ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` load the cached snapshot without a
        request. The downloaded files go through the same checks as a local folder's.

        Every weight file the directory holds (head, student, LoRA, merged student) is compared with the
        SHA-256 its config records before any tensor is read, and only safetensors load (a base student read
        from ``student_model`` is not the adapter's, so it is not hashed, but it must be safetensors too). The
        loaded encoder refuses to return non-finite ``prompt_embeds``, naming the directory.

        A LoRA adapter loads through peft (base student + ``student_lora/``) when peft is installed, and from
        its merged copy ``student_merged/`` otherwise, so ``xling-adapters[diffusers]`` alone runs every
        adapter. A merged student is a plain ``PreTrainedModel`` holding the whole trained student, so the
        loaded encoder's ``config.student_weights`` is then ``"unfrozen"`` (saving it writes those weights).

        Args:
            directory: the adapter directory (``run/adapter`` of an ``xling train`` run).
            student_path: where the base student lives when the directory does not hold it (a frozen or
                LoRA student); defaults to the ``student_model`` recorded at save time.
            device: where to put the encoder.
            dtype: cast student and head to this dtype (e.g. ``torch.float16`` on a GPU).
            merged_lora: for a LoRA adapter, ``True`` loads ``student_merged/``, ``False`` loads through peft,
                ``None`` picks peft when it is installed (older adapters have no merged copy and need peft).
            verify_hashes: require a recorded SHA-256 for every weight file and compare it; ``False`` loads a
                hand-made folder that records none (each file is still checked to be readable safetensors).
            revision: for a Hub id, the branch, tag or commit (default ``"main"``).
            subfolder: the adapter's folder inside the repo (or inside the local folder).
            cache_dir: for a Hub id, the cache to download into and read from (default ``HF_HUB_CACHE``).
            token: for a Hub id, the token of a private or gated repo (``None``: the one ``huggingface_hub``
                finds).
            local_files_only: for a Hub id, read the cache only (as ``HF_HUB_OFFLINE=1`` does).
            force_download: for a Hub id, download the files again (e.g. after a cached file was refused).

        Raises:
            FileNotFoundError: no ``config.json`` (naming ``DIR/adapter`` when ``DIR`` is a run folder), or a
                local student folder that is not there (naming the path and ``student_path=``).
            HubAdapterNotFoundError: (a ``FileNotFoundError``) a Hub id whose repo, revision or ``config.json``
                does not exist, or that is not cached while downloads are off; the message names the repo id,
                the revision and what to do.
            WeightFileError: a weight file has no recorded hash, does not match it, is truncated or is a
                pickle (a ``ValueError``; the message names the file, and for a download how to fetch it again).
            ValueError: not an encoder directory, or a newer format.
        """
        from xling.adapters.hub import is_hub_id, resolve_pretrained

        hub = {
            "revision": revision,
            "subfolder": subfolder,
            "cache_dir": cache_dir,
            "token": token,
            "local_files_only": local_files_only,
            "force_download": force_download,
        }
        directory = resolve_pretrained(
            name_or_path, patterns=lambda payload: _download_patterns(payload, merged_lora), **hub
        )
        try:
            return cls._from_folder(
                directory,
                student_path=student_path,
                device=device,
                dtype=dtype,
                merged_lora=merged_lora,
                verify_hashes=verify_hashes,
            )
        except WeightFileError as e:
            if not is_hub_id(name_or_path):
                raise
            raise WeightFileError(
                f"{e}. It is the cached download of the Hub repo {name_or_path!r} (revision "
                f"{revision or 'main'!r}): load it with force_download=True to download it again"
            ) from e

    @classmethod
    def _from_folder(
        cls,
        directory: Path,
        *,
        student_path: str | os.PathLike[str] | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        merged_lora: bool | None,
        verify_hashes: bool,
    ) -> LanguageEncoder:
        """:meth:`from_pretrained` of a local folder (a Hub snapshot included)."""
        transformers = _require_transformers()
        directory = _resolve_adapter_dir(Path(directory))
        cfg_path = directory / "config.json"
        try:
            payload = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(payload, dict) or payload.get("format") != ENCODER_FORMAT:
            raise ValueError(
                f"{cfg_path} is not a language-encoder config (format {ENCODER_FORMAT!r}); "
                "a head directory loads with xling.adapters.load_head"
            )
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path} has format_version {version!r}; this xling-adapters reads <= {FORMAT_VERSION}"
            )
        try:
            config = LanguageEncoderConfig(**payload["encoder"])
            layout = payload["layout"]
            hashes = payload.get("weights_sha256")
            if hashes is not None and not isinstance(hashes, dict):
                raise ValueError(f"`weights_sha256` must map file paths to SHA-256 digests, got {hashes!r}")
            teacher = payload.get("teacher")
            if teacher is not None and (not isinstance(teacher, dict) or "name_or_path" not in teacher):
                raise ValueError(f"`teacher` must be an object with {TEACHER_KEYS}, got {teacher!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: invalid encoder config: {e}") from e

        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(directory / layout["tokenizer"]), trust_remote_code=False
        )
        student_dir, lora_dir, merged = _student_parts(layout, merged_lora)
        if merged:
            if not student_dir:
                raise FileNotFoundError(
                    f"{directory} has no student_merged/ (saved by an older xling-adapters); load it with "
                    'peft installed: pip install "xling-adapters[peft]"'
                )
            config.student_weights = "unfrozen"
        # Every weight file this load reads is checked against its hash before any of them is read.
        for part in (student_dir, lora_dir):
            if part:
                check_model_folder(directory / part, hashes, root=directory, verify_hashes=verify_hashes)
        head = load_head(directory / layout["head"], verify_hashes=verify_hashes)
        if student_dir:
            model = _load_student_model(directory / student_dir)
        else:
            model = _load_student_model(_base_student(directory, config, student_path))
        if lora_dir:
            from xling.adapters.lora import load_lora

            model = load_lora(model, directory / lora_dir)
        encoder = cls(tokenizer, model, head, config)
        encoder.teacher = teacher
        encoder.source = directory
        encoder.requires_grad_(False)
        encoder.eval()
        if dtype is not None:
            encoder = encoder.to(dtype=dtype)
        return encoder.to(device) if device is not None else encoder


def _student_parts(layout: dict[str, Any], merged_lora: bool | None) -> tuple[str | None, str | None, bool]:
    """``(student folder, LoRA folder, merged)``: the student parts of ``layout`` a load reads.

    A LoRA adapter loads its merged copy when ``merged_lora`` (``None``: when peft is not installed and the copy
    exists), else the base student (if held) and the LoRA folder; any other adapter its ``student/``, if any.
    """
    lora_dir = layout.get("student_lora")
    merged_dir = layout.get("student_merged")
    if merged_lora is None:
        merged_lora = merged_dir is not None and importlib.util.find_spec("peft") is None
    if lora_dir and merged_lora:
        return merged_dir, None, True
    return layout.get("student"), lora_dir, False


def _download_patterns(payload: Any, merged_lora: bool | None) -> list[str]:
    """The files of an adapter a load reads (globs relative to it), from its ``config.json`` ``payload``.

    The parts the load does not read (a held base student while the merged copy loads, the README and grid) are
    left out, so a Hub download fetches no more than the load needs.
    """
    layout = payload.get("layout") if isinstance(payload, dict) else None
    if not isinstance(layout, dict):
        return ["head/*", "tokenizer/*"]  # the load then reports the config's problem, naming it
    student_dir, lora_dir, _ = _student_parts(layout, merged_lora)
    parts = [layout.get("head") or "head", layout.get("tokenizer") or "tokenizer", student_dir, lora_dir]
    return [f"{p}/*" for p in parts if p]


def _base_student(
    directory: Path, config: LanguageEncoderConfig, student_path: str | os.PathLike[str] | None
) -> str:
    """Where the base student of an adapter that does not hold it lives; a missing local folder fails here.

    Raises:
        FileNotFoundError: the path (given, or recorded at save time) is a local folder that is not there.
    """
    path = os.fspath(student_path) if student_path is not None else config.student_model
    if looks_like_local_path(path) and not Path(path).expanduser().exists():
        where = (
            "given as student_path" if student_path is not None else f"recorded in {directory}/config.json"
        )
        raise FileNotFoundError(
            f"the student of {directory} is not at {path} ({where}); it holds no student weights, so pass "
            "the student's folder: LanguageEncoder.from_pretrained(..., student_path=...), "
            "attach(..., student_path=...) or `--student-path` on xling generate / xling eval"
        )
    return path


def _save_plain(model: nn.Module, directory: Path) -> None:
    """Save the base weights of a peft-wrapped model without its LoRA tensors, under their original names."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        state[name.replace(".base_layer", "")] = tensor.detach().contiguous().cpu()
    model.config.save_pretrained(str(directory))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
