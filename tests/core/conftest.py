"""Core fixtures: the tiny pipelines and teachers loaded once per session from the shared fixture directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from xling.core import Teacher


def _pipeline(path: Path, xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    return cls.from_pretrained(path)


@pytest.fixture(scope="session")
def sd1_pipe(tiny_sd1_path):
    return _pipeline(tiny_sd1_path, xl=False)


@pytest.fixture(scope="session")
def sd2_pipe(tiny_sd2_path):
    return _pipeline(tiny_sd2_path, xl=False)


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl_path):
    return _pipeline(tiny_sdxl_path, xl=True)


@pytest.fixture(scope="session")
def sd1_teacher(tiny_sd1_path) -> Teacher:
    return Teacher.from_pretrained(tiny_sd1_path)


@pytest.fixture(scope="session")
def sdxl_teacher(tiny_sdxl_path) -> Teacher:
    return Teacher.from_pretrained(tiny_sdxl_path)
