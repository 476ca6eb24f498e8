"""WebDataset-style tar shards, streamed: for image sets too large to index up front.

A sample is the run of consecutive tar members sharing a key (the member path up to the first dot
of its base name, the WebDataset convention): ``0001.en.txt``, ``0001.zh.txt``, ``0001.jpg`` and
optionally ``0001.json`` (whose fields, named by the :class:`ColumnMap`, fill in missing texts and
the culture-only flag). Read with :mod:`tarfile` in streaming mode, so shards are never extracted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from xling.train.data.corpus import ColumnMap, _parse_flag, file_fingerprint
from xling.train.data.errors import (
    EMPTY_CAPTION,
    MALFORMED_ROW,
    MISSING_COLUMN,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    BadRow,
    BadRowReport,
    OnBadRow,
    check_policy,
    handle_bad_row,
)
from xling.train.data.images import CropPolicy, ImageTransform, open_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand WebDataset brace patterns.

    ``"shard-{000000..000002}.tar"`` gives three names (zero padding follows the first bound);
    ``"{a,b}-{0..1}.tar"`` gives ``a-0.tar, a-1.tar, b-0.tar, b-1.tar``.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        low, high = numeric.groups()
        if int(high) < int(low):
            raise ValueError(f"empty brace range {{{body}}} in {pattern!r}")
        width = len(low) if low.startswith("0") else 0
        choices = [str(number).zfill(width) for number in range(int(low), int(high) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def _split_key(name: str) -> tuple[str, str]:
    """``"dir/0001.en.txt"`` -> ``("dir/0001", "en.txt")``."""
    folder, base = os.path.split(name)
    stem, _, suffix = base.partition(".")
    return os.path.join(folder, stem), suffix.lower()


def _truncated(shard: str) -> str | None:
    """Why an uncompressed tar file lacks its end (size not a multiple of 512 or no end-of-archive
    zero blocks), or ``None``. Compressed shards fail loudly in the decompressor instead."""
    if not shard.endswith(".tar"):
        return None
    size = os.path.getsize(shard)
    if size % 512:
        return f"size {size} is not a multiple of 512"
    with open(shard, "rb") as handle:
        handle.seek(max(0, size - 1024))
        if handle.read(1024).strip(b"\0"):
            return "no end-of-archive marker"
    return None


class TarShardCorpus(IterableDataset[dict[str, Any]]):
    """Stream parallel samples from WebDataset tar shards.

    Items are dicts like :class:`~xling.train.data.ParallelCorpus` items, with ``key``
    (``"shard.tar/sample"``) in place of ``index``: ``en``, ``target``, ``culture_only``, ``source`` and,
    with images, ``image`` ``[3, R, R]`` in [-1, 1], ``original_size``, ``crop_top_left``.

    Shards are split across DataLoader workers and (optionally) across processes by ``rank`` /
    ``world_size``: give those only when each process builds its own loader; accelerate's default
    for iterable datasets reads on the main process and dispatches the batches itself. The order is
    a function of ``seed`` and the epoch (:meth:`set_epoch`), so a resumed run that skips the
    consumed batches sees the same samples.

    Args:
        urls: A brace pattern (``"data/shard-{000000..000009}.tar"``) or a list of shard paths.
        columns: Texts are read from ``<columns.en>.txt`` and ``<columns.target>.txt`` members (or the
            same keys of a ``.json`` member); ``columns.en`` ``None``: no English caption is read (``""``);
            ``columns.culture_only`` is read from the ``.json`` member.
        on_bad_row: ``"skip"`` or ``"fail"``; bad samples are named by shard and member.
        resolution: Load images resized and cropped to this size; ``None``: text only.
        crop: ``"center"`` or ``"random"``.
        seed: Seed of the shard order, the shuffle buffer and random crops.
        shuffle_buffer: Size of the sample shuffle buffer; ``0`` keeps the shard order.
        shuffle_shards: Permute the shard order every epoch.
        with_images: Whether samples must have an image; ``None``: when ``resolution`` is given.
        rank: Index of this process among ``world_size`` for shard-level splitting.
        world_size: Number of processes that split the shards.
    """

    def __init__(
        self,
        urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        columns: ColumnMap | None = None,
        on_bad_row: OnBadRow = "skip",
        resolution: int | None = None,
        crop: CropPolicy = "center",
        seed: int = 0,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        with_images: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(urls, str | os.PathLike):
            self.shards = expand_braces(os.fspath(urls))
        else:
            self.shards = [name for url in urls for name in expand_braces(os.fspath(url))]
        if not self.shards:
            raise ValueError("urls gave no shards")
        missing = [shard for shard in self.shards if not os.path.isfile(shard)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} tar shard(s) not found, e.g. {missing[0]}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.columns = columns if columns is not None else ColumnMap()
        self.on_bad_row = check_policy(on_bad_row)
        self.transform = ImageTransform(resolution, crop, seed) if resolution is not None else None
        self.with_images = self.transform is not None if with_images is None else with_images
        self.seed, self.shuffle_buffer, self.shuffle_shards = seed, shuffle_buffer, shuffle_shards
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Counts what this process skipped; DataLoader workers count in their own copies (use scan()).
        self.report = BadRowReport()

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order and shuffle of ``epoch`` (called by accelerate's ``set_epoch``)."""
        self.epoch = epoch

    def _my_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        consumer, consumers = self.rank * workers + worker_id, self.world_size * workers
        return shards[consumer::consumers]

    def _samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield ``(key, {suffix: bytes})`` of one shard; members of a sample must be adjacent."""
        key, files = None, {}
        with tarfile.open(shard, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, suffix = _split_key(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, files
                    key, files = member_key, {}
                handle = archive.extractfile(member)
                files[suffix] = handle.read() if handle is not None else b""
        if key is not None:
            yield key, files

    def _decode(self, shard: str, key: str, files: dict[str, bytes]) -> dict[str, Any] | BadRow:
        """Turn the members of one sample into an item, or a :class:`BadRow`."""

        def bad(reason: str, detail: str, member: str = key) -> BadRow:
            return BadRow(shard, None, reason, detail, member=member)

        meta: dict[str, Any] = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                return bad(MALFORMED_ROW, f"invalid JSON: {error}", f"{key}.json")
            if not isinstance(meta, dict):
                return bad(MALFORMED_ROW, "the .json member is not an object", f"{key}.json")
        culture_only = False
        if self.columns.culture_only is not None:
            flag = _parse_flag(meta.get(self.columns.culture_only))
            if flag is None:
                return bad(MALFORMED_ROW, f"{self.columns.culture_only!r} is not a boolean", f"{key}.json")
            culture_only = flag
        texts = {"en": ""}  # columns.en None: no English caption (recipes that never read English)
        for field, column in (("target", self.columns.target), ("en", self.columns.en)):
            if column is None:
                continue
            member = f"{column}.txt"
            if member in files:
                try:
                    text = files[member].decode("utf-8")
                except UnicodeDecodeError as error:
                    return bad(MALFORMED_ROW, f"not UTF-8: {error}", f"{key}.{member}")
            elif isinstance(meta.get(column), str):
                text = meta[column]
            elif field == "en" and culture_only:
                text = ""
            else:
                return bad(MISSING_COLUMN, f"no {key}.{member} member and no {column!r} in {key}.json")
            texts[field] = text.strip()
            if not texts[field] and not (field == "en" and culture_only):
                return bad(EMPTY_CAPTION, f"{column!r} caption is empty", f"{key}.{member}")
        item: dict[str, Any] = {
            "key": f"{os.path.basename(shard)}/{key}",
            "en": texts["en"],
            "target": texts["target"],
            "culture_only": culture_only,
            "source": f"{shard}:{key}",
        }
        if self.with_images:
            suffix = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
            if suffix is None:
                return bad(MISSING_IMAGE, f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) for sample {key}")
            try:
                image = open_rgb(files[suffix])
            except (OSError, ValueError) as error:
                return bad(UNREADABLE_IMAGE, f"cannot decode: {error}", f"{key}.{suffix}")
            if self.transform is not None:
                # A stable per-sample integer for the random crop, independent of stream position.
                index = int.from_bytes(
                    hashlib.blake2b(item["key"].encode(), digest_size=8).digest(), "little"
                )
                item["image"], geometry = self.transform(image, index)
                item.update(geometry)
        return item

    def _stream(self, shards: Sequence[str], report: BadRowReport) -> Iterator[dict[str, Any]]:
        for shard in shards:
            samples = self._samples(shard)
            truncated = _truncated(shard)
            pending: tuple[str, dict[str, bytes]] | None = None
            while True:
                try:
                    key, files = next(samples)
                except StopIteration:
                    if truncated:
                        # tarfile stops quietly at a cut header; the last sample may be missing members.
                        where = BadRow(
                            shard, None, MALFORMED_ROW, f"truncated tar shard: {truncated}", member="*"
                        )
                        handle_bad_row(where, self.on_bad_row, report)
                    break
                except (tarfile.TarError, OSError, EOFError) as error:
                    # A truncated or corrupt shard: keep what was read, report the rest as one bad row.
                    where = BadRow(shard, None, MALFORMED_ROW, f"unreadable tar shard: {error}", member="*")
                    handle_bad_row(where, self.on_bad_row, report)
                    break
                if truncated:
                    # Hold each sample back one step: the one read last is dropped with the bad-row record.
                    previous, pending = pending, (key, files)
                    if previous is None:
                        continue
                    key, files = previous
                item = self._decode(shard, key, files)
                if isinstance(item, BadRow):
                    handle_bad_row(item, self.on_bad_row, report)
                else:
                    yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._stream(self._my_shards(), self.report)
        if self.shuffle_buffer <= 1:
            yield from stream
            return
        worker = get_worker_info()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker.id if worker else 0}")
        buffer: list[dict[str, Any]] = []
        for item in stream:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def scan(self) -> BadRowReport:
        """Read every shard once (without decoding to tensors) and return the full bad-row report.

        Useful before training with DataLoader workers, whose own counts stay in the workers.
        """
        report = BadRowReport()
        transform, self.transform = self.transform, None
        try:
            for _ in self._stream(self.shards, report):
                pass
        finally:
            self.transform = transform
        return report

    def fingerprint(self, *, content: bool = False) -> str:
        """A hash of the shard files (path, size, mtime; or bytes) and the column map."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((self.columns, self.on_bad_row, self.with_images)).encode())
        for shard in self.shards:
            digest.update(file_fingerprint(shard, content=content).encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"TarShardCorpus({len(self.shards)} shards, first {self.shards[0]}, images={self.with_images})"
