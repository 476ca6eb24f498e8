"""xling's checkpoint format: safetensors and JSON only, so a resume never unpickles anything.

``<output_dir>/checkpoints/checkpoint-{step}/`` holds

=========================  ==========================================================================
``checkpoint.json``        manifest: format and version, run id, step, process count, the run's config,
                           the grad scaler's numbers (fp16), the list of every file below
``trainer_state.json``     where the loop stood (:class:`TrainerState`)
``model.safetensors``      the trainable parameters, by name
``optimizer.safetensors``  the optimizer's state tensors, ``<parameter name>/<key>`` (AdamW: ``exp_avg``,
                           ``exp_avg_sq``, ``step``)
``optimizer.json``         its param groups (parameters by name) and any non-tensor per-parameter state
``scheduler.json``         the lr scheduler's ``state_dict()`` (plain numbers)
``rng-rank{r}.safetensors``  one per process: torch CPU and CUDA generator states, Python ``random`` and
                           numpy's MT19937 words as tensors, their scalars as JSON metadata
=========================  ==========================================================================

Every process writes its RNG file into ``.tmp-checkpoint-{step}``; the main process writes the rest, fsyncs
every file and renames the directory into place, so a crash, a full disk or a non-finite state at any moment
leaves the previous checkpoints whole. A resume reads exactly the files the manifest lists and refuses a
checkpoint with a file missing, unreadable or unlisted (accelerate's ``*.pkl`` / ``*.bin`` pickles included).

Under FSDP (accelerate's FSDP2, ``fully_shard``) each process holds one shard of every trainable parameter and
of its optimizer states (``DTensor``). Saving gathers them one tensor at a time (``full_tensor``, a collective
every process joins) and only the main process keeps and writes the full tensors, so an FSDP checkpoint holds
the same full, unsharded tensors as a single-process or DDP one; loading reads the full tensors on every process
and keeps each process's own shard (no communication).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from xling.train.config import RecipeConfig

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST = "checkpoint.json"
FORMAT = "xling-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
#: Suffixes of pickle files (accelerate's ``custom_checkpoint_0.pkl``, ``random_states_0.pkl``, ``optimizer.bin``).
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")
#: Config keys a resume may change; it applies and records them (``gradient_checkpointing`` trades memory for time
#: and leaves every number the same). Every other key describes what the saved
#: state means (lr and optimizer hyper-parameters, batch, data, models, recipe options, seed), so a resume
#: that changes one is refused. ``eval.*`` is the end-of-run report only.
RESUME_MAY_CHANGE = (
    "max_steps",
    "log_every",
    "log_with",
    "validate_every",
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "overwrite",
    "output_dir",
    "data.num_workers",
    "gradient_checkpointing",
    "eval.",
)
_MAY_CHANGE_TEXT = ", ".join(k.replace(".", ".*") if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
# Below this much free space an opaque write error (torch's "[enforce fail at inline_container.cc]",
# safetensors' IoError) is a full disk.
_DISK_FULL_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed exactly: old format (pickles), a missing/unreadable/unlisted file, another
    run's checkpoint, a changed config key or process count. The message names the file or key."""


class DiskFullError(OSError):
    """A write failed because the device holding ``path`` is full (``errno`` is ``ENOSPC``)."""

    def __init__(self, path: str | Path) -> None:
        free = _free_bytes(Path(path))
        self.message = (
            f"no space left on device while writing {path} ({free / 2**20:.1f} MiB free); free some space "
            "(or lower keep_checkpoints) and continue with --resume latest"
        )
        super().__init__(errno.ENOSPC, self.message, str(path))

    def __str__(self) -> str:
        return self.message


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


@dataclass
class TrainingParts:
    """What a checkpoint saves and a resume restores, besides the loop position and the RNG states.

    Attributes:
        params: the trainable parameters by name (``named_parameters`` of the step, ``requires_grad`` only).
        optimizer: the optimizer over exactly ``params``.
        scheduler: the lr scheduler (its ``state_dict`` must be plain numbers).
        scaler: the fp16 grad scaler, if any.
    """

    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any | None = None

    def optimizer_tensors(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(parameter name, state key, tensor)`` of every optimizer state tensor."""
        for name, p in self.params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    yield name, key, value


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


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, after checking the directory holds exactly the files it lists.

    Raises:
        CheckpointError: no manifest (an old accelerate checkpoint: the message lists its pickles), a version
            this xling cannot read, or a file missing or not listed.
    """
    path = Path(path)
    present = sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    pickles = [n for n in present if n.endswith(PICKLE_SUFFIXES)]
    if not (path / MANIFEST).is_file():
        if pickles:
            raise CheckpointError(
                f"{path} is an old-format checkpoint (accelerate save_state): it holds pickles "
                f"({', '.join(pickles)}), and xling no longer unpickles anything on resume since unpickling can "
                "run code; start the run again (--overwrite), or resume from a checkpoint this xling wrote"
            )
        raise CheckpointError(f"{path} is not an xling checkpoint (no {MANIFEST})")
    manifest = _read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path / MANIFEST} is not an xling checkpoint manifest of version {VERSION} "
            f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
        )
    listed = set(manifest.get("files", []))
    if missing := sorted(listed - set(present)):
        raise CheckpointError(f"checkpoint {path} is incomplete: {', '.join(missing)} missing")
    if unlisted := sorted(set(present) - listed - {MANIFEST}):
        kind = "pickles" if pickles else "files"
        raise CheckpointError(
            f"checkpoint {path} holds {kind} its manifest does not list ({', '.join(unlisted)}); xling never "
            "loads them, and a checkpoint that was changed after it was written is refused whole"
        )
    return manifest


def rng_file(rank: int) -> str:
    """The RNG-state file of process ``rank``."""
    return f"rng-rank{rank}.safetensors"


def non_finite_tensors(parts: TrainingParts) -> tuple[list[str], int]:
    """Names of the trainable parameters and optimizer state tensors holding NaN/inf, and how many were checked."""
    named = [(name, _local(p.detach())) for name, p in parts.params.items()]
    named += [(f"optimizer {key} of {name}", _local(t)) for name, key, t in parts.optimizer_tensors()]
    # One flag per tensor, moved together: a sync per tensor would stall a GPU for every one of them.
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    bad: list[int] = []
    for idx in by_device.values():
        flags = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).tolist()
        bad += [i for i, ok in zip(idx, flags, strict=True) if not ok]
    return [named[i][0] for i in sorted(bad)], len(named)


def agree(accelerator: Accelerator, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every process; if it fails on any, every process raises (none waits in a collective).

    The failing process raises its own error; the others a ``RuntimeError`` pointing to it.
    """
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as err:
        error = err
    flag = torch.tensor([float(error is not None)], device=accelerator.device)
    failed = float(accelerator.reduce(flag, "sum")) if accelerator.num_processes > 1 else float(flag)
    if error is not None:
        raise error
    if failed > 0:
        raise RuntimeError(f"another process failed while {what}; its message above says why")
    return result


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn a write error caused by a full device into :class:`DiskFullError` naming ``path``.

    ``ENOSPC`` is recognised by its errno, and inside the wrappers that hide it (torch's
    ``RuntimeError: [enforce fail at inline_container.cc...]``, safetensors' ``IoError``) by its text or by the
    free space left on the device.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        text = str(err)
        full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in text
        if not full and (isinstance(err, RuntimeError | OSError) or type(err).__name__ == "SafetensorError"):
            full = _free_bytes(Path(path)) < _DISK_FULL_BYTES
        if full:
            raise DiskFullError(path) from err
        raise


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: TrainerState,
    keep: int,
    *,
    parts: TrainingParts,
    run_id: str,
    config: RecipeConfig,
) -> Path:
    """Write ``checkpoint-{state.step}`` atomically, then delete all but this run's last ``keep`` checkpoints.

    Every process must call this (each saves its RNG states); the main process writes the rest, renames and
    rotates. Checkpoints of another run id are never deleted.

    Raises:
        DiskFullError: the device filled up (the temporary directory is removed, earlier checkpoints stay).
    """
    from safetensors.torch import save_file

    from xling.train.config import to_dict

    root = checkpoint_root(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    main = accelerator.is_main_process

    def prepare() -> None:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()

    def write() -> None:
        # Every process joins the gathers of sharded (FSDP) tensors; only the main process gets them back.
        params = gather_full({n: p.detach() for n, p in parts.params.items()}, main)
        tensors, groups, other = _optimizer_state(parts)
        tensors = gather_full(tensors, main)
        with disk_errors(tmp):
            _save_rng(tmp / rng_file(accelerator.process_index))
            if not main:
                return
            save_file(_cpu(params), str(tmp / MODEL_FILE))
            save_file(_cpu(tensors), str(tmp / OPTIMIZER_TENSORS))
            _write_json(tmp / OPTIMIZER_JSON, {"param_groups": groups, "state": other})
            _write_json(tmp / SCHEDULER_FILE, parts.scheduler.state_dict())
            _write_json(tmp / STATE_FILE, asdict(state))

    def publish() -> None:
        if not main:
            return
        with disk_errors(tmp):
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "run_id": run_id,
                "step": state.step,
                "num_processes": accelerator.num_processes,
                "config": to_dict(config),
                "grad_scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
                "files": sorted(p.name for p in tmp.iterdir()),
            }
            _write_json(tmp / MANIFEST, manifest)
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
        own = [p for p in list_checkpoints(output_dir) if _run_id_of(p) == run_id]
        for old in own[:-keep]:
            shutil.rmtree(old)

    try:
        for what, fn in (("preparing", prepare), ("writing", write), ("publishing", publish)):
            agree(accelerator, f"{what} checkpoint {final}", fn)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        raise
    return final


def load_checkpoint(
    accelerator: Accelerator, path: str | Path, *, parts: TrainingParts, run_id: str, config: RecipeConfig
) -> TrainerState:
    """Restore ``parts`` and this process's RNG states from ``path``; return the loop position.

    Only the manifest's files are read, each as safetensors or JSON. Every process checks the same things, so
    all of them fail together.

    Raises:
        CheckpointError: the checkpoint is of the old (pickled) format, of another run, of another process count,
            holds non-finite values, a file is missing, unreadable or does not fit ``parts``, or ``config``
            changes a key outside :data:`RESUME_MAY_CHANGE` (the message names the keys).
    """
    path = Path(path)

    def load() -> TrainerState:
        manifest = read_manifest(path)
        check_resumable(path, manifest, config, run_id=run_id, num_processes=accelerator.num_processes)
        _load_params(path / MODEL_FILE, parts)
        _load_optimizer(path, parts)
        parts.scheduler.load_state_dict(_read_json(path / SCHEDULER_FILE))
        if parts.scaler is not None:
            if manifest.get("grad_scaler") is None:
                raise CheckpointError(f"{path / MANIFEST} holds no grad scaler state, and this run uses fp16")
            parts.scaler.load_state_dict(manifest["grad_scaler"])
        bad, _ = non_finite_tensors(parts)
        if bad:
            raise CheckpointError(f"checkpoint {path} holds non-finite values in {', '.join(bad[:5])}")
        _load_rng(path / rng_file(accelerator.process_index))
        try:
            return TrainerState(**_read_json(path / STATE_FILE))
        except TypeError as err:
            raise CheckpointError(f"{path / STATE_FILE} is not a trainer state: {err}") from err

    return agree(accelerator, f"loading checkpoint {path}", load)


def check_resumable(
    path: Path, manifest: dict[str, Any], config: RecipeConfig, *, run_id: str | None, num_processes: int
) -> None:
    """Raise :class:`CheckpointError` unless checkpoint ``path`` (its ``manifest``) is of run ``run_id``, written by
    ``num_processes`` processes, and ``config`` changes only keys of :data:`RESUME_MAY_CHANGE`."""
    if manifest.get("run_id") != run_id:
        here = f"run {run_id}" if run_id else "no run"
        raise CheckpointError(
            f"checkpoint {path} belongs to run {manifest.get('run_id')}, but the output folder {config.output_dir} "
            f"holds {here}; resume with --output_dir set to the folder the checkpoint was written in"
        )
    if manifest.get("num_processes") != num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {manifest.get('num_processes')} process(es), this run has "
            f"{num_processes}: its data split and RNG states only continue exactly with as many"
        )
    changed = config_changes(manifest.get("config", {}), config)
    if refused := [k for k in changed if not k.startswith(RESUME_MAY_CHANGE)]:
        detail = ", ".join(f"{k!r} (checkpoint: {changed[k][0]!r}, now: {changed[k][1]!r})" for k in refused)
        raise CheckpointError(
            f"resuming {path} with changed config key(s) {detail}: they would change what the saved state means, "
            "so a resume keeps them; drop them, or start a new run (another --output_dir, or --overwrite). A "
            f"resume may change only: {_MAY_CHANGE_TEXT}"
        )


def config_changes(saved: dict[str, Any], config: RecipeConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, current value)}`` for every key ``config`` sets differently from ``saved``
    (a checkpoint manifest's ``config``)."""
    from xling.train.config import flat_dict, flatten

    before = flatten(saved)
    now = json.loads(json.dumps(flat_dict(config)))  # tuples as lists, as the manifest holds them
    return {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}


def fsync_tree(directory: Path) -> None:
    """fsync every file below ``directory`` and the directory itself."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory`` itself, so a rename into it is durable."""
    # Some filesystems refuse a directory fsync, which is harmless here.
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


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def _run_id_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / MANIFEST).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded tensors either
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 shard of a parameter or of its optimizer state)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: its shard for a ``DTensor``, else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def gather_full(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """The full tensors of ``tensors`` (sharded ones all-gathered, one at a time, onto the CPU).

    Every process must call it with the same keys in the same order when any tensor is sharded (each gather is a
    collective); a process with ``keep=False`` joins the gathers and gets ``{}`` back, so only the one that writes
    holds a full copy, and no device ever holds more than one full tensor at a time.

    Args:
        tensors: tensors by name, plain or ``DTensor``.
        keep: return the full tensors (the main process), else ``{}``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        full = tensor.full_tensor().detach().cpu() if is_sharded(tensor) else tensor
        if keep:
            out[name] = full
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this process's shard of it (a ``DTensor`` on ``like``'s mesh and placements)
    when ``like`` is sharded, else ``full`` itself. Every process holds ``full``, so no data moves between them."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device_mesh.device_type, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _write_json(path: Path, value: Any) -> None:
    # allow_nan=False: a NaN in a scheduler or optimizer number is a broken state, not something to save.
    path.write_text(json.dumps(value, indent=1, allow_nan=False))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118
    except Exception as err:  # SafetensorError, OSError: the file is not what it should be
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _expect_keys(path: Path, found: set[str], expected: set[str]) -> None:
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(
            f"{path} does not fit this run's trainable parameters: missing {missing[:5] or 'none'}, "
            f"unexpected {extra[:5] or 'none'}"
        )


def _load_params(path: Path, parts: TrainingParts) -> None:
    tensors, _ = _read_tensors(path)
    _expect_keys(path, set(tensors), set(parts.params))
    with torch.no_grad():
        for name, p in parts.params.items():
            if tensors[name].shape != p.shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {list(tensors[name].shape)}, this run's has {list(p.shape)}"
                )
            if is_sharded(p):
                p.to_local().copy_(shard_like(tensors[name], p).to_local())
            else:
                p.copy_(tensors[name])


def _optimizer_state(parts: TrainingParts) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, dict]]:
    """The optimizer's ``state_dict`` split into tensors (``<name>/<key>``), param groups with parameter names,
    and the non-tensor per-parameter values."""
    name_of = {id(p): n for n, p in parts.params.items()}
    groups = []
    for group in parts.optimizer.param_groups:
        groups.append({**group, "params": [name_of[id(p)] for p in group["params"]]})
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for name, p in parts.params.items():
        for key, value in parts.optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                other.setdefault(name, {})[key] = value
    return tensors, groups, other


def _load_optimizer(path: Path, parts: TrainingParts) -> None:
    tensors, _ = _read_tensors(path / OPTIMIZER_TENSORS)
    saved = _read_json(path / OPTIMIZER_JSON)
    current = parts.optimizer.state_dict()
    index: dict[str, int] = {}
    name_of = {id(p): n for n, p in parts.params.items()}
    for group, group_sd in zip(parts.optimizer.param_groups, current["param_groups"], strict=True):
        for p, i in zip(group["params"], group_sd["params"], strict=True):
            index[name_of[id(p)]] = i
    try:
        saved_groups = saved["param_groups"]
        if [g["params"] for g in saved_groups] != [g["params"] for g in _optimizer_state(parts)[1]]:
            raise CheckpointError(
                f"{path / OPTIMIZER_JSON}: its param groups do not hold this run's parameters"
            )
        groups = []
        for group, now in zip(saved_groups, current["param_groups"], strict=True):
            # JSON has no tuples; AdamW's betas were one.
            restored = {k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}
            restored["params"] = [index[n] for n in group["params"]]
            groups.append(restored)
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            name, _, field = key.rpartition("/")
            p = parts.params[name]
            if is_sharded(p) and value.shape == p.shape and value.dim() > 0:
                # AdamW's moments are sharded as their parameter; its scalar `step` stays a plain tensor.
                value = shard_like(value, p)
            state.setdefault(index[name], {})[field] = value
        for name, values in saved.get("state", {}).items():
            state.setdefault(index[name], {}).update(values)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path / OPTIMIZER_JSON} does not fit this run's optimizer: {err!r}") from err
    parts.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    version, words, gauss = random.getstate()
    _, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    tensors = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_words, dtype=np.int64)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_pos": int(np_pos)}
    scalars |= {"numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss)}
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})


def _load_rng(path: Path) -> None:
    tensors, metadata = _read_tensors(path)
    try:
        s = json.loads(metadata["scalars"])
        words = tuple(int(w) for w in tensors["python"].tolist())
        np_state = ("MT19937", tensors["numpy"].numpy().astype(np.uint32), s["numpy_pos"])
        np_state += (s["numpy_has_gauss"], s["numpy_gauss"])
        cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
        if (
            torch.cuda.is_available()
            and torch.cuda.is_initialized()
            and len(cuda) != torch.cuda.device_count()
        ):
            raise CheckpointError(
                f"{path} holds {len(cuda)} CUDA generator state(s), this process sees {torch.cuda.device_count()}"
            )
        random.setstate((s["python_version"], words, s["python_gauss"]))
        np.random.set_state(np_state)
        torch.set_rng_state(tensors["torch"])
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable RNG state: {err!r}") from err
