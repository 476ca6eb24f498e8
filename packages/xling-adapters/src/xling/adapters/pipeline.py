"""Attach a language encoder to a diffusers pipeline through its public embedding inputs.

``attach(pipe, encoder)`` returns a thin wrapper: ``wrapper(prompt="一只戴帽子的猫", ...)`` encodes the prompt
(and the negative prompt) with the student, then calls ``pipe(prompt_embeds=..., negative_prompt_embeds=...,
[masks or pooled embeds], **kwargs)``. Nothing in the pipeline or its denoiser is changed, so
``pipe.load_lora_weights``, ControlNet pipelines and swapped schedulers (LCM, ...) keep working; every other
attribute read or set on the wrapper goes to the pipeline.

Pipeline families (one row of :data:`FAMILIES` each; detected from the denoiser and the pipeline's class)
    ======  ==========================================  ======================================================
    family  conditioning width (the head's             also given, with its negative
            ``teacher_width``)
    ======  ==========================================  ======================================================
    sd      ``unet.config.cross_attention_dim``         nothing (SD 1.x / 2.x)
    sdxl    ``unet.config.cross_attention_dim``         ``pooled_prompt_embeds`` ``[B, P]``
    pixart  ``transformer.config.caption_channels``     ``prompt_attention_mask`` ``[B, L]``
    sana    ``transformer.config.caption_channels``     ``prompt_attention_mask`` ``[B, L]``
    sd3     ``transformer.config.joint_attention_dim``  ``pooled_prompt_embeds`` ``[B, P]``
    flux    ``transformer.config.joint_attention_dim``  ``pooled_prompt_embeds`` ``[B, P]``
    ======  ==========================================  ======================================================

    The student's attention mask (``Conditioning.attention_mask``, 1 = real token) becomes PixArt's and Sana's
    masks, which those pipelines require beside given embeddings; SD3 and Flux take no text mask (their T5
    padding is attended to as well). The pooled width is ``transformer.config.pooled_projection_dim`` for SD3
    (CLIP-L + CLIP-G projections, 2048) and Flux (CLIP-L's pooler, 768).

Negative prompts, as the pipelines treat them
    * ``negative_prompt=None``: SDXL pipelines with ``force_zeros_for_empty_prompt`` get zero embeddings
      (exactly what they would build themselves); SD, PixArt, Sana and SD3 pipelines get the student's
      encoding of ``""`` (their own default); Flux gets no negative at all.
    * a string or list: encoded by the student, in the same batch as the prompts so both have the same
      number of windows and tokens (the pipelines require equal shapes of embeddings and masks).
    * Flux: its default ``guidance_scale`` is distilled guidance, with no negative branch; a negative
      prompt is used only with ``true_cfg_scale > 1`` (otherwise it is dropped, as the pipeline drops it).
    * a pipeline whose ``__call__`` takes no ``negative_prompt_embeds`` (Sana Sprint) gets no negatives.

``num_images_per_prompt``: SD, SDXL and PixArt pipelines repeat given embeddings themselves, so it is passed
on. SD3 and Flux pipelines do not repeat given embeddings, and Sana's repeats its masks in another order
than its embeddings, so for those the wrapper repeats embeddings, masks and pooled vectors (each prompt's
rows side by side, as the pipelines order their images) and calls the pipeline with
``num_images_per_prompt=1``: the same latents and the same images.

No diffusers import is needed here: the wrapper reads ``pipe.unet.config`` / ``pipe.transformer.config`` and
calls ``pipe`` as a user would.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xling.adapters.config import HeadConfig
from xling.adapters.encoder import LanguageEncoder, _as_prompt_list
from xling.adapters.io import check_widths

# Attributes that live on the wrapper itself; everything else is forwarded to the pipeline.
_OWN = frozenset({"pipe", "encoder", "family", "cross_attention_dim", "needs_pooled", "pooled_width"})

_SDXL_CLASH = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_2",
    "negative_prompt_2",
)


@dataclass(frozen=True)
class PipelineFamily:
    """How one family of pipelines takes embeddings (a row of :data:`FAMILIES`).

    Attributes:
        name: ``"sd"``, ``"sdxl"``, ``"pixart"``, ``"sana"``, ``"sd3"`` or ``"flux"``.
        denoiser: the pipeline attribute holding the denoiser (``"unet"`` or ``"transformer"``).
        width_key: the config key of the conditioning width ``D`` (named in width errors).
        pooled_key: where the pooled width ``P`` is read, or ``None`` for a family with no pooled input.
        embeds_kwargs: ``(positive, negative)`` names of the ``[B, L, D]`` embeddings.
        mask_kwargs: ``(positive, negative)`` names of the ``[B, L]`` masks, or ``None`` (no mask input).
        pooled_kwargs: ``(positive, negative)`` names of the ``[B, P]`` pooled vectors, or ``None``.
        negatives: ``"always"``: negatives are always passed (the student's ``""`` when none is given);
            ``"true_cfg"``: only for a given ``negative_prompt`` with ``true_cfg_scale > 1`` (Flux).
        zeros_for_empty: ``negative_prompt=None`` means zero embeddings when the pipeline's config sets
            ``force_zeros_for_empty_prompt`` (SDXL).
        clear_negative_prompt: pass ``negative_prompt=None`` with the negative embeddings, because the
            pipeline's default ``negative_prompt=""`` would clash with them (PixArt, Sana).
        repeats_embeds: the pipeline repeats given embeddings (and masks) for ``num_images_per_prompt``
            itself; ``False``: the wrapper repeats them and passes ``num_images_per_prompt=1``.
        clash: keyword arguments that cannot be given with ``prompt`` (the wrapper makes them).
    """

    name: str
    denoiser: str
    width_key: str
    pooled_key: str | None
    embeds_kwargs: tuple[str, str] = ("prompt_embeds", "negative_prompt_embeds")
    mask_kwargs: tuple[str, str] | None = None
    pooled_kwargs: tuple[str, str] | None = None
    negatives: str = "always"
    zeros_for_empty: bool = False
    clear_negative_prompt: bool = False
    repeats_embeds: bool = True
    clash: tuple[str, ...] = _SDXL_CLASH

    @property
    def needs_pooled(self) -> bool:
        """Whether the pipeline requires pooled embeddings beside the token embeddings."""
        return self.pooled_kwargs is not None


_MASKS = ("prompt_attention_mask", "negative_prompt_attention_mask")
_POOLED = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_MASKED_CLASH = ("prompt_embeds", "negative_prompt_embeds", *_MASKS)

#: Every supported pipeline family, by name: the one place that says which keyword arguments each takes.
FAMILIES: dict[str, PipelineFamily] = {
    f.name: f
    for f in (
        PipelineFamily("sd", "unet", "unet.config.cross_attention_dim", None),
        PipelineFamily(
            "sdxl",
            "unet",
            "unet.config.cross_attention_dim",
            "text_encoder_2.config.projection_dim",
            pooled_kwargs=_POOLED,
            zeros_for_empty=True,
        ),
        PipelineFamily(
            "pixart",
            "transformer",
            "transformer.config.caption_channels",
            None,
            mask_kwargs=_MASKS,
            clear_negative_prompt=True,
            clash=_MASKED_CLASH,
        ),
        PipelineFamily(
            "sana",
            "transformer",
            "transformer.config.caption_channels",
            None,
            mask_kwargs=_MASKS,
            clear_negative_prompt=True,
            repeats_embeds=False,  # Sana tiles its masks but interleaves its embeddings
            clash=_MASKED_CLASH,
        ),
        PipelineFamily(
            "sd3",
            "transformer",
            "transformer.config.joint_attention_dim",
            "transformer.config.pooled_projection_dim",
            pooled_kwargs=_POOLED,
            repeats_embeds=False,
            clash=(
                *_SDXL_CLASH,
                "prompt_3",
                "negative_prompt_3",
            ),
        ),
        PipelineFamily(
            "flux",
            "transformer",
            "transformer.config.joint_attention_dim",
            "transformer.config.pooled_projection_dim",
            pooled_kwargs=_POOLED,
            negatives="true_cfg",
            repeats_embeds=False,
        ),
    )
}

_SUPPORTED = (
    "StableDiffusionPipeline, StableDiffusionXLPipeline (and their ControlNet / img2img / inpaint variants), "
    "PixArtAlphaPipeline, PixArtSigmaPipeline, SanaPipeline, StableDiffusion3Pipeline or FluxPipeline"
)


def pipeline_family(pipe: Any) -> PipelineFamily:
    """The :class:`PipelineFamily` of a diffusers pipeline, from its denoiser and class names.

    A UNet pipeline is ``"sdxl"`` when its UNet takes added text/time conditions, else ``"sd"``. A transformer
    pipeline is named by its transformer's or its own class (``Sana``, ``PixArt``, ``Flux``, ``SD3`` /
    ``StableDiffusion3``), or else by its transformer's config keys (a compiled transformer hides its class).

    Raises:
        TypeError: neither a ``unet`` nor a ``transformer`` with a config of a supported family.
    """
    unet = getattr(pipe, "unet", None)
    if unet is not None and getattr(unet, "config", None) is not None:
        text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
        return FAMILIES["sdxl" if text_time else "sd"]
    transformer = getattr(pipe, "transformer", None)
    cfg = getattr(transformer, "config", None) if transformer is not None else None
    if cfg is None:
        raise TypeError(
            f"{type(pipe).__name__} has no `unet` or `transformer` with a config; expected a diffusers "
            + _SUPPORTED
        )
    names = f"{type(transformer).__name__} {type(pipe).__name__}"
    keys = set(cfg) if isinstance(cfg, Mapping) else set(vars(cfg))
    for family, marks in (
        ("sana", ("Sana",)),
        ("pixart", ("PixArt",)),
        ("flux", ("Flux",)),
        ("sd3", ("SD3", "StableDiffusion3")),
    ):
        if any(m in names for m in marks):
            return FAMILIES[family]
    if "caption_channels" in keys:
        return FAMILIES["sana" if "num_cross_attention_heads" in keys else "pixart"]
    if "joint_attention_dim" in keys and "pooled_projection_dim" in keys:
        return FAMILIES["flux" if "guidance_embeds" in keys else "sd3"]
    raise TypeError(
        f"{type(pipe).__name__} with a {type(transformer).__name__} is not a supported pipeline; expected a "
        + _SUPPORTED
    )


def _unet_widths(pipe: Any) -> tuple[int, bool, int | None]:
    cfg = pipe.unet.config
    cad = cfg.cross_attention_dim
    if isinstance(cad, list | tuple):
        if len(set(cad)) != 1:
            raise ValueError(f"per-block cross_attention_dim {cad} is not supported")
        cad = cad[0]
    needs_pooled = getattr(cfg, "addition_embed_type", None) == "text_time"
    pooled_width = None
    if needs_pooled:
        te2 = getattr(pipe, "text_encoder_2", None)
        if te2 is not None and getattr(te2.config, "projection_dim", None):
            pooled_width = int(te2.config.projection_dim)
        else:
            pipe_cfg = getattr(pipe, "config", {}) or {}
            n_ids = 5 if dict(pipe_cfg).get("requires_aesthetics_score", False) else 6
            pooled_width = int(
                cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
            )
    return int(cad), needs_pooled, pooled_width


def pipeline_widths(pipe: Any) -> tuple[int, bool, int | None]:
    """``(conditioning_width, needs_pooled, pooled_width)`` of a diffusers pipeline.

    The conditioning width is what the head's ``teacher_width`` must be: the UNet's ``cross_attention_dim``
    (SD / SDXL), the transformer's ``caption_channels`` (PixArt-α/Σ, Sana) or ``joint_attention_dim`` (SD3,
    Flux). The pooled width, where the pipeline needs pooled embeddings: for SDXL
    ``text_encoder_2.config.projection_dim`` when that encoder is loaded, otherwise read off the UNet's
    added-condition input (``projection_class_embeddings_input_dim`` minus one ``addition_time_embed_dim``
    per time id: 6, or 5 for a refiner with an aesthetic score); for SD3 and Flux
    ``transformer.config.pooled_projection_dim``. PixArt and Sana take none (``False, None``).

    Raises:
        TypeError: not a pipeline of a supported family (see :func:`pipeline_family`).
    """
    family = pipeline_family(pipe)
    if family.denoiser == "unet":
        return _unet_widths(pipe)
    cfg = pipe.transformer.config
    width = int(getattr(cfg, family.width_key.rsplit(".", 1)[-1]))
    pooled = int(cfg.pooled_projection_dim) if family.needs_pooled else None
    return width, family.needs_pooled, pooled


def check_pipeline_widths(config: HeadConfig, pipe: Any, *, where: str | None = None) -> None:
    """Raise :class:`~xling.adapters.io.WidthMismatchError` when a head's widths do not fit ``pipe``.

    The message names each width that differs and the config key it was read from
    (``unet.config.cross_attention_dim``, ``transformer.config.caption_channels``,
    ``transformer.config.joint_attention_dim``, ``transformer.config.pooled_projection_dim``).

    Args:
        config: the head's config.
        pipe: a pipeline of a supported family.
        where: how the message names the pipeline (default: its class name).
    """
    family = pipeline_family(pipe)
    width, needs_pooled, pooled_width = pipeline_widths(pipe)
    check_widths(
        config,
        cross_attention_dim=width,
        pooled_width=pooled_width,
        needs_pooled=needs_pooled,
        where=where or type(pipe).__name__,
        width_key=family.width_key,
        pooled_key=family.pooled_key if family.denoiser == "transformer" else None,
    )


def _call_parameters(pipe: Any) -> set[str] | None:
    """Keyword names ``pipe.__call__`` takes, or ``None`` when it takes ``**kwargs`` / cannot be read."""
    try:
        params = inspect.signature(pipe.__call__).parameters.values()
    except (TypeError, ValueError):
        return None
    names = set()
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        names.add(p.name)
    return names


class XlingPipeline:
    """A diffusers pipeline that takes prompts in the student's language. Build it with :func:`attach`.

    Attributes:
        pipe: the wrapped pipeline (unchanged).
        encoder: the :class:`~xling.adapters.encoder.LanguageEncoder`.
        family: the pipeline's :class:`PipelineFamily` (which keyword arguments it is given).
        cross_attention_dim: the conditioning width ``D`` (``cross_attention_dim``, ``caption_channels`` or
            ``joint_attention_dim``).
        needs_pooled: whether the pipeline is given pooled embeddings.
        pooled_width: their width ``P``, or ``None``.
    """

    def __init__(self, pipe: Any, encoder: LanguageEncoder, *, check: bool = True) -> None:
        family = pipeline_family(pipe)
        cad, needs_pooled, pooled_width = pipeline_widths(pipe)
        if check:
            check_pipeline_widths(encoder.head.config, pipe)
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "encoder", encoder)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "cross_attention_dim", cad)
        object.__setattr__(self, "needs_pooled", needs_pooled)
        object.__setattr__(self, "pooled_width", pooled_width)

    def __getattr__(self, name: str) -> Any:
        # only called for names not found on the wrapper: scheduler, unet, load_lora_weights, ...
        return getattr(object.__getattribute__(self, "pipe"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)  # e.g. wrapper.scheduler = LCMScheduler.from_config(...)

    def __repr__(self) -> str:
        return f"XlingPipeline({type(self.pipe).__name__}, head={self.encoder.head.config.head_type})"

    def to(self, *args: Any, **kwargs: Any) -> XlingPipeline:
        """Move both the pipeline and the encoder (same arguments as ``pipe.to``)."""
        self.pipe.to(*args, **kwargs)
        self.encoder.to(*args, **kwargs)
        return self

    def _zero_negatives(self, negative_prompt: Any) -> bool:
        cfg = dict(getattr(self.pipe, "config", {}) or {})
        return (
            negative_prompt is None
            and self.family.zeros_for_empty
            and bool(cfg.get("force_zeros_for_empty_prompt", False))
        )

    def _takes_negatives(self) -> bool:
        params = _call_parameters(self.pipe)
        return params is None or self.family.embeds_kwargs[1] in params

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        negatives: bool | None = None,
    ) -> dict[str, Tensor]:
        """The embedding keyword arguments for these prompts, as the wrapper passes them to the pipeline.

        Args:
            prompt: one prompt or a list of ``B``.
            negative_prompt: ``None``, one string, or one per prompt (see the module docstring).
            num_images_per_prompt: repeat each prompt's rows this many times, side by side (``B * n`` rows);
                give such rows to the pipeline with its ``num_images_per_prompt`` left at 1.
            negatives: whether to make negative embeddings; ``None``: as the family does (always, except
                Flux: only for a given ``negative_prompt``).

        Returns:
            ``{"prompt_embeds": [B, L, D], "negative_prompt_embeds": [B, L, D]}`` plus, by family,
            ``"prompt_attention_mask"`` / ``"negative_prompt_attention_mask"`` ``[B, L]`` (int64, 1 = real
            token; PixArt, Sana) or ``"pooled_prompt_embeds"`` / ``"negative_pooled_prompt_embeds"`` ``[B, P]``
            (SDXL, SD3, Flux); embeddings on the pipeline's execution device in the denoiser's dtype.
        """
        fam = self.family
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
            raise TypeError(f"`num_images_per_prompt` must be an int, got {num_images_per_prompt!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
        if negatives is None:
            negatives = fam.negatives == "always" or negative_prompt is not None
        prompts = _as_prompt_list(prompt, "prompt")
        batch = len(prompts)
        neg_e = neg_p = neg_m = None
        if negatives and self._zero_negatives(negative_prompt):
            out = self.encoder(prompts)
            pos_e, pos_p, pos_m = out.prompt_embeds, out.pooled_prompt_embeds, out.attention_mask
            neg_e = torch.zeros_like(pos_e)
            neg_p = torch.zeros_like(pos_p) if pos_p is not None else None
            neg_m = pos_m
        elif negatives:
            negs = (
                [""] * batch
                if negative_prompt is None
                else _as_prompt_list(negative_prompt, "negative_prompt")
            )
            if len(negs) == 1 and batch > 1:
                negs = negs * batch
            if len(negs) != batch:
                raise ValueError(f"`negative_prompt` has {len(negs)} entries but `prompt` has {batch}")
            # one batch, so prompts and negatives get the same number of windows (equal shapes)
            out = self.encoder(prompts + negs)
            pos_e, neg_e = out.prompt_embeds[:batch], out.prompt_embeds[batch:]
            pos_m, neg_m = out.attention_mask[:batch], out.attention_mask[batch:]
            pooled = out.pooled_prompt_embeds
            pos_p, neg_p = (pooled[:batch], pooled[batch:]) if pooled is not None else (None, None)
        else:
            out = self.encoder(prompts)
            pos_e, pos_p, pos_m = out.prompt_embeds, out.pooled_prompt_embeds, out.attention_mask
        if fam.needs_pooled and (pos_p is None or (negatives and neg_p is None)):
            raise ValueError(
                f"the {fam.name} pipeline needs pooled_prompt_embeds but the "
                f"{self.encoder.head.config.head_type} head returns none"
            )
        device = getattr(self.pipe, "_execution_device", None) or self.pipe.device
        dtype = getattr(self.pipe, fam.denoiser).dtype
        n = num_images_per_prompt

        def put(x: Tensor, *, mask: bool = False) -> Tensor:
            if n > 1:
                x = x.repeat_interleave(n, dim=0)  # [B * n, ...], each prompt's copies side by side
            # the pipelines' tokenizers give int64 masks; the transformers turn them into additive biases
            return x.to(device=device, dtype=torch.long if mask else dtype)

        # (kwarg names, positive, negative, is a mask) for each input the family takes
        groups = [(fam.embeds_kwargs, pos_e, neg_e, False)]
        if fam.mask_kwargs is not None:
            groups.append((fam.mask_kwargs, pos_m, neg_m, True))
        if fam.pooled_kwargs is not None:
            groups.append((fam.pooled_kwargs, pos_p, neg_p, False))
        kwargs: dict[str, Tensor] = {}
        for (pos_name, _), pos, _neg, is_mask in groups:
            kwargs[pos_name] = put(pos, mask=is_mask)
        if negatives:
            for (_, neg_name), _pos, neg, is_mask in groups:
                kwargs[neg_name] = put(neg, mask=is_mask)
        return kwargs

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the pipeline on prompts in the student's language.

        Args:
            prompt: one prompt or a list. ``None`` passes straight through to the pipeline (for callers that
                give ``prompt_embeds`` themselves, e.g. from :meth:`encode_prompt`); PixArt and Sana then get
                ``negative_prompt=None`` beside given ``negative_prompt_embeds``.
            negative_prompt: ``None``, one string, or one per prompt (see the module docstring).
            **kwargs: every other pipeline argument (``image=`` for ControlNet / img2img, ``generator``,
                ``num_inference_steps``, ``guidance_scale``, ``true_cfg_scale`` (Flux),
                ``num_images_per_prompt``, ...).

        Returns:
            Whatever the pipeline returns.

        Raises:
            TypeError: ``prompt`` together with an argument the wrapper makes (``prompt_embeds``, masks,
                pooled embeds, ``prompt_2`` / ``prompt_3`` and their negatives).
        """
        fam = self.family
        if prompt is None:
            if negative_prompt is not None:
                kwargs["negative_prompt"] = negative_prompt
            elif fam.clear_negative_prompt and kwargs.get(fam.embeds_kwargs[1]) is not None:
                kwargs["negative_prompt"] = None  # not the pipeline's default "", which clashes with them
            return self.pipe(**kwargs)
        clash = sorted(k for k in fam.clash if kwargs.get(k) is not None)
        if clash:
            raise TypeError(
                f"pass either `prompt` or {clash}, not both: the language encoder makes the embeddings"
            )
        negatives = self._takes_negatives()
        if fam.negatives == "true_cfg":
            # Flux's default guidance is distilled: a negative branch runs only with true CFG
            true_cfg = kwargs.get("true_cfg_scale")
            negatives = negatives and negative_prompt is not None and true_cfg is not None and true_cfg > 1
        if fam.repeats_embeds:
            embeds = self.encode_prompt(prompt, negative_prompt, negatives=negatives)
        else:
            n = kwargs.pop("num_images_per_prompt", None)
            n = 1 if n is None else n
            embeds = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt=n, negatives=negatives)
            kwargs["num_images_per_prompt"] = 1
        if fam.clear_negative_prompt and negatives:
            kwargs["negative_prompt"] = None
        return self.pipe(**embeds, **kwargs)


def attach(
    pipe: Any, encoder: LanguageEncoder | str | os.PathLike[str], *, check: bool = True, **load_kwargs: Any
) -> XlingPipeline:
    """Make ``pipe`` take prompts in the student's language.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` (or a ControlNet /
            img2img / inpaint variant of them), ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``,
            ``SanaPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (and their variants that take
            the same embedding arguments); the family is found from ``pipe.unet`` / ``pipe.transformer``
            (see :func:`pipeline_family` and the module docstring for what each family is given).
        encoder: a :class:`~xling.adapters.encoder.LanguageEncoder`, the path of a saved one, or a Hub repo id
            (``"org/name"``) holding one; loaded with
            ``LanguageEncoder.from_pretrained(encoder, device=pipe.device, **load_kwargs)``.
        check: verify the head's widths against the denoiser: ``teacher_width`` against the UNet's
            ``cross_attention_dim``, the PixArt / Sana transformer's ``caption_channels`` or the SD3 / Flux
            transformer's ``joint_attention_dim``; ``pooled_width`` against SDXL's pooled width or the SD3 /
            Flux transformer's ``pooled_projection_dim``.
        **load_kwargs: for a path or repo id, passed to ``LanguageEncoder.from_pretrained``: ``student_path=``
            (where a frozen or LoRA adapter's student lives now, when it moved), ``dtype=``, ``merged_lora=``,
            ``verify_hashes=False`` (a hand-made adapter whose configs record no SHA-256 of its weights), and for
            a repo id ``revision=``, ``subfolder=``, ``cache_dir=``, ``token=``, ``local_files_only=``,
            ``force_download=`` (``HF_HUB_OFFLINE=1`` loads the cached snapshot without a request).

    Returns:
        An :class:`XlingPipeline`: call it like the pipeline, with ``prompt`` in the student's language.

    Raises:
        WidthMismatchError: the head's ``teacher_width`` or ``pooled_width`` does not fit the pipeline; the
            message names each width that differs and the config key it was read from.
        TypeError: ``pipe`` is not a pipeline of a supported family.
        FileNotFoundError: ``encoder`` is a run folder (the message names its ``adapter/``), or the recorded
            student folder is gone (the message names it and ``student_path=``), or a repo id cannot be found or
            is not cached while downloads are off (:class:`~xling.adapters.hub.HubAdapterNotFoundError`).
    """
    if isinstance(encoder, str | os.PathLike):
        load_kwargs.setdefault("device", getattr(pipe, "device", None))
        encoder = LanguageEncoder.from_pretrained(encoder, **load_kwargs)
    if not isinstance(encoder, LanguageEncoder):
        raise TypeError(f"`encoder` must be a LanguageEncoder or a path, got {type(encoder).__name__}")
    return XlingPipeline(pipe, encoder, check=check)
