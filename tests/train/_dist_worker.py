"""Run by ``accelerate launch`` from test_distributed.py: train IAP on the tiny fixtures, print the losses."""

from __future__ import annotations

import json
import sys

from tests.train.conftest import make_rows, tiny_config
from xling.train.recipes import run_recipe


def main() -> None:
    teacher, student, output_dir, batch_size, result_file = sys.argv[1:6]
    config = tiny_config(
        teacher, student, output_dir, max_steps=3, batch_size=int(batch_size), lr=1e-3, train_encoder=False
    )
    result = run_recipe("iap", config, train_data=make_rows(12))
    from accelerate import PartialState

    if PartialState().is_main_process:
        with open(result_file, "w") as fh:
            json.dump({"losses": result.losses, "processes": PartialState().num_processes}, fh)


if __name__ == "__main__":
    main()
