"""Bad-row records, the error raised under ``on_bad_row="fail"``, and the skip report.

A corpus never silently drops a row: each row it cannot use becomes a :class:`BadRow` that names
the file and the 1-based line (for tar shards: the shard and the member). Under ``"fail"`` the
first one raises :class:`DataError`; under ``"skip"`` it is counted in a :class:`BadRowReport`,
which the corpus's :class:`~xling.train.data.RowAccounting` carries to the end of the run.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

OnBadRow = Literal["skip", "fail"]

#: Reasons a row is rejected; reports, ``metrics.json`` and the CLI group by these exact strings.
MALFORMED_ROW = "malformed_row"  # invalid JSON, wrong CSV field count, a caption that is not text, ...
MISSING_COLUMN = "missing_column"
EMPTY_CAPTION = "empty_caption"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
BAD_UTF8 = "bad_utf8"  # a byte sequence that is not UTF-8 in a line, field or tar text member
CONTROL_CHARACTERS = (
    "control_characters"  # NUL or another C0/C1 control character (tab and newlines excepted)
)
FIELD_TOO_LONG = "field_too_long"  # a CSV/TSV field over FIELD_LIMIT characters
UNCLOSED_QUOTE = (
    "unclosed_quote"  # a CSV/TSV quoted field that never closes (the rest of the file is re-read)
)
IMAGE_TOO_SMALL = "image_too_small"  # shorter side below the minimum image size
TRUNCATED_SHARD = "truncated_shard"  # the tar sample a cut (or corrupt) shard ends in
REASONS = (
    MALFORMED_ROW,
    MISSING_COLUMN,
    EMPTY_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    BAD_UTF8,
    CONTROL_CHARACTERS,
    FIELD_TOO_LONG,
    UNCLOSED_QUOTE,
    IMAGE_TOO_SMALL,
    TRUNCATED_SHARD,
)


@dataclass(frozen=True)
class BadRow:
    """One unusable row of a corpus.

    Attributes:
        file: The corpus file (or tar shard) the row came from.
        line: 1-based line number for JSONL/CSV/TSV (the header is line 1 of a CSV), 1-based row
            number for Parquet, ``None`` for tar shards.
        reason: One of :data:`REASONS`, e.g. ``"empty_caption"``.
        detail: A human-readable explanation, e.g. ``"column 'zh' is empty"``.
        member: For tar shards, the sample key or member name; ``None`` otherwise.
    """

    file: str
    line: int | None
    reason: str
    detail: str
    member: str | None = None

    def location(self, *, short: bool = False) -> str:
        """``file:line`` (or ``file:member`` for tar shards); ``short`` keeps only the base name."""
        name = os.path.basename(self.file) if short else self.file
        if self.member is not None:
            return f"{name}:{self.member}"
        return f"{name}:{self.line}" if self.line is not None else name

    def __str__(self) -> str:
        return f"{self.location()}: {self.reason}: {self.detail}"


class DataError(ValueError):
    """A corpus row could not be used and the policy is ``on_bad_row="fail"``.

    The message names the file, the line (or tar member) and the problem; ``bad_row`` holds the record.
    """

    def __init__(self, bad_row: BadRow) -> None:
        super().__init__(f"{bad_row} (pass on_bad_row='skip' to skip such rows)")
        self.bad_row = bad_row


@dataclass
class BadRowReport:
    """Counts of skipped rows per reason plus the first few examples of each.

    Args:
        max_examples: How many examples to keep per reason.
    """

    max_examples: int = 5
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[BadRow]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Number of rows skipped so far."""
        return sum(self.counts.values())

    def add(self, bad_row: BadRow) -> None:
        """Count ``bad_row`` and keep it as an example while fewer than ``max_examples`` are kept."""
        self.counts[bad_row.reason] += 1
        kept = self.examples.setdefault(bad_row.reason, [])
        if len(kept) < self.max_examples:
            kept.append(bad_row)

    def merge(self, other: BadRowReport) -> None:
        """Add the counts and examples of ``other`` (e.g. the report of another shard) to this one."""
        self.counts.update(other.counts)
        for reason, rows in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(rows[: max(0, self.max_examples - len(kept))])

    def summary(self) -> str:
        """One line for the end of a run.

        Example: ``skipped 3 rows: 2 empty_caption (data.jsonl:4, :9), 1 unreadable_image (data.jsonl:7)``.
        """
        if not self.total:
            return "skipped 0 rows"
        parts = []
        for reason, count in self.counts.most_common():
            locations, previous_file = [], None
            for row in self.examples.get(reason, []):
                # Repeat the file name only when it changes, as in "data.jsonl:4, :9".
                text = row.location(short=True)
                if previous_file == row.file:
                    text = text[len(os.path.basename(row.file)) :]
                previous_file = row.file
                locations.append(text)
            more = ", ..." if count > len(locations) else ""
            parts.append(f"{count} {reason} ({', '.join(locations)}{more})")
        noun = "row" if self.total == 1 else "rows"
        return f"skipped {self.total} {noun}: " + ", ".join(parts)

    def __str__(self) -> str:
        return self.summary()


def handle_bad_row(bad_row: BadRow, policy: OnBadRow, report: BadRowReport) -> None:
    """Raise :class:`DataError` under ``"fail"``, else count ``bad_row`` in ``report``."""
    if policy == "fail":
        raise DataError(bad_row)
    report.add(bad_row)


def check_policy(on_bad_row: str) -> OnBadRow:
    """Validate an ``on_bad_row`` argument."""
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
    return on_bad_row  # type: ignore[return-value]
