"""Run by ``accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml`` (2 CPU processes) from test_fsdp.py:
train a recipe on the tiny fixtures and write what the run did as JSON.

Usage: ``_fsdp_worker.py RESULT_FILE CONFIG_JSON`` where ``CONFIG_JSON`` holds ``{"recipe": ..., "config": {...}}``
(a ``tiny_config`` mapping; ``"rows": N`` training rows). The result holds the losses, the distributed type, the
process count and how the trainable parameters were held after the first update (global shape, this process's
shape, whether each was sharded); a run stopped by a non-finite value writes the error's class, step and message
instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.train.conftest import make_rows


def force_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP2 path run in a CPU process group.

    accelerate 1.15 turns ``ACCELERATE_USE_FSDP`` into ``DistributedType.FSDP`` only for a device world
    (``AcceleratorState``: MULTI_GPU, MULTI_XPU, ...); a CPU world (``ACCELERATE_USE_CPU``, MULTI_CPU, gloo) keeps
    plain DDP and ignores the FSDP plugin. torch's ``fully_shard`` itself runs on CPU tensors over gloo. So the
    worker joins the gloo group first and then names its world MULTI_GPU, the one thing changed: the Accelerator
    the loop builds then reads the FSDP plugin from the launcher's environment (the config file's
    ``fsdp_config``) and prepares the step with accelerate's own FSDP2 code, as on GPUs.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected a CPU process group, got {state.distributed_type}")
    state.distributed_type = DistributedType.MULTI_GPU


def main() -> None:
    result_file, spec_file = sys.argv[1:3]
    spec = json.loads(Path(spec_file).read_text())
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        force_fsdp_on_cpu()

    from accelerate import PartialState

    from xling.train.checkpoint import is_sharded
    from xling.train.loop import NonFiniteTrainingError
    from xling.train.recipes import run_recipe

    held: dict[str, Any] = {}

    def on_step(step: int, logs: dict[str, float], module: Any) -> None:
        if step == 1:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    local = p.to_local() if is_sharded(p) else p
                    held[name] = {
                        "sharded": is_sharded(p),
                        "shape": list(p.shape),
                        "local": list(local.shape),
                    }

    out: dict[str, Any] = {"processes": PartialState().num_processes}
    try:
        result = run_recipe(
            spec["recipe"], spec["config"], train_data=make_rows(spec.get("rows", 12)), on_step=on_step
        )
    except NonFiniteTrainingError as err:
        out.update(error=type(err).__name__, step=err.step, message=str(err))
    else:
        out.update(losses=result.losses, held=held)
    from accelerate.state import AcceleratorState

    out["distributed_type"] = str(AcceleratorState().distributed_type.value)
    if PartialState().is_main_process:
        Path(result_file).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
