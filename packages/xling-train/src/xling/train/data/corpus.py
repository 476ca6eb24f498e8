"""Parallel corpora from JSONL, CSV, TSV and Parquet files: one map-style dataset, many readers.

A row is an English caption, a caption in the target language, optionally an image path and a
"culture-only" flag (rows with no trustworthy English, trained with the plain denoising loss by
PEA's hybrid mode). Rows are parsed and validated once, at construction, so bad rows are found
before training starts and the report is complete even with DataLoader workers.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from xling.train.data.accounting import RowAccounting
from xling.train.data.errors import (
    BAD_UTF8,
    CONTROL_CHARACTERS,
    EMPTY_CAPTION,
    FIELD_TOO_LONG,
    IMAGE_TOO_SMALL,
    MALFORMED_ROW,
    MISSING_COLUMN,
    MISSING_IMAGE,
    UNCLOSED_QUOTE,
    UNREADABLE_IMAGE,
    BadRow,
    BadRowReport,
    DataError,
    OnBadRow,
    check_policy,
    handle_bad_row,
)
from xling.train.data.images import CropPolicy, ImageTransform, default_min_size, open_rgb, too_small

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


#: The longest caption (and, in CSV/TSV, the longest field) a row may hold, in characters. csv's own default is
#: 131,072 and ends the whole file with an error; above this limit a row is a counted ``field_too_long`` skip.
FIELD_LIMIT = 1 << 20

# Control characters (C0, DEL, C1) but tab, line feed and carriage return, which are whitespace in a caption.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Undecodable bytes, as the "surrogateescape" error handler keeps them (0x80-0xff -> U+DC80-U+DCFF).
_ESCAPED = re.compile(r"[\udc80-\udcff]")
_BOM = "\ufeff"

Record = dict[str, Any] | BadRow


def check_text(name: str, value: str) -> tuple[str, tuple[str, str] | None]:
    """Clean one caption: strip whitespace and a leading UTF-8 byte-order mark.

    Returns:
        ``(text, problem)``: ``problem`` is ``None``, or ``(reason, detail)`` when ``value`` holds bytes that were
        not UTF-8 (``bad_utf8``), a control character such as NUL (``control_characters``) or more than
        :data:`FIELD_LIMIT` characters (``field_too_long``).
    """
    if match := _ESCAPED.search(value):
        byte = ord(match.group()) - 0xDC00
        return value, (
            BAD_UTF8,
            f"column {name!r} holds the byte 0x{byte:02x}, not UTF-8, at character {match.start() + 1}",
        )
    if match := _CONTROL.search(value):
        code = ord(match.group())
        return value, (
            CONTROL_CHARACTERS,
            f"column {name!r} holds control character U+{code:04X} at character {match.start() + 1}",
        )
    if len(value) > FIELD_LIMIT:
        return value, (
            FIELD_TOO_LONG,
            f"column {name!r} holds {len(value):,} characters (limit {FIELD_LIMIT:,})",
        )
    return value.strip().removeprefix(_BOM).strip(), None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'zh'?)"`` for the choice closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _utf8_detail(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"invalid UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line"


def _read_jsonl(path: str) -> Iterator[tuple[int, Record]]:
    """Yield ``(line, record)``; a line that is not a UTF-8 JSON object comes back as a :class:`BadRow`."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                # One bad byte costs its line only, not the file.
                yield line_no, BadRow(path, line_no, BAD_UTF8, _utf8_detail(raw, error))
                continue
            if line_no == 1:
                text = text.removeprefix(_BOM)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield (
                    line_no,
                    BadRow(
                        path, line_no, MALFORMED_ROW, f"invalid JSON: {error.msg} at column {error.colno}"
                    ),
                )
                continue
            if not isinstance(record, dict):
                detail = f"expected a JSON object, got {type(record).__name__}"
                yield line_no, BadRow(path, line_no, MALFORMED_ROW, detail)
                continue
            yield line_no, record


class _Lines:
    """The physical lines of a text file, numbered, that a ``csv.reader`` reads, and that can start again
    after any line: a quote that never closes swallows the lines after it, which are then read again.

    Undecodable bytes are kept as surrogates ("surrogateescape"), so they cost the row that holds them (see
    :func:`check_text`), not the file.
    """

    def __init__(self, path: str) -> None:
        self.path, self.line = path, 0
        self.handle = self._open()

    def _open(self) -> Any:
        # Closed by close(), which every reader calls in a finally block.
        return open(self.path, encoding="utf-8", errors="surrogateescape", newline="")

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        text = self.handle.readline()
        if not text:
            raise StopIteration
        self.line += 1
        return text.removeprefix(_BOM) if self.line == 1 else text

    def restart_after(self, line: int) -> None:
        """Continue with line ``line + 1`` (re-reads the file up to there; only after a damaged row)."""
        self.handle.close()
        self.handle = self._open()
        for _ in range(line):
            self.handle.readline()
        self.line = line

    def close(self) -> None:
        self.handle.close()


def _csv_error(error: csv.Error, start: int, end: int) -> tuple[str, str]:
    """``(reason, detail)`` of a row that ``csv`` cannot parse, started on line ``start`` and read to ``end``."""
    message = str(error)
    if "field larger than field limit" in message:
        return FIELD_TOO_LONG, f"a field of the row starting here is over {FIELD_LIMIT:,} characters"
    if end > start or "end of data" in message:
        return UNCLOSED_QUOTE, (
            f"a quoted field opened on line {start} does not close (read up to line {end}: {message}); "
            f"the lines after {start} are read again as rows"
        )
    return MALFORMED_ROW, f"cannot parse the row: {message}"


def _read_delimited(path: str, delimiter: str) -> Iterator[tuple[int, Record]]:
    """Yield ``(line, record)`` of a CSV/TSV file with a header row (line 1).

    A row ``csv`` cannot parse, or one that spans several lines with the wrong number of fields (a quote that
    never closed), is a :class:`BadRow` at the line it starts on, and reading goes on at the next line.

    Raises:
        ValueError: the header row cannot be read (the message names the file and line 1).
    """
    # Raise csv's module-wide limit (never lower it): an over-long field becomes a counted skip, not a crash.
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT + 1))
    lines = _Lines(path)
    try:
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{path}:1: cannot read the header row: {error}") from error
        if lines.line > 1:
            raise ValueError(
                f"{path}:1: the header row has a quote that does not close (it runs to line {lines.line})"
            )
        while True:
            start = lines.line + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield start, BadRow(path, start, *_csv_error(error, start, lines.line))
                lines.restart_after(start)
                reader = csv.reader(lines, delimiter=delimiter, strict=True)
                continue
            if not any(field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                detail = f"expected {len(header)} fields as in the header, got {len(fields)}"
                if lines.line > start:
                    # A quote that never closed swallowed the next lines: report it, then read them again.
                    yield (
                        start,
                        BadRow(
                            path,
                            start,
                            UNCLOSED_QUOTE,
                            f"{detail} from a quoted field over lines {start}-{lines.line}; the lines after {start} are read again as rows",
                        ),
                    )
                    lines.restart_after(start)
                    reader = csv.reader(lines, delimiter=delimiter, strict=True)
                else:
                    yield start, BadRow(path, start, MALFORMED_ROW, detail)
                continue
            yield start, dict(zip(header, fields))
    finally:
        lines.close()


def _parquet_file(path: str) -> Any:
    """``pyarrow.parquet.ParquetFile(path)``, with an error that names the file when it is not a readable one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        size = os.path.getsize(path)
        raise ValueError(
            f"{path} is not a readable Parquet file ({size:,} bytes: {error}); was it cut short or not written "
            "by a Parquet writer?"
        ) from error


def _read_parquet(path: str, columns: ColumnMap) -> Iterator[tuple[int, Record]]:
    """Yield ``(row number, record)`` of a Parquet file, reading only the mapped columns."""
    import pyarrow as pa

    parquet = _parquet_file(path)
    wanted = [name for name in asdict(columns).values() if name in parquet.schema_arrow.names]
    row_no = 0
    try:
        for batch in parquet.iter_batches(columns=wanted, batch_size=4096):
            for record in batch.to_pylist():
                row_no += 1
                yield row_no, record
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: cannot read the rows after row {row_no}: {error}") from error


def read_records(path: str, columns: ColumnMap) -> Iterator[tuple[int, Record]]:
    """Yield ``(line, record)`` pairs of a table file, chosen by its suffix.

    Malformed rows are yielded as a :class:`BadRow` in place of the record.
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


def column_names(path: str) -> list[str]:
    """The columns of a table file: the CSV/TSV header, the Parquet schema, or every key of a JSONL file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return list(_parquet_file(path).schema_arrow.names)
    if suffix in (".csv", ".tsv"):
        lines = _Lines(path)
        try:
            return [
                name.strip()
                for name in next(csv.reader(lines, delimiter="\t" if suffix == ".tsv" else ","), [])
            ]
        except csv.Error:
            return []
        finally:
            lines.close()
    names: dict[str, None] = {}
    for _, record in _read_jsonl(path):
        if isinstance(record, dict):
            names.update(dict.fromkeys(record))
    return list(names)


def _has_column(path: str, name: str) -> bool:
    """Whether a CSV/TSV header or Parquet schema has column ``name`` (JSONL: any record has the key)."""
    return name in column_names(path)


def _empty_file(path: str) -> str:
    """Why table file ``path`` gave no row at all (the message of the error the corpus raises)."""
    if os.path.getsize(path) == 0:
        return f"{path} is empty (0 bytes)"
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return f"{path} has a header row ({', '.join(column_names(path))}) but no data rows"
    if suffix == ".parquet":
        return f"{path} has no rows (columns: {', '.join(column_names(path))})"
    return f"{path} holds no JSON line (only blank lines)"


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
        min_image_size: Shortest image side (pixels) a row may have; a smaller image is an ``image_too_small``
            skip rather than upscaled from almost nothing. ``None``: ``resolution // 8`` (0 disables).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file holds no row at all (zero bytes, only a header, only blank lines), is not a
            readable Parquet file, or has an unreadable CSV header; the message names the file.
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
        min_image_size: int | None = None,
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
        if min_image_size is not None and min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, got {min_image_size}")
        self.min_image_size = default_min_size(resolution) if min_image_size is None else min_image_size
        self.report = BadRowReport()
        self._accounting = RowAccounting(skipped=self.report)
        self.rows: list[Row] = []
        self.with_images: dict[str, bool] = {}
        first_seen: dict[tuple[str, str, str | bytes | None], tuple[str, int]] = {}
        for path in self.paths:
            if self.columns.image is None or with_images is False:
                self.with_images[path] = False
            else:
                self.with_images[path] = bool(with_images) or _has_column(path, self.columns.image)
            read_before = self._accounting.read
            for line, record in read_records(path, self.columns):
                row = self._parse(path, line, record)
                if isinstance(row, BadRow):
                    handle_bad_row(row, self.on_bad_row, self._accounting.skipped)
                    self._accounting.read += 1
                    continue
                self.rows.append(row)
                # Exact duplicates are kept (a corpus may repeat a pair on purpose) but counted.
                image_key = (
                    hashlib.blake2b(row.image, digest_size=16).digest()
                    if isinstance(row.image, bytes)
                    else row.image
                )
                file, line = first_seen.setdefault((row.en, row.target, image_key), (path, row.line))
                if (file, line) == (path, row.line):
                    self._accounting.use()
                else:
                    first = f":{line}" if file == path else f"{os.path.basename(file)}:{line}"
                    self._accounting.use(duplicate_at=f"{row.source} (as {first})")
            if self._accounting.read == read_before:
                raise ValueError(_empty_file(path))

    def accounting(self) -> RowAccounting:
        """Rows read, used and skipped (by reason) over every file, and exact duplicates among the used ones."""
        return self._accounting

    def _parse(self, path: str, line: int, record: Record) -> Row | BadRow:
        """Validate one record into a :class:`Row`, or describe what is wrong with it."""

        def bad(reason: str, detail: str) -> BadRow:
            return BadRow(path, line, reason, detail)

        if isinstance(record, BadRow):
            return record
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
                return bad(MISSING_COLUMN, f"column {name!r} is missing{did_you_mean(name, record)}")
            value = record[name]
            if value is not None and not isinstance(value, str):
                return bad(MALFORMED_ROW, f"column {name!r} is not text: {value!r}")
            texts[name], problem = check_text(name, value or "")
            if problem is not None:
                return bad(*problem)
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
            what = source if isinstance(source, str) else "image bytes"
            try:
                image = open_rgb(source)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                return UNREADABLE_IMAGE, f"cannot decode {what}: {error}"
            if small := too_small(image, self.min_image_size):
                return IMAGE_TOO_SMALL, f"{what}: {small}"
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
            if small := too_small(image, self.min_image_size):  # only unchecked with verify_images=False
                raise DataError(BadRow(row.file, row.line, IMAGE_TOO_SMALL, small))
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
