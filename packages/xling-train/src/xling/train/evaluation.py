"""Evaluation of a trained student: alignment, paired-generation agreement, toy-world accuracy, CLIP score.

Everything compares the student with the teacher it was trained to imitate, at identical seeds:

- **alignment** (no sampling): token cosine between the student's ``prompt_embeds`` and the teacher's for
  parallel captions (where both have the same length; otherwise the cosine of their token means), and the
  attention MSE through :class:`xling.core.PivotTap`: for noised latents of the scene's image, the sum over
  every cross-attention layer of ``mean((Attn(Q, K_en, V_en) - Attn(Q, K_zh, V_zh))^2)`` (IAP eq. 3);
- **agreement**: images generated from the student's conditioning and from the teacher's conditioning on the
  parallel English caption, same seeds and sampler: latent MSE and PSNR of the decoded images;
- **accuracy** (toy world): the checker's verdict per attribute on every generated image, for the student on
  Chinese prompts, for the teacher on the parallel English captions ("perfect translation", the student's
  upper bound) and for the teacher on canonical English captions (its own accuracy);
- **CLIP score** through ``torchmetrics`` when a CLIP model directory is given (``pip install
  "xling-train[eval]"``), of the student's and the teacher's images against the English captions.

:func:`evaluate_toy` runs all of it on the toy world, :func:`evaluate_pairs` on any teacher and any list of
parallel prompts; :func:`write_report` writes ``report.md``, ``metrics.json`` and ``grid.png``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ATTRIBUTES",
    "Conditioning",
    "EvalResult",
    "Samples",
    "StudentLike",
    "agreement",
    "attention_alignment",
    "clip_score",
    "embedding_alignment",
    "evaluate_pairs",
    "evaluate_toy",
    "latent_mse",
    "load_pipeline",
    "psnr",
    "report_markdown",
    "sample",
    "student_conditioning",
    "teacher_conditioning",
    "toy_sampler_defaults",
    "write_grid",
    "write_report",
    "write_run_report",
]

#: Checker verdicts reported, in table order.
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "all")

#: Default sampler settings when neither the caller nor the toy world names them.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0


class StudentLike(Protocol):
    """What evaluation needs from a student: ``xling.adapters.LanguageEncoder`` satisfies it.

    ``__call__(prompts)`` returns an object with ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds
    [B, P] | None`` and ``attention_mask [B, L] | None``.
    """

    def __call__(self, prompts: Sequence[str]) -> Any: ...


@dataclass
class Conditioning:
    """Text conditioning of a batch, as a diffusers pipeline takes it.

    Attributes:
        prompt_embeds: ``[B, L, D]``.
        pooled_prompt_embeds: ``[B, P]`` (SDXL) or ``None``.
        attention_mask: ``[B, L]`` (1 = real token) or ``None`` (every position counts, as for CLIP).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    attention_mask: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def rows(self, index: Sequence[int] | Tensor) -> Conditioning:
        """The rows ``index`` of every tensor (repeats allowed)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.prompt_embeds.device)
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return Conditioning(
            pick(self.prompt_embeds), pick(self.pooled_prompt_embeds), pick(self.attention_mask)
        )


@dataclass
class Samples:
    """Generations of a batch.

    Attributes:
        latents: ``[B, C, h, w]`` float32 on the CPU, the sampler's final latents before decoding.
        images: ``[B, H, W, 3]`` uint8, decoded.
    """

    latents: Tensor
    images: np.ndarray


@dataclass
class EvalResult:
    """Everything an evaluation measured. ``to_dict`` drops the images; the writers use them.

    Attributes:
        accuracy: Toy world: condition (``"zh_student"``, ``"perfect_translation"``, ``"en_teacher"``) ->
            attribute (:data:`ATTRIBUTES`) -> fraction correct over all scenes and seeds. Empty elsewhere.
        heldout_accuracy: The same restricted to the held-out scenes (no ``"en_teacher"`` row).
        relative_accuracy: Student ``all`` accuracy divided by the English teacher's (the issue's targets are
            >= 0.9 for IAP, >= 0.8 for PEA and MTN); ``None`` outside the toy world.
        alignment: ``token_cosine`` (``None`` when the student's length differs from the teacher's),
            ``mean_cosine`` (token means), ``pooled_cosine`` (SDXL), ``attention_mse`` (``None`` when
            ``xling.core`` is not available).
        agreement: ``latent_mse`` and ``psnr`` (dB; ``inf`` when identical) between student- and
            teacher-conditioned generations at identical seeds.
        clip_score: ``{"zh_student": s, "perfect_translation": s}`` or ``None`` without a CLIP model.
        settings: Seeds, sampler steps, guidance, scene counts, teacher.
        examples: Grid items: ``en``, ``zh``, ``seed``, ``en_image``, ``zh_image`` (uint8 ``[H, W, 3]``),
            ``en_check`` and ``zh_check`` (checker verdicts or ``None``).
        seconds: Wall time of the evaluation.
    """

    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    heldout_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    relative_accuracy: float | None = None
    alignment: dict[str, float | None] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    clip_score: dict[str, float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (no images; ``inf`` written as the string ``"inf"``)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, Mapping):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "accuracy": self.accuracy,
                "heldout_accuracy": self.heldout_accuracy,
                "relative_accuracy": self.relative_accuracy,
                "alignment": self.alignment,
                "agreement": self.agreement,
                "clip_score": self.clip_score,
                "settings": self.settings,
                "seconds": self.seconds,
            }
        )

    def summary(self) -> str:
        """One line: the headline numbers."""
        parts = []
        if "zh_student" in self.accuracy:
            parts.append(f"zh all {self.accuracy['zh_student']['all']:.3f}")
        if "en_teacher" in self.accuracy:
            parts.append(f"en all {self.accuracy['en_teacher']['all']:.3f}")
        if self.relative_accuracy is not None:
            parts.append(f"relative {self.relative_accuracy:.3f}")
        if self.agreement:
            parts.append(
                f"latent MSE {self.agreement['latent_mse']:.4g}, PSNR {self.agreement['psnr']:.2f} dB"
            )
        if self.alignment.get("attention_mse") is not None:
            parts.append(f"attention MSE {self.alignment['attention_mse']:.4g}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- metrics


def latent_mse(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample mean squared difference of two latent batches.

    Args:
        a: ``[B, ...]``.
        b: Same shape as ``a``.

    Returns:
        ``[B]`` float32: ``mean((a - b)^2)`` over every non-batch element.
    """
    if a.shape != b.shape:
        raise ValueError(f"latents differ in shape: a {tuple(a.shape)}, b {tuple(b.shape)}")
    diff = a.detach().float() - b.detach().float()
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr(a: np.ndarray | Tensor, b: np.ndarray | Tensor, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio of two image batches, from their pooled mean squared error.

    ``PSNR = 10 log10(data_range^2 / MSE)``, with the MSE averaged over every pixel of every image, so one
    perfect pair does not make the whole batch infinite; identical batches give ``inf``.

    Args:
        a: Images ``[B, H, W, C]`` (or any shape), e.g. uint8 in ``[0, 255]``.
        b: Same shape as ``a``.
        data_range: The largest possible pixel difference (255 for uint8, 2 for ``[-1, 1]``).

    Returns:
        The PSNR in dB.
    """
    a_t, b_t = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    if a_t.shape != b_t.shape:
        raise ValueError(f"images differ in shape: a {tuple(a_t.shape)}, b {tuple(b_t.shape)}")
    mse = float((a_t - b_t).pow(2).mean())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def agreement(student: Samples, teacher: Samples) -> dict[str, float]:
    """Paired-generation agreement of two sample sets drawn at the same seeds.

    Returns:
        ``latent_mse`` (mean over pairs of :func:`latent_mse`) and ``psnr`` of the decoded images (dB).
    """
    if len(student.images) != len(teacher.images):
        raise ValueError(f"sample sets differ in size: {len(student.images)} vs {len(teacher.images)}")
    return {
        "latent_mse": float(latent_mse(student.latents, teacher.latents).mean()),
        "psnr": psnr(student.images, teacher.images),
    }


def embedding_alignment(student: Conditioning, teacher: Conditioning) -> dict[str, float | None]:
    """Cosine similarity between student and teacher conditioning of the same (parallel) prompts.

    - ``token_cosine``: mean over positions (the student's real tokens when it has a mask) of the cosine of
      ``student[b, l]`` and ``teacher[b, l]``; ``None`` when the lengths differ (no token correspondence).
    - ``mean_cosine``: cosine of the token means (student mean over its real tokens, teacher over all).
    - ``pooled_cosine``: cosine of the pooled vectors when both have one, else ``None``.

    Args:
        student: Student conditioning, ``prompt_embeds [B, L_s, D]``.
        teacher: Teacher conditioning, ``prompt_embeds [B, L_t, D]``.
    """
    s, t = student.prompt_embeds.detach().float(), teacher.prompt_embeds.detach().float()
    if s.shape[0] != t.shape[0] or s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"student prompt_embeds {tuple(s.shape)} and teacher prompt_embeds {tuple(t.shape)} must agree in "
            "batch size and width"
        )
    mask = None if student.attention_mask is None else student.attention_mask.to(s.device).float()  # [B, L_s]
    token = None
    if s.shape[1] == t.shape[1]:
        cos = torch.nn.functional.cosine_similarity(s, t.to(s.device), dim=-1)  # [B, L]
        token = float(cos.mean()) if mask is None else float((cos * mask).sum() / mask.sum().clamp_min(1.0))
    s_mean = (
        s.mean(1) if mask is None else (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    )
    mean = float(torch.nn.functional.cosine_similarity(s_mean, t.to(s.device).mean(1), dim=-1).mean())
    pooled = None
    if student.pooled_prompt_embeds is not None and teacher.pooled_prompt_embeds is not None:
        pooled = float(
            torch.nn.functional.cosine_similarity(
                student.pooled_prompt_embeds.float(),
                teacher.pooled_prompt_embeds.float().to(s.device),
                dim=-1,
            ).mean()
        )
    return {"token_cosine": token, "mean_cosine": mean, "pooled_cosine": pooled}


def attention_alignment(
    pipe: Any,
    student: Conditioning,
    teacher: Conditioning,
    images: Tensor,
    *,
    timesteps: Sequence[int] = (100, 500, 900),
    seed: int = 0,
) -> float | None:
    """IAP's attention MSE between teacher and student branches of every cross-attention layer.

    For each timestep, the images' latents are noised with seeded noise and the UNet runs once on the
    teacher's conditioning with :class:`xling.core.PivotTap` holding the student's; the value is
    ``sum_layers mean((o_t - o_s)^2)`` (:func:`xling.losses.attention_mse`), averaged over the timesteps.

    Args:
        pipe: A diffusers SD / SDXL pipeline (its ``unet``, ``vae`` and scheduler config are used).
        student: Student conditioning ``[B, L_s, D]`` of the prompts.
        teacher: Teacher conditioning ``[B, L_t, D]`` of the parallel prompts.
        images: ``[B, 3, H, W]`` in ``[-1, 1]``, the scenes the prompts describe (the "pivots").
        timesteps: Training timesteps to probe.
        seed: Seeds the noise.

    Returns:
        The attention MSE, or ``None`` when ``xling.core`` (the pivot tap) is not importable.
    """
    try:
        from xling.core import PivotTap
        from xling.losses import attention_mse
    except ImportError:
        return None
    from diffusers import DDPMScheduler

    if images.ndim != 4 or images.shape[0] != len(teacher) or len(student) != len(teacher):
        raise ValueError(
            f"images [B, 3, H, W] and both conditionings must share B: images {tuple(images.shape)}, "
            f"student {len(student)}, teacher {len(teacher)}"
        )
    unet, vae = pipe.unet, pipe.vae
    device, dtype = unet.device, unet.dtype
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = vae.encode(images.to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        added = _added_conditions(pipe, teacher, images.shape[-1])
        values = []
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
            tt = torch.full((z0.shape[0],), int(t), dtype=torch.long, device=device)
            z_t = noise_scheduler.add_noise(z0, noise, tt)
            with PivotTap(unet) as tap:
                tap.set_student(student.prompt_embeds.to(device, dtype), _mask_or_none(student, device))
                unet(
                    z_t.to(dtype), tt, encoder_hidden_states=teacher.prompt_embeds.to(device, dtype), **added
                )
                values.append(float(attention_mse(tap.pairs)))
    return float(np.mean(values))


def _mask_or_none(c: Conditioning, device: torch.device) -> Tensor | None:
    return None if c.attention_mask is None else c.attention_mask.to(device)


def _added_conditions(pipe: Any, teacher: Conditioning, resolution: int) -> dict[str, Any]:
    """SDXL's ``added_cond_kwargs`` (pooled text + time ids for an uncropped square image); ``{}`` for SD."""
    if getattr(pipe.unet.config, "addition_embed_type", None) != "text_time":
        return {}
    b = len(teacher)
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=pipe.unet.dtype)
    return {
        "added_cond_kwargs": {
            "text_embeds": teacher.pooled_prompt_embeds.to(pipe.unet.device, pipe.unet.dtype),
            "time_ids": time_ids.to(pipe.unet.device).repeat(b, 1),
        }
    }


def clip_score(images: np.ndarray, captions: Sequence[str], model_path: str | Path) -> float:
    """CLIP score (``100 * max(cos, 0)``, averaged) of images against captions, through torchmetrics.

    Args:
        images: ``[N, H, W, 3]`` uint8.
        captions: ``N`` captions (English: CLIP reads English).
        model_path: A local CLIP model directory (or a name the user's cache holds) for
            ``torchmetrics.multimodal.CLIPScore``.

    Raises:
        ImportError: torchmetrics is missing (install ``xling-train[eval]``).
    """
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as err:  # an optional extra
        raise ImportError('CLIP score needs torchmetrics: pip install "xling-train[eval]"') from err
    if len(images) != len(captions):
        raise ValueError(f"images ({len(images)}) and captions ({len(captions)}) differ in number")
    metric = CLIPScore(model_name_or_path=str(model_path))
    metric.update(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), list(captions))
    return float(metric.compute())


# ------------------------------------------------------------------------------------ pipeline and sampling


def load_pipeline(
    teacher: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """A diffusers SD / SDXL pipeline for ``teacher``.

    Args:
        teacher: ``"toy"`` (the committed toy teacher), a diffusers directory or id, a pipeline (returned as
            is), or an ``xling.core.Teacher`` (its components, with the inference scheduler read from the
            directory it was loaded from).
        device: Device of the pipeline.
        dtype: Weight dtype.
    """
    from diffusers import DiffusionPipeline

    if isinstance(teacher, DiffusionPipeline):
        pipe = teacher
    elif isinstance(teacher, str | Path):
        if str(teacher) == "toy":
            from xling.train.toyworld import teacher_path

            teacher = teacher_path()
        pipe = DiffusionPipeline.from_pretrained(str(teacher), dtype=dtype)
        pipe = pipe.to(device)
    elif hasattr(teacher, "unet") and hasattr(teacher, "text_encoders"):
        pipe = _pipeline_from_teacher(teacher)
    else:
        raise TypeError(
            f"teacher must be 'toy', a path, a DiffusionPipeline or an xling.core.Teacher, got {type(teacher).__name__}"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_from_teacher(teacher: Any) -> Any:
    """Assemble a pipeline around an ``xling.core.Teacher``'s modules (shared, not copied)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = getattr(teacher, "inference_scheduler", None)
    if scheduler is None:
        # Built from parts: DDIM over the training schedule is the deterministic sampler every SD accepts.
        scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    if len(teacher.text_encoders) == 2:
        return StableDiffusionXLPipeline(
            vae=teacher.vae,
            text_encoder=teacher.text_encoders[0],
            text_encoder_2=teacher.text_encoders[1],
            tokenizer=teacher.tokenizers[0],
            tokenizer_2=teacher.tokenizers[1],
            unet=teacher.unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoders[0],
        tokenizer=teacher.tokenizers[0],
        unet=teacher.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def teacher_conditioning(pipe: Any, prompts: Sequence[str]) -> tuple[Conditioning, Conditioning]:
    """The teacher's conditioning of ``prompts`` and of the empty prompt, exactly as the pipeline makes them.

    Returns:
        ``(cond, uncond)``, each ``[B, L, D]`` (+ pooled ``[B, P]`` for SDXL).
    """
    prompts = list(prompts)
    with torch.no_grad():
        out = pipe.encode_prompt(
            prompt=prompts,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts),
        )
    # Every row's empty prompt is the same; one row repeated keeps it bit-identical across batch positions.
    first = [0] * len(prompts)
    if len(out) == 4:  # SDXL: embeds, negative, pooled, negative pooled
        return Conditioning(out[0], out[2]), Conditioning(out[1], out[3]).rows(first)
    return Conditioning(out[0]), Conditioning(out[1]).rows(first)


def student_conditioning(encoder: StudentLike, prompts: Sequence[str]) -> tuple[Conditioning, Conditioning]:
    """The student's conditioning of ``prompts`` and of the empty prompt, padded to one length.

    The empty prompt is encoded in the same call so both come out with the same token count, which the
    pipelines require of ``prompt_embeds`` and ``negative_prompt_embeds``.

    Returns:
        ``(cond, uncond)``, each ``[B, L, D]`` (+ pooled, + attention mask).
    """
    prompts = list(prompts)
    training = getattr(encoder, "training", None)
    if training:
        encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(["", *prompts])
    finally:
        if training:
            encoder.train()
    embeds = out.prompt_embeds
    pooled = getattr(out, "pooled_prompt_embeds", None)
    mask = getattr(out, "attention_mask", None)
    if embeds.ndim != 3 or embeds.shape[0] != len(prompts) + 1:
        raise ValueError(
            f"the student returned prompt_embeds {tuple(embeds.shape)} for {len(prompts) + 1} prompts; "
            "expected [B, L, D]"
        )
    whole = Conditioning(embeds, pooled, mask)
    cond = whole.rows(range(1, len(prompts) + 1))
    uncond = whole.rows([0] * len(prompts))
    return cond, uncond


def sample(
    pipe: Any,
    cond: Conditioning,
    uncond: Conditioning,
    seeds: Sequence[int],
    *,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
) -> Samples:
    """Generate one image per row of ``cond`` with the pipeline's own sampler, each from its own seed.

    The initial noise of row ``i`` is drawn from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so a
    teacher and a student sampled with the same seeds start from identical latents.

    Args:
        pipe: A diffusers SD / SDXL pipeline.
        cond: Conditioning ``[B, L, D]``.
        uncond: Negative conditioning ``[B, L, D]`` (same length as ``cond``).
        seeds: ``B`` seeds.
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale (<= 1 disables guidance).
        batch_size: Rows per pipeline call.
    """
    if len(seeds) != len(cond) or len(uncond) != len(cond):
        raise ValueError(
            f"cond ({len(cond)}), uncond ({len(uncond)}) and seeds ({len(seeds)}) must have equal length"
        )
    device, dtype = pipe.unet.device, pipe.unet.dtype
    latents, images = [], []
    for start in range(0, len(cond), batch_size):
        rows = list(range(start, min(start + batch_size, len(cond))))
        c, u = cond.rows(rows), uncond.rows(rows)
        kwargs: dict[str, Any] = {
            "prompt_embeds": c.prompt_embeds.to(device, dtype),
            "negative_prompt_embeds": u.prompt_embeds.to(device, dtype),
        }
        if c.pooled_prompt_embeds is not None:
            kwargs["pooled_prompt_embeds"] = c.pooled_prompt_embeds.to(device, dtype)
            kwargs["negative_pooled_prompt_embeds"] = u.pooled_prompt_embeds.to(device, dtype)
        generators = [torch.Generator().manual_seed(int(seeds[i])) for i in rows]
        with torch.no_grad():
            z = pipe(
                **kwargs,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent",
            ).images
            decoded = pipe.vae.decode(z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        latents.append(z.float().cpu())
        images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return Samples(torch.cat(latents), np.concatenate(images))


# --------------------------------------------------------------------------------------------- evaluations


def toy_sampler_defaults() -> tuple[int, float]:
    """The toy teacher's default sampler steps and guidance (the ones its accuracy was measured at)."""
    try:
        from xling.train.toyworld import teacher as toy_teacher
    except ImportError:
        return DEFAULT_STEPS, DEFAULT_GUIDANCE
    return (
        int(getattr(toy_teacher, "DEFAULT_STEPS", DEFAULT_STEPS)),
        float(getattr(toy_teacher, "DEFAULT_GUIDANCE", DEFAULT_GUIDANCE)),
    )


def _accuracy(verdicts: Sequence[Mapping[str, bool]]) -> dict[str, float]:
    """Fraction of verdicts with each attribute right (an empty list gives NaN)."""
    if not verdicts:
        return {a: float("nan") for a in ATTRIBUTES}
    return {a: float(np.mean([bool(v[a]) for v in verdicts])) for a in ATTRIBUTES}


def evaluate_pairs(
    encoder: StudentLike,
    teacher: Any,
    en_prompts: Sequence[str],
    zh_prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    clip_model: str | Path | None = None,
    num_examples: int = 8,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Alignment (embedding cosine), agreement and optional CLIP score on parallel prompts, any teacher.

    Args:
        encoder: The student (``xling.adapters.LanguageEncoder``), on ``device``.
        teacher: Anything :func:`load_pipeline` accepts.
        en_prompts: English captions.
        zh_prompts: Their translations, same order.
        seeds: Each prompt is sampled once per seed.
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance.
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        num_examples: Pairs kept for the PNG grid.
        batch_size: Rows per pipeline call.
        device: Where the pipeline runs.
    """
    start = time.perf_counter()
    if len(en_prompts) != len(zh_prompts) or not en_prompts:
        raise ValueError(
            f"en_prompts ({len(en_prompts)}) and zh_prompts ({len(zh_prompts)}) must be equal and > 0"
        )
    pipe = load_pipeline(teacher, device=device)
    t_cond, t_uncond = teacher_conditioning(pipe, en_prompts)
    s_cond, s_uncond = student_conditioning(encoder, zh_prompts)
    rows = [i for i in range(len(en_prompts)) for _ in seeds]
    seed_list = [int(s) for _ in en_prompts for s in seeds]
    settings = dict(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size
    )
    teacher_samples = sample(pipe, t_cond.rows(rows), t_uncond.rows(rows), seed_list, **settings)
    student_samples = sample(pipe, s_cond.rows(rows), s_uncond.rows(rows), seed_list, **settings)
    result = EvalResult(
        alignment={**embedding_alignment(s_cond, t_cond), "attention_mse": None},
        agreement=agreement(student_samples, teacher_samples),
        settings={
            "teacher": _teacher_name(teacher),
            "prompts": len(en_prompts),
            "seeds": [int(s) for s in seeds],
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
        },
    )
    if clip_model is not None:
        en_rep = [en_prompts[i] for i in rows]
        result.clip_score = {
            "zh_student": clip_score(student_samples.images, en_rep, clip_model),
            "perfect_translation": clip_score(teacher_samples.images, en_rep, clip_model),
        }
    result.examples = _examples(
        rows, seed_list, en_prompts, zh_prompts, teacher_samples, student_samples, num_examples
    )
    result.seconds = time.perf_counter() - start
    return result


def _examples(
    rows: Sequence[int],
    seed_list: Sequence[int],
    en: Sequence[str],
    zh: Sequence[str],
    teacher_samples: Samples,
    student_samples: Samples,
    limit: int,
    en_checks: Sequence[Mapping[str, bool]] | None = None,
    zh_checks: Sequence[Mapping[str, bool]] | None = None,
) -> list[dict[str, Any]]:
    """The first ``limit`` distinct prompts, each at every seed, for the grid."""
    keep = sorted(set(rows), key=list(rows).index)[:limit]
    out = []
    for k, (i, s) in enumerate(zip(rows, seed_list)):
        if i in keep:
            out.append(
                {
                    "en": en[i],
                    "zh": zh[i],
                    "seed": int(s),
                    "en_image": teacher_samples.images[k],
                    "zh_image": student_samples.images[k],
                    "en_check": None if en_checks is None else dict(en_checks[k]),
                    "zh_check": None if zh_checks is None else dict(zh_checks[k]),
                }
            )
    return out


def _teacher_name(teacher: Any) -> str:
    if isinstance(teacher, str | Path):
        return str(teacher)
    path = getattr(teacher, "path", None) or getattr(getattr(teacher, "unet", None), "config", {}).get(
        "_name_or_path"
    )
    return str(path) if path else type(teacher).__name__


def evaluate_toy(
    encoder: StudentLike,
    teacher: Any = "toy",
    *,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    paraphrase: bool = True,
    max_scenes: int | None = None,
    attention_timesteps: Sequence[int] = (100, 500, 900),
    clip_model: str | Path | None = None,
    num_examples: int = 8,
    batch_size: int = 48,
    device: str | torch.device = "cpu",
    reference_cache: dict[Any, tuple[Samples, Samples]] | None = None,
) -> EvalResult:
    """Evaluate a student on the toy world: checker accuracy, alignment, agreement, optional CLIP score.

    Scenes: every single-object scene of the world (both splits; ``heldout_accuracy`` reports the held-out
    ones alone), each sampled at every seed in three conditions that share the seeds:

    - ``zh_student``: the student on the Chinese caption;
    - ``perfect_translation``: the teacher on the parallel English caption (same paraphrase);
    - ``en_teacher``: the teacher on the canonical English caption (the teacher's own accuracy; with
      ``paraphrase=False`` it is the same generation as ``perfect_translation`` and is not sampled twice).

    Alignment uses the held-out scenes: their rendered images are the pivots of the attention MSE.

    Args:
        encoder: The student (``xling.adapters.LanguageEncoder`` or anything :class:`StudentLike`).
        teacher: ``"toy"``, a directory, a pipeline or an ``xling.core.Teacher``.
        seeds: Sampling seeds per scene.
        num_inference_steps: Sampler steps (``None``: the toy world's default).
        guidance_scale: Classifier-free guidance (``None``: the toy world's default).
        paraphrase: Draw one seeded paraphrase per scene (parallel in both languages) instead of the
            canonical captions.
        max_scenes: Evaluate only the first N scenes of a fixed shuffled order (budget runs).
        attention_timesteps: Timesteps of the attention-MSE probe.
        clip_model: CLIP model directory for the CLIP score (``None``: skipped).
        num_examples: Scenes kept for the PNG grid.
        batch_size: Rows per pipeline call.
        device: Where the pipeline runs.
        reference_cache: A dict to keep the teacher's generations in between calls with the same pipeline,
            scenes and sampler (they do not depend on the student): a benchmark evaluating many students
            samples the teacher once.
    """
    from xling.train.toyworld import world

    start = time.perf_counter()
    default_steps, default_guidance = toy_sampler_defaults()
    steps = num_inference_steps or default_steps
    guidance = guidance_scale if guidance_scale is not None else default_guidance
    pipe = load_pipeline(teacher, device=device)

    train_scenes = list(world.all_single_scenes(split="train"))
    heldout_scenes = list(world.all_single_scenes(split="heldout"))
    scenes = train_scenes + heldout_scenes
    heldout = [False] * len(train_scenes) + [True] * len(heldout_scenes)
    if max_scenes is not None and max_scenes < len(scenes):
        # A fixed shuffle keeps both splits represented in a budget run.
        order = np.random.default_rng(0).permutation(len(scenes))[:max_scenes]
        scenes, heldout = [scenes[i] for i in order], [heldout[i] for i in order]
    rng = np.random.default_rng(1234)
    en_prompts, zh_prompts = [], []
    for scene in scenes:
        en, zh = _parallel_captions(world, scene, rng if paraphrase else None)
        en_prompts.append(en)
        zh_prompts.append(zh)
    canonical_en = [world.caption_en(scene) for scene in scenes]

    rows = [i for i in range(len(scenes)) for _ in seeds]
    seed_list = [int(s) for _ in scenes for s in seeds]
    settings = dict(num_inference_steps=steps, guidance_scale=guidance, batch_size=batch_size)
    t_cond, t_uncond = teacher_conditioning(pipe, en_prompts)
    s_cond, s_uncond = student_conditioning(encoder, zh_prompts)
    key = (id(pipe), tuple(en_prompts), tuple(canonical_en), tuple(seed_list), steps, guidance)
    if reference_cache is not None and key in reference_cache:
        perfect, canonical = reference_cache[key]
    else:
        perfect = sample(pipe, t_cond.rows(rows), t_uncond.rows(rows), seed_list, **settings)
        if canonical_en != en_prompts:
            c_cond, c_uncond = teacher_conditioning(pipe, canonical_en)
            canonical = sample(pipe, c_cond.rows(rows), c_uncond.rows(rows), seed_list, **settings)
        else:
            canonical = perfect
        if reference_cache is not None:
            reference_cache[key] = (perfect, canonical)
    student = sample(pipe, s_cond.rows(rows), s_uncond.rows(rows), seed_list, **settings)

    checks = {
        name: [world.check(img, scenes[i]) for img, i in zip(samples.images, rows)]
        for name, samples in (
            ("zh_student", student),
            ("perfect_translation", perfect),
            ("en_teacher", canonical),
        )
    }
    accuracy = {name: _accuracy(v) for name, v in checks.items()}
    held_rows = [k for k, i in enumerate(rows) if heldout[i]]
    heldout_accuracy = {
        name: _accuracy([checks[name][k] for k in held_rows])
        for name in ("zh_student", "perfect_translation")
    }
    teacher_all = accuracy["en_teacher"]["all"]
    relative = accuracy["zh_student"]["all"] / teacher_all if teacher_all > 0 else None

    # Alignment on the held-out scenes (all scenes when the budget left none), their renders as pivots.
    probe = [i for i in range(len(scenes)) if heldout[i]] or list(range(len(scenes)))
    alignment = embedding_alignment(s_cond.rows(probe), t_cond.rows(probe))
    resolution = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 1))
    pivots = torch.stack(
        [
            torch.from_numpy(np.asarray(world.render(scenes[i], size=resolution))).permute(2, 0, 1)
            for i in probe
        ]
    )
    pivots = pivots.float() / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
    alignment["attention_mse"] = attention_alignment(
        pipe, s_cond.rows(probe), t_cond.rows(probe), pivots, timesteps=attention_timesteps
    )

    result = EvalResult(
        accuracy=accuracy,
        heldout_accuracy=heldout_accuracy,
        relative_accuracy=relative,
        alignment=alignment,
        agreement=agreement(student, perfect),
        settings={
            "teacher": _teacher_name(teacher),
            "scenes": len(scenes),
            "heldout_scenes": int(sum(heldout)),
            "seeds": [int(s) for s in seeds],
            "images_per_condition": len(rows),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "paraphrase": paraphrase,
            "scheduler": type(pipe.scheduler).__name__,
        },
    )
    if clip_model is not None:
        en_rep = [en_prompts[i] for i in rows]
        result.clip_score = {
            "zh_student": clip_score(student.images, en_rep, clip_model),
            "perfect_translation": clip_score(perfect.images, en_rep, clip_model),
        }
    result.examples = _examples(
        rows, seed_list, en_prompts, zh_prompts, perfect, student, num_examples,
        checks["perfect_translation"], checks["zh_student"],
    )  # fmt: skip
    result.seconds = time.perf_counter() - start
    return result


def _parallel_captions(world: Any, scene: Any, rng: np.random.Generator | None) -> tuple[str, str]:
    """One English and one Chinese caption of ``scene`` that say the same thing (same paraphrase draw)."""
    if rng is None:
        return world.caption_en(scene), world.caption_zh(scene)
    if hasattr(world, "captions"):
        return tuple(world.captions(scene, rng=rng))  # type: ignore[return-value]
    # Two generators in the same state make the two grammars take the same template choice.
    state = int(rng.integers(2**31))
    return (
        world.caption_en(scene, rng=np.random.default_rng(state)),
        world.caption_zh(scene, rng=np.random.default_rng(state)),
    )


# ------------------------------------------------------------------------------------------------ writers


def write_grid(result: EvalResult, path: str | Path, *, max_columns: int = 16) -> Path:
    """A labelled PNG: top row the teacher on English captions, bottom row the student on Chinese prompts.

    Columns are (prompt, seed) pairs, identical seeds above each other; a column title gives the English
    caption and the seed, and a cell's frame is green (red) when the checker accepts (rejects) it. Chinese
    glyphs are not drawn (no CJK font is assumed); the report lists the Chinese prompts by column.

    Args:
        result: An evaluation with ``examples``.
        path: The PNG to write.
        max_columns: At most this many columns.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = result.examples[:max_columns]
    if not examples:
        raise ValueError("the result has no examples to draw")
    n = len(examples)
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n + 0.8, 3.6), squeeze=False)
    for col, ex in enumerate(examples):
        for row, (key, check) in enumerate((("en_image", "en_check"), ("zh_image", "zh_check"))):
            ax = axes[row][col]
            ax.imshow(ex[key], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if ex[check] is not None:
                color = "#1a9850" if ex[check]["all"] else "#d73027"
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(3)
            if row == 0:
                ax.set_title(f"{col + 1}. {_wrap(ex['en'])}\nseed {ex['seed']}", fontsize=6)
        axes[0][0].set_ylabel("English\n(teacher)", fontsize=8)
        axes[1][0].set_ylabel("Chinese\n(student)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 18) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".4g") -> str:
    if x is None:
        return "n/a"
    return "inf" if math.isinf(x) else format(x, fmt)


_CONDITION_LABELS = {
    "en_teacher": "English teacher (canonical English captions)",
    "perfect_translation": "Perfect translation (teacher, parallel English captions)",
    "zh_student": "Student (Chinese prompts)",
}


def report_markdown(
    result: EvalResult, *, title: str = "xling evaluation", grid: str | None = "grid.png"
) -> str:
    """The Markdown report of ``result`` (what :func:`write_report` writes to ``report.md``)."""
    s = result.settings
    lines = [f"# {title}", ""]
    lines.append(
        f"Teacher `{s.get('teacher', '?')}`; sampler {s.get('scheduler', 'pipeline default')}, "
        f"{s.get('num_inference_steps')} steps, guidance {s.get('guidance_scale')}; seeds {s.get('seeds')}."
    )
    if "scenes" in s:
        lines.append(
            f"{s['scenes']} single-object scenes ({s['heldout_scenes']} held out) x {len(s['seeds'])} seeds = "
            f"{s['images_per_condition']} images per condition; paraphrased captions: {s['paraphrase']}."
        )
    lines.append("")
    if result.accuracy:
        lines += [
            "## Checker accuracy",
            "",
            "| condition | color | shape | position | all |",
            "|---|---|---|---|---|",
        ]
        for name in ("en_teacher", "perfect_translation", "zh_student"):
            acc = result.accuracy.get(name)
            if acc:
                lines.append(
                    f"| {_CONDITION_LABELS[name]} | " + " | ".join(_pct(acc[a]) for a in ATTRIBUTES) + " |"
                )
        for name, acc in result.heldout_accuracy.items():
            lines.append(
                f"| {_CONDITION_LABELS[name]}, held-out scenes | "
                + " | ".join(_pct(acc[a]) for a in ATTRIBUTES)
                + " |"
            )
        lines += ["", f"Student / English teacher, all attributes: **{_pct(result.relative_accuracy)}**.", ""]
    a = result.alignment
    lines += [
        "## Alignment" + (" (held-out scenes)" if result.accuracy else ""),
        "",
        "| token cosine | mean-token cosine | pooled cosine | attention MSE (sum over layers) |",
        "|---|---|---|---|",
        f"| {_num(a.get('token_cosine'), '.4f')} | {_num(a.get('mean_cosine'), '.4f')} | "
        f"{_num(a.get('pooled_cosine'), '.4f')} | {_num(a.get('attention_mse'))} |",
        "",
        "## Paired-generation agreement (student vs teacher on the parallel English caption, same seeds)",
        "",
        "| latent MSE | PSNR (dB) |",
        "|---|---|",
        f"| {_num(result.agreement.get('latent_mse'))} | {_num(result.agreement.get('psnr'), '.2f')} |",
        "",
    ]
    if result.clip_score is not None:
        lines += [
            "## CLIP score (against the English captions)",
            "",
            "| condition | CLIP score |",
            "|---|---|",
        ]
        lines += [f"| {_CONDITION_LABELS[k]} | {v:.2f} |" for k, v in result.clip_score.items()]
        lines.append("")
    if result.examples:
        lines += ["## Examples", ""]
        if grid:
            lines += [f"![English (top) vs Chinese (bottom) at the same seeds]({grid})", ""]
        lines += ["| column | English | Chinese | seed |", "|---|---|---|---|"]
        for k, ex in enumerate(result.examples):
            lines.append(f"| {k + 1} | {ex['en']} | {ex['zh']} | {ex['seed']} |")
        lines.append("")
    lines.append(f"Evaluation time: {result.seconds:.1f} s.")
    return "\n".join(lines) + "\n"


def write_report(
    result: EvalResult, out_dir: str | Path, *, title: str = "xling evaluation", grid: bool = True
) -> dict[str, Path]:
    """Write ``report.md``, ``metrics.json`` and (with examples) ``grid.png`` into ``out_dir``.

    Returns:
        ``{"report": ..., "metrics": ..., "grid": ...}`` (``grid`` only when written).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if grid and result.examples:
        paths["grid"] = write_grid(result, out_dir / "grid.png")
    paths["report"] = out_dir / "report.md"
    paths["report"].write_text(
        report_markdown(result, title=title, grid="grid.png" if "grid" in paths else None)
    )
    paths["metrics"] = out_dir / "metrics.json"
    paths["metrics"].write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return paths


def write_run_report(
    *,
    adapter_dir: str | Path,
    output_dir: str | Path,
    teacher: Any = "toy",
    toy: bool = True,
    num_prompts: int = 8,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    max_scenes: int | None = None,
    device: str | torch.device = "cpu",
    title: str | None = None,
) -> dict[str, Path]:
    """The end-of-training evaluation ``run_recipe`` calls: load the adapter, evaluate, write the report.

    On the toy world (``toy``) it is :func:`evaluate_toy`; with any other teacher it is :func:`evaluate_pairs`
    on ``num_prompts`` parallel captions of the toy grammar (plain scene descriptions any SD model can draw).

    Args:
        adapter_dir: A ``LanguageEncoder.save_pretrained`` directory.
        output_dir: Where ``report.md``, ``metrics.json`` and ``grid.png`` go.
        teacher: ``"toy"``, a diffusers directory or id.
        toy: Whether ``teacher`` is the toy world's.
        num_prompts: Prompts shown in the grid (and evaluated, off the toy world).
        seeds: Sampling seeds.
        num_inference_steps: Sampler steps (``None``: the toy world's default).
        guidance_scale: Guidance (``None``: the toy world's default).
        max_scenes: Toy world: evaluate a fixed subset of this many scenes (``None``: all).
        device: Where the evaluation runs.
        title: Report title (default names the adapter directory).

    Returns:
        ``{"report": ..., "metrics": ..., "grid": ...}``.
    """
    from xling.adapters.encoder import LanguageEncoder

    encoder = LanguageEncoder.from_pretrained(adapter_dir, device=device)
    title = title or f"xling evaluation of {Path(adapter_dir).name}"
    if toy:
        result = evaluate_toy(
            encoder,
            teacher,
            seeds=seeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            max_scenes=max_scenes,
            num_examples=num_prompts,
            device=device,
        )
    else:
        from xling.train.toyworld import world

        scenes = list(world.all_single_scenes(split="heldout"))[:num_prompts]
        result = evaluate_pairs(
            encoder,
            teacher,
            [world.caption_en(s) for s in scenes],
            [world.caption_zh(s) for s in scenes],
            seeds=seeds,
            num_inference_steps=num_inference_steps or DEFAULT_STEPS,
            guidance_scale=guidance_scale if guidance_scale is not None else DEFAULT_GUIDANCE,
            num_examples=num_prompts,
            device=device,
        )
    return write_report(result, output_dir, title=title)
