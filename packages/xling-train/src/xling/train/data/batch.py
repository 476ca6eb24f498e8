"""The batch every recipe's step reads, and the collate function that builds it from corpus rows.

The training and validation DataLoaders (:func:`xling.train.data.make_dataloader`) hand
:func:`collate_rows` ``(row index, row)`` pairs; the row index travels in :attr:`Batch.index` because it
seeds each row's noise and timesteps (see ``xling.train.recipes.base.row_generators``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "collate_rows"]


@dataclass
class Batch:
    """One micro-batch of parallel rows.

    Attributes:
        en: ``B`` English captions ("" for culture-only rows).
        zh: ``B`` target-language captions.
        index: ``[B]`` dataset row indices (the noise seeds).
        pixels: ``[B, 3, H, W]`` images in [-1, 1], or ``None`` (text-only data or cached latents).
        latents: ``[B, C, h, w]`` cached VAE latents (already scaled), or ``None``.
        culture: ``[B]`` bool, True for culture-only rows, or ``None``.
        step: the update this batch belongs to (set by the loop; part of the noise seed).
        extra: cached teacher conditioning of ``en`` (``prompt_embeds [B, 77, D]``,
            ``pooled_prompt_embeds [B, P]``, ``prompt_attention_mask [B, L]`` for PixArt / Sana) when the data comes
            with a teacher-embedding cache.
    """

    en: list[str]
    zh: list[str]
    index: Tensor
    pixels: Tensor | None = None
    latents: Tensor | None = None
    culture: Tensor | None = None
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.zh)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        move = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return replace(
            self,
            index=move(self.index),
            pixels=move(self.pixels),
            latents=move(self.latents),
            culture=move(self.culture),
            extra={k: move(v) for k, v in self.extra.items()},
        )


_EN = ("en", "english")
_ZH = ("target", "zh")
_IMAGE = ("image", "pixels", "pixel_values")
_CULTURE = ("culture_only", "culture")


def _first(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in row:
            return row[k]
    return None


def collate_rows(items: Sequence[tuple[int, Mapping[str, Any]]]) -> Batch:
    """Collate ``(index, row)`` pairs into a :class:`Batch`.

    Rows are the items of ``xling.train.data`` corpora (``en``, ``target``, ``image``, ``culture_only``),
    of the toy world (``en``, ``zh``, ``image``) or plain dicts; ``latents`` (a latent cache) is used when present.

    Args:
        items: ``B`` pairs of a row index (the noise seed; ``-1`` for streamed rows, which the loop numbers)
            and a row. Per row: ``image`` ``[3, H, W]``, ``latents`` ``[C, h, w]``, ``prompt_embeds``
            ``[L, D]``, ``pooled_prompt_embeds`` ``[P]``, each optional.

    Returns:
        The :class:`Batch`: ``index`` ``[B]``; ``pixels`` ``[B, 3, H, W]`` float32 when every row has an
        image, ``latents`` ``[B, C, h, w]`` float32 when every row has them, ``extra`` the cached embeddings
        present in every row (``[B, L, D]``, ``[B, P]``) and the images' ``original_size`` / ``crop_top_left``
        (``[B, 2]`` long), ``culture`` ``[B]`` bool when any row has the flag.

    Raises:
        ValueError: ``items`` is empty, or a row has no target caption (``zh`` or ``target``).
    """
    if not items:
        raise ValueError("collate_rows got an empty batch")
    rows = [r for _, r in items]
    zh = [_first(r, _ZH) for r in rows]
    if any(z is None for z in zh):
        raise ValueError(f"every row needs a target caption under one of {_ZH}; got keys {sorted(rows[0])}")
    en = [_first(r, _EN) or "" for r in rows]
    images = [_first(r, _IMAGE) for r in rows]
    pixels = None
    if all(isinstance(im, Tensor) for im in images):
        pixels = torch.stack([im.float() for im in images])
    latents = None
    if all(isinstance(r.get("latents"), Tensor) for r in rows):
        latents = torch.stack([r["latents"].float() for r in rows])
    extra = {}
    # a teacher-embedding cache's rows
    for key in ("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"):
        if all(isinstance(r.get(key), Tensor) for r in rows):
            extra[key] = torch.stack([r[key] for r in rows])
    for key in (
        "original_size",
        "crop_top_left",
    ):  # (h, w) / (top, left) of the image transform: SDXL time ids
        if all(r.get(key) is not None for r in rows):
            extra[key] = torch.tensor([tuple(r[key]) for r in rows], dtype=torch.long)
    flags = [_first(r, _CULTURE) for r in rows]
    culture = torch.tensor([bool(f) for f in flags]) if any(f is not None for f in flags) else None
    return Batch(
        en=list(en),
        zh=list(zh),
        index=torch.tensor([i for i, _ in items], dtype=torch.long),
        pixels=pixels,
        latents=latents,
        culture=culture,
        extra=extra,
    )
