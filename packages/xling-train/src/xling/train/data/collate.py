"""Collate corpus items into a batch dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of corpus items into one batch.

    Per key: tensors are stacked (``image`` ``[B, 3, R, R]``, cached ``latents`` ``[B, C, h, w]``,
    ``prompt_embeds`` ``[B, 77, D]`` ...), bools become a bool tensor ``[B]``, ints a long tensor ``[B]``,
    floats a float tensor ``[B]``, pairs of ints (``original_size``, ``crop_top_left``) a long tensor
    ``[B, 2]``; strings and anything else stay lists. A ``zh`` key (the toy world's items) is also
    exposed as ``target``, so recipes read ``batch["target"]`` for either source.

    Args:
        samples: Items with the same keys.

    Returns:
        The batch dict.

    Raises:
        ValueError: ``samples`` is empty, keys differ between items, or tensors of a key differ in shape.
    """
    if not samples:
        raise ValueError("collate got an empty list of samples")
    keys = list(samples[0])
    for position, sample in enumerate(samples[1:], start=1):
        if set(sample) != set(keys):
            raise ValueError(f"sample {position} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            shapes = {tuple(value.shape) for value in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r}: tensors have shapes {sorted(shapes)}")
            batch[key] = torch.stack(values)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        elif isinstance(first, tuple) and first and all(isinstance(v, int) for v in first):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    if "zh" in batch and "target" not in batch:
        batch["target"] = batch["zh"]
    return batch
