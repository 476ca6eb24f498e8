"""Scores of a student against its teacher: latent MSE, PSNR, embedding and attention alignment, CLIP score."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xling.adapters.head import masked_mean
from xling.core import Conditioning, Teacher
from xling.losses import attention_mse
from xling.train.evaluation.results import Samples
from xling.train.evaluation.sampling import pipeline_teacher


def bootstrap_interval(
    correct: Sequence[bool] | np.ndarray,
    reference: Sequence[bool] | np.ndarray | None = None,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy, or of an accuracy ratio, over the evaluated images.

    Each image is one (scene, seed) draw, so resampling images with replacement resamples scenes x seeds.
    With ``reference`` (the same images' verdicts under another condition, e.g. the English teacher at the
    same scenes and seeds) the statistic is ``mean(correct) / mean(reference)`` on the same resampled rows,
    which keeps the pairing.

    Args:
        correct: ``[N]`` verdicts (True = right).
        reference: ``[N]`` verdicts of the denominator, or ``None``.
        level: Coverage of the interval.
        resamples: Bootstrap draws (seeded, so the interval is reproducible).
        seed: Seed of the draws.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no images, or when a ratio's denominator is always 0.
    """
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rows = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))  # [R, N]
    stat = x[rows].mean(axis=1)
    if reference is not None:
        denominator = np.asarray(reference, dtype=float)[rows].mean(axis=1)
        keep = denominator > 0
        if not keep.any():
            return float("nan"), float("nan")
        stat = stat[keep] / denominator[keep]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stat, [tail, 100 - tail])
    return float(low), float(high)


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

    Args:
        student: ``B`` generations, latents ``[B, C, h, w]``, images ``[B, H, W, 3]``.
        teacher: ``B`` generations at the same seeds.

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
    s_mean = masked_mean(s, mask)  # [B, D]
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
    model: Teacher | Any,
    student: Conditioning,
    teacher: Conditioning,
    images: Tensor,
    *,
    timesteps: Sequence[int] = (100, 500, 900),
    seed: int = 0,
) -> float:
    """IAP's attention MSE between teacher and student branches of every tapped attention layer.

    For each timestep, the images' latents are noised with seeded noise and the denoiser runs once on the
    teacher's conditioning with the family's pivot tap holding the student's; the value is
    ``sum_layers mean((o_t - o_s)^2)`` (:func:`xling.losses.attention_mse`), averaged over the timesteps.
    The tap (docs/families.md): UNets :class:`xling.core.PivotTap` on every ``attn2``; PixArt / Sana the same
    after the transformer's frozen caption projection (the teacher's and student's T5 / Gemma padding masks
    reach the attention); SD3 / Flux ``xling.core.JointPivotTap``, the teacher-forced joint attention (image
    queries against [image keys; English text keys] and [image keys; student text keys]).

    Args:
        model: An ``xling.core.Teacher``, or a diffusers pipeline of a supported family (wrapped with
            ``Teacher.from_pipeline``, which freezes its modules in place).
        student: Student conditioning ``[B, L_s, D]`` of the prompts (+ ``attention_mask [B, L_s]``).
        teacher: Teacher conditioning ``[B, L_t, D]`` of the parallel prompts (+ pooled ``[B, P]`` for SDXL /
            SD3 / Flux, + ``attention_mask [B, L_t]`` for PixArt / Sana).
        images: ``[B, 3, H, W]`` in ``[-1, 1]``, the scenes the prompts describe (the "pivots").
        timesteps: Training timesteps to probe (indices in ``[0, num_train_timesteps)``; larger is noisier on
            every family, flow matching included).
        seed: Seeds the noise.

    Returns:
        The attention MSE.
    """
    if images.ndim != 4 or images.shape[0] != len(teacher) or len(student) != len(teacher):
        raise ValueError(
            f"images [B, 3, H, W] and both conditionings must share B: images {tuple(images.shape)}, "
            f"student {len(student)}, teacher {len(teacher)}"
        )
    frozen = model if isinstance(model, Teacher) else pipeline_teacher(model)
    device, dtype = frozen.device, frozen.dtype
    pooled, mask = teacher.pooled_prompt_embeds, teacher.attention_mask
    english = Conditioning(
        teacher.prompt_embeds.to(device, dtype),
        None if pooled is None else pooled.to(device, dtype),
        # PixArt / Sana attend with the T5 / Gemma padding mask; the UNets' CLIP and the MMDiTs attend to all
        mask.to(device) if mask is not None and frozen.needs_attention_mask else None,
    )
    student_embeds = student.prompt_embeds.to(device, dtype)
    student_mask = None if student.attention_mask is None else student.attention_mask.to(device)
    generator = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        z0 = frozen.encode_images(images, sample=False)
        for t in timesteps:
            noise = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
            tt = torch.full((z0.shape[0],), int(t), dtype=torch.long, device=device)
            z_t = frozen.add_noise(z0, noise, tt)  # DDPM's forward process, or flow matching's interpolation
            with frozen.pivot_tap() as tap:
                tap.set_student(student_embeds, student_mask)
                frozen.denoise(z_t, tt, english)
                values.append(float(attention_mse(tap.pairs)))
    return float(np.mean(values))


def clip_score(
    images: np.ndarray,
    captions: Sequence[str],
    model_path: str | Path,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> float:
    """CLIP score of images against captions: ``100 * max(cos(image_embeds, text_embeds), 0)``, averaged.

    The definition of Hessel et al. (2021) and of torchmetrics' ``CLIPScore``, computed with transformers'
    ``CLIPModel`` directly and offline: the model, its tokenizer and its image processor are read from
    ``model_path`` (a ``save_pretrained`` folder such as a downloaded ``openai/clip-vit-large-patch14``), so
    any folder name works and nothing is fetched. Images go through the folder's image processor (resize,
    center crop, normalisation); captions are truncated to the text model's positions (77 for CLIP).

    Args:
        images: ``[N, H, W, 3]`` uint8.
        captions: ``N`` captions (English: CLIP reads English).
        model_path: A local CLIP model directory with ``config.json``, the weights, the tokenizer files and
            ``preprocessor_config.json``.
        batch_size: Image-caption pairs per forward pass.
        device: Where the CLIP model runs.

    Returns:
        The mean score over the ``N`` pairs, in ``[0, 100]``.

    Raises:
        ValueError: ``images`` and ``captions`` differ in number, or there are none.
        OSError: ``model_path`` is not a CLIP model folder (transformers' message names the missing file).
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    if len(images) != len(captions):
        raise ValueError(f"images ({len(images)}) and captions ({len(captions)}) differ in number")
    if len(images) == 0:
        raise ValueError("clip_score needs at least one image")
    path = str(model_path)
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    max_length = model.config.text_config.max_position_embeddings
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = [np.ascontiguousarray(im) for im in images[start : start + batch_size]]
            text = tokenizer(
                list(captions[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
            # The forward's projected embeddings, not get_image_features / get_text_features: those return
            # a tensor in transformers 4 and an output object in 5, while image_embeds and text_embeds
            # mean the same in both.
            out = model(
                input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels
            )
            cos = torch.nn.functional.cosine_similarity(
                out.image_embeds.float(), out.text_embeds.float(), dim=-1
            )
            scores.append(100.0 * cos.clamp_min(0.0))
    return float(torch.cat(scores).mean())
