"""Recipes, the accelerate training loop, data, evaluation, the toy world and the xling command line.

The public names load lazily so that ``xling --help`` does not import torch.

Example:
    >>> from xling.train import run_recipe  # doctest: +SKIP
    >>> result = run_recipe("iap", overrides={"max_steps": 50, "output_dir": "runs/iap"})  # doctest: +SKIP
    >>> result.adapter_dir  # doctest: +SKIP
    PosixPath('runs/iap/adapter')
"""

from __future__ import annotations

from xling.train._lazy import lazy_exports

_EXPORTS = {
    "run_recipe": "xling.train.recipes",
    "get_recipe": "xling.train.recipes",
    "Recipe": "xling.train.recipes",
    "RECIPES": "xling.train.recipes",
    "RecipeConfig": "xling.train.config",
    "IAPConfig": "xling.train.recipes.iap",
    "PEAConfig": "xling.train.recipes.pea",
    "MTNConfig": "xling.train.recipes.mtn",
    "AlignConfig": "xling.train.recipes.align",
    "DistillConfig": "xling.train.recipes.distill",
    "DenoiseConfig": "xling.train.recipes.denoise",
    "DataConfig": "xling.train.config",
    "EvalConfig": "xling.train.config",
    "load_config": "xling.train.config",
    "RunResult": "xling.train.loop",
    "NonFiniteTrainingError": "xling.train.loop",
    "train": "xling.train.loop",
    "Batch": "xling.train.data",
    "TrainStep": "xling.train.recipes.base",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
