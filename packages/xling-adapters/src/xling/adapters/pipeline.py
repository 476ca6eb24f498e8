"""Attach a language encoder to a diffusers SD / SDXL pipeline through its public embedding inputs.

``attach(pipe, encoder)`` returns a thin wrapper: ``wrapper(prompt="一只戴帽子的猫", ...)`` encodes the prompt
(and the negative prompt) with the student, then calls ``pipe(prompt_embeds=..., negative_prompt_embeds=...,
[pooled_prompt_embeds=..., negative_pooled_prompt_embeds=...], **kwargs)``. Nothing in the pipeline or its
UNet is changed, so ``pipe.load_lora_weights``, ControlNet pipelines and swapped schedulers (LCM, ...) keep
working; every other attribute read or set on the wrapper goes to the pipeline.

Negative prompts, as the pipelines treat them
    * ``negative_prompt=None``: SDXL pipelines with ``force_zeros_for_empty_prompt`` get zero embeddings
      (exactly what they would build themselves); every other pipeline gets the student's encoding of ``""``.
    * a string or list: encoded by the student, in the same batch as the prompts so both have the same
      number of windows (the pipelines require equal shapes).

No diffusers import is needed here: the wrapper reads ``pipe.unet.config`` and calls ``pipe`` as a user would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xling.adapters.encoder import LanguageEncoder, _as_prompt_list
from xling.adapters.io import check_widths

# Attributes that live on the wrapper itself; everything else is forwarded to the pipeline.
_OWN = frozenset({"pipe", "encoder", "cross_attention_dim", "needs_pooled", "pooled_width"})


def pipeline_widths(pipe: Any) -> tuple[int, bool, int | None]:
    """``(cross_attention_dim, needs_pooled, pooled_width)`` of a diffusers SD / SDXL pipeline.

    The pooled width is ``text_encoder_2.config.projection_dim`` when that encoder is loaded, otherwise it is
    read off the UNet's added-condition input: ``projection_class_embeddings_input_dim`` minus one
    ``addition_time_embed_dim`` per time id (6, or 5 for a refiner with an aesthetic score).
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "config"):
        raise TypeError(
            f"{type(pipe).__name__} has no `unet` with a config; expected a diffusers SD/SDXL pipeline"
        )
    cfg = unet.config
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


class XlingPipeline:
    """A diffusers pipeline that takes prompts in the student's language. Build it with :func:`attach`.

    Attributes:
        pipe: the wrapped pipeline (unchanged).
        encoder: the :class:`~xling.adapters.encoder.LanguageEncoder`.
    """

    def __init__(self, pipe: Any, encoder: LanguageEncoder, *, check: bool = True) -> None:
        cad, needs_pooled, pooled_width = pipeline_widths(pipe)
        if check:
            check_widths(
                encoder.head.config,
                cross_attention_dim=cad,
                pooled_width=pooled_width,
                needs_pooled=needs_pooled,
                where=f"{type(pipe).__name__}",
            )
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "encoder", encoder)
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
            and self.needs_pooled
            and bool(cfg.get("force_zeros_for_empty_prompt", False))
        )

    @torch.no_grad()
    def encode_prompt(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """The embedding keyword arguments the wrapper passes to the pipeline for these prompts.

        Returns:
            ``{"prompt_embeds": [B, L, D], "negative_prompt_embeds": [B, L, D]}`` plus, for SDXL,
            ``"pooled_prompt_embeds"`` and ``"negative_pooled_prompt_embeds"`` ``[B, P]``; on the pipeline's
            execution device, in the UNet's dtype.
        """
        prompts = _as_prompt_list(prompt, "prompt")
        batch = len(prompts)
        zero_neg = self._zero_negatives(negative_prompt)
        if zero_neg:
            out = self.encoder(prompts)
            pos_e, pos_p = out.prompt_embeds, out.pooled_prompt_embeds
            neg_e = torch.zeros_like(pos_e)
            neg_p = torch.zeros_like(pos_p) if pos_p is not None else None
        else:
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
            pooled = out.pooled_prompt_embeds
            pos_p, neg_p = (pooled[:batch], pooled[batch:]) if pooled is not None else (None, None)
        device = getattr(self.pipe, "_execution_device", None) or self.pipe.device
        dtype = self.pipe.unet.dtype
        kwargs = {
            "prompt_embeds": pos_e.to(device=device, dtype=dtype),
            "negative_prompt_embeds": neg_e.to(device=device, dtype=dtype),
        }
        if self.needs_pooled:
            if pos_p is None or neg_p is None:
                raise ValueError("the pipeline needs pooled_prompt_embeds but the head returns none")
            kwargs["pooled_prompt_embeds"] = pos_p.to(device=device, dtype=dtype)
            kwargs["negative_pooled_prompt_embeds"] = neg_p.to(device=device, dtype=dtype)
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
                give ``prompt_embeds`` themselves).
            negative_prompt: ``None``, one string, or one per prompt (see the module docstring).
            **kwargs: every other pipeline argument (``image=`` for ControlNet / img2img, ``generator``,
                ``num_inference_steps``, ``guidance_scale``, ``num_images_per_prompt``, ...).

        Returns:
            Whatever the pipeline returns.
        """
        if prompt is None:
            if negative_prompt is not None:
                kwargs["negative_prompt"] = negative_prompt
            return self.pipe(**kwargs)
        clash = sorted(
            k
            for k in (
                "prompt_embeds",
                "negative_prompt_embeds",
                "pooled_prompt_embeds",
                "negative_pooled_prompt_embeds",
                "prompt_2",
                "negative_prompt_2",
            )
            if kwargs.get(k) is not None
        )
        if clash:
            raise TypeError(
                f"pass either `prompt` or {clash}, not both: the language encoder makes the embeddings"
            )
        return self.pipe(**self.encode_prompt(prompt, negative_prompt), **kwargs)


def attach(
    pipe: Any, encoder: LanguageEncoder | str | os.PathLike[str], *, check: bool = True, **load_kwargs: Any
) -> XlingPipeline:
    """Make ``pipe`` take prompts in the student's language.

    Args:
        pipe: a diffusers ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or a ControlNet /
            img2img / inpaint variant of them.
        encoder: a :class:`~xling.adapters.encoder.LanguageEncoder`, the path of a saved one, or a Hub repo id
            (``"org/name"``) holding one; loaded with
            ``LanguageEncoder.from_pretrained(encoder, device=pipe.device, **load_kwargs)``.
        check: verify the head's widths against the UNet (``cross_attention_dim``, SDXL pooled width).
        **load_kwargs: for a path or repo id, passed to ``LanguageEncoder.from_pretrained``: ``student_path=``
            (where a frozen or LoRA adapter's student lives now, when it moved), ``dtype=``, ``merged_lora=``,
            ``verify_hashes=False`` (a hand-made adapter whose configs record no SHA-256 of its weights), and for
            a repo id ``revision=``, ``subfolder=``, ``cache_dir=``, ``token=``, ``local_files_only=``,
            ``force_download=`` (``HF_HUB_OFFLINE=1`` loads the cached snapshot without a request).

    Returns:
        An :class:`XlingPipeline`: call it like the pipeline, with ``prompt`` in the student's language.

    Raises:
        WidthMismatchError: the head's ``teacher_width`` or ``pooled_width`` does not fit the pipeline; the
            message names each width that differs.
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
