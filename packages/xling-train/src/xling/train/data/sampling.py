"""The seeded, sharded, resumable batch order and the DataLoaders the training loop reads.

The order of epoch ``e`` is a pure function of ``(seed, e)`` (:class:`EpochBatchSampler`), so a resumed run
gets the same batches: set the epoch, then skip the batches already consumed
(``accelerator.skip_first_batches``). Every loader draws its worker base seed from its own generator, so
starting a fresh iterator leaves the global RNG (the one dropout draws from, restored on resume) untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from xling.train.data.batch import Batch, collate_rows

__all__ = ["EpochBatchSampler", "make_dataloader"]


class EpochBatchSampler(Sampler[list[int]]):
    """Seeded, sharded batch sampler: epoch ``e`` is ``randperm(num_rows, seed + e)`` cut into global batches
    of ``batch_size * num_replicas``; process ``rank`` takes its contiguous slice of each. The global batch is
    thus the same for any process count, which is what makes 1-process and N-process runs agree.

    Args:
        num_rows: dataset length.
        batch_size: rows per process per batch.
        seed: base seed of the permutation.
        num_replicas: number of processes.
        rank: this process.
        shuffle: permute (``False``: dataset order, for validation).

    Raises:
        ValueError: the dataset holds fewer rows than one global batch.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_rows < batch_size * num_replicas:
            raise ValueError(
                f"the dataset has {num_rows} rows, fewer than one global batch "
                f"(batch_size {batch_size} x {num_replicas} processes)"
            )
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (the loop sets it before every epoch, resumed or not)."""
        self.epoch = epoch

    def __len__(self) -> int:
        # The last incomplete global batch is dropped, so every process sees the same number of batches.
        return self.num_rows // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            # A private generator: the order depends on (seed, epoch) only and the global RNG does not move.
            order = torch.randperm(
                self.num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        else:
            order = torch.arange(self.num_rows)
        per_global = self.batch_size * self.num_replicas
        for b in range(len(self)):
            start = b * per_global + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()


class _IndexedStream(IterableDataset):
    """Pairs every streamed row with a placeholder index; the loop numbers rows by stream position."""

    def __init__(self, rows: IterableDataset) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for row in self.rows:
            yield -1, row


class _Indexed(Dataset):
    """Adds the row index (the noise seed) to every row of ``rows``."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.rows[i]


def make_dataloader(
    rows: Any,
    *,
    batch_size: int,
    seed: int,
    num_replicas: int = 1,
    rank: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
) -> DataLoader[Batch]:
    """The DataLoader the training loop reads batches from, for training or validation.

    A map-style ``rows`` (anything with ``len`` and integer indexing: a corpus, a ``Subset``, a cached
    dataset, the toy world) is read through an :class:`EpochBatchSampler` (``loader.batch_sampler``: call
    its ``set_epoch`` before each epoch; the last incomplete global batch is dropped), and each batch's
    ``index`` holds the dataset row indices. An ``IterableDataset`` (tar shards) is read in stream order:
    the stream's own ``set_epoch`` and ``rank`` / ``world_size`` decide the order and the split across
    processes (``num_replicas``, ``rank`` and ``shuffle`` are not used), incomplete batches are dropped so
    every micro-batch has ``batch_size`` rows, and ``index`` is ``-1`` (the loop numbers streamed rows by
    position).

    Args:
        rows: The rows: dicts such as corpus items (``en``, ``target``, ``image`` ``[3, R, R]`` ...).
        batch_size: Rows per process per batch (``B``).
        seed: Seed of the order (``seed + epoch``) and of the loader's own generator (worker seeds).
        num_replicas: Number of processes that split each global batch of ``batch_size * num_replicas``.
        rank: This process.
        shuffle: Permute every epoch; ``False`` keeps the dataset order (validation).
        num_workers: DataLoader worker processes.

    Returns:
        A DataLoader yielding one :class:`~xling.train.data.Batch` of ``B`` rows at a time (``index``
        ``[B]``, ``pixels`` ``[B, 3, R, R]`` when the rows have images, ...; see
        :func:`~xling.train.data.collate_rows`).

    Raises:
        ValueError: a map-style ``rows`` holds fewer rows than one global batch.
    """
    # Its own generator: a new iterator then leaves the global RNG (dropout's) where load_state put it.
    generator = torch.Generator().manual_seed(seed)
    if isinstance(rows, IterableDataset):
        if num_workers > 0 and hasattr(rows, "share_accounting"):
            rows.share_accounting()  # workers read the shards: their counts must reach this process
        return DataLoader(
            _IndexedStream(rows),
            batch_size=batch_size,
            collate_fn=collate_rows,
            num_workers=num_workers,
            drop_last=True,
            generator=generator,
        )
    sampler = EpochBatchSampler(
        len(rows), batch_size, seed=seed, num_replicas=num_replicas, rank=rank, shuffle=shuffle
    )
    return DataLoader(
        _Indexed(rows),
        batch_sampler=sampler,
        collate_fn=collate_rows,
        num_workers=num_workers,
        generator=generator,
    )
