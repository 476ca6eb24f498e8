"""Shared fixtures: tiny random diffusers pipelines and student encoders, saved once per session.

Each path fixture returns a directory written with ``save_pretrained``; tests load it back through the
real ``from_pretrained`` code. Nothing here touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton must see TRITON_INTERPRET before it is first imported; without a GPU the kernels run on the numpy
# interpreter. A GPU run (or a user who set it) keeps its own value.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import _tiny


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1-style ``StableDiffusionPipeline`` directory (cross_attention_dim 32, 32x32 images)."""
    return _tiny.build_sd(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-2-style pipeline directory (linear projections, v-prediction, cross_attention_dim 32)."""
    return _tiny.build_sd(tmp_path_factory.mktemp("tiny-sd2"), sd2=True)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``StableDiffusionXLPipeline`` directory (cross_attention_dim 64 = 32 + 32, pooled width 32)."""
    return _tiny.build_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT-like student encoder directory (hidden 48, WordPiece tokenizer)."""
    return _tiny.build_bert_student(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_xlmr_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny XLM-R-like student encoder directory (hidden 40, Unigram tokenizer)."""
    return _tiny.build_xlmr_student(tmp_path_factory.mktemp("tiny-xlmr"))
