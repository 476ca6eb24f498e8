"""Atomic, rotated training checkpoints: ``<output_dir>/checkpoints/checkpoint-{step}``.

``accelerator.save_state`` writes into ``.tmp-checkpoint-{step}``; every file is fsynced and the directory is
renamed into place, so a crash (or a non-finite loss) at any moment leaves the previous checkpoints whole.
``trainer_state.json`` beside accelerate's files records where the loop stood (update step, micro-batches
consumed) so a resumed run continues with the same data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Loop position saved with every checkpoint.

    Attributes:
        step: optimizer updates done.
        micro_batches: micro-batches consumed since the start (``step * gradient_accumulation_steps``).
        epoch: epoch of the next micro-batch.
        batch_in_epoch: index, within ``epoch``, of the next micro-batch.
    """

    step: int = 0
    micro_batches: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def checkpoint_root(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """Map ``--resume latest|PATH`` to a checkpoint directory (``None`` when ``latest`` finds nothing)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume={resume!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # Directory fsync makes the rename itself durable; some filesystems refuse it, which is harmless here.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: TrainerState, keep: int) -> Path:
    """Write ``checkpoint-{state.step}`` atomically and delete all but the last ``keep`` checkpoints.

    Every process must call this (accelerate saves per-process RNG states); only the main process renames
    and rotates.
    """
    root = checkpoint_root(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> TrainerState:
    """Restore model, optimizer, registered objects and RNG states from ``path``; return the loop position."""
    path = Path(path)
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))
