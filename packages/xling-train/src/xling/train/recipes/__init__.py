"""The recipe registry and :func:`run_recipe`, the one entry point the CLI and ``xling bench`` call.

A recipe is one module: its config dataclass (the home of every default), ``SUMMARY`` (one line), ``NEEDS_IMAGES``,
optionally ``NEEDS_ENGLISH`` (default ``True``; ``False`` for a recipe that never reads the English captions, so a
corpus without an English column is enough), its ``TrainStep`` (what trains, what is tapped, which loss terms
with which weights) and ``build(config, *, device, dtype) -> TrainStep``. Adding one is a module and a name in :data:`RECIPES`; the
CLI's options and summaries, bench's recipe list and the config classes all come from :func:`get_recipe`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xling.train.config import RecipeConfig
    from xling.train.loop import RunResult
    from xling.train.recipes.base import TrainStep

__all__ = ["RECIPES", "Recipe", "get_recipe", "run_recipe"]

#: The recipes, each a module under ``xling.train.recipes``, in the order the CLI and the bench list them.
RECIPES: tuple[str, ...] = ("iap", "pea", "mtn", "align", "distill", "denoise")


@dataclass(frozen=True)
class Recipe:
    """One registered recipe, read off its module.

    Attributes:
        name: the recipe's name (its module's).
        summary: one line for ``xling train --help``.
        needs_images: whether it trains on images (else on captions alone).
        needs_english: whether it reads the English captions (else a corpus needs no English column).
        config_class: its config dataclass.
        build: ``build(config, *, device, dtype) -> TrainStep``.
        module: the module itself.
    """

    name: str
    summary: str
    needs_images: bool
    needs_english: bool
    config_class: type[RecipeConfig]
    build: Callable[..., TrainStep]
    module: ModuleType

    @classmethod
    def from_module(cls, name: str) -> Recipe:
        from xling.train.config import RecipeConfig

        module = importlib.import_module(f"{__name__}.{name}")
        # The module's own RecipeConfig subclass (others it imports, e.g. mixins, are defined elsewhere).
        (config_class,) = [
            v
            for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, RecipeConfig) and v.__module__ == module.__name__
        ]
        # Most recipes compare with the teacher's English conditioning, so a module says so only when it does not.
        needs_english = bool(getattr(module, "NEEDS_ENGLISH", True))
        return cls(
            name,
            module.SUMMARY,
            bool(module.NEEDS_IMAGES),
            needs_english,
            config_class,
            module.build,
            module,
        )


@functools.cache
def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (its module imported on first use); ``ValueError`` for an unknown one."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return Recipe.from_module(name)


def run_recipe(
    name: str,
    config: Mapping[str, Any] | RecipeConfig | str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    train_data: Any | None = None,
    val_data: Any | None = None,
    on_step: Callable[[int, dict[str, float], TrainStep], None] | None = None,
) -> RunResult:
    """Train recipe ``name`` and write its run directory; return a :class:`~xling.train.loop.RunResult`.

    Args:
        name: ``"iap"``, ``"pea"``, ``"mtn"``, ``"align"``, ``"distill"`` or ``"denoise"``.
        config: a config mapping, a YAML path or the recipe's config dataclass (``None``: its defaults and
            shipped YAML).
        overrides: dotted keys over ``config``, as a mapping (``{"lr": 1e-4, "data.path": "x.jsonl"}``) or as
            command-line tokens (``["--lr", "1e-4"]``).
        train_data: rows to train on instead of ``config.data`` (map-style dataset of dicts with ``en``,
            ``zh``/``target`` and, for image recipes, ``image [3, H, W]`` in [-1, 1] or ``latents``); without
            them a real teacher needs ``data.path`` (the toy world's captions are never used unasked).
        val_data: validation rows to go with ``train_data``.
        on_step: callback ``(update, logs, step)`` after every update and its checkpoint (main process);
            ``step.save(dir)`` writes the adapter as it stands.

    Returns:
        The ``RunResult``: steps, per-update losses and terms, adapter directory, config path, report files.

    Raises:
        ValueError: an unknown recipe or config key, no ``train_data`` and no ``data.path`` for a real teacher
            (the message names ``--data PATH``), or data that does not fit.
        xling.train.loop.NonFiniteTrainingError: a loss term became NaN/inf (the last checkpoint is intact).
    """
    import torch
    from accelerate.utils import set_seed

    from xling.train.config import load_config, validate
    from xling.train.data import load_rows
    from xling.train.loop import frozen_dtype, make_accelerator, train
    from xling.train.rundir import RunFolder

    recipe = get_recipe(name)
    cfg = load_config(name, config, overrides)
    # Before the teacher loads (minutes for a real one): rows of its own or a corpus to read them from.
    validate(cfg, needs_data=train_data is None)
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    # Before any model loads too: the output folder is writable, not another run's, and locked for this one.
    run = RunFolder.claim(cfg, accelerator)
    step = recipe.build(cfg, device=accelerator.device, dtype=frozen_dtype(accelerator))
    if train_data is None:
        # Forked RNG: building a cache (VAE sampling) must not shift the RNG the training (dropout) draws from.
        with torch.random.fork_rng(devices=[]):
            train_data, val_data = load_rows(
                cfg,
                resolution=step.teacher.resolution,
                with_images=recipe.needs_images,
                with_english=recipe.needs_english,
                teacher=step.teacher,
                accelerator=accelerator,
            )
    result = train(step, cfg, train_data, val_data, accelerator=accelerator, on_step=on_step, run=run)
    if cfg.eval.enabled and accelerator.is_main_process and result.adapter_dir is not None:
        from xling.train.evaluation import prompt_pairs_from_rows, write_run_report
        from xling.train.toyworld.names import is_toy_teacher

        toy = is_toy_teacher(cfg.teacher)
        # Off the toy world the report scores held-out rows of the run's own data: the validation pairs.
        pairs = None if toy else prompt_pairs_from_rows(val_data, cfg.eval.num_prompts)
        result.files.update(
            write_run_report(
                adapter_dir=result.adapter_dir,
                output_dir=result.output_dir,
                teacher=cfg.teacher,
                toy=toy,
                num_prompts=cfg.eval.num_prompts,
                seeds=list(cfg.eval.seeds),
                num_inference_steps=cfg.eval.num_inference_steps,
                guidance_scale=cfg.eval.guidance_scale,
                max_scenes=cfg.eval.max_scenes,
                scene_kind=cfg.eval.scene_kind,
                max_pair_scenes=cfg.eval.max_pair_scenes,
                prompt_pairs=pairs,
                rows=result.rows,
            )
        )
        # The adapter's model card gets the report's evaluation tables and its grid image.
        from xling.adapters import write_model_card
        from xling.train.recipes.base import adapter_card

        write_model_card(result.adapter_dir, adapter_card(cfg, result.output_dir))
    run.release()  # on an error, at exit (or by the next run of this process, which finds its own pid)
    return result
