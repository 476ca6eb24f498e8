"""Two CPU processes (torchrun + accelerate, gloo) agree with one process on the same global batch, and sum the row
accounting of the tar shards they split."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.train.conftest import make_rows, tiny_config
from xling.train.recipes import run_recipe

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch_two(*args: object, worker: str = "_dist_worker.py") -> None:
    """Run ``worker ARGS`` in two gloo processes (torchrun, accelerate on CPU)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
    }
    env["ACCELERATE_USE_CPU"] = "true"  # accelerate then joins the torchrun group with gloo (MULTI_CPU)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(Path(__file__).with_name(worker)),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def test_two_processes_match_one(tiny_sd1_path, tiny_bert_path, tmp_path):
    # One process, batch 4 == two processes, batch 2 each (the sampler gives each its half of the global batch).
    config = tiny_config(
        tiny_sd1_path,
        tiny_bert_path,
        tmp_path / "one",
        max_steps=3,
        batch_size=4,
        lr=1e-3,
        train_encoder=False,
    )
    single = run_recipe("iap", config, train_data=make_rows(12))

    result_file = tmp_path / "two.json"
    _launch_two(tiny_sd1_path, tiny_bert_path, tmp_path / "two", 2, result_file)
    two = json.loads(result_file.read_text())
    assert two["processes"] == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)


def _shard(path: Path, n: int, bad: list[int]) -> Path:
    """A tar shard of ``n`` text samples; those in ``bad`` have an empty target caption."""
    with tarfile.open(path, "w") as archive:
        for i in range(n):
            for lang, text in (("en", f"{path.stem} {i}"), ("zh", " " if i in bad else f"{path.stem} {i}")):
                data = text.encode()
                info = tarfile.TarInfo(f"{i:04d}.{lang}.txt")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def test_two_processes_sum_the_row_accounting(tiny_sd1_path, tiny_bert_path, tmp_path):
    # Two shards, one per process; 4 updates of 2 rows per process read both shards to their end (an epoch is
    # 2 batches): each process counts only its own shard, and the run's accounting is their sum.
    _shard(tmp_path / "shard-0.tar", 6, bad=[1])
    _shard(tmp_path / "shard-1.tar", 7, bad=[0, 5, 6])
    data = str(tmp_path / "shard-{0..1}.tar")
    config = tiny_config(
        tiny_sd1_path, tiny_bert_path, tmp_path / "one", max_steps=4, batch_size=4, data={"path": data}
    )
    single = run_recipe("align", config).rows
    assert single is not None and (single.read, single.used, single.skipped.total) == (13, 9, 4)

    result_file = tmp_path / "two.json"
    _launch_two(tiny_sd1_path, tiny_bert_path, tmp_path / "two", 2, result_file, data)
    two = json.loads(result_file.read_text())
    assert two["processes"] == 2
    expected = single.to_dict()
    assert {k: two["rows"][k] for k in ("read", "used", "skipped", "by_reason")} == {
        k: expected[k] for k in ("read", "used", "skipped", "by_reason")
    }
    assert sorted(two["rows"]["first"]["empty_caption"]) == sorted(expected["first"]["empty_caption"])


def test_two_processes_resume_exactly(tiny_sd1_path, tiny_bert_path, tmp_path):
    # Each process saves its own RNG state (the student encoder's dropout draws from it); update 3 after a resume
    # from checkpoint-2 in two new processes comes out bit for bit.
    out = tmp_path / "two"
    for mode in ("full", "resume"):
        _launch_two(
            tiny_sd1_path,
            tiny_bert_path,
            out,
            tmp_path / f"{mode}.json",
            mode,
            worker="_dist_resume_worker.py",
        )
    full, resumed = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("full", "resume"))
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "checkpoint.json").read_text())["num_processes"] == 2
    assert len(full) == 3 and resumed == full[2:]
