"""Tiny in-memory data and configs for the recipe, loop and CLI tests (fixtures from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests import _tiny


def make_rows(n: int = 12, *, images: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` parallel rows from the tiny tokenizers' text, each with a seeded random 32x32 image in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (_tiny.BILINGUAL_TEXT[i], _tiny.BILINGUAL_TEXT[i + 1]) for i in range(0, len(_tiny.BILINGUAL_TEXT), 2)
    ]
    rows = []
    for i in range(n):
        en, zh = pairs[i % len(pairs)]
        row: dict[str, Any] = {"en": en, "zh": zh}
        if images:
            row["image"] = torch.rand(3, 32, 32, generator=g) * 2 - 1
        rows.append(row)
    return rows


#: A fixed 4-row parallel batch of the fidelity tests (each recomputes a preset's loss on it).
FIXED_ZH = ["一只戴帽子的猫", "左边的红色圆形", "右边的蓝色正方形", "上面的绿色三角形"]
FIXED_EN = [
    "a cat wearing a hat",
    "a red circle on the left",
    "a blue square on the right",
    "a green triangle at the top",
]


@pytest.fixture
def recipe_rows() -> list[dict[str, Any]]:
    return make_rows(12)


def tiny_config(teacher: Path, student: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A config for the tiny fixtures: few steps, no tracker, no report, no checkpoints unless asked."""
    config: dict[str, Any] = {
        "teacher": str(teacher),
        "student": str(student),
        "output_dir": str(output_dir),
        "max_steps": 2,
        "batch_size": 4,
        "warmup_steps": 0,
        "log_with": "none",
        "checkpoint_every": 0,
        "validate_every": 0,
        "eval": {"enabled": False},
    }
    config.update(overrides)
    return config


@pytest.fixture
def recipe_config(tiny_sd1_path: Path, tiny_bert_path: Path, tmp_path: Path):
    """``recipe_config(**overrides) -> dict``: a tiny-fixture config writing under ``tmp_path/run``."""

    def make(**overrides: Any) -> dict[str, Any]:
        output_dir = overrides.pop("output_dir", tmp_path / "run")
        return tiny_config(tiny_sd1_path, tiny_bert_path, Path(output_dir), **overrides)

    return make
