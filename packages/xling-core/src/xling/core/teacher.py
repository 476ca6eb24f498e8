"""The frozen English teacher: tokenizer(s), text encoder(s), denoiser, VAE and noise scheduler of a diffusers
text-to-image model.

Seven families are supported (pipeline: denoiser; text encoders):

- ``sd1`` / ``sd2``: ``StableDiffusionPipeline``: ``UNet2DConditionModel``; CLIP ViT-L / OpenCLIP ViT-H.
- ``sdxl``: ``StableDiffusionXLPipeline``: ``UNet2DConditionModel``; CLIP-L + OpenCLIP-bigG.
- ``pixart``: ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``: ``PixArtTransformer2DModel``; T5.
- ``sana``: ``SanaPipeline``: ``SanaTransformer2DModel`` (``AutoencoderDC`` latents); Gemma 2.
- ``sd3``: ``StableDiffusion3Pipeline``: ``SD3Transformer2DModel`` (MMDiT); CLIP-L + CLIP-G + T5.
- ``flux``: ``FluxPipeline``: ``FluxTransformer2DModel`` (MMDiT); CLIP-L + T5.

The teacher's English conditioning is the target every recipe distils towards, so :meth:`Teacher.encode` and
:meth:`Teacher.encode_unconditional` reproduce the family's pipeline ``encode_prompt`` step for step, and
:meth:`Teacher.denoise` calls the denoiser as the pipeline's sampling loop does. Training noise follows
diffusers' training scripts: DDPM's forward process for the UNet families and PixArt, the rectified-flow
interpolation ``(1 - sigma) z0 + sigma noise`` with the velocity target ``noise - z0`` for Sana, SD3 and Flux.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from xling.core.conditioning import Conditioning
from xling.core.features import pea_blocks

if TYPE_CHECKING:
    from xling.core.joint_pivot import JointPivotTap
    from xling.core.pivot import AttentionFn, PivotTap

Family = Literal["sd1", "sd2", "sdxl", "pixart", "sana", "sd3", "flux"]

#: Families whose denoiser is a ``UNet2DConditionModel`` with ``attn2`` cross-attention.
UNET_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
#: Transformer families where text meets image in each block's ``attn2`` cross-attention.
CROSS_ATTENTION_DIT_FAMILIES: tuple[str, ...] = ("pixart", "sana")
#: Transformer families with one joint attention over [image; text] tokens.
MMDIT_FAMILIES: tuple[str, ...] = ("sd3", "flux")
#: Families trained with flow matching (velocity target) rather than DDPM noise prediction.
FLOW_FAMILIES: tuple[str, ...] = ("sana", "sd3", "flux")

_FAMILIES: tuple[str, ...] = UNET_FAMILIES + CROSS_ATTENTION_DIT_FAMILIES + MMDIT_FAMILIES

#: Components every UNet family needs; SDXL adds the second tokenizer and text encoder.
_REQUIRED: tuple[str, ...] = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
_REQUIRED_SDXL: tuple[str, ...] = ("text_encoder_2", "tokenizer_2")
#: Components of the transformer families.
_REQUIRED_DIT: dict[str, tuple[str, ...]] = {
    "pixart": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sana": ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"),
    "sd3": (
        "transformer",
        "vae",
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ),
    "flux": ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
}
#: Text encoders (and tokenizers) per family, by their component suffix: "" = ``text_encoder``.
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "sd1": ("",),
    "sd2": ("",),
    "sdxl": ("", "_2"),
    "pixart": ("",),
    "sana": ("",),
    "sd3": ("", "_2", "_3"),
    "flux": ("", "_2"),
}
#: The text-encoder class each slot falls back to when ``model_index.json`` does not name one.
_TEXT_ENCODER_FALLBACK: dict[str, tuple[str, ...]] = {
    "sd1": ("CLIPTextModel",),
    "sd2": ("CLIPTextModel",),
    "sdxl": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "pixart": ("T5EncoderModel",),
    "sana": ("Gemma2Model",),
    "sd3": ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
    "flux": ("CLIPTextModel", "T5EncoderModel"),
}
_DENOISER_FALLBACK: dict[str, str] = {
    "pixart": "PixArtTransformer2DModel",
    "sana": "SanaTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}
#: The pipelines' default ``max_sequence_length`` of the T5 / Gemma prompt (PixArt-Σ: 300, set at loading).
_DEFAULT_SEQUENCE_LENGTH: dict[str, int] = {"pixart": 120, "sana": 300, "sd3": 256, "flux": 512}
_PIXART_SIGMA_SEQUENCE_LENGTH = 300
#: ``FluxPipeline``'s guidance default (FLUX.1-dev's distilled guidance).
FLUX_DEFAULT_GUIDANCE = 3.5
#: ``FluxPipeline.default_sample_size``: its default image side is this many latents times the VAE factor.
_FLUX_DEFAULT_SAMPLE_SIZE = 128


class _Default:
    """Sentinel: "the pipeline's own default" where ``None`` already means "none"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def _is_local(path_or_id: str | os.PathLike[str]) -> bool:
    return Path(path_or_id).is_dir()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _load_model_index(path_or_id: str | os.PathLike[str], **hub_kwargs: Any) -> dict[str, Any] | None:
    """``model_index.json`` as a dict; ``None`` for a local directory without one."""
    if _is_local(path_or_id):
        index = Path(path_or_id) / "model_index.json"
        return _read_json(index) if index.is_file() else None
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(str(path_or_id), **hub_kwargs))


def _declared(index: Mapping[str, Any] | None, name: str) -> bool:
    """Whether ``model_index.json`` names a real class for component ``name`` (``[null, null]`` does not)."""
    if index is None or name not in index:
        return False
    entry = index[name]
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


#: SD3's T5 may be dropped, as diffusers documents: ``model_index.json`` then lists both as ``[null, null]``.
_DROPPABLE_T5: tuple[str, ...] = ("text_encoder_3", "tokenizer_3")


def _t5_dropped(index: Mapping[str, Any] | None) -> bool:
    """Whether an SD3 ``model_index.json`` records its T5 as dropped (both slots present and ``[null, null]``)."""
    return index is not None and all(name in index and not _declared(index, name) for name in _DROPPABLE_T5)


def _family_of_class(name: str) -> str | None:
    """The transformer family a pipeline or transformer class name belongs to; ``None`` for anything else."""
    if name.startswith("PixArt"):
        return "pixart"
    if name.startswith("Sana"):
        return "sana"
    if name.startswith(("StableDiffusion3", "SD3")):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    return None


def _transformer_family(
    index: Mapping[str, Any] | None, path_or_id: str | os.PathLike[str], **hub_kwargs: Any
) -> str | None:
    """PixArt / Sana / SD3 / Flux from ``model_index.json``'s ``_class_name``, else from the
    ``transformer/config.json`` ``_class_name``; ``None`` for a UNet model (or nothing recognisable)."""
    if index is not None:
        family = _family_of_class(str(index.get("_class_name", "")))
        if family is not None:
            return family
    if _is_local(path_or_id):
        config = Path(path_or_id) / "transformer" / "config.json"
        return _family_of_class(str(_read_json(config).get("_class_name", ""))) if config.is_file() else None
    if index is not None and not _declared(index, "transformer"):
        return None
    from diffusers import ModelMixin

    try:
        config = ModelMixin.load_config(str(path_or_id), subfolder="transformer", **hub_kwargs)
    except OSError:
        return None
    return _family_of_class(str(config.get("_class_name", "")))


def _is_sdxl(index: Mapping[str, Any] | None, path_or_id: str | os.PathLike[str]) -> bool:
    if index is not None:
        return "XL" in str(index.get("_class_name", "")) or _declared(index, "text_encoder_2")
    return _is_local(path_or_id) and (Path(path_or_id) / "text_encoder_2").is_dir()


def missing_components(path_or_id: str | os.PathLike[str]) -> list[str]:
    """The components a local diffusers directory lacks (``[]`` when complete, or for a Hub id).

    A component counts as present when ``model_index.json`` declares it and its subfolder exists and is not empty.
    What is required depends on the family: ``unet`` for SD 1.x / 2.x / SDXL (+ the second text encoder and
    tokenizer of SDXL), ``transformer`` for PixArt / Sana / SD3 / Flux, with SD3's three and Flux's two text
    encoders and tokenizers. SD3's T5 may be dropped as diffusers documents (``text_encoder_3`` and
    ``tokenizer_3`` both ``[null, null]``); the teacher then appends zeros in its place, as the pipeline does.

    Args:
        path_or_id: a local diffusers model directory (a Hub id is not checked here: its loaders report).

    Returns:
        Names such as ``"model_index.json"``, ``"text_encoder_2"``, in a stable order.
    """
    if not _is_local(path_or_id):
        return []
    root = Path(path_or_id)
    index = _load_model_index(root)
    missing = [] if index is not None else ["model_index.json"]
    family = _transformer_family(index, root)
    if family is not None:
        required = _REQUIRED_DIT[family]
    else:
        required = _REQUIRED + (_REQUIRED_SDXL if _is_sdxl(index, root) else ())
    for name in required:
        if family == "sd3" and name in _DROPPABLE_T5 and _t5_dropped(index):
            continue
        folder = root / name
        on_disk = folder.is_dir() and any(folder.iterdir())
        if not on_disk or (index is not None and not _declared(index, name)):
            missing.append(name)
    return missing


def detect_family(path_or_id: str | os.PathLike[str], **hub_kwargs: Any) -> Family:
    """Tell the seven families apart from the configs alone (no weights are read).

    Rules, in order: PixArt / Sana / SD3 / Flux when ``model_index.json``'s ``_class_name`` names their
    pipeline (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``, ``Sana*``, ``StableDiffusion3*``, ``Flux*``),
    or else when ``transformer/config.json``'s ``_class_name`` names their transformer; SDXL when the pipeline
    class names an XL pipeline or a second text encoder is declared; SD 2.x when the text encoder is 1024 wide
    or OpenCLIP-style (``hidden_act == "gelu"``; CLIP ViT-L of SD 1.x uses ``quick_gelu``) or the scheduler
    predicts ``v_prediction``; SD 1.x otherwise.

    Args:
        path_or_id: a diffusers model directory or Hub id.
        **hub_kwargs: Hub options every config loader takes (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``).

    Returns:
        ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"pixart"``, ``"sana"``, ``"sd3"`` or ``"flux"``.
    """
    index = _load_model_index(path_or_id, **hub_kwargs)
    family = _transformer_family(index, path_or_id, **hub_kwargs)
    if family is not None:
        return family  # type: ignore[return-value]
    if _is_sdxl(index, path_or_id):
        return "sdxl"
    from diffusers import DDPMScheduler
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(str(path_or_id), subfolder="text_encoder", **hub_kwargs)
    scheduler = DDPMScheduler.load_config(str(path_or_id), subfolder="scheduler", **hub_kwargs)
    return "sd2" if _is_sd2(getattr(text, "text_config", text), scheduler) else "sd1"


def _is_sd2(text_config: Any, scheduler_config: Mapping[str, Any]) -> bool:
    """SD 2.x: an OpenCLIP-style text encoder (1024 wide, or ``gelu`` where CLIP ViT-L of SD 1.x uses
    ``quick_gelu``), or a scheduler that predicts ``v_prediction``."""
    return (
        getattr(text_config, "hidden_size", None) == 1024
        or getattr(text_config, "hidden_act", None) == "gelu"
        or scheduler_config.get("prediction_type") == "v_prediction"
    )


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 takes ``dtype=``; 4.x took ``torch_dtype=`` (and would pass ``dtype`` on to the config)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _library_class(library: str, name: str | None, fallback: str) -> Any:
    """The class ``model_index.json`` names, from ``library``; ``fallback`` when the name is absent or unknown."""
    module = importlib.import_module(library)
    return getattr(module, name or fallback, None) or getattr(module, fallback)


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def sana_default_instruction() -> list[str] | None:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction`` (read from its signature, so it follows
    the installed diffusers), or ``None`` when that pipeline has no such argument."""
    from diffusers import SanaPipeline

    parameter = inspect.signature(SanaPipeline.__call__).parameters.get("complex_human_instruction")
    if parameter is None or parameter.default is inspect.Parameter.empty or not parameter.default:
        return None
    return list(parameter.default)


def flow_training_scheduler(scheduler: Any) -> Any:
    """The ``FlowMatchEulerDiscreteScheduler`` a flow family trains with, from its pipeline's scheduler.

    A ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux) is rebuilt from its own config. Sana's repos ship a
    ``DPMSolverMultistepScheduler`` in flow mode (``use_flow_sigmas``) whose shift is ``flow_shift``: the
    training scheduler gets ``shift = flow_shift`` and the same ``num_train_timesteps``, so the training sigmas
    are the ones that sampler spaces its steps over.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler.config)
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    shift = config.get("shift", config.get("flow_shift"))
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        shift=float(1.0 if shift is None else shift),
        use_dynamic_shifting=bool(config.get("use_dynamic_shifting", False)),
    )


def _flow_sigmas(scheduler: Any) -> Tensor:
    """``[N]`` training sigmas indexed by noise level: ``sigma[t] = shift(u)``, ``u = (t + 1) / N``.

    This is ``FlowMatchEulerDiscreteScheduler``'s grid at init (``sigmas``, there from high to low noise),
    reversed: ``shift(u) = s u / (1 + (s - 1) u)`` with the config's ``shift``, not applied when
    ``use_dynamic_shifting`` (the scheduler shifts per resolution at sampling then, not at init).
    """
    config = scheduler.config
    n = int(config.num_train_timesteps)
    u = torch.arange(1, n + 1, dtype=torch.float32) / n
    if not config.get("use_dynamic_shifting", False):
        s = float(config.get("shift", 1.0))
        u = s * u / (1 + (s - 1) * u)
    return u


class Teacher:
    """A frozen diffusers text-to-image model: the English teacher of every recipe.

    Every parameter has ``requires_grad=False`` and every module is in eval mode. The VAE stays in fp32 when
    the rest is fp16 and its config asks for ``force_upcast`` (the SD VAEs overflow in fp16), as the pipelines do.

    Attributes:
        family: one of :data:`Family`.
        denoiser: the frozen ``UNet2DConditionModel`` or transformer (``unet`` is the same object, so code
            written for the UNet families, such as ``PivotTap(teacher.unet)``, runs on every family).
        vae: the frozen ``AutoencoderKL`` (``AutoencoderDC`` for Sana).
        scheduler: the training noise scheduler: a ``DDPMScheduler`` built from the pipeline's scheduler config
            (same betas, ``prediction_type``, timestep spacing) for the DDPM families, a
            ``FlowMatchEulerDiscreteScheduler`` (:func:`flow_training_scheduler`) for the flow families.
        inference_scheduler: the pipeline's own scheduler (for sampling), or ``None`` when built from parts.
        tokenizers: the family's tokenizers, in the pipeline's order (``tokenizer``, ``tokenizer_2``, ...).
        text_encoders: the matching frozen text encoders.
        clip_skip: CLIP hidden layers skipped from the end, as in the pipelines' ``clip_skip`` (SD, SDXL, SD3);
            ``None`` = the default.
        force_zeros_for_empty_prompt: SDXL's rule that the unconditional embedding is all zeros.
        max_sequence_length: token length of the T5 / Gemma prompt (PixArt, Sana, SD3, Flux); ``None`` for the
            UNet families.
        guidance_scale: Flux's distilled guidance value, given to a ``guidance_embeds`` transformer.
        complex_human_instruction: Sana's instruction lines put before every prompt (``None``: none).
    """

    def __init__(
        self,
        *,
        vae: nn.Module,
        scheduler: Any,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[nn.Module],
        family: Family,
        unet: nn.Module | None = None,
        denoiser: nn.Module | None = None,
        inference_scheduler: Any | None = None,
        force_zeros_for_empty_prompt: bool = False,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
        guidance_scale: float = FLUX_DEFAULT_GUIDANCE,
        complex_human_instruction: Sequence[str] | None = DEFAULT,
    ) -> None:
        """Wrap already-loaded components; :meth:`from_pretrained` is the usual door.

        Args:
            vae: the VAE.
            scheduler: the training scheduler (see the class attributes); a flow family's non-flow-matching
                scheduler (Sana's DPM-Solver) goes through :func:`flow_training_scheduler`.
            tokenizers: the family's tokenizers in the pipeline's order.
            text_encoders: the matching text encoders.
            family: one of :data:`Family`.
            unet: the denoiser (the UNet families' name for it); give it or ``denoiser``, not both.
            denoiser: the denoiser (UNet or transformer).
            inference_scheduler: the pipeline's own scheduler.
            force_zeros_for_empty_prompt: SDXL's zero unconditional embedding.
            clip_skip: as the pipelines' ``clip_skip``.
            max_sequence_length: T5 / Gemma prompt length; ``None`` = the pipeline's default (PixArt 120,
                Sana 300, SD3 256, Flux 512; :meth:`from_pretrained` passes 300 for PixArt-Σ).
            guidance_scale: Flux's distilled guidance (``FluxPipeline``'s default 3.5).
            complex_human_instruction: Sana's instruction lines; default: ``SanaPipeline.__call__``'s default,
                ``None`` or ``[]``: none.

        Raises:
            ValueError: ``family`` unknown, the number of tokenizers/text encoders does not fit it, no (or two)
                denoisers, or a bad ``clip_skip`` / ``max_sequence_length``.
        """
        if family not in _FAMILIES:
            raise ValueError(f"`family` must be one of {', '.join(map(repr, _FAMILIES))}, got {family!r}")
        if (unet is None) == (denoiser is None):
            raise ValueError(
                "give the denoiser as `denoiser` (or, for the UNet families, `unet`), exactly once"
            )
        expected = len(_SUFFIXES[family])
        if family == "sd3" and len(tokenizers) == len(text_encoders) == 2:
            expected = 2  # T5 dropped: the pipeline appends zeros in its place
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(
                f"a {family} teacher needs {expected} tokenizer(s) and text encoder(s), "
                f"got {len(tokenizers)} and {len(text_encoders)}"
            )
        if clip_skip is not None and clip_skip < 0:
            raise ValueError(f"`clip_skip` must be None or >= 0, got {clip_skip}")
        if family in UNET_FAMILIES:
            if max_sequence_length is not None:
                raise ValueError(f"`max_sequence_length` is for the T5 / Gemma families, not {family}")
        else:
            if max_sequence_length is None:
                max_sequence_length = _DEFAULT_SEQUENCE_LENGTH[family]
            if max_sequence_length < 1 or (family == "flux" and max_sequence_length > 512):
                raise ValueError(
                    f"`max_sequence_length` must be in [1, {512 if family == 'flux' else 'inf'}) for {family}, "
                    f"got {max_sequence_length}"
                )
        self.family: Family = family
        self.denoiser: nn.Module = _freeze(denoiser if denoiser is not None else unet)  # type: ignore[arg-type]
        self.vae = _freeze(vae)
        self.text_encoders: list[nn.Module] = [_freeze(m) for m in text_encoders]
        self.tokenizers = list(tokenizers)
        if family in FLOW_FAMILIES and type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            scheduler = flow_training_scheduler(scheduler)  # e.g. Sana's flow-mode DPM-Solver, given as is
        self.scheduler = scheduler
        self.inference_scheduler = inference_scheduler
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.clip_skip = clip_skip
        self.max_sequence_length: int | None = max_sequence_length
        self.guidance_scale = float(guidance_scale)
        if complex_human_instruction is DEFAULT:
            complex_human_instruction = sana_default_instruction() if family == "sana" else None
        self.complex_human_instruction: list[str] | None = (
            list(complex_human_instruction) if complex_human_instruction else None
        )
        if family == "sana":
            # SanaPipeline sets right padding before every encoding: its select_index keeps the first token
            self.tokenizers[0].padding_side = "right"
        self._sigmas: Tensor | None = _flow_sigmas(scheduler) if family in FLOW_FAMILIES else None

    @property
    def unet(self) -> nn.Module:
        """The denoiser under the UNet families' name (the same object as :attr:`denoiser`, on every family)."""
        return self.denoiser

    @unet.setter
    def unet(self, module: nn.Module) -> None:
        self.denoiser = module

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        clip_skip: int | None = None,
        vae_dtype: torch.dtype | None = None,
        variant: str | None = None,
        max_sequence_length: int | None = None,
        guidance_scale: float = FLUX_DEFAULT_GUIDANCE,
        complex_human_instruction: Sequence[str] | None = DEFAULT,
        **hub_kwargs: Any,
    ) -> Teacher:
        """Load each component of a diffusers model directory (or Hub id) with its own ``from_pretrained``.

        The classes are the ones ``model_index.json`` names (``AutoencoderDC`` for Sana's VAE, ``T5EncoderModel``,
        ``Gemma2Model``, ...), falling back to each family's usual ones.

        Args:
            path_or_id: a local diffusers directory (``model_index.json`` + component subfolders) or a Hub id.
            dtype: weights dtype of the denoiser and text encoders (``torch.float32`` / ``float16`` / ``bfloat16``).
            device: where the modules live.
            clip_skip: as the pipelines' ``clip_skip`` (``None`` = the pipeline default).
            vae_dtype: VAE dtype; ``None`` = ``dtype``, except fp32 when ``dtype`` is fp16 and the VAE config sets
                ``force_upcast``.
            variant: weights variant of the models (``"fp16"`` loads ``*.fp16.safetensors``).
            max_sequence_length: T5 / Gemma prompt length; ``None``: the pipeline's default (PixArt-α 120,
                PixArt-Σ 300, Sana 300, SD3 256, Flux 512).
            guidance_scale: Flux's distilled guidance value (``FluxPipeline``'s default 3.5).
            complex_human_instruction: Sana's instruction lines (default: ``SanaPipeline``'s).
            **hub_kwargs: Hub options passed to every loader (``revision``, ``token``, ``cache_dir``,
                ``local_files_only``).

        Returns:
            The frozen teacher.

        Raises:
            FileNotFoundError: a local directory lacks components; the message lists all of them.
            OSError: a component has no safetensors weights (pickled checkpoints are refused).
            TypeError: ``dtype`` is not a floating ``torch.dtype``.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}")
        as_path = Path(os.fspath(path_or_id)).expanduser()
        if not as_path.is_dir() and (as_path.is_absolute() or str(path_or_id).startswith((".", "~"))):
            # clearly a local path, not a Hub id: say so instead of asking the Hub for it
            raise FileNotFoundError(f"no diffusers model directory at {os.fspath(path_or_id)}")
        missing = missing_components(path_or_id)
        if missing:
            raise FileNotFoundError(
                f"{os.fspath(path_or_id)} is not a complete diffusers text-to-image model: "
                f"missing {', '.join(missing)}"
            )
        import diffusers

        index = _load_model_index(path_or_id, **hub_kwargs) or {}
        family = detect_family(path_or_id, **hub_kwargs)
        source = str(path_or_id)
        text_kw = _transformers_dtype_kwarg(dtype)
        # safetensors only: a pickled checkpoint can run code when loaded
        weights_kw: dict[str, Any] = {"use_safetensors": True}
        if variant is not None:
            weights_kw["variant"] = variant

        def cls_name(name: str) -> str | None:
            entry = index.get(name)
            return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None

        tokenizers, text_encoders = [], []
        for suffix, fallback in zip(_SUFFIXES[family], _TEXT_ENCODER_FALLBACK[family], strict=True):
            if family == "sd3" and suffix == "_3" and _t5_dropped(index):
                continue
            tok_cls = _library_class("transformers", cls_name(f"tokenizer{suffix}"), "AutoTokenizer")
            tokenizers.append(tok_cls.from_pretrained(source, subfolder=f"tokenizer{suffix}", **hub_kwargs))
            te_cls = _library_class("transformers", cls_name(f"text_encoder{suffix}"), fallback)
            encoder = te_cls.from_pretrained(
                source, subfolder=f"text_encoder{suffix}", **text_kw, **weights_kw, **hub_kwargs
            )
            text_encoders.append(encoder.to(device=device, dtype=dtype))

        part = "unet" if family in UNET_FAMILIES else "transformer"
        denoiser_cls = _library_class(
            "diffusers", cls_name(part), _DENOISER_FALLBACK.get(family, "UNet2DConditionModel")
        )
        denoiser = denoiser_cls.from_pretrained(
            source, subfolder=part, torch_dtype=dtype, **weights_kw, **hub_kwargs
        )
        vae_cls = _library_class(
            "diffusers", cls_name("vae"), "AutoencoderDC" if family == "sana" else "AutoencoderKL"
        )
        vae = vae_cls.from_pretrained(source, subfolder="vae", **weights_kw, **hub_kwargs)
        if vae_dtype is None:
            upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
            vae_dtype = torch.float32 if upcast else dtype

        sched_cls = _library_class("diffusers", cls_name("scheduler"), "DDPMScheduler")
        inference_scheduler = sched_cls.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
        if max_sequence_length is None and str(index.get("_class_name", "")).startswith("PixArtSigma"):
            max_sequence_length = _PIXART_SIGMA_SEQUENCE_LENGTH
        return cls(
            denoiser=denoiser.to(device=device, dtype=dtype),
            vae=vae.to(device=device, dtype=vae_dtype),
            scheduler=_training_scheduler(family, inference_scheduler, diffusers),
            inference_scheduler=inference_scheduler,
            tokenizers=tokenizers,
            text_encoders=text_encoders,
            family=family,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale,
            complex_human_instruction=complex_human_instruction,
        )

    @classmethod
    def from_pipeline(
        cls,
        pipe: Any,
        *,
        family: Family | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int | None = None,
        guidance_scale: float = FLUX_DEFAULT_GUIDANCE,
        complex_human_instruction: Sequence[str] | None = DEFAULT,
    ) -> Teacher:
        """Wrap the components of an already-built diffusers pipeline (they are frozen in place).

        Args:
            pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``,
                ``PixArtSigmaPipeline``, ``SanaPipeline``, ``StableDiffusion3Pipeline`` or ``FluxPipeline``
                (anything with the same parts).
            family: override the detection (from the pipeline's class name, else ``"sdxl"`` when
                ``text_encoder_2`` exists, else ``"sd2"`` for an OpenCLIP-style or v-prediction model, else
                ``"sd1"``).
            clip_skip, max_sequence_length, guidance_scale, complex_human_instruction: as in
                :meth:`from_pretrained`.
        """
        import diffusers

        if family is None:
            family = _family_of_class(type(pipe).__name__)  # type: ignore[assignment]
            if family is None and getattr(pipe, "transformer", None) is not None:
                family = _family_of_class(type(pipe.transformer).__name__)  # type: ignore[assignment]
        if family is None:
            xl = getattr(pipe, "text_encoder_2", None) is not None
            is_sd2 = _is_sd2(pipe.text_encoder.config, pipe.scheduler.config)
            family = "sdxl" if xl else ("sd2" if is_sd2 else "sd1")
        if family not in _FAMILIES:
            raise ValueError(f"`family` must be one of {', '.join(map(repr, _FAMILIES))}, got {family!r}")
        suffixes = _SUFFIXES[family]
        if family == "sd3" and pipe.text_encoder_3 is None:
            suffixes = suffixes[:2]  # T5 dropped
        if max_sequence_length is None and type(pipe).__name__.startswith("PixArtSigma"):
            max_sequence_length = _PIXART_SIGMA_SEQUENCE_LENGTH
        return cls(
            denoiser=pipe.unet if family in UNET_FAMILIES else pipe.transformer,
            vae=pipe.vae,
            scheduler=_training_scheduler(family, pipe.scheduler, diffusers),
            inference_scheduler=pipe.scheduler,
            tokenizers=[getattr(pipe, f"tokenizer{s}") for s in suffixes],
            text_encoders=[getattr(pipe, f"text_encoder{s}") for s in suffixes],
            family=family,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale,
            complex_human_instruction=complex_human_instruction,
        )

    # ------------------------------------------------------------------ facts

    @property
    def components(self) -> dict[str, nn.Module]:
        """The frozen modules by their diffusers names: ``unet`` or ``transformer``, ``vae``, ``text_encoder``
        (+ ``text_encoder_2``, ``text_encoder_3``)."""
        part = "unet" if self.family in UNET_FAMILIES else "transformer"
        out: dict[str, nn.Module] = {part: self.denoiser, "vae": self.vae}
        for i, encoder in enumerate(self.text_encoders):
            out["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
        return out

    @property
    def device(self) -> torch.device:
        """Device of the denoiser."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Weights dtype of the denoiser."""
        return next(self.denoiser.parameters()).dtype

    @property
    def is_mmdit(self) -> bool:
        """SD3 / Flux: text and image tokens share one joint attention (no ``attn2`` cross-attention)."""
        return self.family in MMDIT_FAMILIES

    @property
    def flow_matching(self) -> bool:
        """Sana / SD3 / Flux: trained on ``(1 - sigma) z0 + sigma noise`` with the velocity target."""
        return self.family in FLOW_FAMILIES

    @property
    def needs_attention_mask(self) -> bool:
        """PixArt / Sana: the pipelines give the transformer the T5 / Gemma ``prompt_attention_mask``."""
        return self.family in CROSS_ATTENTION_DIT_FAMILIES

    @property
    def cross_attention_dim(self) -> int:
        """Width ``D`` of the ``prompt_embeds`` the denoiser takes: the UNet's ``cross_attention_dim``
        (768 / 1024 / 2048), PixArt / Sana ``caption_channels`` (T5 4096 / Gemma 2304), SD3 / Flux
        ``joint_attention_dim`` (4096)."""
        config = self.denoiser.config
        if self.family in UNET_FAMILIES:
            dim = config.cross_attention_dim
            return int(dim[0] if isinstance(dim, (list, tuple)) else dim)
        if self.family in CROSS_ATTENTION_DIT_FAMILIES:
            return int(config.caption_channels)
        return int(config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int | None:
        """Width ``P`` of the pooled text embedding: SDXL ``text_encoder_2.config.projection_dim``; SD3 / Flux the
        transformer's ``pooled_projection_dim`` (SD3: CLIP-L + CLIP-G projections, 2048; Flux: CLIP-L's pooler
        width, 768); ``None`` for SD 1.x / 2.x, PixArt and Sana (their denoisers take no pooled vector)."""
        if self.family == "sdxl":
            return int(self.text_encoders[-1].config.projection_dim)
        if self.family in MMDIT_FAMILIES:
            return int(self.denoiser.config.pooled_projection_dim)
        return None

    @property
    def num_train_timesteps(self) -> int:
        """``N``: training indices ``t`` are in ``[0, N)``, larger = noisier, for every family."""
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (the scheduler's), or
        ``"flow"`` (the velocity ``noise - z0``) for the flow families."""
        if self.flow_matching:
            return "flow"
        return str(self.scheduler.config.prediction_type)

    @property
    def latent_channels(self) -> int:
        """``C`` of the VAE latents (4 for the SD VAEs, 16 for SD3 / Flux, 32 for Sana's DC-AE)."""
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for the KL VAEs, 32 for Sana's DC-AE), as the pipelines count it."""
        config = self.vae.config
        blocks = config.get("encoder_block_out_channels") or config.get("block_out_channels")
        return 2 ** (len(blocks) - 1)

    @property
    def resolution(self) -> int:
        """Native image side in pixels: the denoiser's ``sample_size`` (in latents) times :attr:`vae_scale_factor`
        (512 / 768 / 1024 for SD, 1024 for SD3 and the 1024 px PixArt / Sana). Flux's transformer has no
        ``sample_size``: its pipeline's default side, ``128 * vae_scale_factor`` (1024 px), unless the config has
        one."""
        size = self.denoiser.config.get("sample_size", None)
        if size is None:
            size = _FLUX_DEFAULT_SAMPLE_SIZE
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        """Token length ``L`` of the teacher's ``prompt_embeds``: CLIP's 77 (SD, SDXL), the T5 / Gemma
        :attr:`max_sequence_length` (PixArt-α 120, Σ 300, Sana 300, Flux 512), CLIP's 77 + T5's 256 for SD3."""
        if self.family in UNET_FAMILIES:
            return int(self.tokenizers[0].model_max_length)
        assert self.max_sequence_length is not None  # set for every transformer family
        if self.family == "sd3":
            return int(self.tokenizers[0].model_max_length) + self.max_sequence_length
        return self.max_sequence_length

    def to(self, device: str | torch.device) -> Teacher:
        """Move every module to ``device`` (dtypes unchanged); returns ``self``."""
        for module in self.components.values():
            module.to(device)
        return self

    def feature_blocks(self) -> tuple[str, ...]:
        """PEA's feature-distillation blocks, as dotted names in :attr:`denoiser`.

        UNets: :func:`~xling.core.features.pea_blocks` (down, mid and up blocks). PixArt / Sana / SD3: every
        ``transformer_blocks.{i}``. Flux: every ``transformer_blocks.{i}`` then every
        ``single_transformer_blocks.{i}``.
        """
        if self.family in UNET_FAMILIES:
            return pea_blocks(self.denoiser)
        names = [f"transformer_blocks.{i}" for i in range(len(self.denoiser.transformer_blocks))]
        if self.family == "flux":
            names += [
                f"single_transformer_blocks.{i}" for i in range(len(self.denoiser.single_transformer_blocks))
            ]
        return tuple(names)

    def text_context_module(self) -> nn.Module | None:
        """The frozen module that maps ``prompt_embeds [B, L, D]`` to what every ``attn2`` sees ``[B, L, inner]``
        (:func:`~xling.core.pivot.caption_context_module`): PixArt's ``caption_projection``, Sana's
        ``caption_projection`` then ``caption_norm``; ``None`` for the UNets (``attn2`` reads ``prompt_embeds``
        itself) and the MMDiTs (no cross-attention)."""
        from xling.core.pivot import caption_context_module

        if self.family not in CROSS_ATTENTION_DIT_FAMILIES:
            return None
        return caption_context_module(self.denoiser)

    def pivot_tap(
        self, attention_fn: AttentionFn | None = None, *, fused: bool = False
    ) -> PivotTap | JointPivotTap:
        """The family's pivot tap on the denoiser (docs/families.md), not yet installed.

        UNets, PixArt, Sana: :class:`~xling.core.PivotTap` on every ``attn2`` (after the frozen caption projection
        on PixArt / Sana); SD3, Flux: :class:`~xling.core.JointPivotTap`, the teacher-forced joint attention.

        Args:
            attention_fn: the tap's attention function: the dual-attention contract
                ``(q, k1, v1, k2, v2, *, mask1, mask2, scale)`` for a ``PivotTap``, the joint one
                ``(q, k_img, v_img, k1, v1, k2, v2, *, mask1, mask2, scale)`` for a ``JointPivotTap``; ``None``: the
                tap's PyTorch default.
            fused: ``attention_fn`` returns the layer loss instead of the student output.
        """
        from xling.core.joint_pivot import JointPivotTap
        from xling.core.pivot import PivotTap

        if self.is_mmdit:
            return JointPivotTap(self.denoiser, attention_fn=attention_fn, fused=fused)
        return PivotTap(
            self.denoiser,
            attention_fn=attention_fn,
            fused=fused,
            context_module=self.text_context_module(),
            conditioning_dim=self.cross_attention_dim,
        )

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _prompt_list(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError(f"`{name}` is empty")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"`{name}` must be strings, got {', '.join(sorted(set(bad)))}")
        return prompts

    def _ids(self, tokenizer: Any, prompts: list[str], max_length: int) -> Any:
        return tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )

    def _encode_sd(self, prompts: list[str], clip_skip: int | None) -> Tensor:
        """SD 1.x / 2.x: ``StableDiffusionPipeline.encode_prompt``; ``[B, 77, D]``."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        device = next(encoder.parameters()).device
        inputs = self._ids(tokenizer, prompts, self.max_length)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(device)
        if clip_skip is None:
            embeds = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        else:
            out = encoder(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
            # the pipelines re-apply the final LayerNorm to the earlier layer's states; transformers >= 5.20
            # flattened CLIPTextModel (no .text_model), which diffusers 0.42's own clip_skip path still expects
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            embeds = final_norm(out.hidden_states[-(clip_skip + 1)])
        return embeds.to(dtype=encoder.dtype, device=self.device)

    def _encode_sdxl(self, prompts: list[str], clip_skip: int | None) -> tuple[Tensor, Tensor]:
        """SDXL: both encoders' penultimate (or ``clip_skip``-earlier) states concatenated, pooled from the last."""
        hidden: list[Tensor] = []
        pooled: Tensor | None = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            device = next(encoder.parameters()).device
            inputs = self._ids(tokenizer, prompts, int(tokenizer.model_max_length))
            out = encoder(inputs.input_ids.to(device), output_hidden_states=True)
            # only a projection model returns a 2-D first output: the pooled text_embeds [B, P]
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            index = -2 if clip_skip is None else -(clip_skip + 2)
            hidden.append(out.hidden_states[index].to(self.device))
        if pooled is None:
            raise ValueError(
                "no SDXL text encoder returned a pooled projection (expected CLIPTextModelWithProjection)"
            )
        dtype = self.text_encoders[-1].dtype
        return torch.cat(hidden, dim=-1).to(dtype=dtype), pooled.to(dtype=dtype, device=self.device)

    def _encode_t5_masked(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """PixArt-α/Σ: ``encode_prompt(..., clean_caption=False)``: lower-cased, stripped prompts, T5 states of
        ``max_sequence_length`` tokens with their padding mask; ``[B, L, D]`` and ``[B, L]``."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        device = next(encoder.parameters()).device
        prompts = [p.lower().strip() for p in prompts]
        inputs = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = inputs.attention_mask.to(device)
        embeds = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        return embeds.to(dtype=encoder.dtype, device=self.device), mask.to(self.device)

    def _encode_gemma(self, prompts: list[str], instruction: list[str] | None) -> tuple[Tensor, Tensor]:
        """Sana: ``_get_gemma_prompt_embeds`` then ``encode_prompt``'s ``select_index`` for the prompt side.

        With an instruction (the ``__call__`` default), it is joined by newlines and put before each lower-cased
        prompt; the window grows by its token count minus 2, and the first token ([BOS]) plus the last
        ``L - 1`` positions are kept, as ``encode_prompt`` does. Without one (the negative branch), ``L`` tokens
        are encoded and kept as they are. ``[B, L, D]`` and ``[B, L]``.
        """
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        device = next(encoder.parameters()).device
        length = int(self.max_sequence_length or 0)
        prompts = [p.lower().strip() for p in prompts]
        window = length
        if instruction:
            joined = "\n".join(instruction)
            prompts = [joined + p for p in prompts]
            window = len(tokenizer.encode(joined)) + length - 2
        tokenizer.padding_side = "right"
        inputs = tokenizer(
            prompts,
            padding="max_length",
            max_length=window,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = inputs.attention_mask.to(device)
        embeds = encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
        if instruction:
            keep = [0, *range(window - length + 1, window)]
            embeds, mask = embeds[:, keep], mask[:, keep]
        return embeds.to(dtype=encoder.dtype, device=self.device), mask.to(self.device)

    def _t5_states(self, tokenizer: Any, encoder: nn.Module, prompts: list[str]) -> Tensor:
        """SD3 / Flux: unmasked T5 states of ``max_sequence_length`` tokens ``[B, L_t5, D_t5]``."""
        device = next(encoder.parameters()).device
        ids = self._ids(tokenizer, prompts, int(self.max_sequence_length or 0)).input_ids
        return encoder(ids.to(device))[0].to(dtype=encoder.dtype, device=self.device)

    def _encode_sd3(self, prompts: list[str], clip_skip: int | None) -> tuple[Tensor, Tensor]:
        """SD3: CLIP-L and CLIP-G penultimate (or ``clip_skip``-earlier) states concatenated, zero-padded to the
        T5 width, then T5's states appended along the tokens; pooled = both CLIP projections concatenated.
        ``[B, 77 + L_t5, D_t5]`` and ``[B, P_l + P_g]``."""
        clip_length = int(self.tokenizers[0].model_max_length)  # the pipeline's tokenizer_max_length
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2], strict=True):
            device = next(encoder.parameters()).device
            ids = self._ids(tokenizer, prompts, clip_length).input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            index = -2 if clip_skip is None else -(clip_skip + 2)
            hidden.append(out.hidden_states[index].to(dtype=self.text_encoders[0].dtype, device=self.device))
        clip = torch.cat(hidden, dim=-1)
        if len(self.text_encoders) == 3:
            t5 = self._t5_states(self.tokenizers[2], self.text_encoders[2], prompts)
        else:  # T5 dropped: zeros of the transformer's width, as the pipeline's _get_t5_prompt_embeds
            width = int(self.denoiser.config.joint_attention_dim)
            t5 = clip.new_zeros(len(prompts), int(self.max_sequence_length or 0), width)
        # as the pipeline: F.pad to the T5 width (a CLIP concat wider than T5 would be cut, as there)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat([p.to(self.device) for p in pooled], dim=-1)

    def _encode_flux(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Flux: T5 states ``[B, L_t5, D_t5]`` and CLIP's ``pooler_output`` ``[B, D_clip]``."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        device = next(encoder.parameters()).device
        ids = self._ids(tokenizer, prompts, int(tokenizer.model_max_length)).input_ids
        pooled = encoder(ids.to(device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=encoder.dtype, device=self.device)
        return self._t5_states(self.tokenizers[1], self.text_encoders[1], prompts), pooled

    def _encode(self, prompts: list[str], *, negative: bool) -> Conditioning:
        """The positive (``negative=False``) or negative branch of the family's ``encode_prompt``."""
        clip_skip = None if negative else self.clip_skip  # the pipelines encode negatives without clip_skip
        if self.family == "sdxl":
            return Conditioning(*self._encode_sdxl(prompts, clip_skip))
        if self.family == "pixart":
            embeds, mask = self._encode_t5_masked(prompts)
            return Conditioning(embeds, None, mask)
        if self.family == "sana":
            embeds, mask = self._encode_gemma(prompts, None if negative else self.complex_human_instruction)
            return Conditioning(embeds, None, mask)
        if self.family == "sd3":
            return Conditioning(*self._encode_sd3(prompts, clip_skip))
        if self.family == "flux":
            return Conditioning(*self._encode_flux(prompts))
        return Conditioning(self._encode_sd(prompts, clip_skip))

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> Conditioning:
        """English conditioning for ``prompts``, equal to what the family's pipeline encodes by default.

        SD / SDXL / SD3 / Flux: ``encode_prompt(prompt)``. PixArt: ``encode_prompt(prompt, clean_caption=False)``:
        the pipelines' default ``clean_caption=True`` is text preprocessing outside the model that needs the
        optional ``bs4`` and ``ftfy`` (without them the pipelines fall back to ``False`` too), so the teacher
        lower-cases and strips as the ``False`` branch does. Sana: ``encode_prompt`` with ``__call__``'s default
        ``complex_human_instruction`` (``encode_prompt``'s own default is none; :attr:`complex_human_instruction`).

        Args:
            prompts: ``B`` English prompts.

        Returns:
            ``prompt_embeds [B, L, D]`` (``L`` = :attr:`max_length`, ``D`` = :attr:`cross_attention_dim`);
            ``pooled_prompt_embeds [B, P]`` for SDXL / SD3 / Flux; ``attention_mask [B, L]`` (the pipelines'
            ``prompt_attention_mask``, 1 = token) for PixArt / Sana.
        """
        return self._encode(self._prompt_list(prompts), negative=False)

    @torch.no_grad()
    def encode_unconditional(
        self, batch_size: int = 1, negative_prompts: Sequence[str] | None = None
    ) -> Conditioning:
        """The classifier-free-guidance branch, as the family's ``encode_prompt`` makes it.

        With no ``negative_prompts``: the empty prompt (PixArt / Sana / SD3 default ``negative_prompt=""``), or all
        zeros for SDXL with ``force_zeros_for_empty_prompt``. The pipelines encode negatives without ``clip_skip``
        and, for Sana, without the complex human instruction and without ``select_index``; so does this. Flux's
        pipeline has no unconditional branch by default (its guidance is distilled); with ``true_cfg_scale`` it
        encodes the negative prompt through ``encode_prompt`` like a positive one, which is what this returns
        (for ``""`` when no negative prompts are given).

        Args:
            batch_size: ``B`` when ``negative_prompts`` is ``None``.
            negative_prompts: ``B`` negative prompts instead of the empty one.

        Returns:
            As :meth:`encode`.
        """
        if negative_prompts is None:
            if batch_size < 1:
                raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
            if self.family == "sdxl" and self.force_zeros_for_empty_prompt:
                dtype = self.text_encoders[-1].dtype
                embeds = torch.zeros(batch_size, self.max_length, self.cross_attention_dim, dtype=dtype)
                pooled = torch.zeros(batch_size, int(self.pooled_dim or 0), dtype=dtype)
                return Conditioning(embeds.to(self.device), pooled.to(self.device))
            prompts = [""] * batch_size
        else:
            prompts = self._prompt_list(negative_prompts, "negative_prompts")
        return self._encode(prompts, negative=True)

    @torch.no_grad()
    def encode_images(
        self,
        pixels: Tensor,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample: bool = True,
    ) -> Tensor:
        """VAE latents of images, scaled as the denoiser expects them.

        KL VAEs: ``latents = (z - shift_factor) * scaling_factor`` with ``z`` a sample of (or, with
        ``sample=False``, the mode of) the VAE posterior; ``shift_factor`` is 0 for the SD VAEs (SD3 and Flux
        have one). Sana's ``AutoencoderDC`` is deterministic (no posterior; ``generator`` and ``sample`` do not
        apply): ``latents = encode(x).latent * scaling_factor``, as diffusers' Sana training script scales them.

        Args:
            pixels: ``[B, 3, H, W]`` images in ``[-1, 1]``, ``H`` and ``W`` multiples of :attr:`vae_scale_factor`.
            generator: RNG for the posterior sample, or one per image (``B`` CPU generators).
            sample: sample the posterior (training) or take its mode (deterministic caches).

        Returns:
            ``[B, C, H / f, W / f]`` latents in the denoiser's dtype, ``f`` = :attr:`vae_scale_factor`.
        """
        if not isinstance(pixels, Tensor):
            raise TypeError(f"`pixels` must be a Tensor, got {type(pixels).__name__}")
        f = self.vae_scale_factor
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(
                f"`pixels` must be [B, 3, H, W] with H, W multiples of {f}, got {tuple(pixels.shape)}"
            )
        vae_param = next(self.vae.parameters())
        encoded = self.vae.encode(pixels.to(device=vae_param.device, dtype=vae_param.dtype))
        posterior = getattr(encoded, "latent_dist", None)
        if posterior is None:
            z = encoded.latent  # AutoencoderDC: deterministic latents
        else:
            z = posterior.sample(generator=generator) if sample else posterior.mode()
        shift = self.vae.config.get("shift_factor", None) or 0.0
        latents = (z - shift) * self.vae.config.scaling_factor
        return latents.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ noise

    def _check_timesteps(self, t: Tensor, batch: int | None = None, name: str = "t") -> None:
        if not isinstance(t, Tensor) or t.ndim != 1 or t.is_floating_point() or t.is_complex():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"`{name}` must be a [B] integer tensor of training indices, got {shape}")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(f"`{name}` has {t.shape[0]} indices for a batch of {batch}")
        n = self.num_train_timesteps
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(
                f"`{name}` must be in [0, {n}) for this {self.family} teacher, got [{int(t.min())}, {int(t.max())}]"
            )

    def _check_pair(self, z0: Tensor, noise: Tensor, t: Tensor) -> None:
        if z0.shape != noise.shape:
            raise ValueError(
                f"`z0` {tuple(z0.shape)} and `noise` {tuple(noise.shape)} must have the same shape"
            )
        if z0.ndim < 2:
            raise ValueError(f"`z0` must be [B, ...] latents, got {tuple(z0.shape)}")
        self._check_timesteps(t, z0.shape[0])

    def sigmas(self, t: Tensor) -> Tensor:
        """Flow families: ``sigma(t)`` ``[B]`` (fp32) on the training grid ``shift((t + 1) / N)``, increasing with
        ``t`` (see :func:`_flow_sigmas`).

        Raises:
            ValueError: a DDPM family (no sigma grid), or ``t`` not a ``[B]`` integer tensor in ``[0, N)``.
        """
        if self._sigmas is None:
            raise ValueError(
                f"a {self.family} teacher is trained with DDPM noise, not on a flow-matching sigma grid"
            )
        self._check_timesteps(t)
        return self._sigmas.to(t.device)[t.long()]

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noised latents ``z_t`` at training indices ``t`` (larger = noisier, every family).

        DDPM families: ``scheduler.add_noise`` (``sqrt(a_t) z0 + sqrt(1 - a_t) noise``). Flow families:
        ``(1 - sigma) z0 + sigma noise`` with ``sigma`` = :meth:`sigmas` ``(t)``, as diffusers' SD3 / Flux / Sana
        training scripts interpolate.

        Args:
            z0: ``[B, C, h, w]`` clean latents.
            noise: same shape.
            t: ``[B]`` integer training indices in ``[0, num_train_timesteps)``.

        Returns:
            ``z_t`` with ``z0``'s shape and dtype.
        """
        self._check_pair(z0, noise, t)
        if self._sigmas is None:
            return self.scheduler.add_noise(z0, noise, t.to(z0.device))
        sigma = self.sigmas(t.to(z0.device)).to(z0.dtype).view(-1, *([1] * (z0.ndim - 1)))
        return (1 - sigma) * z0 + sigma * noise

    def denoising_target(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser should predict for :meth:`add_noise` ``(z0, noise, t)``.

        ``epsilon``: ``noise``; ``v_prediction``: ``sqrt(a_t) noise - sqrt(1 - a_t) z0``; ``sample``: ``z0``;
        ``flow``: ``noise - z0``.

        Args:
            z0: ``[B, C, h, w]`` clean latents.
            noise: same shape.
            t: ``[B]`` integer training indices.

        Returns:
            The target, with ``noise``'s shape and dtype.
        """
        self._check_pair(z0, noise, t)
        kind = self.prediction_type
        if kind in ("flow", "epsilon"):
            return noise - z0 if kind == "flow" else noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(z0, noise, t.to(z0.device))
        if kind == "sample":
            return z0
        raise ValueError(f"unknown prediction_type {kind!r} of the {self.family} teacher's scheduler")

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the denoiser's ``timestep`` argument gets for training indices ``t`` ``[B]``, as the pipelines
        pass it: DDPM families the index itself; SD3 ``sigma * N`` (the flow scheduler's timesteps); Sana
        ``sigma * N * timestep_scale``; Flux ``sigma * N / 1000`` (its pipeline divides the timesteps by 1000).
        """
        if self._sigmas is None:
            self._check_timesteps(t)
            return t
        timesteps = self.sigmas(t) * self.num_train_timesteps
        if self.family == "sana":
            timesteps = timesteps * float(self.denoiser.config.get("timestep_scale", 1.0))
        elif self.family == "flux":
            timesteps = timesteps / 1000
        return timesteps

    # ------------------------------------------------------------------ denoising

    def add_time_ids(
        self,
        batch_size: int,
        *,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> Tensor | None:
        """SDXL's added time ids ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``, one row per sample.

        Args:
            batch_size: ``B``.
            original_size: the training image's size before cropping; default ``(resolution, resolution)``.
            crops_coords_top_left: the crop's top-left corner.
            target_size: the generated size; default ``(resolution, resolution)``.

        Returns:
            ``[B, 6]`` in the UNet's dtype, or ``None`` for every other family (no added time ids).

        Raises:
            ValueError: the UNet's ``add_embedding`` width does not match ``6 * addition_time_embed_dim + P``.
        """
        if self.family != "sdxl":
            return None
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        side = (self.resolution, self.resolution)
        ids = list((original_size or side) + tuple(crops_coords_top_left) + (target_size or side))
        passed = self.unet.config.addition_time_embed_dim * len(ids) + int(self.pooled_dim or 0)
        expected = self.unet.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"the UNet's added embedding takes {expected} values but 6 time ids and the pooled width give {passed}"
            )
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(batch_size, 1)

    def added_cond_kwargs(
        self, conditioning: Conditioning, time_ids: Tensor | None = None
    ) -> dict[str, Tensor] | None:
        """``added_cond_kwargs`` for ``unet(...)``: SDXL's ``text_embeds`` + ``time_ids``; ``None`` otherwise.

        Args:
            conditioning: the teacher's (or a student's) conditioning with ``pooled_prompt_embeds [B, P]`` for SDXL.
            time_ids: ``[B, 6]`` per-row time ids; ``None``: :meth:`add_time_ids`' square defaults.
        """
        if self.family != "sdxl":
            return None
        pooled = conditioning.pooled_prompt_embeds
        if pooled is None:
            raise ValueError("an SDXL UNet needs `pooled_prompt_embeds`, got None")
        if time_ids is None:
            time_ids = self.add_time_ids(pooled.shape[0])
        elif tuple(time_ids.shape) != (pooled.shape[0], 6):
            raise ValueError(
                f"`time_ids` must be [B, 6] = {(pooled.shape[0], 6)}, got {tuple(time_ids.shape)}"
            )
        return {
            "text_embeds": pooled.to(self.dtype),
            "time_ids": time_ids.to(device=self.device, dtype=self.dtype),
        }

    def pooled(self, prompts: str | Sequence[str], conditioning: Conditioning | None = None) -> Tensor:
        """The teacher's pooled text vector ``[B, P]``, the one AltDiffusion distils.

        SDXL / SD3 / Flux: its ``pooled_prompt_embeds`` (taken from ``conditioning`` when given). SD 1.x / 2.x: the
        final-layer [EOS] state of the CLIP text encoder (``pooler_output``), which the UNet itself never reads.

        Args:
            prompts: ``B`` English prompts.
            conditioning: :meth:`encode` of the same prompts, to save a second encoding.

        Raises:
            ValueError: PixArt / Sana, whose T5 / Gemma conditioning has no pooled text vector.
        """
        if self.family in CROSS_ATTENTION_DIT_FAMILIES:
            raise ValueError(
                f"a {self.family} teacher has no pooled text vector (its T5 / Gemma conditioning is per token), "
                "so AltDiffusion's pooled distillation target does not exist for it"
            )
        if self.family in ("sdxl", *MMDIT_FAMILIES):
            conditioning = conditioning or self.encode(prompts)
            if conditioning.pooled_prompt_embeds is None:
                raise ValueError(f"a {self.family} conditioning needs `pooled_prompt_embeds`, got None")
            return conditioning.pooled_prompt_embeds
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = self._ids(tokenizer, self._prompt_list(prompts), self.max_length).input_ids
        with torch.no_grad():
            return encoder(ids.to(next(encoder.parameters()).device)).pooler_output

    def _check_denoise_inputs(self, latents: Tensor, conditioning: Conditioning) -> None:
        if latents.ndim != 4:
            raise ValueError(f"`latents` must be [B, C, h, w], got {tuple(latents.shape)}")
        embeds = conditioning.prompt_embeds
        if embeds.ndim != 3 or embeds.shape[0] != latents.shape[0]:
            raise ValueError(
                f"`prompt_embeds` must be [B, L, D] with B = {latents.shape[0]}, got {tuple(embeds.shape)}"
            )
        if embeds.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"the {self.family} denoiser takes prompt_embeds of width {self.cross_attention_dim}, "
                f"got {embeds.shape[-1]}"
            )

    def _pooled_for(self, conditioning: Conditioning, batch: int) -> Tensor:
        pooled = conditioning.pooled_prompt_embeds
        if pooled is None or tuple(pooled.shape) != (batch, self.pooled_dim):
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(
                f"a {self.family} denoiser needs pooled_prompt_embeds [B, P] = {(batch, self.pooled_dim)}, got {got}"
            )
        return pooled.to(self.dtype)

    def _denoise_dit(
        self, latents: Tensor, t: Tensor, conditioning: Conditioning, attention_mask: Tensor | None
    ) -> Tensor:
        """PixArt / Sana: as their pipelines call the transformer (mask, added conditions, learned sigma)."""
        mask = attention_mask if attention_mask is not None else conditioning.attention_mask
        embeds = conditioning.prompt_embeds.to(self.dtype)
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                f"`attention_mask` must be [B, L] = {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}"
            )
        kwargs: dict[str, Any] = {}
        if self.family == "pixart":
            # PixArt-α's 1024 px checkpoints embed the image size and aspect ratio (in pixels) with the timestep
            added: dict[str, Tensor | None] = {"resolution": None, "aspect_ratio": None}
            if getattr(self.denoiser, "use_additional_conditions", False):
                b, f = latents.shape[0], self.vae_scale_factor
                height, width = latents.shape[-2] * f, latents.shape[-1] * f
                added = {
                    "resolution": torch.tensor(
                        [[height, width]], dtype=embeds.dtype, device=self.device
                    ).repeat(b, 1),
                    "aspect_ratio": torch.tensor(
                        [[height / width]], dtype=embeds.dtype, device=self.device
                    ).repeat(b, 1),
                }
            kwargs["added_cond_kwargs"] = added
        out = self.denoiser(
            latents.to(self.dtype),
            encoder_hidden_states=embeds,
            encoder_attention_mask=None if mask is None else mask.to(self.device),
            timestep=self.model_timesteps(t).to(self.device),
            return_dict=False,
            **kwargs,
        )[0]
        # learned sigma: the second half of the channels is the variance, the pipelines keep the first
        if self.denoiser.config.out_channels // 2 == latents.shape[1]:
            out = out.chunk(2, dim=1)[0]
        return out

    def _denoise_sd3(self, latents: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        return self.denoiser(
            hidden_states=latents.to(self.dtype),
            timestep=self.model_timesteps(t).to(self.device),
            encoder_hidden_states=conditioning.prompt_embeds.to(self.dtype),
            pooled_projections=self._pooled_for(conditioning, latents.shape[0]),
            return_dict=False,
        )[0]

    def _denoise_flux(self, latents: Tensor, t: Tensor, conditioning: Conditioning) -> Tensor:
        """Flux: 2x2 patches packed into tokens ``[B, h/2 * w/2, 4C]`` with their (0, row, col) ids, text ids
        all zeros, the distilled guidance value when the transformer embeds it, and the output unpacked."""
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: `latents` h and w must be even, got {(h, w)}")
        packed = latents.to(self.dtype).view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(device=self.device, dtype=self.dtype)
        embeds = conditioning.prompt_embeds.to(self.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=self.device, dtype=torch.float32)
        out = self.denoiser(
            hidden_states=packed,
            timestep=self.model_timesteps(t).to(device=self.device, dtype=self.dtype),
            guidance=guidance,
            pooled_projections=self._pooled_for(conditioning, b),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)

    def denoise(
        self,
        latents: Tensor,
        timesteps: Tensor,
        conditioning: Conditioning,
        *,
        attention_mask: Tensor | None = None,
        time_ids: Tensor | None = None,
    ) -> Tensor:
        """One denoiser forward as the family's pipeline makes it, with whatever taps are installed.

        Inputs are cast to the denoiser's dtype; gradients flow wherever the inputs (or trainable weights) ask.
        The denoiser gets :meth:`model_timesteps` ``(timesteps)``. PixArt: the added resolution / aspect-ratio
        conditions when the transformer uses them, and the epsilon half of a learned-sigma output. SD3: the pooled
        projections. Flux: the packed latents, their ids and the guidance value, unpacked on the way out.

        Args:
            latents: ``[B, C, h, w]`` noisy latents.
            timesteps: ``[B]`` integer training indices in ``[0, num_train_timesteps)``.
            conditioning: ``prompt_embeds [B, L, D]`` (+ ``pooled_prompt_embeds [B, P]`` for SDXL / SD3 / Flux).
            attention_mask: ``[B, L]`` key padding mask of ``prompt_embeds`` (1 = attend). UNets: ``None`` means
                every position attends, as at generation. PixArt / Sana: ``None`` means
                ``conditioning.attention_mask``, the pipeline's T5 / Gemma mask. SD3 / Flux take none.
            time_ids: SDXL's ``[B, 6]`` added time ids; ``None``: the square defaults of :meth:`add_time_ids`.

        Returns:
            The prediction ``[B, C, h, w]`` (epsilon, v, x0 or the flow velocity: :attr:`prediction_type`).

        Raises:
            ValueError: shapes or widths that do not fit the denoiser, or a mask for SD3 / Flux.
        """
        if self.family in UNET_FAMILIES:
            # unchecked, as before the transformer families: the UNet and its processors report their own errors
            return self.unet(
                latents.to(self.dtype),
                timesteps,
                encoder_hidden_states=conditioning.prompt_embeds.to(self.dtype),
                encoder_attention_mask=attention_mask,
                added_cond_kwargs=self.added_cond_kwargs(conditioning, time_ids),
            ).sample
        self._check_denoise_inputs(latents, conditioning)
        self._check_timesteps(timesteps, latents.shape[0], "timesteps")
        if self.family in CROSS_ATTENTION_DIT_FAMILIES:
            return self._denoise_dit(latents, timesteps, conditioning, attention_mask)
        if attention_mask is not None:
            raise ValueError(
                f"the {self.family} pipeline gives its joint attention no text padding mask; pass attention_mask=None"
            )
        if self.family == "sd3":
            return self._denoise_sd3(latents, timesteps, conditioning)
        return self._denoise_flux(latents, timesteps, conditioning)

    def __repr__(self) -> str:
        return (
            f"Teacher(family={self.family!r}, cross_attention_dim={self.cross_attention_dim}, "
            f"pooled_dim={self.pooled_dim}, max_length={self.max_length}, resolution={self.resolution}, "
            f"prediction_type={self.prediction_type!r}, dtype={self.dtype}, device={self.device})"
        )


def _training_scheduler(family: str, scheduler: Any, diffusers: Any) -> Any:
    """The training scheduler of ``family`` from its pipeline's scheduler: DDPM's forward process over the same
    betas and prediction type (as the diffusers training scripts build it with
    ``DDPMScheduler.from_pretrained(..., subfolder="scheduler")``), or :func:`flow_training_scheduler`."""
    if family in FLOW_FAMILIES:
        return flow_training_scheduler(scheduler)
    return diffusers.DDPMScheduler.from_config(scheduler.config)
