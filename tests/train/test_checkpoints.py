"""Trustworthy runs (issue 15): every checkpoint finite, nothing unpickled on resume, overrides applied or refused,
a run owns its folder, read-only and full disks reported in words."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xling.train.checkpoint import CheckpointError, DiskFullError, list_checkpoints
from xling.train.cli import main as xling
from xling.train.loop import NonFiniteStateError, NonFiniteTrainingError
from xling.train.recipes import distill, run_recipe
from xling.train.rundir import LOCK_FILE, RUN_FILE, RunFolderError

SRC = Path(__file__).resolve().parents[2] / "packages"


def _run(recipe_config, rows, out: Path, **overrides):
    return run_recipe("distill", recipe_config(output_dir=str(out), **overrides), train_data=rows)


def _finite_files(checkpoint: Path) -> bool:
    tensors = {
        **load_file(str(checkpoint / "model.safetensors")),
        **load_file(str(checkpoint / "optimizer.safetensors")),
    }
    return all(torch.isfinite(t).all() for t in tensors.values())


# -- 1. no non-finite state in a checkpoint -------------------------------------------------------------------------


def test_non_finite_state_is_never_written(monkeypatch, recipe_config, recipe_rows, tmp_path):
    # An inf Adam second moment after update 3: the loss stays finite (the update divides by inf, a zero step),
    # so only the state check can see it. checkpoint-4 must not be written; checkpoint-2 is the last good one.
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            first = self.param_groups[0]["params"][0]
            self.state[first]["exp_avg_sq"].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    out = tmp_path / "state"
    with pytest.raises(
        NonFiniteStateError, match=r"after update 4 .*optimizer exp_avg_sq of .*checkpoint-4 was not written"
    ) as info:
        _run(recipe_config, recipe_rows, out, max_steps=6, checkpoint_every=2)
    assert info.value.checkpoint == out / "checkpoints" / "checkpoint-2"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"] and _finite_files(
        info.value.checkpoint
    )
    assert not (out / "adapter").exists()

    # The same before the final adapter (no checkpoints at all): nothing is written.
    calls["n"] = 0
    out = tmp_path / "final"
    with pytest.raises(
        NonFiniteStateError, match=r"the adapter was not written .no checkpoint was written yet"
    ):
        _run(recipe_config, recipe_rows, out, max_steps=3)
    assert not (out / "adapter").exists()


def test_huge_lr_never_leaves_a_non_finite_checkpoint(recipe_config, recipe_rows, tmp_path):
    out = tmp_path / "lr"
    with pytest.raises(NonFiniteTrainingError) as info:
        _run(recipe_config, recipe_rows, out, max_steps=8, checkpoint_every=1, keep_checkpoints=8, lr=1e6)
    assert all(_finite_files(c) for c in list_checkpoints(out))
    if info.value.checkpoint is not None:
        assert _finite_files(info.value.checkpoint)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("adam_epsilon", 0.0),
        ("adam_epsilon", -1e-8),
        ("adam_beta2", 1.0),
        ("weight_decay", -0.1),
        ("lr", float("inf")),
    ],
)
def test_options_that_make_non_finite_updates_are_rejected(key, value, recipe_config, tmp_path):
    from xling.train.config import load_config

    with pytest.raises(ValueError, match=f"config key '{key}'"):
        load_config("distill", recipe_config(**{key: value}))


# -- 2. no pickle on resume ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes the marker file: what a crafted ``.pkl`` in a checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_resume_never_unpickles(monkeypatch, recipe_config, recipe_rows, tmp_path):
    out = tmp_path / "pkl"
    _run(recipe_config, recipe_rows, out, max_steps=2, checkpoint_every=2)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert {p.name for p in checkpoint.iterdir()} == {
        "checkpoint.json",
        "trainer_state.json",
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng-rank0.safetensors",
    }
    resume = {"max_steps": 3, "resume": "latest"}
    marker = tmp_path / "marker"

    # A pickle slipped into a new checkpoint: refused, never opened.
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(
        CheckpointError, match=r"holds pickles its manifest does not list \(custom_checkpoint_0.pkl\)"
    ):
        _run(recipe_config, recipe_rows, out, **resume)
    (checkpoint / "custom_checkpoint_0.pkl").unlink()

    # A corrupt RNG file: a resume that cannot restore exactly fails, naming the file.
    rng = checkpoint / "rng-rank0.safetensors"
    good = rng.read_bytes()
    rng.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*rng-rank0.safetensors"):
        _run(recipe_config, recipe_rows, out, **resume)
    rng.write_bytes(good)

    # The good checkpoint resumes with every unpickler disabled.
    def refuse(*args, **kwargs):
        raise AssertionError("a resume unpickled something")

    with monkeypatch.context() as m:
        for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
            m.setattr(target, name, refuse)
        assert _run(recipe_config, recipe_rows, out, **resume).steps == 3

    # An old (accelerate) checkpoint: refused with a message saying it holds pickles.
    (checkpoint / "checkpoint.json").unlink()
    for name in ("random_states_0.pkl", "optimizer.bin"):
        (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(
        CheckpointError, match=r"old-format checkpoint .*holds pickles \(optimizer.bin, random_states_0.pkl\)"
    ):
        _run(recipe_config, recipe_rows, out, max_steps=3, resume=str(checkpoint))
    assert not marker.exists()


def test_no_unpickling_call_in_the_training_package():
    text = "\n".join(p.read_text() for p in (SRC / "xling-train").rglob("*.py"))
    # Spelt in two, so that `git grep` for it finds nothing in the repository.
    unsafe = "weights_only=" + "False"
    assert unsafe not in text and "load_state(" not in text and "pickle.load" not in text


# -- 3. overrides on resume ---------------------------------------------------------------------------------------


def test_resume_applies_or_refuses_overrides(recipe_config, recipe_rows, tmp_path, capsys):
    out, data = tmp_path / "ovr", tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"en": r["en"], "zh": r["zh"]}) + "\n" for r in recipe_rows))
    config = recipe_config(
        output_dir=str(out), max_steps=2, checkpoint_every=2, lr=4e-3, data={"path": str(data)}
    )
    run_recipe("distill", config)
    # The command line resumes from the checkpoint's own config: no option needs repeating.
    assert xling(["train", "distill", "--output_dir", str(out), "--resume", "latest", "--lr", "1e-5"]) == 2
    err = capsys.readouterr().err
    assert "'lr' (checkpoint: 0.004, now: 1e-05)" in err and "may change only: max_steps" in err
    with pytest.raises(CheckpointError, match="'batch_size'"):
        run_recipe("distill", {**config, "batch_size": 2, "resume": "latest"})

    assert (
        xling(["train", "distill", "--output_dir", str(out), "--resume", "latest", "--max_steps", "3"]) == 0
    )
    assert "trained distill: 3 steps" in capsys.readouterr().out
    import yaml

    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["max_steps"] == 3 and recorded["lr"] == 4e-3


# -- 4. a run owns its folder -------------------------------------------------------------------------------------


def test_a_run_owns_its_folder(recipe_config, recipe_rows, tmp_path, caplog):
    out = tmp_path / "own"
    first = _run(recipe_config, recipe_rows, out, max_steps=4, checkpoint_every=2, keep_checkpoints=5)
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert (
        json.loads((out / "checkpoints" / "checkpoint-4" / "checkpoint.json").read_text())["run_id"] == run_id
    )
    assert not (out / LOCK_FILE).exists() and first.steps == 4

    with pytest.raises(
        RunFolderError, match=r"is not empty: it holds run .*pass --resume latest .*--overwrite"
    ):
        _run(recipe_config, recipe_rows, out, max_steps=2)

    # Another live process holds the lock: refused; a dead one's lock is replaced, with a warning.
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(RunFolderError, match=rf"in use by a running process \(pid {os.getppid()}"):
        _run(recipe_config, recipe_rows, out, max_steps=5, resume="latest")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))

    # A checkpoint of another run is foreign here: rotation leaves it alone, and resume refuses it.
    other = tmp_path / "other"
    _run(recipe_config, recipe_rows, other, max_steps=1, checkpoint_every=1)
    foreign = out / "checkpoints" / "checkpoint-1"
    os.replace(other / "checkpoints" / "checkpoint-1", foreign)
    with caplog.at_level(logging.WARNING, logger="xling"):
        _run(
            recipe_config,
            recipe_rows,
            out,
            max_steps=6,
            checkpoint_every=1,
            keep_checkpoints=1,
            resume="latest",
        )
    assert f"pid {dead.pid}" in caplog.text and "no longer running" in caplog.text
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-6"]
    with pytest.raises(CheckpointError, match=r"checkpoint-1 belongs to run .*--output_dir"):
        _run(recipe_config, recipe_rows, out, max_steps=7, resume=str(foreign))

    # --overwrite starts over, saying what it removed.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xling"):
        _run(recipe_config, recipe_rows, out, max_steps=1, overwrite=True)
    assert "--overwrite: removed the previous run's adapter, checkpoints, config.yaml" in caplog.text
    assert json.loads((out / RUN_FILE).read_text())["run_id"] != run_id and not list_checkpoints(out)


# -- 5. read-only and full disks ----------------------------------------------------------------------------------


def test_unwritable_folder_is_reported_before_any_model_loads(
    monkeypatch, recipe_config, recipe_rows, tmp_path
):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(distill, "build", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RunFolderError, match=f"output folder {blocker / 'run'} is not writable"):
        _run(recipe_config, recipe_rows, blocker / "run")
    real_open = os.open

    def read_only(path, flags, *args):
        if ".xling-write-probe-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(RunFolderError, match=r"is not writable \(Read-only file system\)"):
        _run(recipe_config, recipe_rows, tmp_path / "ro")


def test_full_disk_says_so_and_leaves_no_half_written_adapter(
    monkeypatch, recipe_config, recipe_rows, tmp_path
):
    import safetensors.torch

    from xling.train import checkpoint
    from xling.train.recipes.base import TrainStep

    out = tmp_path / "full"
    _run(recipe_config, recipe_rows, out, max_steps=1)
    before = sorted(p.relative_to(out) for p in (out / "adapter").rglob("*"))

    # torch's wrapper hides ENOSPC; the free space tells.
    real_save = TrainStep.save

    def save_then_fail(self, output_dir):
        real_save(self, output_dir)
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 64 vs 0")

    monkeypatch.setattr(TrainStep, "save", save_then_fail)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: _Usage())
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*full") as info:
        _run(
            recipe_config, recipe_rows, out, max_steps=2, resume="latest"
        )  # no checkpoint: the run starts over
    assert info.value.errno == errno.ENOSPC
    assert (
        sorted(p.relative_to(out) for p in (out / "adapter").rglob("*")) == before
    )  # the old adapter, whole
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]

    # A checkpoint on a full disk: ENOSPC in words, no temporary directory left.
    monkeypatch.setattr(TrainStep, "save", real_save)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*tmp-checkpoint-1"):
        _run(recipe_config, recipe_rows, out, max_steps=2, checkpoint_every=1, resume="latest")
    assert not list((out / "checkpoints").iterdir())


class _Usage:
    total, used, free = 1 << 30, 1 << 30, 0
