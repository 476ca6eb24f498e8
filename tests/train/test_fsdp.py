"""FSDP (accelerate's FSDP2, torch's ``fully_shard``) with two CPU processes on gloo, launched by ``accelerate launch
--config_file configs/accelerate/fsdp_8gpu.yaml``: the student is really sharded, the run agrees with one process on
the same global batch, an FSDP checkpoint resumes exactly, the non-finite guard stops every process; the DDP config
runs the documented ``-m xling.train.cli`` command; and every shipped accelerate config loads with accelerate's own
config loader and launcher.

accelerate 1.15 enables FSDP only for GPU-like worlds, so the worker (``_fsdp_worker.force_fsdp_on_cpu``) names its
gloo world MULTI_GPU after joining it; everything else (the config file, the launcher's FSDP environment, the
plugin, ``prepare``) is accelerate's own code path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import make_rows, tiny_config
from xling.train.recipes import run_recipe

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
FSDP_CONFIG = ACCELERATE_CONFIGS / "fsdp_8gpu.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch_fsdp(tmp_path: Path, recipe: str, config: dict[str, Any], name: str) -> dict[str, Any]:
    """``accelerate launch`` the FSDP worker in 2 CPU processes; its JSON result."""
    spec, result = tmp_path / f"{name}-spec.json", tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"recipe": recipe, "config": config}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",  # a gloo group on CPU; the worker then lets FSDP run in it
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",  # fp32 on CPU, so one process and two can be compared closely
        str(Path(__file__).with_name("_fsdp_worker.py")),
        str(result),
        str(spec),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not result.is_file():
        pytest.fail(f"accelerate launch (FSDP) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


@pytest.fixture
def dropout_free_bert(tiny_bert_path: Path, tmp_path: Path) -> Path:
    """The tiny BERT student without dropout: dropout masks are drawn per process, so with dropout on, one process
    and two draw different masks for the same rows and no comparison of trained students could be exact."""
    import shutil

    path = tmp_path / "bert-no-dropout"
    shutil.copytree(tiny_bert_path, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _weights(adapter: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(adapter.rglob("*.safetensors")):
        out |= {f"{f.parent.name}/{k}": v for k, v in load_file(f).items()}
    return out


def test_fsdp_shards_the_student_and_matches_one_process(tiny_sd1_path, dropout_free_bert, tmp_path):
    # IAP with the whole student training: one process on batch 4 against two FSDP processes on 2 rows each.
    common = dict(max_steps=3, lr=1e-3, train_encoder=True)
    single = run_recipe(
        "iap",
        tiny_config(tiny_sd1_path, dropout_free_bert, tmp_path / "one", batch_size=4, **common),
        train_data=make_rows(12),
    )
    # The FSDP run also checkpoints the student's layers (recomputed inside their FSDP units in the backward).
    config = tiny_config(
        tiny_sd1_path,
        dropout_free_bert,
        tmp_path / "two",
        batch_size=2,
        gradient_checkpointing=True,
        **common,
    )
    two = _launch_fsdp(tmp_path, "iap", config, "two")

    assert two["distributed_type"] == "FSDP" and two["processes"] == 2
    # Sharded for real: every trainable tensor of the student and head is a DTensor, and rank 0 holds its first
    # half of rows (FSDP2 shards dim 0 as torch.chunk does).
    held = two["held"]
    assert sum(torch.Size(h["shape"]).numel() for h in held.values()) == single.trainable_parameters
    assert all(h["sharded"] for h in held.values())
    assert all(h["local"] == [-(-h["shape"][0] // 2), *h["shape"][1:]] for h in held.values())
    # Measured: the losses agree to the last printed digit and the trained weights to 7e-7 (fp32 sums reduced in
    # another order); the tolerances leave a little room above that.
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    ours, theirs = _weights(tmp_path / "two" / "adapter"), _weights(tmp_path / "one" / "adapter")
    assert ours.keys() == theirs.keys() and any(k.startswith("student/") for k in ours)
    for k in ours:
        assert ours[k].dtype == torch.float32, k  # the fp32 shards, gathered: no mixed-precision copy
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-5, msg=k)
    # The adapter loads back on one process as a plain model (transformers' class name recorded, no FSDP wrapper)
    # and encodes as the single-process one does.
    saved = json.loads((tmp_path / "two" / "adapter" / "student" / "config.json").read_text())
    assert saved["architectures"] == ["BertModel"]
    from xling.adapters import LanguageEncoder

    prompts = [r["zh"] for r in make_rows(3, images=False)]
    with torch.no_grad():
        a, b = (LanguageEncoder.from_pretrained(tmp_path / d / "adapter").eval() for d in ("two", "one"))
        torch.testing.assert_close(a(prompts).prompt_embeds, b(prompts).prompt_embeds, rtol=1e-4, atol=1e-5)


def test_fsdp_checkpoint_resumes_exactly(tiny_sd1_path, tiny_bert_path, tmp_path):
    # A LoRA student (align): the run checkpoints at update 2 and ends at 3; a new pair of processes resumes the
    # same folder from checkpoint-2 and must produce update 3 and the adapter bit for bit.
    out = tmp_path / "run"
    config = tiny_config(
        tiny_sd1_path, tiny_bert_path, out, max_steps=3, batch_size=2, lr=1e-3, checkpoint_every=2
    )
    config |= {"method": "lora", "lora_r": 4, "lora_alpha": 8}
    full = _launch_fsdp(tmp_path, "align", config, "full")
    full_weights = _weights(out / "adapter")  # the resume writes its adapter over this one
    checkpoint = out / "checkpoints" / "checkpoint-2"
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    assert manifest["num_processes"] == 2
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(manifest["files"])
    # The checkpoint holds full tensors (what one process would save), not one process's shards.
    saved = load_file(checkpoint / "model.safetensors")
    assert saved.keys() == full["held"].keys()
    assert all(list(saved[k].shape) == h["shape"] for k, h in full["held"].items())
    moments = load_file(checkpoint / "optimizer.safetensors")
    assert all(moments[f"{k}/exp_avg"].shape == saved[k].shape for k in saved)

    resumed = _launch_fsdp(tmp_path, "align", {**config, "resume": "latest"}, "resumed")
    assert len(full["losses"]) == 3 and resumed["losses"] == full["losses"][2:]
    resumed_weights = _weights(out / "adapter")
    assert any(k.startswith("student_lora/") for k in full_weights)
    assert resumed_weights.keys() == full_weights.keys()
    for k in full_weights:
        assert torch.equal(resumed_weights[k], full_weights[k]), k


def test_fsdp_non_finite_loss_stops_every_process(tiny_sd1_path, tiny_bert_path, tmp_path):
    # lr 1e30: the first AdamW update moves each weight by about 1e30, so the next loss overflows; both processes
    # must stop with the same error before that update (the main process's JSON says which; a hung process would
    # time the launch out instead).
    config = tiny_config(tiny_sd1_path, tiny_bert_path, tmp_path / "run", max_steps=3, batch_size=2, lr=1e30)
    result = _launch_fsdp(tmp_path, "iap", {**config, "max_grad_norm": 0.0}, "nan")
    assert result["error"] == "NonFiniteTrainingError" and result["step"] == 2, result
    assert not (tmp_path / "run" / "adapter").exists()


def test_ddp_config_launches_the_cli(tiny_sd1_path, tiny_bert_path, tmp_path):
    # The documented command, `accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml -m xling.train.cli
    # train ...`, with 2 CPU processes instead of 8 GPUs: the CLI trains, both processes checkpoint.
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"en": r["en"], "zh": r["zh"]} for r in make_rows(8, images=False)]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(ACCELERATE_CONFIGS / "ddp_8gpu.yaml"), "--num_processes", "2"),
        *("--main_process_port", str(_free_port()), "-m", "xling.train.cli", "train", "align"),
        *("--teacher", str(tiny_sd1_path), "--student", str(tiny_bert_path), "--data", str(pairs)),
        *("--output_dir", str(out), "--max_steps", "2", "--batch_size", "2", "--checkpoint_every", "2"),
        *("--log_with", "none", "--eval.enabled", "false", "--gradient_checkpointing", "true"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    manifest = json.loads((out / "checkpoints" / "checkpoint-2" / "checkpoint.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["config"]["gradient_checkpointing"] is True
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(manifest["files"])
    assert (out / "adapter" / "config.json").is_file()


def _launch_args(config: Path, num_processes: int | None = None) -> Any:
    """accelerate's launcher arguments for ``config`` (``accelerate launch --config_file CONFIG script.py``)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(config)]
    if num_processes is not None:
        argv += ["--num_processes", str(num_processes)]
    args = launch_command_parser().parse_args([*argv, "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize(
    ("name", "distributed_type", "machines", "processes"),
    [
        ("ddp_8gpu.yaml", "MULTI_GPU", 1, 8),
        ("fsdp_8gpu.yaml", "FSDP", 1, 8),
        ("multinode_2x8.yaml", "MULTI_GPU", 2, 16),
    ],
)
def test_accelerate_configs_load(name, distributed_type, machines, processes):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = ACCELERATE_CONFIGS / name
    config = load_config_from_file(str(path))  # raises on an unknown top-level key
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type.value, config.num_machines, config.num_processes) == (
        distributed_type,
        machines,
        processes,
    )
    assert config.mixed_precision == "no" and not config.use_cpu  # xling's --mixed_precision decides
    text = path.read_text()
    assert text.startswith("# ") and "Keys to change:" in text and "accelerate launch" in text
    args = _launch_args(path)
    assert args.num_processes == processes and args.multi_gpu == (distributed_type == "MULTI_GPU")
    if machines > 1:
        assert args.num_machines == 2 and args.main_process_ip and args.machine_rank == 0


def test_fsdp_config_becomes_an_fsdp2_plugin(monkeypatch):
    # The launcher turns the file's fsdp_config into the environment the processes read; accelerate's plugin built
    # from that environment is FSDP2 with transformer-layer units and the other choices the file documents.
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = json.loads(json.dumps(__import__("yaml").safe_load(FSDP_CONFIG.read_text())))
    args = _launch_args(FSDP_CONFIG, num_processes=2)
    unknown = [k for k in config["fsdp_config"] if not hasattr(args, k)]
    assert not unknown, f"fsdp_config keys accelerate launch does not know: {unknown}"
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert (
        plugin.activation_checkpointing is False
        and plugin.cpu_offload.__class__.__name__ != "CPUOffloadPolicy"
    )
    assert "transformer_auto_wrap_policy" in repr(plugin.auto_wrap_policy)
    assert plugin.transformer_cls_names_to_wrap is None  # the loop fills in the student's layer classes
