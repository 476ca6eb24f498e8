"""``clip_score`` with transformers' CLIP read from a local folder: a tiny random CLIP, saved and loaded back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests import _tiny
from xling.train.evaluation.metrics import clip_score

CAPTIONS = [
    "a red dragon flying over the great wall at sunset",
    "a small house under a big tree",
    "two people drinking tea in a garden",
    "a small dragon",
    "a big garden under a tree, drinking tea at sunset with two people and a house",
]


@pytest.fixture(scope="module")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``CLIPModel`` folder (config, weights, tokenizer, image processor), as a real one ships.

    The folder name has no "openai" in it: torchmetrics would refuse such a folder, clip_score must not.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    directory = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _tiny.clip_tokenizer()
    _tiny.write_clip_tokenizer(directory)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=_tiny.clip_text_config(tokenizer, projection_dim=16).to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        directory
    )
    return directory


def _images(n: int, seed: int = 0) -> np.ndarray:
    # 24x20 images: not the model's 16x16, so the resize and the center crop are exercised.
    return np.random.default_rng(seed).integers(0, 256, size=(n, 24, 20, 3), dtype=np.uint8)


def _expected(path: Path, images: np.ndarray, captions: list[str]) -> float:
    """``mean(100 * max(cos(image_embeds, text_embeds), 0))`` from the model's towers and projections."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path).eval()
    tokens = AutoTokenizer.from_pretrained(path)(captions, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(path)(images=list(images), return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(
            model.text_model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output
        )
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    cos = (img * txt).sum(-1).double().numpy()
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


def test_clip_score_is_the_clipscore_formula(tiny_clip_path: Path) -> None:
    images = _images(len(CAPTIONS))
    score = clip_score(images, CAPTIONS, tiny_clip_path)
    assert score == pytest.approx(_expected(tiny_clip_path, images, CAPTIONS), abs=1e-4)
    assert 0.0 <= score <= 100.0


def test_clip_score_clamps_negative_cosines_at_zero(tiny_clip_path: Path) -> None:
    # Random weights give some pairs a negative cosine; those count as 0, as in CLIPScore.
    images = _images(12, seed=1)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(12)]
    per_pair = [clip_score(images[i : i + 1], captions[i : i + 1], tiny_clip_path) for i in range(12)]
    assert min(per_pair) == 0.0 and max(per_pair) > 0.0
    assert clip_score(images, captions, tiny_clip_path) == pytest.approx(np.mean(per_pair), abs=1e-4)


def test_clip_score_does_not_depend_on_the_batch_size(tiny_clip_path: Path) -> None:
    images = _images(len(CAPTIONS), seed=2)
    whole = clip_score(images, CAPTIONS, tiny_clip_path)
    assert clip_score(images, CAPTIONS, tiny_clip_path, batch_size=2) == pytest.approx(whole, abs=1e-4)


def test_clip_score_rejects_mismatched_inputs(tiny_clip_path: Path) -> None:
    with pytest.raises(ValueError, match=r"images \(2\) and captions \(1\) differ"):
        clip_score(_images(2), CAPTIONS[:1], tiny_clip_path)
    with pytest.raises(ValueError, match="at least one image"):
        clip_score(_images(0), [], tiny_clip_path)
