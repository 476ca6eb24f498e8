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
import zlib
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from xling.train.data.accounting import RowAccounting
from xling.train.data.corpus import ColumnMap, _parse_flag, check_text, did_you_mean, file_fingerprint
from xling.train.data.errors import (
    BAD_UTF8,
    EMPTY_CAPTION,
    IMAGE_TOO_SMALL,
    MALFORMED_ROW,
    MISSING_COLUMN,
    MISSING_IMAGE,
    TRUNCATED_SHARD,
    UNREADABLE_IMAGE,
    BadRow,
    BadRowReport,
    OnBadRow,
    check_policy,
    handle_bad_row,
)
from xling.train.data.images import CropPolicy, ImageTransform, default_min_size, open_rgb, too_small

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


def _image_member(files: dict[str, bytes]) -> str | None:
    """The suffix of a sample's image member: the first of :data:`IMAGE_EXTENSIONS` present."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)


def _raise_unusable(columns: ColumnMap, shards: Sequence[str], accounts: Sequence[RowAccounting]) -> None:
    """Raise when no sample of ``shards`` is usable because they are empty or lack a caption column (the
    same for every sample: a typo in a column option, or shards of another corpus), naming shard and column.
    Samples that are bad one by one (unreadable images, empty captions) are counted, not raised on."""
    total = RowAccounting.merged(accounts)
    named = f"{shards[0]}" + (f" (and {len(shards) - 1} more shard(s))" if len(shards) > 1 else "")
    if total.read == 0:
        raise ValueError(f"no sample in {named}: the tar shard(s) hold no file member")
    if total.skipped.counts.get(MISSING_COLUMN, 0) == total.read:
        first = total.skipped.examples[MISSING_COLUMN][0]
        needed = " and ".join(repr(c) for c in (columns.target, columns.en) if c is not None)
        raise ValueError(
            f"no usable sample in {named}: every one of its {total.read:,} samples lacks a caption column "
            f"this reader needs ({needed}); first: {first}"
        )


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
        min_image_size: Shortest image side a sample may have (smaller: an ``image_too_small`` skip);
            ``None``: ``resolution // 8``.

    Raises:
        FileNotFoundError: a shard does not exist.
        ValueError: (while streaming) no sample of this reader's shards is usable because a caption column is
            in none of them, or the shards hold no member at all; the message names the shards and the column.
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
        min_image_size: int | None = None,
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
        self.min_image_size = default_min_size(resolution) if min_image_size is None else min_image_size
        # Accounting per shard, kept from the pass that read most of it, so a shard read again in a later
        # epoch is not counted twice. DataLoader workers hold copies of this object: they also write to
        # `_shared` (see share_accounting), which the main process reads.
        self._local: dict[str, RowAccounting] = {}
        self._shared: MutableMapping[str, RowAccounting] | None = None
        self._manager: Any = None

    def share_accounting(self) -> None:
        """Have DataLoader worker processes report what they read to this process (a ``multiprocessing``
        manager's dict, updated after every sample); :func:`xling.train.data.make_dataloader` calls it when
        it starts workers."""
        if self._shared is None:
            import multiprocessing

            self._manager = multiprocessing.Manager()
            self._shared = self._manager.dict()

    def __getstate__(self) -> dict[str, Any]:
        # A manager cannot be pickled (spawned workers); its dict proxy can and is what workers write to.
        return {**self.__dict__, "_manager": None}

    def accounting(self) -> RowAccounting:
        """Samples read, used and skipped (by reason) so far by this reader and its DataLoader workers, each
        shard counted once, in shard order."""
        per_shard = dict(self._local)
        for shard, acc in (self._shared or {}).items():
            if shard not in per_shard or acc.read > per_shard[shard].read:
                per_shard[shard] = acc
        return RowAccounting.merged(per_shard[shard] for shard in self.shards if shard in per_shard)

    @property
    def report(self) -> BadRowReport:
        """The skipped samples so far (see :meth:`accounting`)."""
        return self.accounting().skipped

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

    def _samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes] | None, str]]:
        """Yield ``(key, {suffix: bytes}, "")`` of one shard (members of a sample must be adjacent); a damaged
        shard ends with ``(key, None, why)`` for the one sample the damage may have cut.

        A sample is closed when a member of the next key begins, so on an error only the sample being read
        (``key``) can be incomplete: every sample before it was complete and has been yielded.
        """
        if os.path.getsize(shard) == 0:
            return
        truncated = _truncated(shard)
        key: str | None = None
        files: dict[str, bytes] = {}
        try:
            with tarfile.open(shard, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, suffix = _split_key(member.name)
                    if member_key != key:
                        if key is not None:
                            yield key, files, ""
                        key, files = member_key, {}
                    handle = archive.extractfile(member)
                    files[suffix] = handle.read() if handle is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            yield key or "*", None, f"unreadable tar shard (read up to this sample): {error}"
            return
        if key is None:
            return
        if truncated:
            # tarfile stops quietly at a cut header, so the last sample may be missing members.
            yield key, None, f"truncated tar shard ({truncated}): its last sample may be incomplete"
        else:
            yield key, files, ""

    def _decode(self, shard: str, key: str, files: dict[str, bytes]) -> dict[str, Any] | BadRow:
        """Turn the members of one sample into an item, or a :class:`BadRow`."""

        def bad(reason: str, detail: str, member: str = key) -> BadRow:
            return BadRow(shard, None, reason, detail, member=member)

        meta: dict[str, Any] = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8-sig"))
            except UnicodeDecodeError as error:
                return bad(
                    BAD_UTF8,
                    f"invalid UTF-8: byte 0x{files['json'][error.start]:02x} at byte {error.start + 1}",
                    f"{key}.json",
                )
            except json.JSONDecodeError as error:
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
                raw = files[member]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    detail = f"invalid UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1}"
                    return bad(BAD_UTF8, detail, f"{key}.{member}")
            elif isinstance(meta.get(column), str):
                text, member = meta[column], "json"
            elif field == "en" and culture_only:
                text = ""
            else:
                present = sorted(files) + sorted(f"json:{name}" for name in meta)
                hint = did_you_mean(column, [suffix.removesuffix(".txt") for suffix in files] + list(meta))
                return bad(
                    MISSING_COLUMN,
                    f"no {key}.{member} member and no {column!r} in {key}.json (the sample holds "
                    f"{', '.join(present)}){hint}",
                )
            texts[field], problem = check_text(column, text)
            if problem is not None:
                return bad(*problem, f"{key}.{member}")
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
            suffix = _image_member(files)
            if suffix is None:
                return bad(MISSING_IMAGE, f"no image member ({'/'.join(IMAGE_EXTENSIONS)}) for sample {key}")
            try:
                image = open_rgb(files[suffix])
            except (OSError, ValueError) as error:
                return bad(UNREADABLE_IMAGE, f"cannot decode: {error}", f"{key}.{suffix}")
            if small := too_small(image, self.min_image_size):
                return bad(IMAGE_TOO_SMALL, small, f"{key}.{suffix}")
            if self.transform is not None:
                # A stable per-sample integer for the random crop, independent of stream position.
                index = int.from_bytes(
                    hashlib.blake2b(item["key"].encode(), digest_size=8).digest(), "little"
                )
                item["image"], geometry = self.transform(image, index)
                item.update(geometry)
        return item

    def _record(self, shard: str, acc: RowAccounting, sink: dict[str, RowAccounting]) -> None:
        """Keep ``acc`` as ``shard``'s accounting once it has read more than any earlier pass."""
        best = sink.get(shard)
        if best is acc or best is None or acc.read > best.read:
            sink[shard] = acc
            if self._shared is not None and sink is self._local:
                self._shared[shard] = acc

    def _stream(self, shards: Sequence[str], sink: dict[str, RowAccounting]) -> Iterator[dict[str, Any]]:
        yielded = 0
        for shard in shards:
            if self._shared is not None and sink is self._local and shard in self._shared:
                sink.setdefault(shard, self._shared[shard])  # an earlier epoch's worker read it
            acc = RowAccounting()
            # Exact duplicates are counted within a shard (a set over every shard could outgrow memory).
            first_seen: dict[tuple[str, str, bytes | None], str] = {}
            for key, files, cut in self._samples(shard):
                if files is None:
                    handle_bad_row(
                        BadRow(shard, None, TRUNCATED_SHARD, cut, member=key), self.on_bad_row, acc.skipped
                    )
                    acc.read += 1
                    self._record(shard, acc, sink)
                    continue
                item = self._decode(shard, key, files)
                if isinstance(item, BadRow):
                    handle_bad_row(item, self.on_bad_row, acc.skipped)
                    acc.read += 1
                    self._record(shard, acc, sink)
                    continue
                suffix = _image_member(files) if self.with_images else None
                image = hashlib.blake2b(files[suffix], digest_size=16).digest() if suffix else None
                first = first_seen.setdefault((item["en"], item["target"], image), key)
                acc.use(duplicate_at=f"{shard}:{key} (as :{first})" if first != key else None)
                # Counted before it is handed on: a consumer that stops after this item has it counted.
                self._record(shard, acc, sink)
                yielded += 1
                yield item
            if acc.read == 0:
                acc.empty_files.append(shard)
                self._record(shard, acc, sink)
        if shards and not yielded:
            _raise_unusable(self.columns, shards, [sink.get(shard) or RowAccounting() for shard in shards])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = self._stream(self._my_shards(), self._local)
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
        """Read every shard once (decoding images to check them, without the tensors) and return the full
        bad-row report; the reader's own :meth:`accounting` is left as it is."""
        sink: dict[str, RowAccounting] = {}
        transform, self.transform = self.transform, None
        try:
            for _ in self._stream(self.shards, sink):
                pass
        finally:
            self.transform = transform
        return RowAccounting.merged(sink[shard] for shard in self.shards if shard in sink).skipped

    def fingerprint(self, *, content: bool = False) -> str:
        """A hash of the shard files (path, size, mtime; or bytes) and the column map."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((self.columns, self.on_bad_row, self.with_images)).encode())
        for shard in self.shards:
            digest.update(file_fingerprint(shard, content=content).encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"TarShardCorpus({len(self.shards)} shards, first {self.shards[0]}, images={self.with_images})"
