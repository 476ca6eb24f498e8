"""Two CPU processes (torchrun + accelerate, gloo) agree with one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
        str(Path(__file__).with_name("_dist_worker.py")),
        str(tiny_sd1_path),
        str(tiny_bert_path),
        str(tmp_path / "two"),
        "2",
        str(result_file),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    two = json.loads(result_file.read_text())
    assert two["processes"] == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
