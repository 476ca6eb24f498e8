"""What every recipe shares: the batch, the step interface the loop drives, seeded per-row noise."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


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
            ``pooled_prompt_embeds [B, P]``) when the data comes with a teacher-embedding cache.
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
_ZH = ("zh", "target")
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
    for key in ("prompt_embeds", "pooled_prompt_embeds"):  # a teacher-embedding cache's rows
        if all(isinstance(r.get(key), Tensor) for r in rows):
            extra[key] = torch.stack([r[key] for r in rows])
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


def row_generators(seed: int, step: int, index: Tensor, salt: str = "") -> list[torch.Generator]:
    """One CPU generator per row, seeded by ``(seed, step, row index, salt)``.

    Noise and timesteps drawn from these depend on neither the process count nor resumption, which is what
    makes 1-process and N-process runs, and interrupted and uninterrupted runs, match.
    """
    gens = []
    for i in index.tolist():
        digest = hashlib.blake2b(f"{seed}/{step}/{i}/{salt}".encode(), digest_size=8).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1)))
    return gens


def sample_noise_and_timesteps(
    batch: Batch,
    latent_shape: Sequence[int],
    *,
    seed: int,
    num_train_timesteps: int,
    t_min: int = 0,
    t_max: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Per-row seeded ``noise [B, *latent_shape]`` and ``timesteps [B]`` in ``[t_min, t_max]``."""
    t_max = num_train_timesteps - 1 if t_max is None else t_max
    if not 0 <= t_min <= t_max < num_train_timesteps:
        raise ValueError(
            f"need 0 <= t_min <= t_max < {num_train_timesteps}, got t_min={t_min}, t_max={t_max}"
        )
    noise, steps = [], []
    for g in row_generators(seed, batch.step, batch.index):
        noise.append(torch.randn(tuple(latent_shape), generator=g))
        steps.append(int(torch.randint(t_min, t_max + 1, (1,), generator=g)))
    return (
        torch.stack(noise).to(device=device, dtype=dtype),
        torch.tensor(steps, dtype=torch.long, device=device),
    )


def _eval_frozen_subtrees(module: nn.Module) -> None:
    # A subtree with parameters, none trainable, is frozen as a whole: its dropouts (parameter-free) go to
    # eval with it.
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _eval_frozen_subtrees(child)


class TrainStep(nn.Module):
    """Base of the recipes' steps: registered parameters are what trains and what checkpoints hold.

    Frozen parts that must not be checkpointed (the teacher) are kept in ``self.frozen`` (a plain dict, so
    ``nn.Module`` does not register them). Submodules without trainable parameters stay in eval mode when the
    loop calls ``train()`` (no dropout in a frozen encoder).

    Subclasses implement ``forward(batch) -> (total, logs)`` and ``save(output_dir) -> {name: path}`` (the
    ``"adapter"`` entry is the ``LanguageEncoder`` directory).
    """

    def __init__(self) -> None:
        super().__init__()
        self.frozen: dict[str, Any] = {}

    def train(self, mode: bool = True) -> TrainStep:
        super().train(mode)
        if mode:
            _eval_frozen_subtrees(self)
        return self

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, output_dir: Path) -> dict[str, Path]:  # pragma: no cover - abstract
        raise NotImplementedError
