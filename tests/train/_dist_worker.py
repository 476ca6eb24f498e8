"""Run by ``accelerate launch`` from test_distributed.py: train IAP on the tiny fixtures and write the losses; with a
sixth argument (tar shards), train ``align`` on them and write the run's row accounting instead."""

from __future__ import annotations

import json
import sys

from tests.train.conftest import make_rows, tiny_config
from xling.train.recipes import run_recipe


def main() -> None:
    teacher, student, output_dir, batch_size, result_file = sys.argv[1:6]
    if len(sys.argv) > 6:
        _accounting(teacher, student, output_dir, int(batch_size), result_file, sys.argv[6])
        return
    config = tiny_config(
        teacher, student, output_dir, max_steps=3, batch_size=int(batch_size), lr=1e-3, train_encoder=False
    )
    result = run_recipe("iap", config, train_data=make_rows(12))
    from accelerate import PartialState

    if PartialState().is_main_process:
        with open(result_file, "w") as fh:
            json.dump({"losses": result.losses, "processes": PartialState().num_processes}, fh)


def _accounting(
    teacher: str, student: str, output_dir: str, batch_size: int, result_file: str, data: str
) -> None:
    from accelerate import PartialState

    config = tiny_config(
        teacher, student, output_dir, max_steps=4, batch_size=batch_size, data={"path": data}
    )
    result = run_recipe("align", config)
    if PartialState().is_main_process:
        with open(result_file, "w") as fh:
            json.dump({"rows": result.rows.to_dict(), "processes": PartialState().num_processes}, fh)


if __name__ == "__main__":
    main()
