"""Evaluation metrics on hand-made cases: identical conditioning agrees perfectly, different does not."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from xling.train import evaluation as ev

EN = ["a red circle on the left", "a blue square on the right"]
ZH = ["左边的红色圆形", "右边的蓝色正方形"]


@dataclass
class _Out:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class MirrorStudent:
    """A "perfect translator": gives each Chinese prompt the teacher's own embedding of its English translation
    (looked up from one teacher call, so the numbers are bit-identical to what the teacher is sampled with)."""

    def __init__(self, pipe, translation: dict[str, str], noise: float = 0.0) -> None:
        en = list(translation.values())
        cond, uncond = ev.teacher_conditioning(pipe, en)
        self.table = {zh: cond.prompt_embeds[i] for i, zh in enumerate(translation)}
        self.table[""] = uncond.prompt_embeds[0]
        self.noise = noise

    def __call__(self, prompts):
        embeds = torch.stack([self.table[p] for p in prompts])
        if self.noise:
            embeds = embeds + self.noise * torch.randn(
                embeds.shape, generator=torch.Generator().manual_seed(0)
            )
        return _Out(embeds)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_path: Path):
    return ev.load_pipeline(tiny_sd1_path)


def test_latent_mse_and_psnr_hand_values() -> None:
    a = torch.zeros(2, 4, 3, 3)
    assert torch.equal(ev.latent_mse(a, a), torch.zeros(2))
    b = a.clone()
    b[1] += 2.0
    assert torch.allclose(ev.latent_mse(a, b), torch.tensor([0.0, 4.0]))
    img = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert ev.psnr(img, img) == math.inf
    # every pixel off by one grey level: 10 log10(255^2 / 1)
    assert ev.psnr(img, img + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)
    # pooled MSE: one perfect pair does not make the batch infinite
    mixed = img.copy()
    mixed[1] += 16
    assert math.isfinite(ev.psnr(img, mixed))
    with pytest.raises(ValueError, match="differ in shape"):
        ev.psnr(img, img[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        ev.latent_mse(a, a[:1])


def test_embedding_alignment_cases() -> None:
    g = torch.Generator().manual_seed(0)
    t = ev.Conditioning(torch.randn(2, 5, 8, generator=g))
    same = ev.embedding_alignment(t, t)
    assert same["token_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["pooled_cosine"] is None
    negated = ev.embedding_alignment(ev.Conditioning(-t.prompt_embeds), t)
    assert negated["token_cosine"] == pytest.approx(-1.0, abs=1e-6)
    # A student of another length has no token correspondence, only the mean cosine.
    other = ev.embedding_alignment(ev.Conditioning(torch.randn(2, 3, 8, generator=g)), t)
    assert other["token_cosine"] is None and -1.0 <= other["mean_cosine"] <= 1.0
    # Masked-out student tokens do not count: garbage there leaves the cosine at 1.
    s = t.prompt_embeds.clone()
    s[:, 3:] = torch.randn(2, 2, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 2)
    assert ev.embedding_alignment(ev.Conditioning(s, attention_mask=mask), t)[
        "token_cosine"
    ] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="batch size and width"):
        ev.embedding_alignment(ev.Conditioning(torch.randn(2, 5, 7)), t)


def test_sample_is_seeded(pipe) -> None:
    cond, uncond = ev.teacher_conditioning(pipe, EN)
    a = ev.sample(pipe, cond, uncond, [0, 1], num_inference_steps=2)
    b = ev.sample(pipe, cond, uncond, [0, 1], num_inference_steps=2, batch_size=1)
    assert a.images.dtype == np.uint8 and a.images.shape == (2, 32, 32, 3)
    # Batching changes a row only by float reassociation; the same call twice is bit-identical.
    assert torch.allclose(a.latents, b.latents, atol=1e-4)
    again = ev.sample(pipe, cond, uncond, [0, 1], num_inference_steps=2)
    assert ev.agreement(a, again) == {"latent_mse": 0.0, "psnr": math.inf}
    c = ev.sample(pipe, cond, uncond, [5, 6], num_inference_steps=2)
    assert ev.agreement(a, c)["latent_mse"] > 0
    with pytest.raises(ValueError, match="equal length"):
        ev.sample(pipe, cond, uncond, [0], num_inference_steps=2)


def test_attention_alignment_zero_for_identical(pipe) -> None:
    cond, _ = ev.teacher_conditioning(pipe, EN)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = ev.attention_alignment(pipe, cond, cond, images, timesteps=(500,))
    assert same == pytest.approx(0.0, abs=1e-10)
    other, _ = ev.teacher_conditioning(pipe, list(reversed(EN)))
    assert ev.attention_alignment(pipe, other, cond, images, timesteps=(500,)) > 1e-8


def test_evaluate_pairs_perfect_student_agrees_exactly(pipe, tmp_path: Path) -> None:
    student = MirrorStudent(pipe, dict(zip(ZH, EN)))
    result = ev.evaluate_pairs(student, pipe, EN, ZH, seeds=(0, 1), num_inference_steps=2, num_examples=2)
    assert result.agreement["latent_mse"] == 0.0
    assert result.agreement["psnr"] == math.inf
    assert result.alignment["token_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(result.examples) == 4 and result.examples[0]["zh"] == ZH[0]

    noisy = ev.evaluate_pairs(
        MirrorStudent(pipe, dict(zip(ZH, EN)), noise=1.0), pipe, EN, ZH, seeds=(0,), num_inference_steps=2
    )
    assert noisy.agreement["latent_mse"] > 0 and math.isfinite(noisy.agreement["psnr"])
    assert noisy.alignment["token_cosine"] < 0.999

    paths = ev.write_report(result, tmp_path / "report", title="hand-made")
    assert set(paths) == {"report", "metrics", "grid"}
    text = paths["report"].read_text()
    assert "# hand-made" in text and "| 0 | inf |" in text and ZH[1] in text
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["agreement"] == {"latent_mse": 0.0, "psnr": "inf"}
    from PIL import Image

    assert Image.open(paths["grid"]).size[0] > 200


def test_student_conditioning_pads_negative_to_prompt_length(pipe, tiny_bert_path: Path) -> None:
    from xling.adapters.config import LinearHeadConfig
    from xling.adapters.encoder import LanguageEncoder
    from xling.adapters.linear import LinearHead

    encoder = LanguageEncoder.from_student(
        tiny_bert_path, LinearHead(LinearHeadConfig(student_width=48, teacher_width=32))
    )
    encoder.train()
    cond, uncond = ev.student_conditioning(encoder, ZH)
    assert cond.prompt_embeds.shape == uncond.prompt_embeds.shape
    assert cond.prompt_embeds.shape[::2] == (2, 32)
    assert encoder.training  # restored
    out = ev.sample(pipe, cond, uncond, [0, 0], num_inference_steps=2)
    assert out.images.shape == (2, 32, 32, 3)
