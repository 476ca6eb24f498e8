"""Evaluation, ``xling generate`` and ``xling eval`` on the transformer families: PixArt-α/Σ, Sana, SD3, Flux.

Every check is against the family's own diffusers pipeline loaded from a tiny saved folder: the teacher's
conditioning must be the pipeline's ``encode_prompt``, and sampling through :func:`evaluation.sample` must give
the pixels the pipeline gives for the same prompts and seeds.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from xling.train import evaluation as ev
from xling.train.cli import main

EN = ["a red circle on the left", "a blue square"]
ZH = ["左边的红色圆形", "蓝色的正方形"]
SEEDS = [0, 1]

#: fixture, pipeline class, prompt length L (PixArt-α 120, Σ / Sana 300, SD3 77 CLIP + 256 T5, Flux 512 T5),
#: the conditioning width (the head's teacher_width) and the pooled width (None: the family takes a mask instead).
FAMILIES: dict[str, dict[str, Any]] = {
    "pixart": dict(fixture="tiny_pixart_path", cls="PixArtAlphaPipeline", length=120, width=32, pooled=None),
    "pixart_sigma": dict(
        fixture="tiny_pixart_sigma_path", cls="PixArtSigmaPipeline", length=300, width=32, pooled=None
    ),
    "sana": dict(fixture="tiny_sana_path", cls="SanaPipeline", length=300, width=16, pooled=None),
    "sd3": dict(fixture="tiny_sd3_path", cls="StableDiffusion3Pipeline", length=333, width=48, pooled=32),
    "flux": dict(fixture="tiny_flux_path", cls="FluxPipeline", length=512, width=40, pooled=20),
}
#: The pipelines' own __call__ defaults, which the commands sample at when given no --steps / --guidance.
CALL_DEFAULTS = {
    "pixart": (20, 4.5),
    "pixart_sigma": (20, 4.5),
    "sana": (20, 4.5),
    "sd3": (28, 7.0),
    "flux": (28, 3.5),
}


def _path(request: pytest.FixtureRequest, family: str) -> Path:
    return request.getfixturevalue(FAMILIES[family]["fixture"])


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    """Loaded pipelines by family, so each folder is read once per module."""
    return {}


def _pipe(request: pytest.FixtureRequest, pipes: dict[str, Any], family: str) -> Any:
    if family not in pipes:
        pipes[family] = ev.load_pipeline(_path(request, family))
    return pipes[family]


def _call_direct(pipe: Any, family: str, prompts: list[str], **kwargs: Any) -> Any:
    """``pipe(prompts, ...)`` as a user would call it at the size :func:`ev.sample` uses (Flux: 32 px)."""
    if family in ("pixart", "pixart_sigma", "sana"):
        kwargs.update(use_resolution_binning=False)
    if family == "sana":
        kwargs.update(height=32, width=32)  # SanaPipeline's own default is 1024
    if family == "flux":
        kwargs.update(height=32, width=32)
    else:
        kwargs.update(negative_prompt="")  # Flux has no negative branch
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(prompts, num_inference_steps=2, guidance_scale=4.0, generator=generators, **kwargs).images


def _encode_direct(pipe: Any, family: str, prompts: list[str]) -> tuple[Any, ...]:
    """The pipeline's own ``encode_prompt`` with its ``__call__``'s text options spelled out (under no_grad, as
    ``__call__`` runs it: with grad, the CPU attention may take another kernel and differ in the last bit)."""
    with torch.no_grad():
        return _encode(pipe, family, prompts)


def _encode(pipe: Any, family: str, prompts: list[str]) -> tuple[Any, ...]:
    if family in ("pixart", "pixart_sigma"):
        length = FAMILIES[family]["length"]
        return pipe.encode_prompt(
            prompts, negative_prompt="", clean_caption=False, max_sequence_length=length
        )
    if family == "sana":
        instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
        return pipe.encode_prompt(prompts, negative_prompt="", complex_human_instruction=instruction)
    if family == "sd3":
        return pipe.encode_prompt(prompts, None, None, negative_prompt=[""] * len(prompts))
    cond = pipe.encode_prompt(prompts, None)
    return cond[0], cond[1], *pipe.encode_prompt([""], None)[:2]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_teacher_conditioning_and_sampling_match_the_pipeline(
    request: pytest.FixtureRequest, pipes: dict[str, Any], family: str
) -> None:
    spec = FAMILIES[family]
    pipe = _pipe(request, pipes, family)
    assert type(pipe).__name__ == spec["cls"]
    cond, uncond = ev.teacher_conditioning(pipe, EN)
    assert tuple(cond.prompt_embeds.shape) == (2, spec["length"], spec["width"])
    assert cond.prompt_embeds.shape == uncond.prompt_embeds.shape
    direct = _encode_direct(pipe, family, EN)
    if spec["pooled"] is None:  # PixArt / Sana: embeds, mask, negative embeds, negative mask
        embeds, mask, neg, neg_mask = direct
        assert cond.pooled_prompt_embeds is None and uncond.pooled_prompt_embeds is None
        assert torch.equal(cond.attention_mask, mask) and torch.equal(uncond.attention_mask, neg_mask)
        # the masks mark real tokens only: the two prompts differ in length, and "" is shorter still
        assert int(uncond.attention_mask[0].sum()) < int(mask.sum(1).min())
    else:  # SD3: embeds, negative, pooled, negative pooled; Flux: embeds, pooled of the prompts, then of ""
        embeds, neg, pooled, neg_pooled = (
            direct if family == "sd3" else (direct[0], direct[2], direct[1], direct[3])
        )
        assert cond.attention_mask is None
        assert tuple(cond.pooled_prompt_embeds.shape) == (2, spec["pooled"])
        assert torch.equal(cond.pooled_prompt_embeds, pooled)
        assert torch.equal(uncond.pooled_prompt_embeds, neg_pooled.expand(2, -1))
    assert torch.equal(cond.prompt_embeds, embeds)
    assert torch.equal(uncond.prompt_embeds, neg.expand(2, -1, -1))
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])

    # 32 px as every other family's native size (Flux's own is default_sample_size 128 x VAE factor 2 = 256 px)
    size = {"height": 32, "width": 32} if family == "flux" else {}
    samples = ev.sample(pipe, cond, uncond, SEEDS, num_inference_steps=2, guidance_scale=4.0, **size)
    assert tuple(samples.latents.shape) == (2, 4, 16, 16)  # Flux's packed 8x8 tokens of 16 unpacked
    assert torch.isfinite(samples.latents).all()
    assert samples.images.shape == (2, 32, 32, 3) and samples.images.dtype == np.uint8
    assert not np.array_equal(samples.images[0], samples.images[1])
    # the same pixels as the pipeline on the English prompts themselves, at the same seeds: the conditioning, the
    # sampler call, Flux's unpacking and each VAE's decoding (scale, SD3 / Flux shift, Sana's DC-AE) all agree
    images = _call_direct(pipe, family, EN, output_type="np")
    assert np.array_equal(samples.images, (images * 255).round().astype(np.uint8))


def test_sample_refuses_conditioning_the_family_cannot_take(
    request: pytest.FixtureRequest, pipes: dict[str, Any]
) -> None:
    pixart = _pipe(request, pipes, "pixart")
    cond, uncond = ev.teacher_conditioning(pixart, EN[:1])
    no_mask = ev.Conditioning(cond.prompt_embeds)
    with pytest.raises(ValueError, match="pixart pipeline needs an attention mask"):
        ev.sample(pixart, no_mask, uncond, [0], num_inference_steps=1)
    sd3 = _pipe(request, pipes, "sd3")
    cond, uncond = ev.teacher_conditioning(sd3, EN[:1])
    with pytest.raises(
        ValueError, match=r"sd3 pipeline needs pooled_prompt_embeds \[B, P\]; uncond has none"
    ):
        ev.sample(sd3, cond, ev.Conditioning(uncond.prompt_embeds), [0], num_inference_steps=1)


def test_sampler_defaults_are_each_pipelines_own(
    request: pytest.FixtureRequest, pipes: dict[str, Any], tiny_sd1_path: Path
) -> None:
    for family, defaults in CALL_DEFAULTS.items():
        assert ev.sampler_defaults(str(_path(request, family)), None, None) == defaults
        assert ev.sampler_defaults(str(_path(request, family)), 3, 0.0) == (3, 0.0)
    assert ev.sampler_defaults(_pipe(request, pipes, "flux"), None, None) == CALL_DEFAULTS["flux"]
    # UNets keep 30 / 7.5, the toy world its own
    assert ev.sampler_defaults(str(tiny_sd1_path), None, None) == (
        ev.sampling.SD_STEPS,
        ev.sampling.SD_GUIDANCE,
    )
    assert ev.sampler_defaults("toy", None, None) == ev.toy_sampler_defaults()


def _adapter(directory: Path, student: Path, family: str, **widths: Any) -> Path:
    """A random linear head on the tiny BERT student (hidden 48) with the family's widths."""
    from xling.adapters import LanguageEncoder, LinearHead, LinearHeadConfig

    spec = FAMILIES[family]
    config = dict(
        student_width=48,
        teacher_width=spec["width"],
        pooled_width=spec["pooled"],
        teacher_family=family.removesuffix("_sigma"),
    )
    config.update(widths)
    torch.manual_seed(0)
    head = LinearHead(LinearHeadConfig(**config))
    return LanguageEncoder.from_student(student, head).save_pretrained(directory)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_writes_pngs_on_each_family(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_bert_path: Path, family: str
) -> None:
    from PIL import Image

    teacher = _path(request, family)
    adapter = _adapter(tmp_path / "adapter", tiny_bert_path, family)
    out = tmp_path / "out"
    args = ["generate", "--adapter", str(adapter), "--teacher", str(teacher), *ZH]
    assert main([*args, "--steps", "2", "--out", str(out)]) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["000-seed0.png", "001-seed0.png"]
    image = np.asarray(Image.open(out / files[0]))
    # the native size: sample_size 16 x VAE factor 2, except Flux (default_sample_size 128 x 2)
    side = 256 if family == "flux" else 32
    assert image.shape == (side, side, 3)
    assert not np.array_equal(image, np.asarray(Image.open(out / files[1])))  # the prompts differ
    index = json.loads((out / "images.json").read_text())
    assert (index["steps"], index["guidance"]) == (2, CALL_DEFAULTS[family][1])


def test_generate_names_the_transformer_width_that_does_not_fit(
    tmp_path: Path, tiny_bert_path: Path, tiny_sd3_path: Path, capsys: pytest.CaptureFixture
) -> None:
    adapter = _adapter(tmp_path / "adapter", tiny_bert_path, "sd3", teacher_width=40, pooled_width=20)
    out = tmp_path / "out"
    args = ["generate", "--adapter", str(adapter), "--teacher", str(tiny_sd3_path), ZH[0]]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "teacher_width 40 != transformer.config.joint_attention_dim 48" in err
    assert "pooled_width 20 != pooled width 32 (transformer.config.pooled_projection_dim)" in err
    assert not out.exists()  # refused before sampling


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_teacher_pipeline_and_attention_alignment(
    request: pytest.FixtureRequest, pipes: dict[str, Any], family: str
) -> None:
    from xling.core import Teacher

    teacher = Teacher.from_pretrained(_path(request, family))
    pipe = ev.load_pipeline(teacher)
    assert type(pipe).__name__ == FAMILIES[family]["cls"]
    assert pipe.transformer is teacher.denoiser and pipe.vae is teacher.vae  # shared, not copied
    cond, uncond = ev.teacher_conditioning(pipe, EN)
    reference = _pipe(request, pipes, family)
    ref_cond, _ = ev.teacher_conditioning(reference, EN)
    assert torch.equal(cond.prompt_embeds, ref_cond.prompt_embeds)
    size = {"height": 32, "width": 32} if family == "flux" else {}
    sampler: dict[str, Any] = dict(num_inference_steps=2, guidance_scale=4.0, **size)
    samples = ev.sample(pipe, cond, uncond, SEEDS, **sampler)
    # the same images as the pipeline diffusers loads from the folder (same modules' weights, same scheduler)
    assert np.array_equal(samples.images, ev.sample(reference, ref_cond, uncond, SEEDS, **sampler).images)
    pixels = torch.from_numpy(samples.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    same = ev.attention_alignment(teacher, cond, cond, pixels, timesteps=(500,))
    # a student whose conditioning is the teacher's, with the rows swapped: every layer disagrees
    swapped = ev.attention_alignment(teacher, cond.rows([1, 0]), cond, pixels, timesteps=(500,))
    assert same < 1e-10 < swapped and np.isfinite(swapped)


def test_eval_scores_a_family_teacher(tmp_path: Path, tiny_bert_path: Path, tiny_sd3_path: Path) -> None:
    adapter = _adapter(tmp_path / "adapter", tiny_bert_path, "sd3")
    prompts = tmp_path / "pairs.jsonl"
    prompts.write_text(json.dumps({"en": EN[0], "zh": ZH[0]}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "report"
    args = ["eval", "--adapter", str(adapter), "--teacher", str(tiny_sd3_path), "--prompts", str(prompts)]
    assert main([*args, "--seeds", "0", "--steps", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    alignment, agreement = metrics["alignment"], metrics["agreement"]
    assert alignment["attention_mse"] > 0 and np.isfinite(alignment["attention_mse"])
    assert (
        alignment["pooled_cosine"] is not None
    )  # SD3 conditioning carries the CLIP-L + CLIP-G pooled vector
    assert agreement["latent_mse"] > 0  # a random head is not the teacher
    assert metrics["settings"]["guidance_scale"] == CALL_DEFAULTS["sd3"][1]
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("family", ["sana", "sd3"])
def test_demo_draws_teacher_and_student_on_a_family_teacher(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_bert_path: Path, family: str
) -> None:
    from xling.train.demo import load_demo

    adapter = _adapter(tmp_path / "adapter", tiny_bert_path, family)
    model = load_demo(adapter, _path(request, family))
    assert model.default_steps == CALL_DEFAULTS[family][0]
    teacher, student = model.generate(ZH[0], "a red circle on the left", steps=2, seed=3, num_images=2)
    # two 32 px images side by side, upscaled for the page
    assert teacher.shape == student.shape and teacher.dtype == np.uint8
    assert teacher.shape[1] == 2 * teacher.shape[0]
    assert not np.array_equal(teacher, student)  # English teacher vs a random student head
