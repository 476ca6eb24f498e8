"""The one training loop every recipe runs on (accelerate).

The recipe hands over a :class:`~xling.train.recipes.base.TrainStep`: an ``nn.Module`` whose registered
parameters are the trainable part (frozen teachers are held unregistered) and whose ``forward(batch)`` returns
``(total, logs)``. The loop owns everything else: devices and processes, mixed precision (frozen modules in the
half dtype, trainable ones fp32), gradient accumulation, clipping, the lr schedule, trackers, tqdm, periodic
validation, atomic rotated checkpoints, exact resume and the non-finite stop.

Exact resume rests on three choices: the data order comes from :class:`EpochBatchSampler` (a permutation
seeded by ``seed + epoch``, skipped into with ``accelerator.skip_first_batches``); the per-row noise and
timesteps come from generators seeded by ``(seed, step, row index)`` (see ``xling.train.noise.row_generators``), so
they depend neither on the process count nor on where a run was resumed; the DataLoader draws its worker seed
from its own generator, so starting a fresh iterator does not move the global RNG that dropout uses (restored from
the checkpoint's per-process RNG file).

Checkpoints are xling's own safetensors + JSON files (``xling.train.checkpoint``; nothing is unpickled on resume),
written only when every trainable parameter and optimizer state is finite; the final adapter is written into a
temporary folder and renamed into place; the run folder is checked writable, locked and tagged with a run id before
anything trains (``xling.train.rundir``).

Scale-out (docs/scale.md): under ``accelerate launch`` with an FSDP config (FSDP2, ``fsdp_version: 2``) the step's
registered modules (the student and its head) are sharded by ``fully_shard``, each transformer layer of the
student its own unit unless the config names the classes; the frozen teacher, unregistered, stays whole on every
process. The optimizer is built over the full parameters and handed to ``prepare`` with the step, which swaps in
the shards; checkpoints and the final adapter gather full tensors onto the main process (same files as a
single-process run). ``gradient_checkpointing`` turns on the Hugging Face student's activation checkpointing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from xling.train.checkpoint import (
    TrainerState,
    TrainingParts,
    agree,
    disk_errors,
    fsync_dir,
    fsync_tree,
    is_sharded,
    list_checkpoints,
    load_checkpoint,
    non_finite_tensors,
    save_checkpoint,
)
from xling.train.config import RecipeConfig, dump_yaml, flat_dict
from xling.train.data import EpochBatchSampler, RowAccounting, make_dataloader, row_accounting
from xling.train.recipes.base import TrainStep
from xling.train.rundir import RunFolder

__all__ = [
    "EpochBatchSampler",
    "NonFiniteStateError",
    "NonFiniteTrainingError",
    "RunResult",
    "build_lr_scheduler",
    "cast_frozen",
    "enable_gradient_checkpointing",
    "frozen_dtype",
    "make_accelerator",
    "train",
    "uses_fsdp",
]

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(FloatingPointError):
    """A loss term became NaN/inf; the run stopped before the update, the last checkpoint is intact.

    Attributes:
        step: the update (1-based) whose loss was not finite.
        terms: names of the non-finite terms (all terms if the recipe did not say).
        checkpoint: the last good checkpoint, or ``None`` if none was written yet.
    """

    def __init__(self, step: int, terms: Sequence[str], checkpoint: Path | None, detail: str = "") -> None:
        self.step, self.terms, self.checkpoint = step, list(terms), checkpoint
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite loss at step {step} in term(s) {', '.join(self.terms) or '?'}; training stopped "
            f"before the update ({where}). {detail}".strip()
        )


class NonFiniteStateError(NonFiniteTrainingError):
    """After a finite loss, an update left trainable parameters or optimizer states NaN/inf; neither the
    checkpoint nor the adapter of that step was written.

    Attributes:
        step: the update after which the state was found non-finite.
        terms: the non-finite tensors (parameter names; ``optimizer <key> of <name>`` for optimizer states).
        checkpoint: the last good checkpoint (written finite), or ``None``.
    """

    def __init__(
        self, step: int, tensors: Sequence[str], checked: int, checkpoint: Path | None, what: str
    ) -> None:
        FloatingPointError.__init__(self)
        self.step, self.terms, self.checkpoint = step, list(tensors), checkpoint
        where = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        shown = ", ".join(self.terms[:4]) + (
            f" and {len(self.terms) - 4} more" if len(self.terms) > 4 else ""
        )
        self.args = (
            f"non-finite values after update {step} in {len(self.terms)} of {checked} trainable tensors and "
            f"optimizer states ({shown}); {what} was not written ({where}). Lower --lr, clip with --max_grad_norm "
            "or raise --adam_epsilon, then resume from it",
        )

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class RunResult:
    """What a finished run produced.

    Attributes:
        recipe: recipe name.
        output_dir: the run directory.
        adapter_dir: the trained adapter (``LanguageEncoder.save_pretrained`` format), if the recipe has one.
        config_path: the resolved ``config.yaml``.
        steps: updates done in total (including those before a resume).
        losses: total loss of every update this call ran (mean over micro-batches and processes).
        logs: every logged term of every update this call ran.
        val_logs: the last validation losses (``val/<term>``).
        wall_time_s: seconds this call spent training (model loading and the report excluded).
        trainable_parameters: number of trainable parameters.
        files: other outputs by name (``"kv_weights"``, ``"report"``, ``"grid"``, ...).
        rows: the row accounting of the run's data (read, used, skipped by reason), summed over processes.
    """

    recipe: str
    output_dir: Path
    adapter_dir: Path | None
    config_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    logs: list[dict[str, float]] = field(default_factory=list)
    val_logs: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    trainable_parameters: int = 0
    files: dict[str, Path] = field(default_factory=dict)
    rows: RowAccounting | None = None


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast every submodule of ``module`` without trainable parameters to ``dtype`` (and to eval mode), keeping
    the trainable ones fp32: frozen weights in the half dtype halve their memory, while the optimizer keeps
    full-precision master weights for what it updates."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.to(dtype).eval()
        else:
            cast_frozen(child, dtype)
    for p in module.parameters(recurse=False):
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    total_steps: int,
    *,
    power: float = 1.0,
    lr_end: float = 0.0,
    stages: int = 1,
    gamma: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then ``cosine`` (to 0 at ``total_steps``), ``linear`` (to 0) or ``constant``; or
    ``polynomial``, transformers' ``get_polynomial_decay_schedule_with_warmup`` step for step (PEA-Diffusion's
    ``utils/model_utils.py`` schedule): factor ``step / warmup`` during warmup (0 at the first update), then
    ``(lr_end + (lr - lr_end) * (1 - progress) ** power) / lr``, and ``lr_end / lr`` after ``total_steps``; or
    ``step`` (GlueGen's ``StepLR(step_size=1 epoch, gamma)`` over ``stages`` epochs): after warmup the run is cut
    into ``stages`` equal stages and stage ``k`` gets ``gamma ** k``.

    Raises:
        ValueError: an unknown ``name``; for ``polynomial``, ``lr_end`` not below the optimizer's lr.
    """
    if name not in ("cosine", "linear", "constant", "polynomial", "step"):
        raise ValueError(f"lr_scheduler must be cosine, linear, constant, polynomial or step, got {name!r}")
    lr = float(optimizer.defaults["lr"])
    if name == "polynomial" and not lr_end < lr:
        raise ValueError(f"config key 'lr_end' ({lr_end}) must be below 'lr' ({lr}) for 'polynomial'")

    def factor(step: int) -> float:
        if name == "polynomial":
            if step < warmup_steps:
                return step / max(1, warmup_steps)
            if step > total_steps:
                return lr_end / lr
            remaining = 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return (lr_end + (lr - lr_end) * remaining**power) / lr
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "step":
            return gamma ** min(stages - 1, int(stages * progress))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(config: RecipeConfig) -> Any:
    """The ``accelerate.Accelerator`` of a run: mixed precision, accumulation, trackers under ``output_dir/logs``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(config.output_dir)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )


def frozen_dtype(accelerator: Any) -> torch.dtype:
    """The dtype frozen modules run in: the mixed-precision half dtype, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        str(accelerator.mixed_precision), torch.float32
    )


def uses_fsdp(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards the model (accelerate's ``distributed_type`` is ``FSDP``)."""
    # DistributedType is a str enum: its FSDP member equals "FSDP".
    return getattr(accelerator, "distributed_type", None) == "FSDP"


def _student_model(step_module: nn.Module) -> nn.Module | None:
    """The Hugging Face student of the step (``step.encoder.student``: a ``PreTrainedModel`` or a peft model
    around one), or ``None`` for a step without one."""
    student = getattr(getattr(step_module, "encoder", None), "student", None)
    return student if isinstance(student, nn.Module) else None


def enable_gradient_checkpointing(step_module: nn.Module) -> bool:
    """Turn on activation checkpointing in the step's Hugging Face student, if any of its weights train.

    Each student layer then keeps only its input in the forward and recomputes its activations in the backward
    (transformers' ``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``, with
    ``use_reentrant=False``: the same gradients, the RNG replayed for dropout, and no need for inputs that
    require grad, so a LoRA student with frozen embeddings works too). A frozen student has no
    activations saved for a backward, so there is nothing to save: it is left as is and ``False`` returned.

    Args:
        step_module: the recipe's step (its ``encoder.student``).

    Returns:
        Whether checkpointing was turned on.

    Raises:
        ValueError: the step has no Hugging Face student, or its student cannot checkpoint (the message names
            its class).
    """
    student = _student_model(step_module)
    if student is None:
        raise ValueError(
            f"config key 'gradient_checkpointing' is true, but the {type(step_module).__name__} step has no "
            "Hugging Face student encoder (step.encoder.student) to checkpoint"
        )
    if not any(p.requires_grad for p in student.parameters()):
        return False
    base = getattr(student, "get_base_model", lambda: student)()  # the transformers model under peft
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"config key 'gradient_checkpointing' is true, but the student {type(base).__name__} does not "
            "support gradient checkpointing; set --gradient_checkpointing false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        # transformers 5.x's name; `gradient_checkpointing_enable` is its deprecated alias.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def _fsdp_wrap_hint(step_module: nn.Module, accelerator: Any) -> None:
    """Let accelerate's transformer-based wrap policy find the student's layers.

    The policy reads ``_no_split_modules`` of the module it wraps, here the step, which is no transformers model;
    with no ``fsdp_transformer_layer_cls_to_wrap`` in the config, the step borrows its student's (``BertLayer``,
    ``XLMRobertaLayer``, ``T5Block``, ...), so each student layer becomes its own FSDP unit whatever the student.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    student = _student_model(step_module)
    if plugin is None or student is None or getattr(plugin, "transformer_cls_names_to_wrap", None):
        return
    names = getattr(student, "_no_split_modules", None)
    if names and getattr(step_module, "_no_split_modules", None) is None:
        step_module._no_split_modules = sorted(names)


def _canonical(name: str) -> str:
    # accelerate's activation-checkpoint wrapper and torch.compile insert these into parameter names; the
    # checkpoint keeps the names of the plain step.
    return name.replace("._checkpoint_wrapped_module", "").replace("_orig_mod.", "")


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _is_fsdp_hook(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    return str(getattr(fn, "__module__", "") or "").startswith("torch.distributed.fsdp")


def _plain_copy(module: nn.Module, full_of: dict[int, nn.Parameter], memo: dict[int, nn.Module]) -> nn.Module:
    """A plain module tree like ``module`` with the full parameters ``full_of`` (by id of the shard), its own
    classes (FSDP's ``FSDP<Class>`` wrappers dropped) and no FSDP hooks; everything else (buffers, configs,
    tokenizers, the frozen teacher) shared with ``module``, nothing copied but the tree itself."""
    if id(module) in memo:
        return memo[id(module)]
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        # fully_shard makes `FSDP<Class>(FSDPModule, Class)`; the original class is the first plain one after it.
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    plain = cls.__new__(cls)
    memo[id(module)] = plain
    # torch's composable APIs (fully_shard) keep their state and registry in the module's __dict__ under
    # "__composable_api_*" keys; the plain copy must not reach the sharded step through them.
    state = {k: v for k, v in module.__dict__.items() if not k.startswith("__composable_api")}
    state["_parameters"] = {
        n: (full_of.get(id(p), p) if p is not None else None) for n, p in module._parameters.items()
    }
    state["_modules"] = {
        n: (_plain_copy(c, full_of, memo) if c is not None else None) for n, c in module._modules.items()
    }
    for key in _HOOK_DICTS:
        if key in state:
            state[key] = type(state[key])((k, h) for k, h in state[key].items() if not _is_fsdp_hook(h))
    plain.__dict__.update(state)
    return plain


@contextlib.contextmanager
def gathered(model: nn.Module, accelerator: Any) -> Iterator[nn.Module | None]:
    """The step as one process would hold it, for writing it out: ``model`` itself, unless it is sharded (FSDP).

    Under FSDP every process must enter it: each sharded parameter is gathered with a collective (one at a time,
    onto the CPU). The main process gets a plain copy of the step's module tree holding the full parameters in
    their training dtype (fp32 for trainable weights: the shards, not the mixed-precision all-gather), without
    FSDP's classes and hooks, so ``TrainStep.save`` writes the same files as a single-process run and may
    deep-copy the student (a LoRA student's merged copy); the other processes get ``None``. The sharded step
    itself is left as it was.
    """
    if not uses_fsdp(accelerator):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    # A forward without a backward (validation) leaves the root unit unsharded: reshard, so every parameter is
    # its DTensor shard again, the one exact copy.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    main = accelerator.is_main_process
    full_of: dict[int, nn.Parameter] = {}  # by id of the shard, so tied parameters stay tied
    with torch.no_grad():
        for module in model.modules():
            for p in module._parameters.values():
                if p is not None and is_sharded(p) and id(p) not in full_of:
                    full = p.full_tensor().detach().cpu()
                    if main:
                        full_of[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad)
    yield _plain_copy(model, full_of, {}) if main else None


def _tracker_config(config: RecipeConfig) -> dict[str, Any]:
    # Trackers take scalars only.
    return {
        k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in flat_dict(config).items()
    }


def _finite_or_names(total: torch.Tensor, logs: dict[str, torch.Tensor]) -> list[str]:
    bad = [k for k, v in logs.items() if not torch.isfinite(v.detach()).all()]
    if not bad and not torch.isfinite(total.detach()).all():
        bad = ["total"]
    return bad


@torch.no_grad()
def _validate(
    step_module: nn.Module, loader: DataLoader | None, device: torch.device, step: int
) -> dict[str, float]:
    if loader is None:
        return {}
    was_training = step_module.training
    step_module.eval()
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        batch = batch.to(device)
        batch.step = step
        total, logs = step_module(batch)
        for k, v in {"total": total, **logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().float())
        n += 1
    step_module.train(was_training)
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


def save_atomically(save: Callable[[Path], dict[str, Path]], output_dir: Path, tag: str) -> dict[str, Path]:
    """Run ``save(folder)`` (``TrainStep.save``) into a temporary folder inside ``output_dir``, fsync it, then
    rename each entry it wrote (``adapter/``, ...) over its namesake in ``output_dir``.

    A failure (a full disk: :class:`~xling.train.checkpoint.DiskFullError`) leaves the previous entries whole and
    no half-written one; the temporary folder is removed either way.

    Returns:
        ``save``'s paths, moved to ``output_dir``.
    """
    tmp = output_dir / f".tmp-save-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(tmp):
            tmp.mkdir(parents=True)
            files = save(tmp)
            fsync_tree(tmp)
        for entry in sorted(tmp.iterdir()):
            dest = output_dir / entry.name
            # os.replace cannot replace a non-empty directory: the old one steps aside first.
            old = output_dir / f".tmp-old-{entry.name}-{tag}"
            if dest.is_dir():
                os.replace(dest, old)
            os.replace(entry, dest)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {k: output_dir / Path(v).relative_to(tmp) for k, v in files.items()}


def train(
    step_module: TrainStep,
    config: RecipeConfig,
    train_rows: Any,
    val_rows: Any | None = None,
    *,
    accelerator: Any | None = None,
    on_step: Callable[[int, dict[str, float], TrainStep], None] | None = None,
    run: RunFolder | None = None,
) -> RunResult:
    """Train ``step_module`` on ``train_rows`` as ``config`` says and write the run directory.

    Args:
        step_module: the recipe's trainable step (``forward(batch) -> (total, logs)``, ``save(dir)``).
        config: the resolved recipe config.
        train_rows: a map-style dataset of rows (dicts with ``en``, ``zh`` and optionally ``image`` /
            ``latents`` / ``culture``), or an ``IterableDataset`` of them (tar shards, split by rank by the
            corpus itself; the shards should hold about as many rows per process).
        val_rows: validation rows (optional).
        accelerator: an ``accelerate.Accelerator`` to use (default: one built from ``config``).
        on_step: called with ``(step, logs, step_module)`` on the main process after every update (and its
            checkpoint); ``step_module`` is the unwrapped recipe step (under FSDP: sharded, its parameters
            ``DTensor`` shards, so it cannot be saved from there).
        run: the output folder, claimed (``RunFolder.claim``) before the models were loaded; ``None``: claimed
            here, and released at the end.

    Returns:
        The :class:`RunResult`.

    Raises:
        NonFiniteTrainingError: a loss term is not finite (:class:`NonFiniteStateError`: a parameter or
            optimizer state, found before a checkpoint or the adapter is written).
        xling.train.checkpoint.CheckpointError: the checkpoint to resume cannot be restored exactly.
        xling.train.checkpoint.DiskFullError: the device filled up while a checkpoint or the adapter was written.
    """
    accelerator = accelerator or make_accelerator(config)
    device = accelerator.device
    half = frozen_dtype(accelerator)
    fsdp = uses_fsdp(accelerator)
    if fsdp and not getattr(accelerator, "is_fsdp2", False):
        raise ValueError(
            "xling trains under FSDP2 only (torch's fully_shard): set fsdp_version: 2 in the accelerate config's "
            "fsdp_config (configs/accelerate/fsdp_8gpu.yaml)"
        )

    cast_frozen(step_module, half)
    step_module.to(device)
    trainable = [p for p in step_module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"recipe {config.recipe!r} built a step with no trainable parameters")
    if getattr(config, "gradient_checkpointing", False) and not enable_gradient_checkpointing(step_module):
        logger.warning(
            "gradient_checkpointing is on, but the student of recipe %r is frozen: it saves no activations for a "
            "backward, so there is nothing to checkpoint (ignored)",
            config.recipe,
        )

    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    lr_scheduler = build_lr_scheduler(
        optimizer,
        config.lr_scheduler,
        config.warmup_steps,
        config.max_steps,
        power=config.lr_power,
        lr_end=config.lr_end,
        stages=config.lr_decay_stages,
        gamma=config.lr_decay_gamma,
    )
    parts = TrainingParts(
        params={n: p for n, p in step_module.named_parameters() if p.requires_grad},
        optimizer=optimizer,
        scheduler=lr_scheduler,  # stepped by hand once per update (a prepared scheduler steps once per process)
    )
    if fsdp:
        _fsdp_wrap_hint(step_module, accelerator)
    # FSDP2: `prepare` shards the step in place and swaps the optimizer's parameters for their shards (so the
    # optimizer is built before, over the full parameters, and handed over with the step in one call).
    model, optimizer = accelerator.prepare(step_module, optimizer)
    if fsdp:
        parts.params = {
            _canonical(n): p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad
        }
        held = {id(p) for group in parts.optimizer.param_groups for p in group["params"]}
        if held != {id(p) for p in parts.params.values()}:
            raise RuntimeError(
                "after FSDP's prepare the optimizer does not hold the step's sharded trainable parameters"
            )
    parts.scaler = accelerator.scaler
    owned = run is None
    run = run or RunFolder.claim(config, accelerator)
    try:
        return _train(
            model,
            optimizer,
            parts,
            run,
            config,
            train_rows,
            val_rows,
            accelerator=accelerator,
            on_step=on_step,
        )
    finally:
        if owned:
            run.release()


def _train(
    model: Any,
    optimizer: Any,
    parts: TrainingParts,
    run: RunFolder,
    config: RecipeConfig,
    train_rows: Any,
    val_rows: Any | None,
    *,
    accelerator: Any,
    on_step: Callable[[int, dict[str, float], TrainStep], None] | None,
) -> RunResult:
    """The body of :func:`train`, once the model and optimizer are prepared and the run folder is claimed."""
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    device = accelerator.device
    lr_scheduler = parts.scheduler
    trainable = list(parts.params.values())
    n_trainable = sum(p.numel() for p in trainable)

    streamed = isinstance(train_rows, IterableDataset)
    # Tar shards: each process reads its own shards (the corpus splits them by rank); the epoch is
    # whatever the stream yields, and rows are numbered by their position for the noise seeds.
    loader = make_dataloader(
        train_rows,
        batch_size=config.batch_size,
        seed=config.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        num_workers=config.data.num_workers,
    )
    sampler = None if streamed else loader.batch_sampler
    val_loader = None
    if val_rows is not None and len(val_rows) > 0:
        val_loader = make_dataloader(
            val_rows, batch_size=min(config.batch_size, len(val_rows)), seed=config.seed, shuffle=False
        )

    state = TrainerState()
    resume_from = run.resume_from
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, parts=parts, run_id=run.run_id, config=config)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    last_checkpoint = resume_from

    def check_finite(what: str) -> None:
        bad, checked = non_finite_tensors(parts)
        flag = torch.tensor([float(bool(bad))], device=device)
        if float(accelerator.reduce(flag, "sum") if accelerator.num_processes > 1 else flag) > 0:
            raise NonFiniteStateError(
                state.step, bad or ["(on another process)"], checked, last_checkpoint, what
            )

    if accelerator.trackers == [] and config.log_with != "none":
        accelerator.init_trackers(f"xling-{config.recipe}", config=_tracker_config(config))

    result = RunResult(
        recipe=config.recipe,
        output_dir=output_dir,
        adapter_dir=None,
        config_path=output_dir / "config.yaml",
        steps=state.step,
        trainable_parameters=n_trainable,
    )
    progress = tqdm(
        total=config.max_steps,
        initial=state.step,
        desc=f"xling train {config.recipe}",
        disable=not accelerator.is_local_main_process,
    )
    model.train()  # TrainStep.train keeps its frozen submodules in eval mode
    started = time.perf_counter()
    sums: dict[str, float] = {}
    n_micro = 0

    # Closed on every exit path, so an exception's message starts on its own line, not after the bar.
    try:
        while state.step < config.max_steps:
            (train_rows if streamed else sampler).set_epoch(state.epoch)
            epoch_loader = (
                accelerator.skip_first_batches(loader, state.batch_in_epoch)
                if state.batch_in_epoch
                else loader
            )
            seen_in_epoch = state.batch_in_epoch
            for batch in epoch_loader:
                seen_in_epoch += 1
                if streamed:
                    first = (
                        state.micro_batches * accelerator.num_processes + accelerator.process_index
                    ) * len(batch)
                    batch.index = torch.arange(first, first + len(batch))
                batch = batch.to(device)
                batch.step = state.step
                with accelerator.accumulate(model):
                    bad: list[str] = []
                    detail = ""
                    try:
                        total, logs = model(batch)
                        bad = _finite_or_names(total, logs)
                    except FloatingPointError as err:  # xling.losses.NonFiniteLossError
                        bad, detail = list(getattr(err, "terms", None) or ["?"]), str(err)
                    # Every process learns whether any process saw a non-finite loss, so none is left waiting
                    # in a collective while the others stop.
                    flag = accelerator.reduce(torch.tensor([float(bool(bad))], device=device), "sum")
                    if float(flag) > 0:
                        raise NonFiniteTrainingError(state.step + 1, bad, last_checkpoint, detail)
                    accelerator.backward(total)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                for k, v in {"total": total, **logs}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float())
                n_micro += 1
                state.micro_batches += 1
                state.batch_in_epoch += 1
                if sampler is not None and state.batch_in_epoch >= len(sampler):
                    # An accumulation window left open here simply continues into the next epoch.
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                if not accelerator.sync_gradients:
                    continue

                lr_scheduler.step()
                state.step += 1
                local = torch.tensor([sums[k] / n_micro for k in sorted(sums)], device=device)
                mean = accelerator.reduce(local, "mean")
                step_logs = {f"train/{k}": float(v) for k, v in zip(sorted(sums), mean.tolist())}
                step_logs["train/lr"] = lr_scheduler.get_last_lr()[0]
                sums, n_micro = {}, 0
                result.losses.append(step_logs["train/total"])
                result.logs.append(step_logs)
                progress.update(1)
                progress.set_postfix(loss=f"{step_logs['train/total']:.4g}")
                if state.step % config.log_every == 0 or state.step == config.max_steps:
                    accelerator.log(step_logs, step=state.step)
                if config.validate_every and state.step % config.validate_every == 0:
                    result.val_logs = _validate(model, val_loader, device, state.step)
                    accelerator.log(result.val_logs, step=state.step)
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    check_finite(f"checkpoint-{state.step}")
                    last_checkpoint = save_checkpoint(
                        accelerator,
                        output_dir,
                        state,
                        config.keep_checkpoints,
                        parts=parts,
                        run_id=run.run_id,
                        config=config,
                    )
                if on_step is not None and accelerator.is_main_process:
                    on_step(state.step, step_logs, accelerator.unwrap_model(model))
                if state.step >= config.max_steps:
                    break
            else:
                if streamed:
                    if seen_in_epoch == 0:
                        raise ValueError(
                            f"the streamed corpus yielded no full batch of {config.batch_size} rows on process "
                            f"{accelerator.process_index}: {row_accounting(train_rows).summary()}"
                        )
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    finally:
        progress.close()
    result.wall_time_s = time.perf_counter() - started
    result.steps = state.step
    if not result.val_logs or (config.validate_every and state.step % config.validate_every):
        result.val_logs = _validate(model, val_loader, device, state.step)
        if result.val_logs:
            accelerator.log(result.val_logs, step=state.step)
    # Every process calls it (it sums split corpora); metrics.json carries it even without a report.
    result.rows = row_accounting(train_rows, val_rows, accelerator=accelerator)
    if accelerator.is_main_process:
        result.files["metrics"] = result.rows.write_json(output_dir / "metrics.json")

    check_finite("the adapter")

    with gathered(accelerator.unwrap_model(model), accelerator) as whole:

        def save() -> None:
            if accelerator.is_main_process:
                assert whole is not None  # the main process always gets the whole step
                files = save_atomically(whole.save, output_dir, run.run_id)
                result.adapter_dir = files.pop("adapter", None)
                result.files.update(files)
                with disk_errors(result.config_path):
                    result.config_path.write_text(dump_yaml(config))

        agree(accelerator, f"saving the adapter into {output_dir}", save)
    accelerator.end_training()
    if list_checkpoints(output_dir):
        result.files["last_checkpoint"] = list_checkpoints(output_dir)[-1]
    return result
