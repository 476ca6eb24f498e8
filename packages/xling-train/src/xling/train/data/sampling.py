"""A seeded, resumable sampling order and the DataLoader built on it.

The order of epoch ``e`` is a pure function of ``(seed, e)``, so a resumed run gets the same batches:
set the epoch, then skip the batches already consumed (``accelerator.skip_first_batches``). The
sampler is not a ``RandomSampler``, so accelerate's ``prepare`` keeps it (wrapping it in its
``BatchSamplerShard`` on many processes) and its ``set_epoch`` reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from xling.train.data.collate import collate


class SeededSampler(Sampler[int]):
    """Indices ``0..n-1``, permuted by ``torch.randperm`` seeded with ``seed + epoch`` (or in order).

    Args:
        data_source: The dataset (only its length is used) or the length itself.
        seed: Base seed; the same seed and epoch always give the same order.
        shuffle: Permute (``True``) or keep the row order.
    """

    def __init__(self, data_source: Sized | int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if self.num_samples <= 0:
            raise ValueError(f"cannot sample from an empty dataset (length {self.num_samples})")
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        """``{"seed", "epoch"}``: all that is needed to recreate the order."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the seed and epoch saved by :meth:`state_dict`."""
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])


def make_dataloader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] = collate,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A DataLoader with a :class:`SeededSampler` (map-style) and a seeded generator for workers.

    For an :class:`~torch.utils.data.IterableDataset` (tar shards) no sampler is used; the dataset's
    own ``seed`` and ``set_epoch`` decide the order.

    Args:
        dataset: A :class:`~xling.train.data.ParallelCorpus`, cached dataset or any dataset of dicts.
        batch_size: Samples per batch (per process, before accelerate splits nothing further).
        seed: Seed of the order and of the worker RNGs.
        shuffle: Shuffle the order every epoch.
        drop_last: Drop the last incomplete batch.
        num_workers: DataLoader worker processes.
        collate_fn: Batch builder; :func:`~xling.train.data.collate` by default.
        pin_memory: Pin batches for faster host-to-GPU copies.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # Worker seeds derive from this generator's first draw, so workers are seeded identically every run.
    generator = torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            generator=generator,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededSampler(dataset, seed=seed, shuffle=shuffle),  # type: ignore[arg-type]
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
    )
