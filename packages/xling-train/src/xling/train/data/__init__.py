"""Everything between a corpus on disk and the batches a recipe's step reads: parallel corpora (JSONL, CSV,
TSV, Parquet, WebDataset tar shards), image transforms, the bad-row policy and the row accounting, the rows
of a run, the :class:`Batch` and its collate function, and the seeded, resumable DataLoaders the training loop uses.

Example:
    >>> corpus = load_corpus("pairs.jsonl", resolution=512, on_bad_row="skip")  # doctest: +SKIP
    >>> print(corpus.accounting().summary())  # doctest: +SKIP
    rows: 40 read, 37 used, 3 skipped (empty_caption 2, unreadable_image 1); first: pairs.jsonl:4, pairs.jsonl:7
    >>> loader = make_dataloader(corpus, batch_size=8, seed=0)  # doctest: +SKIP
    >>> loader.batch_sampler.set_epoch(0)  # doctest: +SKIP
    >>> next(iter(loader)).pixels.shape  # doctest: +SKIP
    torch.Size([8, 3, 512, 512])
"""

from __future__ import annotations

from xling.train.data.accounting import RowAccounting, row_accounting
from xling.train.data.batch import Batch, collate_rows
from xling.train.data.corpus import ColumnMap, ParallelCorpus, Row, columns_from, file_fingerprint
from xling.train.data.errors import REASONS, BadRow, BadRowReport, DataError, OnBadRow
from xling.train.data.images import CropPolicy, ImageTransform, open_rgb
from xling.train.data.rows import load_corpus, load_rows
from xling.train.data.sampling import EpochBatchSampler, make_dataloader
from xling.train.data.shards import TarShardCorpus, expand_braces

__all__ = [
    "REASONS",
    "BadRow",
    "BadRowReport",
    "Batch",
    "ColumnMap",
    "CropPolicy",
    "DataError",
    "EpochBatchSampler",
    "ImageTransform",
    "OnBadRow",
    "ParallelCorpus",
    "Row",
    "RowAccounting",
    "TarShardCorpus",
    "collate_rows",
    "columns_from",
    "expand_braces",
    "file_fingerprint",
    "load_corpus",
    "load_rows",
    "make_dataloader",
    "open_rgb",
    "row_accounting",
]
