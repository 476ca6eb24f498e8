"""Each recipe trains on the tiny fixtures; exactly its trainable parameters change; outputs are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xling.train.config import load_config
from xling.train.loop import train
from xling.train.recipes import get_recipe

TEXT_ONLY = {"mtn", "align", "distill"}


def _snapshot(step) -> dict[str, torch.Tensor]:
    """Every parameter the run could touch: the step's own and the frozen teacher's, by qualified name."""
    teacher = step.frozen["teacher"]
    named = {f"step.{n}": p for n, p in step.named_parameters()}
    for prefix, module in (("unet", teacher.unet), ("vae", teacher.vae), ("te", teacher.text_encoders[0])):
        named.update({f"teacher.{prefix}.{n}": p for n, p in module.named_parameters()})
    return {n: p.detach().clone() for n, p in named.items()}


def _build_and_train(name: str, config: dict, rows):
    cfg = load_config(name, config)
    step = get_recipe(name).build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    trainable = {n for n, p in step.named_parameters() if p.requires_grad}
    # The teacher UNet is registered (as step.unet) only when it trains; frozen, it must be invisible.
    teacher_params = {id(p) for p in step.frozen["teacher"].unet.parameters()}
    before = _snapshot(step)
    result = train(step, cfg, rows)
    after = _snapshot(step)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return step, result, trainable, changed, teacher_params


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("iap", {}),
        ("pea", {}),
        ("mtn", {}),
        ("align", {}),
        ("align", {"method": "unfreeze", "unfreeze_layers": 1}),
        ("distill", {}),
        ("denoise", {}),
    ],
    ids=["iap", "pea", "mtn", "align-lora", "align-unfreeze", "distill", "denoise-student"],
)
def test_only_trainable_parameters_change(name, overrides, recipe_config, recipe_rows):
    config = recipe_config(**overrides)
    _step, result, trainable, changed, _ = _build_and_train(name, config, recipe_rows)
    assert result.steps == 2 and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    trainable_q = {f"step.{n}" for n in trainable}
    assert changed, "nothing trained"
    assert changed <= trainable_q, f"frozen parameters changed: {sorted(changed - trainable_q)[:5]}"
    # With two AdamW updates every trainable tensor moves (no dead branch in the composition).
    assert changed == trainable_q, f"trainable but unchanged: {sorted(trainable_q - changed)[:5]}"
    assert not any(n.startswith("teacher.") for n in changed)
    # The output is an adapter directory LanguageEncoder can load, and the resolved config beside it.
    from xling.adapters import LanguageEncoder

    encoder = LanguageEncoder.from_pretrained(result.adapter_dir)
    out = encoder(["左边的红色圆形"])
    assert out.prompt_embeds.shape[-1] == 32
    assert (Path(config["output_dir"]) / "config.yaml").read_text().startswith("recipe: " + name)


def test_align_lora_trains_only_lora_and_head(recipe_config, recipe_rows):
    _, _, _trainable, changed, _ = _build_and_train("align", recipe_config(), recipe_rows)
    assert all("lora_" in n or n.startswith("step.encoder.head.") for n in changed), sorted(changed)[:5]
    assert any("lora_" in n for n in changed)


@pytest.mark.parametrize("part", ["kv", "unet"])
def test_denoise_trains_the_unet_part(part, recipe_config, recipe_rows):
    config = recipe_config(trainable=part)
    step, result, _trainable, changed, _ = _build_and_train("denoise", config, recipe_rows)
    # The trained UNet is both step.unet and teacher.unet; nothing outside it may move.
    changed = {n for n in changed if not n.startswith("teacher.unet.")}
    assert changed and all(n.startswith("step.unet.") for n in changed), sorted(changed)[:5]
    if part == "kv":
        assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed), sorted(changed)[:5]
        saved = load_file(result.files["kv_weights"])
        assert saved and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in saved)
        unet = dict(step.unet.named_parameters())
        for key, value in saved.items():
            assert torch.equal(value, unet[key].detach().float())
    else:
        assert any(".attn2." not in n for n in changed)
        assert (result.files["unet"] / "config.json").is_file()


def test_pea_hybrid_uses_denoising_for_culture_rows(recipe_config, recipe_rows):
    rows = [dict(r, culture=(i % 2 == 0)) for i, r in enumerate(recipe_rows)]
    cfg = load_config("pea", recipe_config(hybrid=True, max_steps=1))
    step = get_recipe("pea").build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    result = train(step, cfg, rows)
    assert {"train/feature", "train/output", "train/denoise"} <= set(result.logs[0])


def test_text_recipes_need_no_images(recipe_config, tmp_path):
    from tests.train.conftest import make_rows

    rows = make_rows(8, images=False)
    for name in sorted(TEXT_ONLY):
        cfg = load_config(name, recipe_config(max_steps=1, output_dir=tmp_path / name))
        assert get_recipe(name).needs_images is False
        step = get_recipe(name).build(cfg, device=torch.device("cpu"), dtype=torch.float32)
        assert train(step, cfg, rows).steps == 1


def test_image_recipe_without_images_says_so(recipe_config):
    from tests.train.conftest import make_rows

    cfg = load_config("iap", recipe_config(max_steps=1))
    step = get_recipe("iap").build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ValueError, match="needs images"):
        train(step, cfg, make_rows(8, images=False))


def test_toy_world_data_and_end_of_run_report(recipe_config):
    # The toy world's generated pairs feed any teacher; the report goes through xling.train.evaluation.
    from xling.train.recipes import run_recipe

    config = recipe_config(
        max_steps=1,
        data={"path": "toy", "num_samples": 8, "val_samples": 4},
        eval={"enabled": True, "num_prompts": 2, "seeds": [0], "num_inference_steps": 2},
    )
    result = run_recipe("iap", config)
    assert result.steps == 1 and "val/attention" in result.val_logs
    assert result.files["report"].is_file() and result.files["grid"].is_file()
    assert "xling evaluation" in result.files["report"].read_text()


def test_adapter_on_the_toy_student_is_self_contained(recipe_config, tmp_path):
    # A frozen student is normally recorded by path; the toy student's path is inside the installed package.
    from transformers import BertModel

    from xling.adapters import LanguageEncoder
    from xling.train.recipes import run_recipe
    from xling.train.toyworld.student import student_path

    config = {
        **recipe_config(max_steps=1, data={"path": "toy", "num_samples": 8, "val_samples": 4}),
        "student": "toy",
    }
    adapter = run_recipe("mtn", config).adapter_dir
    saved = json.loads((adapter / "config.json").read_text())
    assert saved["layout"]["student"] == "student" and saved["encoder"]["student_weights"] == "frozen"
    saved["encoder"]["student_model"] = str(tmp_path / "moved-away")
    (adapter / "config.json").write_text(json.dumps(saved))
    loaded = LanguageEncoder.from_pretrained(adapter).student.state_dict()
    original = BertModel.from_pretrained(student_path()).state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)


@pytest.mark.parametrize(
    ("teacher", "student", "name", "pooled_term"),
    [
        ("tiny_sdxl_path", "tiny_bert_path", "iap", True),
        ("tiny_sdxl_path", "tiny_xlmr_path", "mtn", True),
        ("tiny_sdxl_path", "tiny_bert_path", "pea", False),
        ("tiny_sd2_path", "tiny_xlmr_path", "denoise", False),
        ("tiny_sd2_path", "tiny_bert_path", "distill", True),
    ],
)
def test_sdxl_and_sd2_teachers(teacher, student, name, pooled_term, request, tmp_path):
    from tests.train.conftest import make_rows, tiny_config

    config = tiny_config(request.getfixturevalue(teacher), request.getfixturevalue(student), tmp_path / "run")
    cfg = load_config(name, config)
    step = get_recipe(name).build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    result = train(step, cfg, make_rows(8))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert ("train/pooled" in result.logs[-1]) == pooled_term
    if "sdxl" in teacher:
        # The adapter also yields SDXL's pooled embedding, at the teacher's pooled width.
        from xling.adapters import LanguageEncoder

        out = LanguageEncoder.from_pretrained(result.adapter_dir)(["左边的红色圆形"])
        assert out.prompt_embeds.shape[-1] == 64 and out.pooled_prompt_embeds.shape == (1, 32)
