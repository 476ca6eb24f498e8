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


@pytest.fixture(scope="session")
def tiny_pixart_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``PixArtAlphaPipeline`` directory (T5 width 32 = caption_channels, inner dim 24, learned sigma)."""
    from tests import _families

    return _families.build_pixart(tmp_path_factory.mktemp("tiny-pixart"))


@pytest.fixture(scope="session")
def tiny_pixart_sigma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``PixArtSigmaPipeline`` directory (as :func:`tiny_pixart_path`, 300-token prompts)."""
    from tests import _families

    return _families.build_pixart(tmp_path_factory.mktemp("tiny-pixart-sigma"), sigma=True)


@pytest.fixture(scope="session")
def tiny_sana_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``SanaPipeline`` directory (Gemma2 width 16, inner dim 8, AutoencoderDC, flow DPM-Solver)."""
    from tests import _families

    return _families.build_sana(tmp_path_factory.mktemp("tiny-sana"))


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` directory (CLIP 16 + 20 padded to T5 48, pooled 32)."""
    from tests import _families

    return _families.build_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``FluxPipeline`` directory (T5 40 = joint_attention_dim, CLIP pooled 20, guidance embeds)."""
    from tests import _families

    return _families.build_flux(tmp_path_factory.mktemp("tiny-flux"))
