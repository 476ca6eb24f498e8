"""Sampling from the toy teacher (or any SD pipeline) at fixed seeds, and the checker's accuracy over scenes.

The standard ``StableDiffusionPipeline`` call is the way in: prompts or ``prompt_embeds`` go through it
unchanged, with one CPU generator per image so an image depends only on its seed, never on the batch or
the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from xling.train.toyworld import world
from xling.train.toyworld.teacher import DEFAULT_GUIDANCE, DEFAULT_STEPS

__all__ = ["evaluate_teacher", "generate", "image_grid", "scene_seeds"]


@torch.no_grad()
def generate(
    pipe: Any,
    *,
    prompts: Sequence[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    seeds: Sequence[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    call_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Images for ``prompts`` (or ``prompt_embeds`` ``[B, L, D]``), one per seed, as uint8 ``[B, H, W, 3]``.

    Args:
        pipe: A ``StableDiffusionPipeline`` (the toy teacher or any SD-1/2 pipeline).
        prompts: ``B`` prompts; give either these or ``prompt_embeds``.
        prompt_embeds: ``[B, L, D]`` conditioning (e.g. a student's), passed to the pipeline as is.
        negative_prompt_embeds: ``[B, L, D]`` unconditional embeddings for guidance; ``None`` lets the
            pipeline encode the empty prompt with its own text encoder.
        seeds: ``B`` seeds; image ``i`` starts from ``torch.Generator("cpu").manual_seed(seeds[i])``.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        batch_size: Images per pipeline call.
        call_kwargs: More keyword arguments of every pipeline call (the toy MMDiT teacher's
            ``toyworld.mmdit.PIPELINE_KWARGS``).

    Returns:
        ``np.ndarray`` uint8 ``[B, H, W, 3]``.
    """
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompts and prompt_embeds")
    n = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    if len(seeds) != n:
        raise ValueError(f"seeds must have one entry per image: {len(seeds)} seeds for {n} images")
    if (
        negative_prompt_embeds is not None
        and prompt_embeds is not None
        and negative_prompt_embeds.shape != prompt_embeds.shape
    ):
        raise ValueError(
            f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match prompt_embeds {tuple(prompt_embeds.shape)}"
        )
    out: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        kwargs: dict[str, Any] = dict(call_kwargs or {})
        if prompts is not None:
            kwargs["prompt"] = list(prompts[sl])
        else:
            kwargs["prompt_embeds"] = prompt_embeds[sl]
            if negative_prompt_embeds is not None:
                kwargs["negative_prompt_embeds"] = negative_prompt_embeds[sl]
        images = pipe(
            **kwargs,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds[sl]],
            output_type="np",
        ).images  # [b, H, W, 3] float in [0, 1]
        out.append(np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def scene_seeds(n_scenes: int, seed: int) -> list[int]:
    """The seed of each scene's image in evaluation round ``seed``: ``seed * 100_003 + scene index``."""
    return [seed * 100_003 + i for i in range(n_scenes)]


def evaluate_teacher(
    pipe: Any,
    scenes: Sequence[world.Scene] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int = 64,
    call_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """English accuracy of ``pipe`` on the canonical captions of ``scenes`` (default: every single-object scene).

    ``call_kwargs`` go to every pipeline call, as in :func:`generate`.

    Returns:
        ``(accuracy, images)``: :func:`world.evaluate_accuracy` over ``len(scenes) * len(seeds)`` images, and
        the images uint8 ``[len(seeds) * len(scenes), H, W, 3]`` (seed-major).
    """
    scenes = list(world.all_single_scenes() if scenes is None else scenes)
    prompts = [world.caption_en(s) for s in scenes]
    all_images = [
        generate(
            pipe,
            prompts=prompts,
            seeds=scene_seeds(len(scenes), s),
            steps=steps,
            guidance=guidance,
            batch_size=batch_size,
            call_kwargs=call_kwargs,
        )
        for s in seeds
    ]
    images = np.concatenate(all_images)
    return world.evaluate_accuracy(images, scenes * len(seeds)), images


def image_grid(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """Tile uint8 ``[B, H, W, 3]`` into one ``[rows * (H + pad), columns * (W + pad), 3]`` image."""
    b, h, w, _ = images.shape
    rows = -(-b // columns)
    grid = np.full((rows * (h + pad), columns * (w + pad), 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[i]
    return grid
