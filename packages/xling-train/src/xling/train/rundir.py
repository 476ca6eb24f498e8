"""A run owns its output folder: writable, locked, tagged with a run id.

:meth:`RunFolder.claim` runs before any model loads:

1. the folder is created and a probe file written, fsynced and deleted (every process), so a read-only or full
   disk is reported in seconds, not at the first checkpoint;
2. the main process takes ``run.lock`` (``O_CREAT | O_EXCL``, holding its pid and host). A lock whose pid is no
   longer running on this host is stale and replaced, with a warning; a lock of a live pid is refused; a lock
   from another host (whose pid cannot be checked) is replaced only with ``--overwrite``;
3. ``run.json`` holds the run id (a uuid). A fresh run refuses a folder that holds anything unless
   ``--overwrite``, which first removes what xling writes there (and says what it removed); ``--resume`` needs
   the checkpoint's run id to match the folder's, its process count and the config keys it may not change
   (``xling.train.checkpoint.check_resumable``), all checked before any model loads.

Every checkpoint records the run id, and rotation only deletes checkpoints of its own run.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xling.train.checkpoint import (
    DiskFullError,
    agree,
    check_resumable,
    disk_errors,
    read_manifest,
    resolve_resume,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from xling.train.config import RecipeConfig

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
_PROBE = ".xling-write-probe-"
#: What a run writes at the top of its folder (``--overwrite`` removes these, and ``.tmp-*`` leftovers).
RUN_ENTRIES = (
    "adapter",
    "checkpoints",
    "logs",
    "config.yaml",
    RUN_FILE,
    "report.md",
    "metrics.json",
    "grid.png",
    "images.json",
    "cross_attention_kv.safetensors",
    "unet",
)
# A lock file this young and still empty is being written by its owner, not left behind.
_LOCK_WRITE_S = 5.0
_HELD: set[Path] = set()


class RunFolderError(ValueError):
    """The output folder cannot be used by this run (not writable, locked, another run's); the message says why
    and which option changes that."""


@dataclass
class RunFolder:
    """A claimed output folder.

    Attributes:
        path: the folder.
        run_id: this run's id (``run.json``; kept by a resume).
        resume_from: the checkpoint to resume from (``None``: start at step 0).
        lock: the lock file, on the main process (``None`` elsewhere, and after :meth:`release`).
    """

    path: Path
    run_id: str
    resume_from: Path | None
    lock: Path | None = None

    @classmethod
    def claim(cls, config: RecipeConfig, accelerator: Accelerator) -> RunFolder:
        """Check, lock and tag ``config.output_dir`` for this run (every process calls this).

        Raises:
            RunFolderError: the folder is not writable, is locked by a live run, holds files of another run
                (fresh run without ``--overwrite``) or is not the folder of the checkpoint to resume.
            DiskFullError: no space left for the probe file.
            xling.train.checkpoint.CheckpointError: the checkpoint to resume is of the old (pickled) format or
                incomplete.
        """
        path = Path(config.output_dir)
        main = accelerator.is_main_process
        # The main process creates the folder; then the others probe it (another node may mount it read-only).
        agree(accelerator, f"creating the output folder {path}", lambda: main and _writable(path))
        agree(accelerator, f"writing into the output folder {path}", lambda: main or _writable(path))
        lock = agree(accelerator, f"locking {path}", lambda: _lock(path, config.overwrite) if main else None)
        try:
            agree(
                accelerator,
                f"claiming {path}",
                lambda: main and _own(path, config, accelerator.num_processes),
            )
            run_id = _read_run_id(path)
            resume_from = resolve_resume(config.resume, path)
        except BaseException:
            _release(lock)
            raise
        if run_id is None:  # another process removed it in between: the lock says that cannot happen
            raise RunFolderError(f"{path / RUN_FILE} vanished while the run started")
        return cls(path, run_id, resume_from, lock)

    def release(self) -> None:
        """Remove the lock (idempotent)."""
        _release(self.lock)
        self.lock = None


def _writable(path: Path) -> None:
    try:
        with disk_errors(path):
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f"{_PROBE}{socket.gethostname()}-{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"xling")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
    except DiskFullError:
        raise
    except OSError as err:
        raise RunFolderError(
            f"output folder {path} is not writable ({err.strerror or err}); pick another --output_dir or fix its "
            "permissions"
        ) from err


def _lock(path: Path, overwrite: bool) -> Path:
    lock = path / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            stale = _stale(lock, holder, overwrite)
            lock.unlink(missing_ok=True)
            logger.warning("replaced the lock %s: %s", lock, stale)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _HELD.add(lock)
        return lock
    raise RunFolderError(f"could not take the lock {lock}: another process keeps taking it")


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _stale(lock: Path, holder: dict[str, Any] | None, overwrite: bool) -> str:
    """Why the lock ``holder`` may be replaced; raise when it may not."""
    if holder is None:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return "it was removed meanwhile"
        if age < _LOCK_WRITE_S and not overwrite:
            raise RunFolderError(
                f"output folder {lock.parent} is being claimed by another run (lock file {lock})"
            )
        return "it was unreadable (left by a run that died while taking it)"
    pid, host = holder["pid"], holder.get("host")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    if host != socket.gethostname():
        if overwrite:
            return f"it was held by pid {pid} on host {host} (since {since}), replaced because of --overwrite"
        raise RunFolderError(
            f"output folder {lock.parent} is locked by pid {pid} on host {host} since {since} (lock file {lock}); "
            "this machine cannot tell whether that run still lives: if it has ended, pass --overwrite"
        )
    if pid == os.getpid():
        return "it was left by an earlier run in this process"
    if _alive(pid):
        raise RunFolderError(
            f"output folder {lock.parent} is in use by a running process (pid {pid}, since {since}; lock file "
            f"{lock}): two runs cannot write one folder. Wait for it to end, or pick another --output_dir"
        )
    return f"its process (pid {pid}, since {since}) is no longer running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(lock: Path | None) -> None:
    if lock is None:
        return
    _HELD.discard(lock)
    holder = _read_lock(lock)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD):
        _release(lock)


def _read_run_id(path: Path) -> str | None:
    try:
        run = json.loads((path / RUN_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"cannot read {path / RUN_FILE}: {err}") from err
    if not isinstance(run, dict) or not isinstance(run.get("run_id"), str):
        raise RunFolderError(f"{path / RUN_FILE} holds no run id")
    return run["run_id"]


def _own(path: Path, config: RecipeConfig, processes: int) -> None:
    """Main process, lock held: check the folder is this run's (or empty) and write ``run.json`` if new."""
    run_id = _read_run_id(path)
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE and not p.name.startswith(_PROBE))
    if config.resume is not None:
        checkpoint = resolve_resume(config.resume, path)
        if checkpoint is not None:
            check_resumable(
                checkpoint, read_manifest(checkpoint), config, run_id=run_id, num_processes=processes
            )
            return
        if run_id is not None:  # --resume latest before the first checkpoint: the same run starts over
            return
    # A run that stopped before writing anything (a data error, say) left only its run.json: nothing to protect.
    empty_checkpoints = (path / "checkpoints").is_dir() and not any((path / "checkpoints").iterdir())
    entries = [e for e in entries if e != RUN_FILE and not (e == "checkpoints" and empty_checkpoints)]
    if entries:  # a fresh run (or --resume latest in a folder with no run of xling's)
        if not config.overwrite:
            what = f"run {run_id}" if run_id else "files"
            raise RunFolderError(
                f"output folder {path} is not empty: it holds {what} ({', '.join(entries[:6])}"
                f"{', ...' if len(entries) > 6 else ''}); pass --resume latest to continue that run, --overwrite "
                "to replace it, or another --output_dir"
            )
        removed = [n for n in entries if n in RUN_ENTRIES or n.startswith(".tmp-")]
        removed += [RUN_FILE] if run_id else []
        for name in removed:
            target = path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        kept = sorted(set(entries) - set(removed))
        logger.warning(
            "--overwrite: removed the previous run's %s from %s%s",
            ", ".join(removed) or "nothing",
            path,
            f" (kept, not written by xling: {', '.join(kept)})" if kept else "",
        )
    tmp = path / f".tmp-{RUN_FILE}"
    tmp.write_text(json.dumps({"run_id": uuid.uuid4().hex, "recipe": config.recipe, "created": time.time()}))
    os.replace(tmp, path / RUN_FILE)
