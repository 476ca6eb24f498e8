"""Noised latents for the recipes that run the denoiser on images: per-row seeded noise and timesteps.

Noise and timesteps come from one CPU generator per row, seeded by ``(seed, step, row index)``: they depend on
neither the process count nor where a run was resumed, which is what makes 1-process and N-process runs, and
interrupted and uninterrupted runs, match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xling.core import Teacher
from xling.train.data import Batch


def row_generators(seed: int, step: int, index: Tensor, salt: str = "") -> list[torch.Generator]:
    """One CPU generator per row of ``index [B]``, seeded by ``(seed, step, row index, salt)``."""
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


@torch.no_grad()
def clean_latents(teacher: Teacher, batch: Batch, *, latents: str = "mode", seed: int = 0) -> Tensor:
    """Scaled VAE latents ``[B, C, h, w]``: the cached ones, else the frozen VAE's encoding of ``batch.pixels``.

    Args:
        teacher: its VAE encodes the images.
        batch: rows with ``pixels`` or cached ``latents``.
        latents: ``"mode"``: the posterior mode, as the latent cache stores it; ``"sample"``: a posterior sample
            (what diffusers' and PEA's training scripts take), drawn from one generator per row seeded by
            ``(seed, step, row index)``, so runs still match across process counts and resumes.
        seed: the run's seed (``"sample"``).

    Raises:
        ValueError: ``"sample"`` on cached latents (the cache holds the mode only).
    """
    if batch.latents is not None:
        if latents == "sample":
            raise ValueError(
                "latents: sample needs the images, but these rows carry cached latents (the posterior mode); "
                "set --latents mode or train without the latent cache"
            )
        return batch.latents
    if batch.pixels is None:
        raise ValueError("this recipe needs images (or cached latents); the batch has neither")
    if latents == "sample":
        gens = row_generators(seed, batch.step, batch.index, "latents")
        return teacher.encode_images(batch.pixels, generator=gens, sample=True).float()
    return teacher.encode_images(batch.pixels, sample=False).float()


def noisy_latents(
    teacher: Teacher,
    batch: Batch,
    *,
    seed: int,
    t_min: int = 0,
    t_max: int | None = None,
    latents: str = "mode",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z0, noise, timesteps, z_t)``: ``[B, C, h, w]`` latents (``latents``: the posterior mode or a sample, see
    :func:`clean_latents`) noised by the teacher (``Teacher.add_noise``: DDPM's forward process, or flow matching's
    ``(1 - sigma) z0 + sigma noise``) at per-row seeded training indices ``timesteps [B]`` drawn from
    ``[t_min, t_max]`` (larger = noisier for every family)."""
    z0 = clean_latents(teacher, batch, latents=latents, seed=seed)
    noise, t = sample_noise_and_timesteps(
        batch,
        z0.shape[1:],
        seed=seed,
        num_train_timesteps=teacher.num_train_timesteps,
        t_min=t_min,
        t_max=t_max,
        device=z0.device,
    )
    return z0, noise, t, teacher.add_noise(z0, noise, t)


def denoising_schedule(teacher: Teacher) -> dict[str, Any]:
    """The schedule keywords of ``xling.losses.denoising`` for ``teacher``: ``alphas_cumprod`` (``None`` for a
    flow-matching teacher, whose velocity target needs none) and ``prediction_type`` (``"flow"`` there)."""
    alphas = None if teacher.flow_matching else teacher.scheduler.alphas_cumprod
    return {"alphas_cumprod": alphas, "prediction_type": teacher.prediction_type}


def time_ids(teacher: Teacher, batch: Batch, rule: str = "square") -> Tensor | None:
    """SDXL's added time ids ``[B, 6]`` for ``batch``; ``None`` for other teachers or the ``"square"`` rule.

    ``"square"``: ``(R, R, 0, 0, R, R)`` for every row (the teacher's defaults). ``"image"``: each row's size before
    the resize and its crop corner, ``(h, w, top, left, R, R)``, as diffusers' and PEA's SDXL scripts pass them;
    rows that bring their pixels without that record (in-memory rows) were not resized: their own size, no crop.

    Raises:
        ValueError: ``"image"`` on cached latents, which keep no image size.
    """
    if rule == "square" or teacher.family != "sdxl":
        return None
    recorded = "original_size" in batch.extra and "crop_top_left" in batch.extra
    if not recorded and batch.pixels is None:
        raise ValueError(
            "time_ids: image needs each row's original image size and crop corner, but these rows are cached "
            "latents, which keep none; set --time_ids square"
        )
    ids = teacher.add_time_ids(len(batch))
    assert ids is not None  # an SDXL teacher
    ids = ids.clone()
    if recorded:
        ids[:, 0:2] = batch.extra["original_size"].to(ids)
        ids[:, 2:4] = batch.extra["crop_top_left"].to(ids)
    else:
        ids[:, 0:2] = torch.tensor(batch.pixels.shape[-2:]).to(ids)
        ids[:, 2:4] = 0
    return ids
