"""The teacher's pipeline, the conditioning of teacher and student, and seeded sampling through it.

Seven teacher families share one path (see docs/families.md): SD 1.x / 2.x and SDXL (UNets), PixArt-α/Σ and
Sana (cross-attention DiTs: T5 / Gemma states + their padding mask), SD3 and Flux (MMDiTs: joint CLIP + T5
sequence + pooled vector). Which keyword arguments a pipeline takes is read from
:data:`xling.adapters.pipeline.FAMILIES`, the table ``attach`` uses too.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xling.adapters.io import check_widths
from xling.adapters.pipeline import PipelineFamily, check_pipeline_widths, pipeline_family, pipeline_widths
from xling.core import FLOW_FAMILIES, Conditioning, StudentEncoder, Teacher
from xling.train.evaluation.results import Samples
from xling.train.toyworld import mmdit
from xling.train.toyworld.names import TOY_MMDIT, is_toy_teacher, resolve_teacher, teacher_options
from xling.train.toyworld.teacher import DEFAULT_GUIDANCE, DEFAULT_STEPS

#: Sampler settings for an SD / SDXL teacher other than the toy one when the caller names none.
SD_STEPS = 30
SD_GUIDANCE = 7.5

#: The transformer families' pipelines, by ``Teacher.family``; they sample at their own ``__call__`` defaults
#: (PixArt and Sana 20 steps at guidance 4.5, SD3 28 at 7.0, Flux 28 at distilled guidance 3.5).
FAMILY_PIPELINES: dict[str, tuple[str, ...]] = {
    "pixart": ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    "sana": ("SanaPipeline",),
    "sd3": ("StableDiffusion3Pipeline",),
    "flux": ("FluxPipeline",),
}


#: Attribute of a pipeline holding the text options its prompts are encoded with when they differ from its
#: ``__call__`` defaults (the teacher's ``max_sequence_length``): see :func:`pipeline_text_options`.
TEXT_OPTIONS_ATTR = "xling_text_options"


def toy_sampler_defaults(teacher: Any = "toy") -> tuple[int, float]:
    """A toy teacher's default sampler steps and guidance (the ones its accuracy was measured at): the MMDiT
    one's for ``"toy-mmdit"``, else the UNet one's."""
    if teacher == TOY_MMDIT:
        return mmdit.DEFAULT_STEPS, mmdit.DEFAULT_GUIDANCE
    return DEFAULT_STEPS, DEFAULT_GUIDANCE


def pipeline_text_options(pipe: Any) -> dict[str, Any]:
    """The text options ``pipe``'s prompts are encoded with beyond its ``__call__`` defaults.

    :func:`load_pipeline` records them: the toy MMDiT teacher's T5 length (``toyworld.mmdit.PIPELINE_KWARGS``),
    or the ``max_sequence_length`` of the ``xling.core.Teacher`` a pipeline was assembled from. Every prompt
    xling encodes through the pipeline, and every ``Teacher`` made from it, uses them.
    """
    return dict(getattr(pipe, TEXT_OPTIONS_ATTR, None) or {})


def pipeline_teacher(pipe: Any) -> Teacher:
    """``xling.core.Teacher.from_pipeline(pipe)`` with the pipeline's text options (:func:`pipeline_text_options`)."""
    return Teacher.from_pipeline(pipe, **pipeline_text_options(pipe))


def sampler_defaults(teacher: Any, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """Steps and guidance: the given ones, else the teacher's defaults.

    The defaults are the toy world's for ``"toy"`` and ``"toy-mmdit"``; the pipeline's own ``__call__`` defaults for a
    PixArt-α/Σ, Sana, SD3 or Flux teacher (a folder whose ``model_index.json`` names such a pipeline, a
    pipeline, or an ``xling.core.Teacher`` of those families); 30 steps at guidance 7.5 for any other.

    Args:
        teacher: ``"toy"``, ``"toy-mmdit"``, a diffusers directory or Hub id, a pipeline or an
            ``xling.core.Teacher``.
        steps: Sampler steps, or ``None``.
        guidance: Guidance scale, or ``None`` (``0.0`` is kept: it disables guidance).
    """
    if is_toy_teacher(teacher):
        default_steps, default_guidance = toy_sampler_defaults(teacher)
    else:
        default_steps, default_guidance = _pipeline_call_defaults(teacher) or (SD_STEPS, SD_GUIDANCE)
    return steps or default_steps, guidance if guidance is not None else default_guidance


def _pipeline_class_name(teacher: Any) -> str | None:
    """The diffusers pipeline class ``teacher`` samples with, from its ``model_index.json`` or its type."""
    if isinstance(teacher, str | Path):
        index = Path(str(teacher)).expanduser() / "model_index.json"
        if index.is_file():
            return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")) or None
        if Path(str(teacher)).expanduser().exists():
            return None
        try:  # a Hub id: its config only (cached, or fetched as from_pretrained would)
            from diffusers import DiffusionPipeline

            return str(DiffusionPipeline.load_config(str(teacher)).get("_class_name", "")) or None
        except (OSError, ValueError):  # no config: the SD defaults; loading the pipeline reports the cause
            return None
    if isinstance(teacher, Teacher):
        names = FAMILY_PIPELINES.get(str(teacher.family))
        return (
            None if names is None else _pixart_class_name(teacher) if teacher.family == "pixart" else names[0]
        )
    return type(teacher).__name__


def _pipeline_call_defaults(teacher: Any) -> tuple[int, float] | None:
    """``(num_inference_steps, guidance_scale)`` defaults of a transformer family's ``__call__``, else ``None``."""
    name = _pipeline_class_name(teacher)
    if name is None or not any(name in names for names in FAMILY_PIPELINES.values()):
        return None
    import diffusers

    params = inspect.signature(getattr(diffusers, name).__call__).parameters
    return int(params["num_inference_steps"].default), float(params["guidance_scale"].default)


def _call_default(pipe: Any, name: str) -> Any:
    """The default of keyword ``name`` of ``pipe.__call__`` (what the pipeline uses when not given it)."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if param is None else param.default


def _denoiser(pipe: Any, family: PipelineFamily | None = None) -> Any:
    """The pipeline's UNet or transformer."""
    return getattr(pipe, (family or pipeline_family(pipe)).denoiser)


def native_resolution(pipe: Any) -> tuple[int, int]:
    """``(height, width)`` in pixels a pipeline samples at when given none, by its own rule.

    UNets and PixArt: ``sample_size * vae_scale_factor`` of the denoiser; Sana: the same (its ``__call__``
    default of 1024 is the released models' native size, which the transformer's ``sample_size`` says);
    SD3 and Flux: ``default_sample_size * vae_scale_factor`` (Flux's transformer has no ``sample_size``:
    the pipeline fixes 128, i.e. 1024 px with the 8x VAE).
    """
    family = pipeline_family(pipe)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    if family.name in ("sd3", "flux"):
        size = getattr(pipe, "default_sample_size", None)
    else:
        size = _denoiser(pipe, family).config.sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size) * scale, int(size) * scale


def load_pipeline(
    teacher: Any,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> Any:
    """The diffusers pipeline of ``teacher`` (SD / SDXL, PixArt-α/Σ, Sana, SD3 or Flux).

    Args:
        teacher: ``"toy"`` / ``"toy-mmdit"`` (a committed toy teacher), a diffusers directory or id, a
            pipeline (returned as is), or an ``xling.core.Teacher`` (its components, with the inference
            scheduler read from the directory it was loaded from).
        device: Device of the pipeline.
        dtype: Weight dtype.
        variant: Weight-file variant of a directory or id (``"fp16"`` reads ``*.fp16.safetensors``), as
            ``DiffusionPipeline.from_pretrained(..., variant=)``.
    """
    from diffusers import DiffusionPipeline

    if isinstance(teacher, DiffusionPipeline):
        pipe = teacher
    elif isinstance(teacher, str | Path):
        path = resolve_teacher(str(teacher))
        dropped = {name: None for name in _dropped_components(path)}
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, variant=variant, **dropped).to(device)
        setattr(pipe, TEXT_OPTIONS_ATTR, teacher_options(str(teacher)))
    elif isinstance(teacher, Teacher):
        pipe = _pipeline_from_teacher(teacher)
        if teacher.max_sequence_length is not None:
            setattr(pipe, TEXT_OPTIONS_ATTR, {"max_sequence_length": teacher.max_sequence_length})
    else:
        raise TypeError(
            f"teacher must be 'toy', a path, a DiffusionPipeline or an xling.core.Teacher, got {type(teacher).__name__}"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dropped_components(path: str) -> list[str]:
    """Components a pipeline's ``__init__`` requires that ``model_index.json`` records as ``[null, null]``
    (SD3 with its T5 dropped): ``DiffusionPipeline.from_pretrained`` loads such a folder only when told
    ``name=None`` for each, as diffusers documents for SD3 without T5."""
    import diffusers

    try:
        index = dict(diffusers.DiffusionPipeline.load_config(path))
    except (OSError, ValueError):  # from_pretrained reports the cause
        return []
    pipeline_class = getattr(diffusers, str(index.get("_class_name", "")), None)
    if pipeline_class is None:
        return []
    required, _ = pipeline_class._get_signature_keys(pipeline_class)
    optional = set(getattr(pipeline_class, "_optional_components", []))
    return [
        name
        for name in sorted(set(required) - optional)
        if isinstance(index.get(name), list | tuple) and list(index[name]) == [None, None]
    ]


def check_fits(encoder: Any, pipe: Any, teacher: Any) -> None:
    """Raise before any sampling when the encoder's head does not fit the pipeline's widths.

    The same check (and error) as ``xling.adapters.attach``: the head's ``teacher_width`` against the UNet's
    ``cross_attention_dim`` (PixArt / Sana: ``transformer.config.caption_channels``; SD3 / Flux:
    ``transformer.config.joint_attention_dim``) and, for SDXL / SD3 / Flux, its pooled width. A student without
    a head config (a test double, a custom ``StudentEncoder``) carries no widths and is not checked.

    Args:
        encoder: The student; its ``head.config`` (an ``xling.adapters`` ``HeadConfig``) is checked.
        pipe: A diffusers pipeline of a supported family.
        teacher: What the error calls the teacher (its name or path).

    Raises:
        xling.adapters.WidthMismatchError: a width differs; the message names each one.
    """
    head_config = getattr(getattr(encoder, "head", None), "config", None)
    if head_config is None or not hasattr(head_config, "teacher_width"):
        return
    if pipeline_family(pipe).denoiser == "transformer":
        check_pipeline_widths(head_config, pipe, where=f"the teacher {teacher}")
        return
    cross_attention_dim, needs_pooled, pooled_width = pipeline_widths(pipe)
    check_widths(
        head_config,
        cross_attention_dim=cross_attention_dim,
        pooled_width=pooled_width,
        needs_pooled=needs_pooled,
        where=f"the teacher {teacher}",
    )


def _pixart_class_name(teacher: Teacher) -> str:
    """PixArt-α or PixArt-Σ, told apart by the T5 prompt length (``Teacher`` reads 300 from a Σ folder, else 120).

    The two pipelines differ only in their defaults once given embeddings (Σ: 300 tokens, no resolution
    conditions), so the length decides.
    """
    return "PixArtSigmaPipeline" if teacher.max_sequence_length == 300 else "PixArtAlphaPipeline"


def _pipeline_from_teacher(teacher: Teacher) -> Any:
    """Assemble the family's pipeline around an ``xling.core.Teacher``'s modules (shared, not copied).

    A teacher built from parts has no inference scheduler; it then samples with DDIM over its training
    schedule (UNets, PixArt: the deterministic sampler every DDPM-trained model accepts) or flow-matching Euler
    over its flow schedule (Sana, SD3, Flux).
    """
    import diffusers

    family = str(teacher.family)
    scheduler = teacher.inference_scheduler
    if scheduler is None:
        sampler = "FlowMatchEulerDiscreteScheduler" if family in FLOW_FAMILIES else "DDIMScheduler"
        scheduler = getattr(diffusers, sampler).from_config(teacher.scheduler.config)
    encoders, tokenizers = list(teacher.text_encoders), list(teacher.tokenizers)
    vae, denoiser = teacher.vae, teacher.denoiser
    if family == "pixart":
        pipeline_class = getattr(diffusers, _pixart_class_name(teacher))
        return pipeline_class(
            tokenizer=tokenizers[0],
            text_encoder=encoders[0],
            vae=vae,
            transformer=denoiser,
            scheduler=scheduler,
        )
    if family == "sana":
        return diffusers.SanaPipeline(
            tokenizer=tokenizers[0],
            text_encoder=encoders[0],
            vae=vae,
            transformer=denoiser,
            scheduler=scheduler,
        )
    if family == "sd3":  # CLIP-L, CLIP-G, T5
        return diffusers.StableDiffusion3Pipeline(
            transformer=denoiser,
            scheduler=scheduler,
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            text_encoder_3=encoders[2] if len(encoders) == 3 else None,  # T5 may be dropped
            tokenizer_3=tokenizers[2] if len(tokenizers) == 3 else None,
        )
    if family == "flux":  # CLIP-L, T5
        return diffusers.FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            transformer=denoiser,
        )
    if len(teacher.text_encoders) == 2:
        return diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=teacher.unet,
            scheduler=scheduler,
        )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        unet=teacher.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _text_options(pipe: Any) -> dict[str, Any]:
    """The text options a PixArt / Sana / SD3 / Flux pipeline's ``__call__`` gives its ``encode_prompt``.

    ``max_sequence_length`` (PixArt-α 120, Σ and Sana 300, SD3 256, Flux 512), Sana's
    ``complex_human_instruction`` (prepended to every prompt, not to the negative one) and PixArt's
    ``clean_caption``, which the pipelines quietly turn off without ``bs4`` and ``ftfy``: done here too, so
    the conditioning is the one the pipeline samples a prompt with.
    """
    params = inspect.signature(pipe.encode_prompt).parameters
    options: dict[str, Any] = {}
    for name in ("max_sequence_length", "complex_human_instruction", "clean_caption"):
        default = _call_default(pipe, name)
        if name in params and default is not inspect.Parameter.empty and default is not None:
            options[name] = default
    options.update({k: v for k, v in pipeline_text_options(pipe).items() if k in params})
    if options.get("clean_caption"):
        from diffusers.utils import is_bs4_available, is_ftfy_available

        options["clean_caption"] = bool(is_bs4_available() and is_ftfy_available())
    return options


def teacher_conditioning(pipe: Any, prompts: Sequence[str]) -> tuple[Conditioning, Conditioning]:
    """The teacher's conditioning of ``prompts`` and of the empty prompt, exactly as the pipeline makes them.

    Each pipeline's own ``encode_prompt`` with the text options its ``__call__`` passes (:func:`_text_options`);
    the unconditional conditioning is the encoding of ``""`` (the pipelines' default negative prompt).

    - SD / SDXL: ``[B, 77, D]`` (+ pooled ``[B, P]`` for SDXL).
    - PixArt-α/Σ, Sana: ``[B, L, D]`` T5 / Gemma states + ``attention_mask [B, L]`` (1 = real token), which the
      pipelines need with given embeddings; for Sana the prompts carry its complex human instruction, as
      ``SanaPipeline.__call__`` encodes them.
    - SD3: the joint CLIP-L + CLIP-G + T5 sequence ``[B, 77 + 256, D]`` + pooled ``[B, P]``.
    - Flux: T5 ``[B, 512, D]`` + CLIP pooled ``[B, P]``. ``FluxPipeline`` has no negative branch by default
      (its ``guidance_scale`` feeds the distilled guidance embedding), so :func:`sample` never passes
      ``uncond`` to it; it is returned for the shared interface and for true CFG.

    Args:
        pipe: A diffusers pipeline of a supported family.
        prompts: ``B`` English prompts.

    Returns:
        ``(cond, uncond)``, each with ``B`` rows.
    """
    prompts = list(prompts)
    family = pipeline_family(pipe).name
    device = getattr(pipe, "_execution_device", None) or pipe.device
    # Every row's empty prompt is the same; one row repeated keeps it bit-identical across batch positions.
    first = [0] * len(prompts)
    with torch.no_grad():
        if family in ("sd", "sdxl"):
            out = pipe.encode_prompt(
                prompt=prompts,
                device=pipe.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[""] * len(prompts),
            )
            if len(out) == 4:  # SDXL: embeds, negative, pooled, negative pooled
                return Conditioning(out[0], out[2]), Conditioning(out[1], out[3]).rows(first)
            return Conditioning(out[0]), Conditioning(out[1]).rows(first)
        options = _text_options(pipe)
        if family in ("pixart", "sana"):  # embeds, mask, negative embeds, negative mask
            embeds, mask, neg, neg_mask = pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=True,
                negative_prompt="",
                num_images_per_prompt=1,
                device=device,
                **options,
            )
            return Conditioning(embeds, None, mask), Conditioning(neg, None, neg_mask).rows(first)
        if family == "sd3":  # embeds, negative, pooled, negative pooled
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[""] * len(prompts),
                **options,
            )
            return Conditioning(embeds, pooled), Conditioning(neg, neg_pooled).rows(first)
        # flux: embeds, pooled, text ids (the pipeline makes those itself from the length)
        cond, uncond = (
            Conditioning(*pipe.encode_prompt(prompt=p, prompt_2=None, device=device, **options)[:2])
            for p in (prompts, [""])
        )
        return cond, uncond.rows(first)


def student_conditioning(
    encoder: StudentEncoder, prompts: Sequence[str]
) -> tuple[Conditioning, Conditioning]:
    """The student's conditioning of ``prompts`` and of the empty prompt, padded to one length.

    The empty prompt is encoded in the same call so both come out with the same token count, which the
    pipelines require of ``prompt_embeds`` and ``negative_prompt_embeds``.

    Args:
        encoder: The student; only its ``__call__`` is used, in eval mode (its training mode is restored).
        prompts: ``B`` prompts in the student's language.

    Returns:
        ``(cond, uncond)``, each ``[B, L, D]`` (+ pooled ``[B, P]``, + attention mask ``[B, L]``).
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
    if embeds.ndim != 3 or embeds.shape[0] != len(prompts) + 1:
        raise ValueError(
            f"the student returned prompt_embeds {tuple(embeds.shape)} for {len(prompts) + 1} prompts; "
            "expected [B, L, D]"
        )
    whole = Conditioning(
        embeds, getattr(out, "pooled_prompt_embeds", None), getattr(out, "attention_mask", None)
    )
    return whole.rows(range(1, len(prompts) + 1)), whole.rows([0] * len(prompts))


def sample(
    pipe: Any,
    cond: Conditioning,
    uncond: Conditioning,
    seeds: Sequence[int],
    *,
    rows: Sequence[int] | None = None,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
    height: int | None = None,
    width: int | None = None,
) -> Samples:
    """Generate one image per row of ``cond`` with the pipeline's own sampler, each from its own seed.

    The initial noise of row ``i`` is drawn from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so a
    teacher and a student sampled with the same seeds start from identical latents. Per family the pipeline
    gets what it needs beside ``prompt_embeds`` (:data:`xling.adapters.pipeline.FAMILIES`): pooled embeddings
    (SDXL, SD3, Flux), attention masks (PixArt, Sana), and the negatives for classifier-free guidance, except
    on Flux, whose ``guidance_scale`` is its distilled guidance embedding and which has no negative branch
    (``uncond`` is not used there). PixArt and Sana sample without resolution binning: at the native size the
    binning is the identity, and some sample sizes have no bins at all (PixArt's 16).

    Args:
        pipe: A diffusers pipeline of a supported family.
        cond: Conditioning ``[B, L, D]`` (+ pooled ``[B, P]``, + ``attention_mask [B, L]``).
        uncond: Negative conditioning, shaped as ``cond`` (same length ``L``).
        seeds: ``B`` seeds.
        rows: Draw ``cond.rows(rows)`` instead (repeats allowed; ``seeds`` then has one seed per entry).
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance scale (<= 1 disables guidance); Flux: the guidance embedding.
        batch_size: Rows per pipeline call.
        height: Image height in pixels (``None``: the pipeline's native one, :func:`native_resolution`).
        width: Image width in pixels (``None``: likewise).

    Returns:
        Latents ``[B, C, h, w]`` (Flux's packed tokens unpacked), as the pipeline hands them to its VAE before
        the scaling, and the decoded images ``[B, H, W, 3]`` uint8.

    Raises:
        ValueError: lengths differ, or PixArt / Sana conditioning has no attention mask, or SDXL / SD3 / Flux
            conditioning has no pooled embeddings.
    """
    if rows is not None:
        cond, uncond = cond.rows(rows), uncond.rows(rows)
    if len(seeds) != len(cond) or len(uncond) != len(cond):
        raise ValueError(
            f"cond ({len(cond)}), uncond ({len(uncond)}) and seeds ({len(seeds)}) must have equal length"
        )
    family = pipeline_family(pipe)
    denoiser = _denoiser(pipe, family)
    device, dtype = denoiser.device, denoiser.dtype
    negatives = family.negatives == "always"
    _check_conditioning(family, cond, uncond if negatives else None)
    size: dict[str, Any] = {}
    if family.denoiser == "transformer":
        # Flux needs the size to unpack its latents, and Sana's __call__ default (1024) ignores the model's own
        native = native_resolution(pipe)
        size = {"height": height or native[0], "width": width or native[1]}
        if family.name in ("pixart", "sana"):
            size["use_resolution_binning"] = False
    elif height or width:
        size = {"height": height, "width": width}
    latents, images = [], []
    for start in range(0, len(cond), batch_size):
        batch = list(range(start, min(start + batch_size, len(cond))))
        kwargs = _embedding_kwargs(family, cond.rows(batch), uncond.rows(batch) if negatives else None)
        kwargs = {k: v.to(device, torch.long if "mask" in k else dtype) for k, v in kwargs.items()}
        if family.clear_negative_prompt:
            kwargs["negative_prompt"] = None  # the default "" would clash with the given negative embeddings
        generators = [torch.Generator().manual_seed(int(seeds[i])) for i in batch]
        with torch.no_grad():
            z = pipe(
                **kwargs,
                **size,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="latent",
            ).images
            if family.name == "flux":  # [B, h/2 * w/2, 4C] packed 2x2 patches -> [B, C, h, w]
                z = pipe._unpack_latents(z, size["height"], size["width"], pipe.vae_scale_factor)
            decoded = _decode(pipe, family, z)
        pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        latents.append(z.float().cpu())
        images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return Samples(torch.cat(latents), np.concatenate(images))


def _check_conditioning(family: PipelineFamily, cond: Conditioning, uncond: Conditioning | None) -> None:
    """Raise before sampling when ``cond`` / ``uncond`` lack what the family's pipeline requires."""
    for name, c in (("cond", cond), ("uncond", uncond)):
        if c is None:
            continue
        if family.mask_kwargs is not None and c.attention_mask is None:
            raise ValueError(
                f"the {family.name} pipeline needs an attention mask [B, L] with prompt_embeds; {name} has none"
            )
        if family.pooled_kwargs is not None and c.pooled_prompt_embeds is None:
            raise ValueError(
                f"the {family.name} pipeline needs pooled_prompt_embeds [B, P]; {name} has none "
                f"(prompt_embeds {tuple(c.prompt_embeds.shape)})"
            )


def _embedding_kwargs(
    family: PipelineFamily, cond: Conditioning, uncond: Conditioning | None
) -> dict[str, torch.Tensor]:
    """The family's embedding keyword arguments for one batch (negatives only when ``uncond`` is given)."""
    fields = [(family.embeds_kwargs, "prompt_embeds")]
    if family.mask_kwargs is not None:
        fields.append((family.mask_kwargs, "attention_mask"))
    if family.pooled_kwargs is not None:
        fields.append((family.pooled_kwargs, "pooled_prompt_embeds"))
    kwargs = {}
    for (positive, negative), attr in fields:
        kwargs[positive] = getattr(cond, attr)
        if uncond is not None:
            kwargs[negative] = getattr(uncond, attr)
    return kwargs


def _decode(pipe: Any, family: PipelineFamily, z: torch.Tensor) -> torch.Tensor:
    """Decode latents ``[B, C, h, w]`` to ``[B, 3, H, W]`` in about ``[-1, 1]`` as the pipeline does.

    ``z / scaling_factor`` (SD, SDXL, PixArt; Sana's ``AutoencoderDC`` too), and ``+ shift_factor`` on SD3 and
    Flux, whose VAEs were trained with a shift.
    """
    vae = pipe.vae
    z = z.to(vae.dtype) / vae.config.scaling_factor
    if family.name in ("sd3", "flux"):
        z = z + vae.config.shift_factor
    return vae.decode(z).sample


def seeded_rows(n_prompts: int, seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """Every prompt at every seed, prompt-major: the prompt index and the seed of each generated image.

    Args:
        n_prompts: ``N`` prompts.
        seeds: ``S`` seeds.

    Returns:
        ``(rows, seeds)``, each of length ``N * S``.
    """
    rows = [i for i in range(n_prompts) for _ in seeds]
    return rows, [int(s) for _ in range(n_prompts) for s in seeds]
