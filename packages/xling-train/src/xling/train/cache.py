"""Caches that let a run skip the frozen teacher: VAE latents of the images, teacher text embeddings.

Both are folders of safetensors shards plus an ``index.json``, written atomically (temp file, fsync,
``os.replace``; the index last), and keyed by fingerprints of everything that decides their content:

- latents: the VAE (config + a hash of its weights), the image transform (resolution, crop policy)
  and the corpus (files, sizes, mtimes, images), stored by row index;
- teacher embeddings: the text encoder(s) (config + weights), the tokenizer(s) and each caption's
  text hash, stored by caption, so new captions are appended and shared captions encoded once.

A changed key rebuilds the cache (``cache.status`` says which component changed); a truncated or
unreadable shard is detected at open (size and header check; full hash with ``verify_hash=True``)
and rebuilt, or reported with ``on_corrupt="fail"``.

In a multi-process run build on the main process first::

    with accelerator.main_process_first():
        latents = LatentCache.load_or_build(cache_dir / "latents", corpus, teacher)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xling.train.data import ParallelCorpus

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX_NAME = "index.json"
OnCorrupt = Literal["rebuild", "fail"]


class CacheError(RuntimeError):
    """A cache is corrupt and ``on_corrupt="fail"``, or it cannot be used; the message names the shard."""


@runtime_checkable
class ImageEncoderTeacher(Protocol):
    """What the latent cache needs of :class:`xling.core.Teacher`."""

    vae: nn.Module

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, C, H/8, W/8]``."""
        ...


@runtime_checkable
class TextEncoderTeacher(Protocol):
    """What the teacher-embedding cache needs of :class:`xling.core.Teacher`."""

    text_encoders: Sequence[nn.Module]
    tokenizers: Sequence[Any]

    def encode(self, prompts: Sequence[str]) -> Any:
        """Prompts -> an object with ``prompt_embeds`` ``[B, L, D]`` and ``pooled_prompt_embeds`` ``[B, P] | None``."""
        ...


# --------------------------------------------------------------------------------------------- fingerprints


def _config_dict(module: nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Bookkeeping keys (library versions, load paths, dtype) do not change what the module computes;
    # the weight hash covers the dtype.
    volatile = {"transformers_version", "torch_dtype", "dtype", "architectures"}
    return {k: v for k, v in as_dict.items() if not k.startswith("_") and k not in volatile}


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's class, config and every parameter and buffer (names, dtypes, shapes, bytes).

    Costs one pass over the weights (about 0.3 s for the 84M-parameter SD VAE in fp32).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(module).__name__.encode())
    digest.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer: its full serialisation when fast (vocab, merges, normalizer, post-processor),
    else its vocabulary and BPE ranks; plus class, ``model_max_length`` and the special tokens."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are call-time settings the backend remembers from the last call.
        state.pop("truncation", None)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        ranks = getattr(tokenizer, "bpe_ranks", None)
        if ranks:
            digest.update(repr(sorted(ranks.items(), key=lambda kv: kv[1])).encode())
    special = getattr(tokenizer, "special_tokens_map", {})
    digest.update(repr((getattr(tokenizer, "model_max_length", None), sorted(special.items()))).encode())
    return digest.hexdigest()


def caption_hash(caption: str) -> bytes:
    """16-byte blake2b of the UTF-8 caption: the per-caption key of the teacher-embedding cache."""
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=16).digest()


def _combine(components: Mapping[str, Any]) -> str:
    return hashlib.blake2b(
        json.dumps(components, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


# ------------------------------------------------------------------------------------------ shard storage


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write one safetensors shard atomically; return its index entry (file, bytes, digest)."""
    path = folder / name
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return {"file": name, "bytes": path.stat().st_size, "blake2b": _file_digest(path)}


def _shard_problem(folder: Path, entry: Mapping[str, Any], rows: int, verify_hash: bool) -> str | None:
    """Why a shard cannot be trusted (missing, truncated, bad header, wrong rows, bad hash), or ``None``."""
    path = folder / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{entry['file']} is truncated or changed ({size} bytes, index says {entry['bytes']})"
    try:
        with safe_open(str(path), framework="pt") as handle:
            lengths = {name: handle.get_slice(name).get_shape()[0] for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for bad headers
        return f"{entry['file']} has an unreadable header: {error}"
    if any(length != rows for length in lengths.values()):
        return f"{entry['file']} holds {lengths} rows, index says {rows}"
    if verify_hash and _file_digest(path) != entry["blake2b"]:
        return f"{entry['file']} content hash differs from the index"
    return None


class _ShardReader:
    """Lazily opened safetensors handles, dropped when pickled (DataLoader workers reopen them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handles: dict[str, Any] = {}

    def row(self, file: str, name: str, index: int) -> torch.Tensor:
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        # Copy out of the memory map: a tensor must not outlive (or see a rewrite of) the shard file.
        return handle.get_slice(name)[index : index + 1][0].clone()

    def tensor(self, file: str, name: str) -> torch.Tensor:
        with safe_open(str(self.folder / file), framework="pt") as handle:
            return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_handles": {}}


def _read_index(folder: Path) -> dict[str, Any] | None:
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and index.get("version") == CACHE_VERSION else None


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(names) or "key"


# -------------------------------------------------------------------------------------------- latent cache


class LatentCache:
    """VAE latents of a corpus' images, by row index, in safetensors shards.

    Use :meth:`load_or_build`; ``cache[i]`` is the latent ``[C, h, w]`` of row ``i``.

    Attributes:
        folder: The cache folder.
        status: ``"hit"``, or what was (re)built and why (``"built: teacher VAE changed (vae)"``).
        key: The fingerprint the cache is valid for.
    """

    def __init__(self, folder: Path, index: dict[str, Any], status: str) -> None:
        self.folder, self.index, self.status = folder, index, status
        self.key: str = index["key"]
        self._reader = _ShardReader(folder)
        self._where: list[tuple[int, int, str]] = [(s["start"], s["end"], s["file"]) for s in index["shards"]]

    @staticmethod
    def components(
        corpus: ParallelCorpus, teacher: ImageEncoderTeacher, dtype: torch.dtype | None
    ) -> dict[str, str]:
        """The fingerprints the cache is keyed by: ``vae``, ``transform``, ``corpus``, ``dtype``."""
        if corpus.transform is None:
            raise ValueError("the corpus loads no images: build it with resolution=<teacher resolution>")
        return {
            "vae": module_fingerprint(teacher.vae),
            "transform": corpus.transform.fingerprint(),
            "corpus": corpus.fingerprint(),
            "dtype": str(dtype),
            "posterior": "mode",
        }

    @classmethod
    def load_or_build(
        cls,
        folder: str | os.PathLike[str],
        corpus: ParallelCorpus,
        teacher: ImageEncoderTeacher,
        *,
        batch_size: int = 8,
        shard_size: int = 256,
        dtype: torch.dtype | None = None,
        num_workers: int = 0,
        verify_hash: bool = False,
        on_corrupt: OnCorrupt = "rebuild",
        progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    ) -> LatentCache:
        """Open the cache in ``folder`` if its key matches, else (re)build it.

        Args:
            folder: Cache folder (created if needed; one cache per folder).
            corpus: A map-style corpus built with ``resolution`` (every row must have an image).
            teacher: Anything with ``vae`` and ``encode_images`` (:class:`xling.core.Teacher`).
            batch_size: Images per VAE call while building.
            shard_size: Rows per shard.
            dtype: Storage dtype (e.g. ``torch.float16`` halves the size); ``None`` keeps the VAE's.
            num_workers: DataLoader workers decoding images while building.
            verify_hash: Also compare every shard's content hash at open (reads the whole cache).
            on_corrupt: ``"rebuild"`` re-encodes only the bad shards; ``"fail"`` raises :class:`CacheError`.
            progress: Optional wrapper for the build loop (e.g. ``tqdm``).

        Returns:
            The open cache; ``status`` says whether it was a hit.
        """
        if shard_size <= 0 or batch_size <= 0:
            raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
        if on_corrupt not in ("rebuild", "fail"):
            raise ValueError(f"on_corrupt must be 'rebuild' or 'fail', got {on_corrupt!r}")
        missing = [row.source for row in corpus.rows if row.image is None]
        if missing:
            raise ValueError(
                f"{len(missing)} corpus rows have no image (e.g. {missing[0]}): no latents to cache"
            )
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        components = cls.components(corpus, teacher, dtype)
        key = _combine(components)
        index = _read_index(folder)
        ranges = [
            (start, min(start + shard_size, len(corpus))) for start in range(0, len(corpus), shard_size)
        ]
        todo: list[int]
        if index is None:
            status, todo, entries = "built: no cache yet", list(range(len(ranges))), [None] * len(ranges)
        elif index.get("kind") != "latents" or index["key"] != key:
            changed = _changed(index.get("components", {}), components)
            status, todo, entries = (
                f"rebuilt: {changed} changed",
                list(range(len(ranges))),
                [None] * len(ranges),
            )
        else:
            # Same key: check every shard, keep the good ones and re-encode only the rows of bad ones.
            ranges = [(s["start"], s["end"]) for s in index["shards"]]
            entries = list(index["shards"])
            todo, problems = [], []
            for number, entry in enumerate(entries):
                problem = _shard_problem(folder, entry, entry["end"] - entry["start"], verify_hash)
                if problem is not None:
                    todo.append(number)
                    problems.append(problem)
            if problems and on_corrupt == "fail":
                raise CacheError(f"latent cache {folder} is corrupt: " + "; ".join(problems))
            status = "hit" if not problems else "repaired: " + "; ".join(problems)
        if todo:
            logger.info("latent cache %s: %s; encoding %d shard(s)", folder, status, len(todo))
            index = {"version": CACHE_VERSION, "kind": "latents", "key": key, "components": components}
            index["num_rows"] = len(corpus)
            for number in todo:
                start, end = ranges[number]
                rows = _encode_latents(
                    corpus, teacher, range(start, end), batch_size, num_workers, dtype, progress
                )
                entry = _write_shard(folder, f"latents-{number:05d}.safetensors", {"latents": rows})
                entries[number] = {**entry, "start": start, "end": end}
            index["shards"] = entries
            _atomic_write_bytes(folder / INDEX_NAME, json.dumps(index, indent=1).encode())
        assert index is not None
        return cls(folder, index, status)

    def __len__(self) -> int:
        return int(self.index["num_rows"])

    def __getitem__(self, index: int) -> torch.Tensor:
        """Latent of row ``index``: ``[C, h, w]``."""
        for start, end, file in self._where:
            if start <= index < end:
                return self._reader.row(file, "latents", index - start)
        raise IndexError(f"row {index} is not in the latent cache of {len(self)} rows")

    @property
    def hit(self) -> bool:
        """Whether the cache was used as found, with nothing encoded."""
        return self.status == "hit"


def _stack_images(rows: list[dict[str, Any]]) -> torch.Tensor:
    return torch.stack([row["image"] for row in rows])  # [B, 3, R, R]


@torch.no_grad()
def _encode_latents(
    corpus: ParallelCorpus,
    teacher: ImageEncoderTeacher,
    rows: range,
    batch_size: int,
    num_workers: int,
    dtype: torch.dtype | None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
) -> torch.Tensor:
    """Encode the images of ``rows`` in order: ``[len(rows), C, h, w]``."""
    subset = torch.utils.data.Subset(corpus, list(rows))
    loader: Iterable[Any] = DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_stack_images
    )
    if progress is not None:
        loader = progress(loader)
    parameter = next(teacher.vae.parameters())
    encode: Callable[[torch.Tensor], torch.Tensor] = teacher.encode_images
    if "sample" in inspect.signature(teacher.encode_images).parameters:
        # The posterior mode, not a sample: a cache holds one latent per image, so keep it the unbiased one.
        encode = partial(teacher.encode_images, sample=False)
    chunks = []
    for batch in loader:
        pixels = batch.to(device=parameter.device, dtype=parameter.dtype)  # [B, 3, R, R]
        latents = encode(pixels)  # [B, C, R/8, R/8]
        chunks.append(latents.to("cpu", dtype=dtype or latents.dtype))
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------- teacher-embedding cache


class TextEmbeddingCache:
    """Teacher ``prompt_embeds`` (and pooled embeds) per English caption, in safetensors shards.

    Keyed by the teacher text encoder(s) and tokenizer(s); entries are found by the caption's text
    hash, so a grown corpus only encodes its new captions (appended as a new shard). Use
    :meth:`load_or_build`; ``cache[caption]`` gives ``{"prompt_embeds": [L, D],
    "pooled_prompt_embeds": [P]}`` (the pooled entry only for SDXL-like teachers).

    Attributes:
        folder: The cache folder.
        status: ``"hit"``, ``"extended: N new captions"``, or what was (re)built and why.
        key: The fingerprint the cache is valid for.
    """

    def __init__(self, folder: Path, index: dict[str, Any], status: str) -> None:
        self.folder, self.index, self.status = folder, index, status
        self.key: str = index["key"]
        self._reader = _ShardReader(folder)
        self._where: dict[bytes, tuple[str, int]] = {}
        for entry in index["shards"]:
            hashes = self._reader.tensor(entry["file"], "caption_hash")  # [n, 16] uint8
            for row, digest in enumerate(hashes.numpy()):
                self._where[digest.tobytes()] = (entry["file"], row)

    @staticmethod
    def components(
        teacher: TextEncoderTeacher, dtype: torch.dtype | None, extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The fingerprints the cache is keyed by: ``text_encoders``, ``tokenizers``, ``encoding`` (the teacher's
        options that change its encoding beside its weights: the token length, ``clip_skip`` and Sana's instruction),
        ``dtype``, ``extra``."""
        instruction = getattr(teacher, "complex_human_instruction", None)
        return {
            "text_encoders": [module_fingerprint(encoder) for encoder in teacher.text_encoders],
            "tokenizers": [tokenizer_fingerprint(tokenizer) for tokenizer in teacher.tokenizers],
            "encoding": {
                "max_length": getattr(teacher, "max_length", None),
                "clip_skip": getattr(teacher, "clip_skip", None),
                "instruction": None
                if not instruction
                else hashlib.sha256("\n".join(instruction).encode()).hexdigest()[:16],
            },
            "dtype": str(dtype),
            "extra": dict(extra or {}),
        }

    @classmethod
    def load_or_build(
        cls,
        folder: str | os.PathLike[str],
        captions: Iterable[str],
        teacher: TextEncoderTeacher,
        *,
        batch_size: int = 64,
        shard_size: int = 4096,
        dtype: torch.dtype | None = None,
        extra: Mapping[str, Any] | None = None,
        verify_hash: bool = False,
        on_corrupt: OnCorrupt = "rebuild",
        progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    ) -> TextEmbeddingCache:
        """Open the cache in ``folder`` and encode whichever of ``captions`` it lacks.

        Args:
            folder: Cache folder (created if needed).
            captions: English captions (duplicates are encoded once).
            teacher: Anything with ``text_encoders``, ``tokenizers`` and ``encode`` (:class:`xling.core.Teacher`).
            batch_size: Captions per ``teacher.encode`` call.
            shard_size: Captions per new shard.
            dtype: Storage dtype; ``None`` keeps the encoder's.
            extra: More key material that changes the embeddings (e.g. ``{"clip_skip": 2}``).
            verify_hash: Also compare every shard's content hash at open.
            on_corrupt: ``"rebuild"`` drops bad shards and re-encodes their captions; ``"fail"`` raises.
            progress: Optional wrapper for the build loop (e.g. ``tqdm``).
        """
        if shard_size <= 0 or batch_size <= 0:
            raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
        if on_corrupt not in ("rebuild", "fail"):
            raise ValueError(f"on_corrupt must be 'rebuild' or 'fail', got {on_corrupt!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        components = cls.components(teacher, dtype, extra)
        key = _combine(components)
        index = _read_index(folder)
        notes: list[str] = []
        if index is None:
            notes.append("built: no cache yet")
            entries: list[dict[str, Any]] = []
        elif index.get("kind") != "text" or index["key"] != key:
            notes.append(f"rebuilt: {_changed(index.get('components', {}), components)} changed")
            entries = []
        else:
            entries, problems = [], []
            for entry in index["shards"]:
                problem = _shard_problem(folder, entry, entry["rows"], verify_hash)
                if problem is None:
                    entries.append(entry)
                else:
                    problems.append(problem)
            if problems and on_corrupt == "fail":
                raise CacheError(f"teacher-embedding cache {folder} is corrupt: " + "; ".join(problems))
            if problems:
                notes.append("repaired: " + "; ".join(problems))
        index = {
            "version": CACHE_VERSION,
            "kind": "text",
            "key": key,
            "components": components,
            "shards": entries,
        }
        known = cls(folder, index, "")._where
        wanted = list(dict.fromkeys(captions))  # unique, in first-seen order
        missing = [caption for caption in wanted if caption_hash(caption) not in known]
        if missing:
            if not notes:
                notes.append(f"extended: {len(missing)} new captions")
            logger.info(
                "teacher-embedding cache %s: %s; encoding %d captions", folder, notes[0], len(missing)
            )
            used = {entry["file"] for entry in entries}
            number = 0
            for start in range(0, len(missing), shard_size):
                chunk = missing[start : start + shard_size]
                tensors = _encode_texts(chunk, teacher, batch_size, dtype, progress)
                while f"text-{number:05d}.safetensors" in used:
                    number += 1
                name = f"text-{number:05d}.safetensors"
                used.add(name)
                pooled = "pooled_prompt_embeds" in tensors
                masked = "prompt_attention_mask" in tensors
                entries.append(
                    {
                        **_write_shard(folder, name, tensors),
                        "rows": len(chunk),
                        "pooled": pooled,
                        "mask": masked,
                    }
                )
                # Index after every shard, so an interrupted build keeps what it finished.
                _atomic_write_bytes(folder / INDEX_NAME, json.dumps(index, indent=1).encode())
        elif notes:
            _atomic_write_bytes(folder / INDEX_NAME, json.dumps(index, indent=1).encode())
        return cls(folder, index, notes[0] if notes else "hit")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, caption: object) -> bool:
        return isinstance(caption, str) and caption_hash(caption) in self._where

    def __getitem__(self, caption: str) -> dict[str, torch.Tensor]:
        """``{"prompt_embeds": [L, D]}`` plus ``"pooled_prompt_embeds": [P]`` and ``"prompt_attention_mask": [L]``
        when the teacher has them (pooled: SDXL, SD3, Flux; the mask: PixArt, Sana)."""
        where = self._where.get(caption_hash(caption))
        if where is None:
            raise KeyError(f"caption not in the teacher-embedding cache: {caption[:80]!r}")
        file, row = where
        out = {"prompt_embeds": self._reader.row(file, "prompt_embeds", row)}
        if self.has_pooled:
            out["pooled_prompt_embeds"] = self._reader.row(file, "pooled_prompt_embeds", row)
        if self.has_mask:
            out["prompt_attention_mask"] = self._reader.row(file, "prompt_attention_mask", row)
        return out

    @property
    def has_pooled(self) -> bool:
        """Whether entries carry ``pooled_prompt_embeds``."""
        return bool(self.index["shards"]) and bool(self.index["shards"][0].get("pooled", False))

    @property
    def has_mask(self) -> bool:
        """Whether entries carry the teacher's ``prompt_attention_mask`` (PixArt, Sana)."""
        return bool(self.index["shards"]) and bool(self.index["shards"][0].get("mask", False))

    def lookup(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Batch lookup: ``prompt_embeds`` ``[B, L, D]`` (+ ``pooled_prompt_embeds`` ``[B, P]``)."""
        rows = [self[caption] for caption in captions]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    @property
    def hit(self) -> bool:
        """Whether every caption was found, with nothing encoded."""
        return self.status == "hit"


@torch.no_grad()
def _encode_texts(
    captions: Sequence[str],
    teacher: TextEncoderTeacher,
    batch_size: int,
    dtype: torch.dtype | None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None,
) -> dict[str, torch.Tensor]:
    starts: Iterable[int] = range(0, len(captions), batch_size)
    if progress is not None:
        starts = progress(starts)
    embeds, pooled, masks = [], [], []
    for start in starts:
        out = teacher.encode(list(captions[start : start + batch_size]))
        embeds.append(out.prompt_embeds.to("cpu", dtype=dtype or out.prompt_embeds.dtype))  # [b, L, D]
        if getattr(out, "pooled_prompt_embeds", None) is not None:
            pooled.append(
                out.pooled_prompt_embeds.to("cpu", dtype=dtype or out.pooled_prompt_embeds.dtype)
            )  # [b, P]
        if getattr(out, "attention_mask", None) is not None:
            masks.append(out.attention_mask.to("cpu", dtype=torch.uint8))  # [b, L]
    hashes = torch.tensor([list(caption_hash(c)) for c in captions], dtype=torch.uint8)  # [n, 16]
    tensors = {"caption_hash": hashes, "prompt_embeds": torch.cat(embeds)}
    if pooled:
        tensors["pooled_prompt_embeds"] = torch.cat(pooled)
    if masks:
        tensors["prompt_attention_mask"] = torch.cat(masks)
    return tensors


# ------------------------------------------------------------------------------------------ cached dataset


class CachedDataset(Dataset[dict[str, Any]]):
    """A corpus whose items also carry cached tensors, looked up by row index.

    Adds ``latents`` ``[C, h, w]`` (and stops decoding images) when a latent cache is given, and
    ``prompt_embeds`` ``[L, D]`` (+ ``pooled_prompt_embeds`` ``[P]``) of the row's English caption when a
    teacher-embedding cache is given (an empty caption of a culture-only row is looked up like any
    other: build the cache from ``corpus.captions("en")``).

    Args:
        corpus: The map-style corpus the caches were built from.
        latents: Latent cache of ``corpus`` (same row order), or ``None``.
        text: Teacher-embedding cache holding every English caption of ``corpus``, or ``None``.
        keep_images: Also decode the images although latents are cached.
    """

    def __init__(
        self,
        corpus: ParallelCorpus,
        *,
        latents: LatentCache | None = None,
        text: TextEmbeddingCache | None = None,
        keep_images: bool = False,
    ) -> None:
        if latents is not None and len(latents) != len(corpus):
            raise ValueError(
                f"latent cache has {len(latents)} rows, corpus has {len(corpus)}: build it from this corpus"
            )
        if text is not None:
            absent = [row.source for row in corpus.rows if row.en not in text]
            if absent:
                raise ValueError(
                    f"{len(absent)} English captions are not in the teacher-embedding cache (e.g. {absent[0]})"
                )
        self.corpus, self.latents, self.text, self.keep_images = corpus, latents, text, keep_images

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.corpus.get(index, load_image=self.latents is None or self.keep_images)
        if self.latents is not None:
            item["latents"] = self.latents[item["index"]]
        if self.text is not None:
            item.update(self.text[item["en"]])
        return item
