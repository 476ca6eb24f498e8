"""The six recipes and :func:`run_recipe`, the one entry point the CLI and ``xling bench`` call.

A recipe module holds a ``TrainStep`` subclass (what trains, what is tapped, which loss terms with which
weights) and ``build(config, *, device, dtype) -> TrainStep``; ``NEEDS_IMAGES`` says whether it reads images.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from xling.train.config import RECIPES, TOY, RecipeConfig, load_config

if TYPE_CHECKING:
    from xling.train.loop import RunResult

__all__ = ["RECIPES", "recipe_module", "run_recipe"]

logger = logging.getLogger(__name__)


def recipe_module(name: str) -> ModuleType:
    """The module of recipe ``name`` (``xling.train.recipes.<name>``)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return importlib.import_module(f"xling.train.recipes.{name}")


def run_recipe(
    name: str,
    config: Mapping[str, Any] | RecipeConfig | str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    train_data: Any | None = None,
    val_data: Any | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train recipe ``name`` and write its run directory; return a :class:`~xling.train.loop.RunResult`.

    Args:
        name: ``"iap"``, ``"pea"``, ``"mtn"``, ``"align"``, ``"distill"`` or ``"denoise"``.
        config: a config mapping, a YAML path or a ``RecipeConfig`` (``None``: the shipped YAML defaults).
        overrides: dotted keys over ``config``, as a mapping (``{"lr": 1e-4, "data.path": "x.jsonl"}``) or as
            command-line tokens (``["--lr", "1e-4"]``).
        train_data: rows to train on instead of ``config.data`` (map-style dataset of dicts with ``en``,
            ``zh``/``target`` and, for image recipes, ``image [3, H, W]`` in [-1, 1] or ``latents``).
        val_data: validation rows to go with ``train_data``.
        on_step: callback ``(step, logs)`` after every update (main process).

    Returns:
        The ``RunResult``: steps, per-update losses and terms, adapter directory, config path, report files.

    Raises:
        ValueError: an unknown recipe or config key, or data that does not fit.
        xling.train.loop.NonFiniteTrainingError: a loss term became NaN/inf (the last checkpoint is intact).
    """
    from accelerate.utils import set_seed

    from xling.train.loop import frozen_dtype, make_accelerator, train

    module = recipe_module(name)
    cfg = load_config(name, config, overrides)
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    step = module.build(cfg, device=accelerator.device, dtype=frozen_dtype(accelerator))
    if train_data is None:
        import torch

        from xling.train.recipes._common import load_rows

        teacher = step.frozen["teacher"]
        # Forked RNG: building a cache (VAE sampling) must not shift the RNG the training (dropout) draws from.
        with torch.random.fork_rng(devices=[]):
            train_data, val_data = load_rows(
                cfg,
                resolution=int(teacher.resolution),
                with_images=bool(module.NEEDS_IMAGES),
                teacher=teacher,
                accelerator=accelerator,
            )
    result = train(step, cfg, train_data, val_data, accelerator=accelerator, on_step=on_step)
    if cfg.eval.enabled and accelerator.is_main_process and result.adapter_dir is not None:
        result.files.update(_report(cfg, result))
    return result


def _report(cfg: RecipeConfig, result: RunResult) -> dict[str, Path]:
    """Markdown report + PNG grid through ``xling.train.evaluation`` (toy world); {} when unavailable."""
    try:
        from xling.train import evaluation
    except ImportError:
        logger.warning("xling.train.evaluation is not available; no report written")
        return {}
    fn = getattr(evaluation, "write_run_report", None)
    if fn is None:
        logger.warning("xling.train.evaluation has no write_run_report; no report written")
        return {}
    return dict(
        fn(
            adapter_dir=result.adapter_dir,
            output_dir=result.output_dir,
            teacher=cfg.teacher,
            toy=cfg.teacher == TOY,
            num_prompts=cfg.eval.num_prompts,
            seeds=list(cfg.eval.seeds),
            num_inference_steps=cfg.eval.num_inference_steps,
            guidance_scale=cfg.eval.guidance_scale,
            max_scenes=cfg.eval.max_scenes,
        )
    )
