"""The row accounting of a run: how many rows were read, used and skipped (by reason, with the first few
``file:line`` locations of each), and how many used rows were exact duplicates.

Every corpus keeps one (:meth:`ParallelCorpus.accounting`, :meth:`TarShardCorpus.accounting`); the training
loop gathers them with :func:`row_accounting` at the end of a run, summed over the processes that split a
corpus, and the run's ``metrics.json`` (key ``rows``), ``report.md`` and the CLI's last lines carry it.

Example:
    >>> acc = RowAccounting(read=1000, used=990)
    >>> for line in (17, 20, 31, 40, 52, 60):
    ...     acc.skipped.add(BadRow("a.jsonl", line, "bad_utf8", "invalid UTF-8 byte 0xff"))
    >>> for line in (3, 9, 11, 12):
    ...     acc.skipped.add(BadRow("a.jsonl", line, "missing_image", "image file not found: x.png"))
    >>> print(acc.summary())
    rows: 1,000 read, 990 used, 10 skipped (bad_utf8 6, missing_image 4); first: a.jsonl:17, a.jsonl:3
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xling.train.data.errors import BadRow, BadRowReport

__all__ = ["RowAccounting", "row_accounting"]


@dataclass
class RowAccounting:
    """Rows read, used and skipped by one corpus (or by all the corpora and processes of a run).

    ``read == used + skipped.total`` for every corpus: a row is read once (a tar shard streamed again in a
    later epoch is not counted again), then used or skipped. Duplicates are used rows whose caption pair and
    image (path, or bytes) equal an earlier row's: they are kept and trained on, only counted.

    Attributes:
        read: Rows (records, CSV rows, Parquet rows, tar samples) read, bad ones included.
        used: Rows that passed every check.
        skipped: The skipped rows: counts by reason and the first few of each.
        duplicates: Used rows that repeat an earlier row exactly.
        duplicate_examples: ``file:line`` of the first few duplicates.
        empty_files: Tar shards that held no sample (table files with no row are an error instead).
        max_examples: How many locations to keep per reason and for duplicates.
    """

    read: int = 0
    used: int = 0
    skipped: BadRowReport = field(default_factory=BadRowReport)
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)
    max_examples: int = 5

    def skip(self, bad_row: BadRow) -> None:
        """Count one read row that was skipped."""
        self.read += 1
        self.skipped.add(bad_row)

    def use(self, *, duplicate_at: str | None = None) -> None:
        """Count one read row that is used; ``duplicate_at``: its ``file:line`` when it repeats an earlier row."""
        self.read += 1
        self.used += 1
        if duplicate_at is not None:
            self.duplicates += 1
            if len(self.duplicate_examples) < self.max_examples:
                self.duplicate_examples.append(duplicate_at)

    def merge(self, other: RowAccounting) -> RowAccounting:
        """Add ``other`` (another file, shard, corpus or process) to this one; returns ``self``."""
        self.read += other.read
        self.used += other.used
        self.skipped.merge(other.skipped)
        self.duplicates += other.duplicates
        room = max(0, self.max_examples - len(self.duplicate_examples))
        self.duplicate_examples.extend(other.duplicate_examples[:room])
        self.empty_files.extend(f for f in other.empty_files if f not in self.empty_files)
        return self

    @classmethod
    def merged(cls, parts: Iterable[RowAccounting]) -> RowAccounting:
        """A new accounting that sums ``parts``."""
        total = cls()
        for part in parts:
            total.merge(part)
        return total

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written under ``rows`` in ``metrics.json``.

        Example: ``{"read": 12, "used": 10, "skipped": 2, "by_reason": {"bad_utf8": 2},
        "first": {"bad_utf8": ["a.jsonl:4", "a.jsonl:9"]}, "duplicates": 0, "duplicate_examples": [],
        "empty_files": []}``.
        """
        return {
            "read": self.read,
            "used": self.used,
            "skipped": self.skipped.total,
            "by_reason": dict(self.skipped.counts.most_common()),
            "first": {
                reason: [row.location() for row in self.skipped.examples.get(reason, [])]
                for reason, _ in self.skipped.counts.most_common()
            },
            "duplicates": self.duplicates,
            "duplicate_examples": list(self.duplicate_examples),
            "empty_files": list(self.empty_files),
        }

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``{"rows": to_dict()}`` to ``path`` (a run's ``metrics.json``, which the report completes)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps({"rows": self.to_dict()}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return path

    def summary(self) -> str:
        """The one line the CLI prints at the end of a run, e.g. ``rows: 1,000 read, 990 used, 10 skipped
        (bad_utf8 6, missing_image 4); first: a.jsonl:17, a.jsonl:3`` (the first location of each reason)."""
        text = f"rows: {self.read:,} read, {self.used:,} used, {self.skipped.total:,} skipped"
        reasons = self.skipped.counts.most_common()
        if reasons:
            text += " (" + ", ".join(f"{reason} {count:,}" for reason, count in reasons) + ")"
            firsts = [self.skipped.examples[reason][0].location(short=True) for reason, _ in reasons]
            text += "; first: " + ", ".join(firsts)
        if self.duplicates:
            head, _, tail = self.duplicate_examples[0].partition(" (as ")
            first = os.path.basename(head) + (f" (as {tail}" if tail else "")
            noun = "duplicate" if self.duplicates == 1 else "duplicates"
            text += f"; {self.duplicates:,} exact {noun} kept (first {first})"
        if self.empty_files:
            text += f"; {len(self.empty_files)} empty shard(s): {', '.join(self.empty_files[:3])}"
        return text

    def to_markdown(self) -> str:
        """The ``## Data`` section of ``report.md``: the totals, then a table of reasons and first locations."""
        lines = [
            "## Data",
            "",
            f"Rows read: {self.read:,}; used: {self.used:,}; skipped: {self.skipped.total:,}; exact duplicates "
            f"(kept): {self.duplicates:,}.",
            "",
        ]
        if self.skipped.total:
            lines += ["| reason | rows | first locations |", "|---|---|---|"]
            for reason, count in self.skipped.counts.most_common():
                where = ", ".join(f"`{row.location()}`" for row in self.skipped.examples.get(reason, []))
                more = ", ..." if count > len(self.skipped.examples.get(reason, [])) else ""
                lines.append(f"| {reason} | {count:,} | {where}{more} |")
            lines.append("")
        if self.duplicates:
            lines += [f"First duplicates: {', '.join(f'`{d}`' for d in self.duplicate_examples)}.", ""]
        if self.empty_files:
            lines += [f"Empty tar shards: {', '.join(f'`{f}`' for f in self.empty_files)}.", ""]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _corpus_of(rows: Any) -> Any | None:
    """The corpus under ``rows`` (a ``Subset``'s ``dataset``, a cache's ``corpus``), or ``None``."""
    seen = 0
    while rows is not None and seen < 8:
        if callable(getattr(rows, "accounting", None)):
            return rows
        inner = getattr(rows, "dataset", None)
        rows = inner if inner is not None else getattr(rows, "corpus", None)
        seen += 1
    return None


def row_accounting(*rows: Any, accelerator: Any | None = None) -> RowAccounting:
    """The accounting of a run's rows (training and validation): each corpus counted once.

    A corpus split across processes (tar shards with ``world_size > 1``) is summed over the processes with
    ``accelerate.utils.gather_object`` (a collective: every process must call this); a table corpus is read
    whole by every process, so its own counts are the run's. Rows that are not a corpus (a list, the toy
    world) count as read and used.

    Args:
        *rows: The training rows, the validation rows (``None`` is ignored), ...
        accelerator: The run's ``accelerate.Accelerator`` (needed to sum a split corpus).

    Returns:
        The run's :class:`RowAccounting`.
    """
    total, seen = RowAccounting(), set()
    split = False
    for part in rows:
        if part is None:
            continue
        corpus = _corpus_of(part)
        if corpus is None:
            n = len(part) if hasattr(part, "__len__") else 0
            total.merge(RowAccounting(read=n, used=n))
        elif id(corpus) not in seen:
            seen.add(id(corpus))
            total.merge(corpus.accounting())
            split = split or getattr(corpus, "world_size", 1) > 1
    if split and accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        total = RowAccounting.merged(gather_object([total]))
    return total
