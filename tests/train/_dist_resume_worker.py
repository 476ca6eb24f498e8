"""Run by ``torchrun`` from test_distributed.py: train IAP 3 updates with a checkpoint at update 2 (``full``), or
resume that run from it (``resume``); write the losses."""

from __future__ import annotations

import json
import sys

from tests.train.conftest import make_rows, tiny_config
from xling.train.recipes import run_recipe


def main() -> None:
    teacher, student, output_dir, result_file, mode = sys.argv[1:6]
    config = tiny_config(teacher, student, output_dir, max_steps=3, batch_size=2, lr=1e-3, checkpoint_every=2)
    result = run_recipe(
        "iap", {**config, "resume": "latest" if mode == "resume" else None}, train_data=make_rows(12)
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        with open(result_file, "w") as fh:
            json.dump(result.losses, fh)


if __name__ == "__main__":
    main()
