"""Every recipe on every transformer teacher family (PixArt-α/Σ, Sana, SD3, Flux): a few steps on the tiny
pipelines of tests/_families.py, loaded back through ``from_pretrained``; exactly the trainable parameters change,
the teacher never does, and the trained adapter generates through ``attach`` with the family's own pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.conftest import make_rows, tiny_config
from xling.train.config import load_config
from xling.train.loop import train
from xling.train.recipes import get_recipe

FAMILIES = ["pixart", "pixart_sigma", "sana", "sd3", "flux"]
PIPELINES = {
    "pixart": "PixArtAlphaPipeline",
    "pixart_sigma": "PixArtSigmaPipeline",
    "sana": "SanaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@pytest.fixture
def family_path(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{request.param}_path")


def _teacher_state(teacher) -> dict[str, torch.Tensor]:
    modules = {"denoiser": teacher.denoiser, "vae": teacher.vae}
    modules.update({f"te{i}": m for i, m in enumerate(teacher.text_encoders)})
    return {f"{k}.{n}": p.detach().clone() for k, m in modules.items() for n, p in m.named_parameters()}


def _train(name: str, teacher_path: Path, student: Path, out: Path, **overrides):
    cfg = load_config(name, tiny_config(teacher_path, student, out, **overrides))
    step = get_recipe(name).build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    trainable = {n for n, p in step.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in step.named_parameters()}
    teacher_before = _teacher_state(step.teacher)
    rows = make_rows(8, images=get_recipe(name).needs_images)
    result = train(step, cfg, rows)
    changed = {n for n, p in step.named_parameters() if not torch.equal(before[n], p.detach())}
    teacher_after = _teacher_state(step.teacher)
    return step, result, trainable, changed, teacher_before, teacher_after


def _generate(family: str, teacher_path: Path, adapter: Path) -> torch.Tensor:
    import diffusers

    from xling.adapters import attach

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(teacher_path)
    pipe.set_progress_bar_config(disable=True)
    wrapped = attach(pipe, adapter)
    # PixArt and Sana bin sizes to their aspect-ratio tables (256 px and up); 32 px needs binning off
    binning = {"use_resolution_binning": False} if family in ("pixart", "pixart_sigma", "sana") else {}
    out = wrapped(
        "左边的红色圆形",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **binning,
    )
    return out.images


@pytest.mark.parametrize("family_path", FAMILIES, indirect=True, ids=FAMILIES)
@pytest.mark.parametrize("name", ["iap", "pea"])
def test_iap_and_pea_train_and_generate(name, family_path, tiny_bert_path, tmp_path, request):
    family = request.node.callspec.params["family_path"]
    step, result, trainable, changed, t_before, t_after = _train(
        name, family_path, tiny_bert_path, tmp_path / "run", max_steps=2
    )
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert changed and changed == trainable, sorted(trainable ^ changed)[:5]
    assert all(torch.equal(t_before[n], t_after[n]) for n in t_before), "the teacher changed"
    if name == "iap":
        # one fp32 loss per tapped layer: every attn2 (PixArt, Sana) or every joint block (SD3, Flux)
        assert len(step.tap.layers) > 0
    else:
        assert {"train/feature", "train/output", "train/denoise"} <= set(result.logs[0])
    images = _generate(family, family_path, result.adapter_dir)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("family_path", FAMILIES, indirect=True, ids=FAMILIES)
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("mtn", {"output_norms": "none"}),
        ("align", {}),
        ("distill", {}),
        ("denoise", {}),
        ("denoise", {"trainable": "kv"}),
    ],
    ids=["mtn", "align", "distill", "denoise-student", "denoise-kv"],
)
def test_other_recipes_on_every_family(name, overrides, family_path, tiny_bert_path, tmp_path, request):
    family = request.node.callspec.params["family_path"]
    if name == "distill" and family in ("pixart", "pixart_sigma", "sana"):
        with pytest.raises(ValueError, match="has none"):
            _train(name, family_path, tiny_bert_path, tmp_path / "run", max_steps=1)
        return
    _step, result, trainable, changed, t_before, t_after = _train(
        name, family_path, tiny_bert_path, tmp_path / "run", max_steps=2, **overrides
    )
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert changed and changed <= trainable
    teacher_changed = {n for n in t_before if not torch.equal(t_before[n], t_after[n])}
    if overrides.get("trainable") == "kv":
        kv = ("add_k_proj", "add_v_proj") if family in ("sd3", "flux") else ("attn2.to_k", "attn2.to_v")
        assert teacher_changed and all(any(k in n for k in kv) for n in teacher_changed), sorted(
            teacher_changed
        )[:5]
    else:
        assert not teacher_changed, sorted(teacher_changed)[:5]
