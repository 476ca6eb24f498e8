"""PEA's paper preset against the public code (OPPO-Mente-Lab/PEA-Diffusion ``train_sdxl_zh.py``): the total
loss of one fixed tiny SDXL batch, computed here from PEA's formulas with our own block hooks, must equal the
recipe step's; the polynomial schedule must be transformers' step for step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.conftest import FIXED_EN as EN
from tests.train.conftest import FIXED_ZH as ZH
from tests.train.conftest import tiny_config
from xling.train.config import load_config
from xling.train.data import Batch
from xling.train.noise import row_generators, sample_noise_and_timesteps
from xling.train.recipes import get_recipe


def test_real_teacher_config_is_the_public_code():
    cfg = load_config("pea", {"teacher": "org/real-model"})
    assert (cfg.denoise_weight, cfg.output_weight, cfg.feature_weight) == (1.0, 1.0, 0.1)
    assert cfg.caption_dropout == 0.1 and cfg.hybrid_normalisation == "batch" and cfg.pooled == "all"
    assert (cfg.lr, cfg.lr_scheduler, cfg.warmup_steps, cfg.lr_power, cfg.lr_end) == (
        1e-5,
        "polynomial",
        100,
        1.0,
        5e-8,
    )
    assert (cfg.batch_size, cfg.max_steps, cfg.data.crop, cfg.weight_decay) == (10, 2232142, "random", 0.0)
    assert cfg.student_padding_mask is False and (cfg.timestep_min, cfg.timestep_max) == (0, None)
    assert (cfg.latents, cfg.time_ids) == ("sample", "image")
    toy = load_config("pea")
    assert (toy.lr_scheduler, toy.student_padding_mask, toy.adapter_hidden) == ("cosine", True, 64)


def _blocks(unet) -> list[torch.nn.Module]:
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]


def _run(unet, z_t, t, embeds, pooled, time_ids):
    """PEA's UNet call with its ``cast_hook`` (down blocks: ``output[0]``), written independently of FeatureTap."""
    feats: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: feats.append(o[0] if isinstance(o, tuple) else o))
        for b in _blocks(unet)
    ]
    try:
        pred = unet(
            z_t,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    finally:
        for h in hooks:
            h.remove()
    return pred, feats


def _pea_total(step, batch: Batch, *, hybrid: bool, normalisation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``train_sdxl_zh.py``'s loss: masked per-row MSEs, each averaged over the whole batch (or subset)."""
    c, teacher = step.config, step.teacher
    unet, sched = teacher.unet, teacher.scheduler
    gens = row_generators(c.seed, batch.step, batch.index, "caption_dropout")
    drop = torch.tensor([float(torch.rand((), generator=g)) for g in gens]) < c.caption_dropout
    # latent_dist.sample() (one generator per row, so a row's draw does not depend on the batch) * scaling
    posterior = teacher.vae.encode(batch.pixels).latent_dist
    z0 = posterior.sample(generator=row_generators(c.seed, batch.step, batch.index, "latents"))
    z0 = z0 * teacher.vae.config.scaling_factor
    # add_time_ids: the image's original size, its crop corner, the target size (train_sdxl_zh.py)
    r = teacher.resolution
    time_ids = torch.cat(
        [batch.extra["original_size"], batch.extra["crop_top_left"], torch.tensor([[r, r]] * len(batch))], 1
    ).float()
    noise, t = sample_noise_and_timesteps(batch, z0.shape[1:], seed=c.seed, num_train_timesteps=1000)
    offs = torch.stack(
        [
            torch.randn(z0.shape[1], generator=g)
            for g in row_generators(c.seed, batch.step, batch.index, "noise_offset")
        ]
    )
    noise = noise + 0.5 * offs[:, :, None, None]  # universal.py --noise_offset 0.5
    z_t = sched.add_noise(z0, noise, t)
    with torch.no_grad():
        en = teacher.encode(batch.en)
        en_empty = teacher.encode([""] * len(batch))
        # prompt_mask: the same rows on both sides; the pooled text_embeds are never dropped.
        en_embeds = torch.where(drop[:, None, None], en_empty.prompt_embeds, en.prompt_embeds)
        pred_t, feats_t = _run(unet, z_t, t, en_embeds, en.pooled_prompt_embeds, time_ids)
    enc = step.encoder
    hidden = enc.encode([*batch.zh, ""]).hidden_states  # [B + 1, W, d]
    head = enc.head
    x = head.projector(head.layernorm(hidden))  # [B + 1, W, 1280-like]
    tokens = head.out_proj(x)  # fc(GELU(x))
    pooled = x.mean(1)[: len(batch)]  # torch.mean(x, 1): every position, padding included
    zh_embeds = torch.where(drop[:, None, None], tokens[len(batch) :], tokens[: len(batch)])
    pred_s, feats_s = _run(unet, z_t, t, zh_embeds, pooled, time_ids)

    per_row = lambda a, b: F.mse_loss(a, b, reduction="none").mean([1, 2, 3])  # noqa: E731
    zh_or_not = batch.culture.float() if hybrid else torch.zeros(len(batch))
    m_den = zh_or_not if hybrid else torch.ones(len(batch))
    m_kd = 1 - zh_or_not
    if normalisation == "batch":
        red = lambda v, m: (v * m).mean()  # noqa: E731
    else:
        red = lambda v, m: (v * m).sum() / m.sum().clamp_min(1)  # noqa: E731
    loss = red(per_row(pred_s, noise), m_den)
    loss = loss + red(per_row(pred_s, pred_t), m_kd)
    feature = sum(red(per_row(ft, fs), m_kd) for ft, fs in zip(feats_t, feats_s, strict=True))
    return loss + 0.1 * feature, drop


@pytest.mark.parametrize(
    ("hybrid", "normalisation", "dropout"),
    [(False, "batch", 0.1), (False, "batch", 0.5), (True, "batch", 0.5), (True, "subset", 0.0)],
    ids=["preset", "dropout-0.5", "hybrid-batch", "hybrid-subset"],
)
def test_total_loss_is_peas(hybrid, normalisation, dropout, tiny_sdxl_path, tiny_bert_path, tmp_path):
    overrides = {"hybrid": hybrid, "hybrid_normalisation": normalisation, "caption_dropout": dropout}
    cfg = load_config("pea", tiny_config(tiny_sdxl_path, tiny_bert_path, tmp_path, **overrides))
    step = get_recipe("pea").build(cfg, device=torch.device("cpu"), dtype=torch.float32).train()
    side = step.teacher.resolution
    pixels = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1
    culture = torch.tensor([True, False, False, False])  # rows [1, 0, 0, 0]: 0.25 per term over the batch
    sizes = {  # each row's size before the resize and its crop corner, as the image transform records them
        "original_size": torch.tensor(
            [[side, 2 * side], [3 * side, side], [side, side], [2 * side, 2 * side]]
        ),
        "crop_top_left": torch.tensor([[0, 5], [9, 0], [0, 0], [3, 3]]),
    }
    batch = Batch(
        en=EN, zh=ZH, index=torch.arange(4) + 7, pixels=pixels, culture=culture, step=5, extra=sizes
    )
    total, logs = step(batch)
    expected, drop = _pea_total(step, batch, hybrid=hybrid, normalisation=normalisation)
    if dropout == 0.5:
        assert 0 < int(drop.sum()) < 4, "the fixed batch must drop some rows and keep others"
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-7)
    assert set(logs) >= {"denoise", "output", "feature", "total"}
    # The same rows drop again for the same (seed, step, row): a resumed run sees the same captions.
    again, _ = step(batch)
    torch.testing.assert_close(again, total)


def test_polynomial_schedule_is_transformers():
    from transformers import get_polynomial_decay_schedule_with_warmup

    from xling.train.loop import build_lr_scheduler

    def lrs(make) -> list[float]:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
        sched = make(opt)
        out = []
        for _ in range(30):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    for power in (1.0, 2.0):
        ours = lrs(lambda o: build_lr_scheduler(o, "polynomial", 5, 25, power=power, lr_end=5e-8))  # noqa: B023
        ref = lrs(
            lambda o: get_polynomial_decay_schedule_with_warmup(o, 5, 25, lr_end=5e-8, power=power)  # noqa: B023
        )
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-20)
    with pytest.raises(ValueError, match="'lr_end'"):
        build_lr_scheduler(
            torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5), "polynomial", 0, 9, lr_end=1
        )


def test_sampled_latents_and_image_time_ids_say_what_the_latent_cache_lacks(tmp_path):
    from xling.train.noise import time_ids

    real = {"teacher": "org/real-model", "data": {"path": "x.jsonl", "latent_cache": "c"}}
    with pytest.raises(ValueError, match=r"'latents' is 'sample'.*--latents mode"):
        load_config("pea", real)
    assert load_config("pea", {**real, "latents": "mode"}).latents == "mode"

    class _SDXL:  # time_ids reads the family first, and nothing else before it raises
        family = "sdxl"

    cached = Batch(en=EN, zh=ZH, index=torch.arange(4), latents=torch.zeros(4, 4, 8, 8))
    with pytest.raises(ValueError, match="--time_ids square"):
        time_ids(_SDXL(), cached, "image")
    assert time_ids(_SDXL(), cached, "square") is None
