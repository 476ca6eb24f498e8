"""Parallel corpora (JSONL, CSV, TSV, Parquet, WebDataset tar shards), image transforms, bad-row policy,
collation and a seeded, resumable sampling order.

Example:
    >>> corpus = load_corpus("pairs.jsonl", resolution=512, on_bad_row="skip")  # doctest: +SKIP
    >>> loader = make_dataloader(corpus, batch_size=8, seed=0)  # doctest: +SKIP
    >>> print(corpus.report.summary())  # doctest: +SKIP
    skipped 3 rows: 2 empty caption (pairs.jsonl:4, :9), 1 unreadable image (pairs.jsonl:7)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from xling.train.data.collate import collate
from xling.train.data.corpus import ColumnMap, ParallelCorpus, Row, columns_from, file_fingerprint
from xling.train.data.errors import REASONS, BadRow, BadRowReport, DataError, OnBadRow
from xling.train.data.images import CropPolicy, ImageTransform, open_rgb
from xling.train.data.sampling import SeededSampler, make_dataloader
from xling.train.data.shards import TarShardCorpus, expand_braces

__all__ = [
    "REASONS",
    "BadRow",
    "BadRowReport",
    "ColumnMap",
    "DataError",
    "ImageTransform",
    "ParallelCorpus",
    "Row",
    "SeededSampler",
    "TarShardCorpus",
    "collate",
    "columns_from",
    "expand_braces",
    "file_fingerprint",
    "load_corpus",
    "make_dataloader",
    "open_rgb",
]


def _is_tar(path: str) -> bool:
    return path.endswith(".tar") or path.endswith(".tar.gz") or path.endswith(".tgz") or "{" in path


def load_corpus(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    columns: ColumnMap | Mapping[str, str | None] | None = None,
    image_root: str | os.PathLike[str] | None = None,
    on_bad_row: OnBadRow = "skip",
    resolution: int | None = None,
    crop: CropPolicy = "center",
    seed: int = 0,
    with_images: bool | None = None,
    **kwargs: object,
) -> ParallelCorpus | TarShardCorpus:
    """Open a parallel corpus, choosing the reader from the path.

    ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` files (or a list of them) give a map-style
    :class:`ParallelCorpus`; ``.tar`` shards or a brace pattern (``shard-{000000..000009}.tar``) give a
    streamed :class:`TarShardCorpus`; a directory gives the table files in it (sorted), or its tar
    shards when it holds no table file.

    Args:
        path: A file, a brace pattern, a directory, or a list of files.
        columns: A :class:`ColumnMap` or a mapping such as ``{"en": "english", "target": "chinese"}``.
        image_root: Folder for relative image paths (table files only).
        on_bad_row: ``"skip"`` (count, see ``.report``) or ``"fail"`` (raise :class:`DataError`).
        resolution: Load images at this size (the teacher's resolution); ``None``: text only.
        crop: ``"center"`` or ``"random"`` (seeded per row).
        seed: Seed of random crops (and of the shard order for tar shards).
        with_images: Require images (``True``), ignore them (``False``), or decide from the data (``None``).
        **kwargs: Passed on to the corpus class (e.g. ``verify_images``, ``shuffle_buffer``).
    """
    column_map = columns_from(columns)
    paths = [os.fspath(path)] if isinstance(path, str | os.PathLike) else [os.fspath(p) for p in path]
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = Path(paths[0])
        tables = sorted(
            str(p) for p in folder.iterdir() if p.suffix.lower() in (".jsonl", ".csv", ".tsv", ".parquet")
        )
        paths = tables or sorted(str(p) for p in folder.iterdir() if _is_tar(str(p)))
        if not paths:
            raise FileNotFoundError(f"no corpus files (.jsonl, .csv, .tsv, .parquet, .tar) in {folder}")
    if all(_is_tar(p) for p in paths):
        return TarShardCorpus(
            paths,
            columns=column_map,
            on_bad_row=on_bad_row,
            resolution=resolution,
            crop=crop,
            seed=seed,
            with_images=with_images,
            **kwargs,  # type: ignore[arg-type]
        )
    if any(_is_tar(p) for p in paths):
        raise ValueError(f"cannot mix tar shards and table files in one corpus: {paths}")
    return ParallelCorpus(
        paths,
        columns=column_map,
        image_root=image_root,
        on_bad_row=on_bad_row,
        resolution=resolution,
        crop=crop,
        seed=seed,
        with_images=with_images,
        **kwargs,  # type: ignore[arg-type]
    )
