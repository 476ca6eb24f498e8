"""The step interface the loop drives, and what every recipe's ``build`` shares."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from xling.adapters import LanguageEncoder, ModelCardFacts
from xling.core import Conditioning, Teacher
from xling.train.config import RecipeConfig, recorded_language
from xling.train.data import Batch
from xling.train.toyworld.names import (
    resolve_student,
    resolve_teacher,
    teacher_options,
    teacher_record,
    toy_student_variant,
)

ConfigT = TypeVar("ConfigT", bound=RecipeConfig)


def _eval_frozen_subtrees(module: nn.Module) -> None:
    # A subtree with parameters, none trainable, is frozen as a whole: its dropouts (parameter-free) go to
    # eval with it.
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _eval_frozen_subtrees(child)


class TrainStep(nn.Module, Generic[ConfigT]):
    """Base of the recipes' steps: registered parameters are what trains and what checkpoints hold.

    The frozen teacher is kept in ``self.frozen`` (a plain dict, so ``nn.Module`` neither registers nor
    checkpoints it). Submodules without trainable parameters stay in eval mode when the loop calls ``train()``
    (no dropout in a frozen encoder).

    Subclasses implement ``forward(batch) -> (total, logs)``; :meth:`save` writes the adapter, and a recipe that
    trains more than the encoder extends it.

    Args:
        encoder: the student text path (student encoder + head), trainable as the recipe set it.
        teacher: the frozen teacher.
        config: the recipe's resolved config.
    """

    def __init__(self, encoder: LanguageEncoder, teacher: Teacher, config: ConfigT) -> None:
        super().__init__()
        self.encoder = encoder
        self.frozen: dict[str, Any] = {"teacher": teacher}
        self.config = config

    @property
    def teacher(self) -> Teacher:
        return self.frozen["teacher"]

    def train(self, mode: bool = True) -> TrainStep:
        super().train(mode)
        if mode:
            _eval_frozen_subtrees(self)
        return self

    def english(self, batch: Batch) -> Conditioning:
        """The teacher's conditioning of ``batch.en`` (``prompt_embeds [B, L, D]``, + pooled for SDXL / SD3 / Flux,
        + the key padding mask for PixArt / Sana): read from the teacher-embedding cache when the rows carry it,
        else encoded now."""
        if "prompt_embeds" in batch.extra:
            pooled = batch.extra.get("pooled_prompt_embeds")
            mask = batch.extra.get("prompt_attention_mask")
            mask = None if mask is None else mask.long()
            return Conditioning(batch.extra["prompt_embeds"], pooled, mask).to(self.teacher.dtype)
        return self.teacher.encode(batch.en)

    def student_mask(self, student: Conditioning) -> Tensor | None:
        """The key padding mask a denoiser pass on the student's conditioning gets: the student's own with
        ``student_padding_mask``; ``None`` on an MMDiT (SD3 and Flux attend to every text token: their pipelines
        and transformers take no text mask)."""
        if self.teacher.is_mmdit or not getattr(self.config, "student_padding_mask", False):
            return None
        return student.attention_mask

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """Write the encoder to ``output_dir/adapter`` (the ``xling-adapters`` format); ``{"adapter": path}``.

        A toy student is copied in even when frozen: it lives inside the installed package, so the path a frozen
        student is recorded by would not survive a reinstall or a copy of the adapter to another machine.

        The teacher is recorded (``config.json["teacher"]``) so ``xling generate`` / ``xling eval`` default to it:
        ``"toy"`` for the toy teacher (its folder is inside the installed package), a local folder as an
        absolute path (the adapter may be used from another working directory), a Hub id as is.
        """
        path = Path(output_dir) / "adapter"
        include = toy_student_variant(self.config.student) is not None
        self.encoder.save_pretrained(
            path,
            include_student=include,
            teacher=teacher_record(self.config.teacher),
            card=adapter_card(self.config),
        )
        return {"adapter": path}


#: Config keys of a run that say where and how it ran on its machine, not how the adapter was made: left out
#: of the model card.
_MACHINE_KEYS = ("output_dir", "resume", "overwrite")
#: Sections of ``report.md`` the card leaves out: the examples (the card shows the grid itself) and the data
#: accounting (it names the corpus files of the training machine).
_NOT_IN_CARD = ("## Examples", "## Data")


def _without_local_paths(value: Any) -> Any:
    """``value`` with every absolute path replaced by ``<local>/NAME``: a folder of the training machine means
    nothing to the card's readers (and is not theirs to see); its name still says what it was."""
    if isinstance(value, Mapping):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and Path(value).expanduser().is_absolute():
        return f"<local>/{Path(value).name}"
    return value


def _report_tables(report: str) -> str:
    """The evaluation sections of a run's ``report.md`` (tables and notes), headings one level down."""
    kept: list[str] = []
    keep = False
    for line in report.splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("## "):
            keep = not line.startswith(_NOT_IN_CARD)
            if keep:
                kept.append("#" + line)
            continue
        if keep:
            kept.append(line)
    return "\n".join(kept).strip()


def adapter_card(
    config: RecipeConfig | Mapping[str, Any],
    run_dir: str | Path | None = None,
    *,
    license: str | None = None,
    repo_id: str | None = None,
) -> ModelCardFacts:
    """What the model card of a run's adapter says about the run: recipe, config, evaluation and grid.

    ``TrainStep.save`` passes it to ``save_pretrained`` (recipe and config); ``run_recipe`` writes the card again
    with it once the report exists, and ``xling push`` builds it from a run folder.

    Args:
        config: the run's resolved config (or the mapping of its ``config.yaml``); the keys that only say where
            it ran (``output_dir``, ``resume``, ``overwrite``) are left out, and absolute paths (a local teacher,
            student or corpus) are shown as ``<local>/NAME``.
        run_dir: the run folder; its ``report.md`` gives the evaluation tables and its ``grid.png`` the image
            (either may be missing: the card then says it was not evaluated).
        license: the card's license (``None``: the card's default for the teacher).
        repo_id: the Hub repo the card is for (its usage snippet).
    """
    from xling.train.config import to_dict

    data = dict(config) if isinstance(config, Mapping) else to_dict(config)
    recipe = data.get("recipe") or None
    shown = _without_local_paths({k: v for k, v in data.items() if k not in _MACHINE_KEYS})
    evaluation = grid = None
    if run_dir is not None:
        report = Path(run_dir) / "report.md"
        if report.is_file():
            evaluation = _report_tables(report.read_text(encoding="utf-8")) or None
        if (Path(run_dir) / "grid.png").is_file():
            grid = Path(run_dir) / "grid.png"
    return ModelCardFacts(
        recipe=recipe, config=shown, evaluation=evaluation, grid=grid, license=license, repo_id=repo_id
    )


def load_teacher(config: RecipeConfig, *, device: torch.device | str, dtype: torch.dtype) -> Teacher:
    """The frozen teacher ``config.teacher`` names (``"toy"`` / ``"toy-mmdit"``: a committed one), in ``dtype``
    on ``device``, from its ``config.variant`` weight files (``"fp16"``: ``*.fp16.safetensors``; ``None``: the
    default ones)."""
    return Teacher.from_pretrained(
        resolve_teacher(config.teacher),
        dtype=dtype,
        device=device,
        variant=config.variant,
        **teacher_options(config.teacher),
    )


def head_widths(teacher: Teacher, student: str) -> dict[str, Any]:
    """The ``HeadConfig`` width fields that fit ``teacher`` and the student ``student`` names (read from the
    student's config, no weights loaded)."""
    from transformers import AutoConfig

    path = resolve_student(student)
    student_config = AutoConfig.from_pretrained(path)
    width = getattr(student_config, "hidden_size", None) or getattr(student_config, "d_model", None)
    if width is None:
        raise ValueError(f"cannot read the hidden width of student {student!r} from its config")
    return {
        "student_width": int(width),
        "teacher_width": teacher.cross_attention_dim,
        "teacher_family": teacher.family,
        "pooled_width": teacher.pooled_dim,
        "student_model": path,
    }


def student_encoder(config: RecipeConfig, head: nn.Module, **kwargs: Any) -> LanguageEncoder:
    """A :class:`~xling.adapters.LanguageEncoder` on the student ``config.student`` names, with ``head``, reading
    windows of ``config.student_max_length`` tokens of ``config.language``."""
    return LanguageEncoder.from_student(
        resolve_student(config.student),
        head,
        max_length=config.student_max_length,
        language=recorded_language(config),
        **kwargs,
    )
