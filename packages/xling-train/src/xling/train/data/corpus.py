"""Parallel corpora from JSONL, CSV, TSV and Parquet files: one map-style dataset, many readers.

A row is an English caption, a caption in the target language, optionally an image path and a
"culture-only" flag (rows with no trustworthy English, trained with the plain denoising loss by
PEA's hybrid mode). Rows are parsed and validated once, at construction, so bad rows are found
before training starts and the report is complete even with DataLoader workers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from xling.train.data.errors import (
    EMPTY_CAPTION,
    MALFORMED_ROW,
    MISSING_COLUMN,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    BadRow,
    BadRowReport,
    DataError,
    OnBadRow,
    check_policy,
    handle_bad_row,
)
from xling.train.data.images import CropPolicy, ImageTransform, open_rgb

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class ColumnMap:
    """Which column holds which field.

    Args:
        en: Column of the English caption; ``None``: the corpus has none (recipes that never read English,
            such as ``denoise``), and every row's ``en`` is ``""``.
        target: Column of the caption in the target language (Chinese by default).
        image: Column of the image path (relative paths resolve against ``image_root``, else the
            corpus file's folder). In Parquet it may also hold encoded image bytes or a
            ``{"bytes": ..., "path": ...}`` struct as Hugging Face datasets write it.
        culture_only: Column of the culture-only flag (bool, 0/1, "true"/"false", "yes"/"no"); ``None``
            means no row is culture-only. A culture-only row may have an empty or missing English caption.
    """

    en: str | None = "en"
    target: str = "zh"
    image: str | None = "image"
    culture_only: str | None = None


@dataclass(frozen=True)
class Row:
    """One validated row.

    Attributes:
        en: English caption, stripped ("" only for culture-only rows, or with no English column).
        target: Target-language caption, stripped, never empty.
        image: Resolved image path, raw image bytes, or ``None`` for a text-only row.
        culture_only: Whether the row is culture-only.
        file: Source file.
        line: 1-based line (JSONL, CSV/TSV with the header as line 1) or row number (Parquet).
    """

    en: str
    target: str
    image: str | bytes | None
    culture_only: bool
    file: str
    line: int

    @property
    def source(self) -> str:
        """``file:line`` of the row."""
        return f"{self.file}:{self.line}"


_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f", ""}


def _parse_flag(value: Any) -> bool | None:
    """Parse a culture-only flag; ``None`` means it is not a recognisable boolean."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(line, record)``; a record that is not a JSON object comes back as an error string."""
    with open(path, encoding="utf-8") as handle:
        for line_no, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield line_no, f"invalid JSON: {error.msg} at column {error.colno}"
                continue
            if not isinstance(record, dict):
                yield line_no, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line_no, record


def _read_delimited(path: str, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(line, record)`` of a CSV/TSV file with a header row (line 1)."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        start = reader.line_num + 1
        for fields in reader:
            line_no, start = start, reader.line_num + 1
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                yield line_no, f"expected {len(header)} fields as in the header, got {len(fields)}"
                continue
            yield line_no, dict(zip(header, fields))


def _read_parquet(path: str, columns: ColumnMap) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(row number, record)`` of a Parquet file, reading only the mapped columns."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    wanted = [name for name in asdict(columns).values() if name in parquet.schema_arrow.names]
    row_no = 0
    for batch in parquet.iter_batches(columns=wanted, batch_size=4096):
        for record in batch.to_pylist():
            row_no += 1
            yield row_no, record


def read_records(path: str, columns: ColumnMap) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(line, record)`` pairs of a table file, chosen by its suffix.

    Malformed rows are yielded as an error string in place of the record.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_delimited(path, ",")
    if suffix == ".tsv":
        return _read_delimited(path, "\t")
    if suffix == ".parquet":
        return _read_parquet(path, columns)
    raise ValueError(
        f"unsupported corpus file {path!r}: expected one of {', '.join(TABLE_SUFFIXES)} or .tar shards"
    )


def _has_column(path: str, name: str) -> bool:
    """Whether a CSV/TSV header or Parquet schema has column ``name`` (JSONL: any record has the key)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return name in pq.ParquetFile(path).schema_arrow.names
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ","), [])
        return name in header
    return any(isinstance(record, dict) and name in record for _, record in _read_jsonl(path))


class ParallelCorpus(Dataset[dict[str, Any]]):
    """A map-style dataset of parallel captions (and images) from one or more table files.

    Items are dicts: ``index`` (int, row index), ``en`` (str), ``target`` (str), ``culture_only`` (bool),
    ``source`` (``"file:line"``) and, when images are loaded (``resolution`` given), ``image`` float32
    ``[3, R, R]`` in [-1, 1], ``original_size`` ``(h, w)`` and ``crop_top_left`` ``(top, left)``.

    Args:
        paths: One file or several (concatenated in order): ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``.
        columns: Column names (see :class:`ColumnMap`).
        image_root: Folder that relative image paths resolve against (default: each file's folder).
        on_bad_row: ``"skip"`` counts bad rows in :attr:`report`; ``"fail"`` raises :class:`DataError` at
            the first one, naming file:line and the problem.
        resolution: Load images resized and cropped to this size; ``None`` gives a text-only dataset.
        crop: ``"center"`` or ``"random"`` (seeded per row, see :class:`ImageTransform`).
        seed: Seed of the random crop.
        with_images: Whether rows must have an image. ``None``: when the image column exists in the
            file (header, schema, or any JSONL record); ``False`` ignores the column.
        verify_images: Decode every image once at construction, so unreadable ones become bad rows
            before training and not errors in a worker.
    """

    def __init__(
        self,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        columns: ColumnMap | None = None,
        image_root: str | os.PathLike[str] | None = None,
        on_bad_row: OnBadRow = "skip",
        resolution: int | None = None,
        crop: CropPolicy = "center",
        seed: int = 0,
        with_images: bool | None = None,
        verify_images: bool = True,
    ) -> None:
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        if not paths:
            raise ValueError("paths is empty: give at least one corpus file")
        self.paths = [os.fspath(path) for path in paths]
        for path in self.paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"corpus file not found: {path}")
        self.columns = columns if columns is not None else ColumnMap()
        if not isinstance(self.columns, ColumnMap):
            raise TypeError(f"columns must be a ColumnMap, got {type(self.columns).__name__}")
        self.image_root = os.fspath(image_root) if image_root is not None else None
        self.on_bad_row = check_policy(on_bad_row)
        self.transform = ImageTransform(resolution, crop, seed) if resolution is not None else None
        self.verify_images = verify_images
        self.report = BadRowReport()
        self.rows: list[Row] = []
        self.with_images: dict[str, bool] = {}
        for path in self.paths:
            if self.columns.image is None or with_images is False:
                self.with_images[path] = False
            else:
                self.with_images[path] = bool(with_images) or _has_column(path, self.columns.image)
            for line, record in read_records(path, self.columns):
                row = self._parse(path, line, record)
                if isinstance(row, BadRow):
                    handle_bad_row(row, self.on_bad_row, self.report)
                else:
                    self.rows.append(row)

    def _parse(self, path: str, line: int, record: dict[str, Any] | str) -> Row | BadRow:
        """Validate one record into a :class:`Row`, or describe what is wrong with it."""

        def bad(reason: str, detail: str) -> BadRow:
            return BadRow(path, line, reason, detail)

        if isinstance(record, str):
            return bad(MALFORMED_ROW, record)
        columns = self.columns
        culture_only = False
        if columns.culture_only is not None:
            flag = _parse_flag(record.get(columns.culture_only))
            if flag is None:
                return bad(
                    MALFORMED_ROW,
                    f"column {columns.culture_only!r} is not a boolean: {record[columns.culture_only]!r}",
                )
            culture_only = flag
        texts = {"": ""}  # columns.en None: no English column, every row's English is ""
        for name in (columns.target, columns.en):
            if name is None:
                continue
            if name not in record:
                if name == columns.en and culture_only:
                    texts[name] = ""
                    continue
                return bad(MISSING_COLUMN, f"column {name!r} is missing")
            value = record[name]
            if value is not None and not isinstance(value, str):
                return bad(MALFORMED_ROW, f"column {name!r} is not text: {value!r}")
            texts[name] = (value or "").strip()
            if not texts[name] and not (name == columns.en and culture_only):
                return bad(EMPTY_CAPTION, f"column {name!r} is empty")
        image: str | bytes | None = None
        if self.with_images[path]:
            image_or_bad = self._resolve_image(path, record)
            if isinstance(image_or_bad, tuple):
                return bad(*image_or_bad)
            image = image_or_bad
        return Row(texts[columns.en or ""], texts[columns.target], image, culture_only, path, line)

    def _resolve_image(self, path: str, record: dict[str, Any]) -> str | bytes | tuple[str, str]:
        """Return the image path or bytes of a record, or ``(reason, detail)`` when unusable."""
        name = self.columns.image
        assert name is not None
        value = record.get(name)
        if isinstance(value, dict):  # Hugging Face datasets' Image feature in Parquet
            value = value.get("bytes") or value.get("path")
        if value is None or (isinstance(value, str) and not value.strip()):
            return MISSING_COLUMN, f"column {name!r} is missing or empty"
        if isinstance(value, bytes):
            source: str | bytes = value
        elif isinstance(value, str):
            root = self.image_root if self.image_root is not None else os.path.dirname(os.path.abspath(path))
            source = os.path.normpath(os.path.join(root, value.strip()))
            if not os.path.isfile(source):
                return MISSING_IMAGE, f"image file not found: {source}"
        else:
            return MALFORMED_ROW, f"column {name!r} is neither a path nor bytes: {type(value).__name__}"
        if self.verify_images:
            try:
                open_rgb(source)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                return (
                    UNREADABLE_IMAGE,
                    f"cannot decode {source if isinstance(source, str) else 'image bytes'}: {error}",
                )
        return source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.get(index)

    def get(self, index: int, *, load_image: bool = True) -> dict[str, Any]:
        """Item ``index``; ``load_image=False`` skips decoding (e.g. when its latents are cached)."""
        if not -len(self.rows) <= index < len(self.rows):
            raise IndexError(f"index {index} out of range for a corpus of {len(self.rows)} rows")
        index = index % len(self.rows)
        row = self.rows[index]
        item: dict[str, Any] = {
            "index": index,
            "en": row.en,
            "target": row.target,
            "culture_only": row.culture_only,
            "source": row.source,
        }
        if load_image and self.transform is not None and row.image is not None:
            try:
                image = open_rgb(row.image)
            except (OSError, ValueError) as error:
                # Validation passed at construction, so the file changed since: no row to skip to here.
                raise DataError(BadRow(row.file, row.line, UNREADABLE_IMAGE, str(error))) from error
            item["image"], geometry = self.transform(image, index)
            item.update(geometry)
        return item

    @property
    def has_images(self) -> bool:
        """Whether items carry an ``image`` tensor."""
        return self.transform is not None and any(row.image is not None for row in self.rows)

    def captions(self, field: str = "en") -> list[str]:
        """All captions of one field (``"en"`` or ``"target"``), in row order."""
        if field not in ("en", "target"):
            raise ValueError(f"field must be 'en' or 'target', got {field!r}")
        return [getattr(row, field) for row in self.rows]

    def fingerprint(self, *, content: bool = False) -> str:
        """A hash that changes when the rows or their images may have changed.

        Covers every corpus file (path, size, mtime; or its bytes with ``content=True``), the column
        map, the image root, the bad-row policy (it decides row indices) and the size and mtime of
        every image file. The image transform is not included: caches add it to their own keys.
        """
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((asdict(self.columns), self.image_root, self.on_bad_row, len(self.rows))).encode())
        for path in self.paths:
            digest.update(file_fingerprint(path, content=content).encode())
        for row in self.rows:
            if isinstance(row.image, str):
                stat = os.stat(row.image)
                digest.update(f"{row.image}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            elif isinstance(row.image, bytes):
                digest.update(hashlib.blake2b(row.image, digest_size=16).digest())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (
            f"ParallelCorpus({len(self.rows)} rows from {', '.join(self.paths)}, "
            f"images={self.has_images}, {self.report.summary()})"
        )


def file_fingerprint(path: str | os.PathLike[str], *, content: bool = False) -> str:
    """``path:size:mtime_ns`` of a file, or ``path:blake2b(bytes)`` with ``content=True``."""
    path = os.path.abspath(os.fspath(path))
    if content:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return f"{path}:{digest.hexdigest()}"
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def columns_from(mapping: ColumnMap | Mapping[str, str | None] | None) -> ColumnMap:
    """Build a :class:`ColumnMap` from a config mapping such as ``{"en": "english", "target": "chinese"}``."""
    if mapping is None:
        return ColumnMap()
    if isinstance(mapping, ColumnMap):
        return mapping
    unknown = set(mapping) - set(ColumnMap.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown column keys {sorted(unknown)}: expected en, target, image, culture_only")
    return ColumnMap(**mapping)  # type: ignore[arg-type]
