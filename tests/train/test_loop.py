"""The shared loop: exact resume, non-finite stop with the last checkpoint intact, loss going down, sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xling.train.checkpoint import TrainerState, list_checkpoints, resolve_resume
from xling.train.config import load_config
from xling.train.loop import EpochBatchSampler, NonFiniteTrainingError, build_lr_scheduler, train
from xling.train.recipes import distill, get_recipe, run_recipe


def test_sampler_global_batch_is_independent_of_process_count():
    one = list(EpochBatchSampler(13, 4, seed=3))
    two = [list(EpochBatchSampler(13, 2, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(one) == len(two[0]) == 3
    for b in range(3):
        assert one[b] == two[0][b] + two[1][b]
    s = EpochBatchSampler(13, 4, seed=3)
    s.set_epoch(1)
    assert list(s) != one  # a new permutation per epoch
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(3, 2, seed=0, num_replicas=2)


def test_lr_schedule_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, "cosine", warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_continues_exactly(accumulation, recipe_config, recipe_rows, tmp_path):
    # IAP with the whole student training: dropout (global RNG), AdamW moments, the lr schedule and the data
    # order must all come back. 12 rows / batch 4 = 3 batches per epoch, so step 2 stops mid-epoch.
    common = {
        "max_steps": 5,
        "checkpoint_every": 2,
        "keep_checkpoints": 5,
        "lr": 1e-3,
        "warmup_steps": 1,
        "gradient_accumulation_steps": accumulation,
    }
    full = run_recipe(
        "iap", recipe_config(**common, output_dir=str(tmp_path / "full")), train_data=recipe_rows
    )
    part_dir = str(tmp_path / "part")
    first = _interrupted_after(2, "iap", recipe_config(**common, output_dir=part_dir), train_data=recipe_rows)
    second = run_recipe(
        "iap", recipe_config(**common, output_dir=part_dir, resume="latest"), train_data=recipe_rows
    )
    assert len(full.losses) == 5 and second.steps == 5
    assert first + second.losses == full.losses
    from safetensors.torch import load_file

    full_w = load_file(str(Path(full.adapter_dir) / "head" / "model.safetensors"))
    part_w = load_file(str(Path(second.adapter_dir) / "head" / "model.safetensors"))
    assert all(torch.equal(full_w[k], part_w[k]) for k in full_w)


class _Interrupt(Exception):
    pass


def _interrupted_after(steps: int, name: str, config: dict, **kwargs) -> list[float]:
    """Run ``name`` with ``config`` and kill it (an exception from the step callback) after ``steps`` updates."""
    losses: list[float] = []

    def on_step(step: int, logs: dict[str, float], _module: object) -> None:
        losses.append(logs["train/total"])
        if step == steps:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_recipe(name, config, on_step=on_step, **kwargs)
    return losses


def test_checkpoints_rotate_and_resolve(recipe_config, recipe_rows, tmp_path):
    out = tmp_path / "rot"
    run_recipe(
        "distill",
        recipe_config(max_steps=4, checkpoint_every=1, keep_checkpoints=2, output_dir=str(out)),
        train_data=recipe_rows,
    )
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert TrainerState(**state).step == 4 and state["micro_batches"] == 4
    assert resolve_resume("latest", out) == out / "checkpoints" / "checkpoint-4"
    assert resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path), out)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(monkeypatch, recipe_config, recipe_rows, tmp_path):
    out = tmp_path / "nan"
    calls = {"n": 0}
    real = distill.pooled_kd

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(distill, "pooled_kd", poisoned)
    cfg = load_config("distill", recipe_config(max_steps=5, checkpoint_every=2, output_dir=str(out)))
    step = get_recipe("distill").build(cfg, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(NonFiniteTrainingError, match=r"step 3 .*pooled") as info:
        train(step, cfg, recipe_rows)
    assert info.value.step == 3 and info.value.terms == ["pooled"]
    assert info.value.checkpoint == out / "checkpoints" / "checkpoint-2"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (info.value.checkpoint / "model.safetensors").is_file()
    assert not (out / "adapter").exists()  # no half-trained adapter is written
    # ... and the run resumes from it once the cause is gone.
    monkeypatch.setattr(distill, "pooled_kd", real)
    resumed = run_recipe(
        "distill",
        {**recipe_config(max_steps=5, output_dir=str(out)), "resume": "latest"},
        train_data=recipe_rows,
    )
    assert resumed.steps == 5 and len(resumed.losses) == 3


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("distill", {"lr": 3e-3}),
        ("align", {"lr": 3e-3}),
        ("mtn", {"lr": 3e-3}),
        ("iap", {"lr": 3e-3, "timestep_min": 500, "timestep_max": 500}),
    ],
)
def test_loss_goes_down_on_a_fixed_batch(name, overrides, recipe_config):
    from tests.train.conftest import make_rows

    rows = make_rows(4)  # batch 4 of 4 rows: the same batch every step
    result = run_recipe(
        name,
        recipe_config(max_steps=30, lr_scheduler="constant", max_grad_norm=0.0, **overrides),
        train_data=rows,
    )
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.7 * first, (name, result.losses[:3], result.losses[-3:])


def test_tensorboard_logs_every_term(recipe_config, recipe_rows, tmp_path):
    out = tmp_path / "tb"
    run_recipe(
        "mtn",
        recipe_config(
            max_steps=2, log_with="tensorboard", log_every=1, validate_every=1, output_dir=str(out)
        ),
        train_data=recipe_rows,
        val_data=recipe_rows[:4],
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    expected = {
        "train/total",
        "train/mse",
        "train/reconstruction",
        "train/adversarial",
        "train/lr",
        "val/mse",
    }
    assert expected <= tags, sorted(tags)


def test_mixed_precision_keeps_trainable_fp32(recipe_config, recipe_rows, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        cfg = load_config(
            "pea", recipe_config(max_steps=1, mixed_precision="bf16", output_dir=str(tmp_path / "mp"))
        )
        from xling.train.loop import make_accelerator

        accelerator = make_accelerator(cfg)
        step = get_recipe("pea").build(cfg, device=accelerator.device, dtype=torch.bfloat16)
        result = train(step, cfg, recipe_rows, accelerator=accelerator)
        assert result.steps == 1 and all(torch.isfinite(torch.tensor(result.losses)))
        assert step.frozen["teacher"].unet.dtype == torch.bfloat16
        assert {p.dtype for p in step.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in step.encoder.student.parameters()} == {torch.bfloat16}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _write_shards(folder: Path, n_shards: int = 2, per_shard: int = 6) -> str:
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from tests import _tiny

    rng = np.random.default_rng(0)
    text = _tiny.BILINGUAL_TEXT
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                j = (s * per_shard + i) % (len(text) // 2) * 2
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, format="PNG")
                members = {"en.txt": text[j].encode(), "zh.txt": text[j + 1].encode(), "png": png.getvalue()}
                for suffix, payload in members.items():
                    info = tarfile.TarInfo(f"s{s}i{i}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def test_tar_shards_train_and_resume_exactly(recipe_config, tmp_path):
    pattern = _write_shards(tmp_path / "shards")  # 12 rows, batch 4: 3 batches per epoch
    common = {"max_steps": 5, "checkpoint_every": 2, "lr": 1e-3, "data": {"path": pattern}}
    full = run_recipe("iap", recipe_config(**common, output_dir=str(tmp_path / "full")))
    part = str(tmp_path / "part")
    first = _interrupted_after(2, "iap", recipe_config(**common, output_dir=part))
    second = run_recipe("iap", recipe_config(**common, output_dir=part, resume="latest"))
    assert len(full.losses) == 5
    assert first + second.losses == full.losses
