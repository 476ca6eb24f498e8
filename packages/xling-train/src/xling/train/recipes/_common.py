"""Builders the recipes share: the teacher, the student encoder, the attention function, the data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xling.train.config import TOY, TOY_STUDENTS, DenoiseConfig, IAPConfig, PEAConfig, RecipeConfig
from xling.train.recipes.base import Batch

logger = logging.getLogger(__name__)


def resolve_teacher(name: str) -> str:
    """``"toy"`` -> the committed toy teacher directory; anything else is a path or Hub id."""
    if name == TOY:
        from xling.train.toyworld.teacher import teacher_path

        return str(teacher_path())
    return name


def toy_student_variant(name: str) -> str | None:
    """``"toy"`` -> ``"pretrained"``, ``"toy-<variant>"`` -> ``"<variant>"``; ``None`` for any other student."""
    if name == TOY:
        return "pretrained"
    variant = name.removeprefix(f"{TOY}-")
    return variant if variant != name and variant in TOY_STUDENTS else None


def resolve_student(name: str) -> str:
    """A committed toy student (``"toy"``, ``"toy-random"``, ``"toy-aligned"``) -> its directory; anything else
    is a path or Hub id."""
    variant = toy_student_variant(name)
    if variant is None:
        return name
    from xling.train.toyworld.student import student_path

    return str(student_path(variant))


def load_teacher(config: RecipeConfig, *, device: torch.device, dtype: torch.dtype) -> Any:
    """The frozen :class:`xling.core.Teacher` of ``config.teacher`` in ``dtype`` on ``device``."""
    from xling.core import Teacher

    teacher = Teacher.from_pretrained(resolve_teacher(config.teacher), dtype=dtype, device=device)
    for module in (teacher.unet, teacher.vae, *teacher.text_encoders):
        if module is not None:
            module.requires_grad_(False).eval()
    return teacher


def student_width(student: str) -> int:
    """Hidden width ``d`` of the student encoder (read from its config, no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_student(student))
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    if width is None:
        raise ValueError(f"cannot read the hidden width of student {student!r} from its config")
    return int(width)


def teacher_family(teacher: Any) -> str:
    return str(getattr(teacher, "family", "sd1"))


def head_widths(teacher: Any, student: str) -> dict[str, Any]:
    """The ``HeadConfig`` width fields for ``teacher`` and ``student``."""
    return {
        "student_width": student_width(student),
        "teacher_width": int(teacher.cross_attention_dim),
        "teacher_family": teacher_family(teacher),
        "pooled_width": teacher.pooled_dim,
        "student_model": resolve_student(student),
    }


def build_encoder(config: RecipeConfig, head: torch.nn.Module, **kwargs: Any) -> Any:
    """A :class:`xling.adapters.LanguageEncoder` on ``config.student`` with ``head``."""
    from xling.adapters import LanguageEncoder

    return LanguageEncoder.from_student(resolve_student(config.student), head, **kwargs)


def student_mask(config: IAPConfig | PEAConfig | DenoiseConfig, student: Any) -> Tensor | None:
    """The student's key padding mask ``[B, L]`` for the UNet, or ``None`` (every position attends, as at
    generation) unless ``config.student_padding_mask``."""
    return student.attention_mask if config.student_padding_mask else None


def save_adapter(config: RecipeConfig, encoder: Any, output_dir: str | Path) -> Path:
    """Write ``encoder`` to ``output_dir/adapter`` (the ``xling-adapters`` format) and return that folder.

    A toy student is copied in even when frozen: it lives inside the installed package, so the path a frozen
    student is recorded by would not survive a reinstall or a copy of the adapter to another machine.
    """
    path = Path(output_dir) / "adapter"
    encoder.save_pretrained(path, include_student=toy_student_variant(config.student) is not None)
    return path


def attention_fn(config: RecipeConfig, device: torch.device) -> Callable[..., Any]:
    """The fused dual-attention MSE (Triton) on CUDA, else the PyTorch reference; ``config.attention`` forces."""
    choice = config.attention
    if choice == "auto":
        choice = "fused" if torch.device(device).type == "cuda" else "reference"
    try:
        from xling.kernels import dual_attention_mse, dual_attention_mse_reference
    except ImportError:
        if choice == "fused":
            raise
        from xling.core import dual_attention_mse_sdpa

        return dual_attention_mse_sdpa
    return dual_attention_mse if choice == "fused" else dual_attention_mse_reference


@torch.no_grad()
def latents_of(teacher: Any, batch: Batch) -> Tensor:
    """Scaled VAE latents ``[B, C, h, w]``: the cached ones, else the frozen VAE's encoding of ``batch.pixels``
    (posterior mode)."""
    if batch.latents is not None:
        return batch.latents
    if batch.pixels is None:
        raise ValueError("this recipe needs images (or cached latents); the batch has neither")
    # The posterior mode, as the latent cache stores it: deterministic, so runs match across process counts.
    return teacher.encode_images(batch.pixels, sample=False).float()


def noisy_latents(
    teacher: Any, batch: Batch, config: IAPConfig | PEAConfig | DenoiseConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(z0, noise, timesteps, z_t)`` with per-row seeded noise and timesteps (``[B, C, h, w]``, ``[B]``),
    seeded by ``config.seed`` and drawn from its ``timestep_min`` / ``timestep_max``."""
    from xling.train.recipes.base import sample_noise_and_timesteps

    z0 = latents_of(teacher, batch)
    scheduler = teacher.scheduler
    noise, t = sample_noise_and_timesteps(
        batch,
        z0.shape[1:],
        seed=config.seed,
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        t_min=config.timestep_min,
        t_max=config.timestep_max,
        device=z0.device,
    )
    return z0, noise, t, scheduler.add_noise(z0, noise, t)


def unet_kwargs(teacher: Any, batch_size: int, pooled: Tensor | None, dtype: torch.dtype) -> dict[str, Any]:
    """Extra UNet inputs: SDXL's ``added_cond_kwargs`` (pooled text embeds + time ids); nothing for SD1/2."""
    time_ids = teacher.add_time_ids(batch_size)
    if time_ids is None:
        return {}
    if pooled is None:
        raise ValueError("an SDXL teacher needs pooled prompt embeddings")
    return {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}}


def unet_dtype(teacher: Any) -> torch.dtype:
    return next(teacher.unet.parameters()).dtype


def teacher_pooled(teacher: Any, prompts: list[str], cond: Any) -> Tensor:
    """The teacher's pooled text vector ``[B, P]``: SDXL's pooled embeds, else the final-layer [EOS] state of
    the CLIP text encoder (``pooler_output``), the vector AltDiffusion distils."""
    if cond.pooled_prompt_embeds is not None:
        return cond.pooled_prompt_embeds
    tokenizer, encoder = teacher.tokenizers[0], teacher.text_encoders[0]
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(encoder.device)
    return encoder(ids).pooler_output


@torch.no_grad()
def teacher_conditioning(teacher: Any, batch: Batch) -> Any:
    """The teacher's conditioning of ``batch.en``: from the teacher-embedding cache when the rows carry it,
    else ``teacher.encode``."""
    if "prompt_embeds" in batch.extra:
        from xling.core import TeacherConditioning

        dtype = unet_dtype(teacher)
        pooled = batch.extra.get("pooled_prompt_embeds")
        return TeacherConditioning(
            batch.extra["prompt_embeds"].to(dtype), pooled.to(dtype) if pooled is not None else None
        )
    return teacher.encode(batch.en)


def load_rows(
    config: RecipeConfig,
    *,
    resolution: int | None,
    with_images: bool,
    teacher: Any | None = None,
    accelerator: Any | None = None,
) -> tuple[Any, Any]:
    """``(train_rows, val_rows)``: the toy world's generated pairs, or a corpus file whose first
    ``min(val_samples, 10%)`` rows are held out; with ``data.latent_cache`` / ``data.embedding_cache`` (and a
    ``teacher``) the rows carry cached latents / teacher embeddings, built once on the main process."""
    data = config.data
    if data.path == TOY:
        from xling.train.toyworld import ToyWorldDataset

        # Training pairs come from the training scenes; validation from the held-out combinations.
        size = int(resolution or 32)
        return (
            ToyWorldDataset("train", size=size, seed=config.seed, length=data.num_samples),
            ToyWorldDataset("heldout", size=size, seed=config.seed + 1, length=max(1, data.val_samples)),
        )
    from torch.utils.data import Subset

    from xling.train.data import load_corpus

    streamed_kwargs: dict[str, Any] = {}
    if _is_shards(data.path) and accelerator is not None:
        streamed_kwargs = {"rank": accelerator.process_index, "world_size": accelerator.num_processes}
    corpus = load_corpus(
        data.path,
        columns={
            "en": data.en_column,
            "target": data.zh_column,
            "image": data.image_column if with_images else None,
            "culture_only": data.culture_column if getattr(config, "hybrid", False) else None,
        },
        on_bad_row=data.on_bad_row,
        resolution=resolution if with_images else None,
        seed=config.seed,
        with_images=with_images,
        **streamed_kwargs,
    )
    report = getattr(corpus, "report", None)
    if report is not None and getattr(report, "total", 0):
        logger.warning("%s", report.summary())
    if isinstance(corpus, torch.utils.data.IterableDataset):
        if data.latent_cache or data.embedding_cache:
            raise ValueError("data.latent_cache / data.embedding_cache need a table corpus, not tar shards")
        return corpus, None
    if (data.latent_cache or data.embedding_cache) and teacher is not None:
        corpus = _cached(corpus, config, teacher, accelerator, with_images=with_images)
    n_val = min(data.val_samples, max(0, len(corpus) // 10))
    return Subset(corpus, range(n_val, len(corpus))), Subset(corpus, range(n_val))


def _is_shards(path: str) -> bool:
    p = str(path)
    return (
        p.endswith((".tar", ".tar.gz", ".tgz"))
        or "{" in p
        or (Path(p).is_dir() and not any(Path(p).glob("*.jsonl")) and any(Path(p).glob("*.tar")))
    )


def _cached(
    corpus: Any, config: RecipeConfig, teacher: Any, accelerator: Any | None, *, with_images: bool
) -> Any:
    """Wrap ``corpus`` in ``xling.train.cache.CachedDataset`` with the caches ``config.data`` names."""
    from contextlib import nullcontext

    from xling.train.cache import CachedDataset, LatentCache, TextEmbeddingCache

    first = accelerator.main_process_first() if accelerator is not None else nullcontext()
    latents = text = None
    with first:
        if config.data.latent_cache and with_images:
            latents = LatentCache.load_or_build(config.data.latent_cache, corpus, teacher)
            logger.info("latent cache %s: %s", config.data.latent_cache, latents.status)
        if config.data.embedding_cache:
            text = TextEmbeddingCache.load_or_build(
                config.data.embedding_cache, corpus.captions("en"), teacher
            )
            logger.info("teacher-embedding cache %s: %s", config.data.embedding_cache, text.status)
    return CachedDataset(corpus, latents=latents, text=text)


def output_paths(output_dir: Path) -> dict[str, Path]:
    return {"adapter": Path(output_dir) / "adapter"}


def set_backbone_trainable(encoder: torch.nn.Module, trainable: bool) -> None:
    """Train (or freeze) everything of ``encoder`` but its head; the head always trains.

    The student's own pooler (BERT/XLM-R ``pooler.dense``) stays frozen: the encoder pools by taking the [CLS]
    state, so the pooler gets no gradient, and a trainable parameter without one stalls DDP's reduction.
    """
    for name, p in encoder.named_parameters():
        p.requires_grad_(name.startswith("head.") or (trainable and ".pooler." not in name))
