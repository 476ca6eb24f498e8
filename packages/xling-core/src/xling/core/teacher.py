"""The frozen English teacher: tokenizer(s), text encoder(s), UNet, VAE and noise scheduler of an SD1/SD2/SDXL model.

The teacher's English conditioning is the target every recipe distils towards, so :meth:`Teacher.encode` and
:meth:`Teacher.encode_unconditional` reproduce the pipelines' own ``encode_prompt`` step for step
(``StableDiffusionPipeline`` for SD 1.x / 2.x, ``StableDiffusionXLPipeline`` for SDXL).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xling.core.conditioning import Conditioning

Family = Literal["sd1", "sd2", "sdxl"]

#: Components every family needs; SDXL adds the second tokenizer and text encoder.
_REQUIRED: tuple[str, ...] = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
_REQUIRED_SDXL: tuple[str, ...] = ("text_encoder_2", "tokenizer_2")


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


def _is_sdxl(index: Mapping[str, Any] | None, path_or_id: str | os.PathLike[str]) -> bool:
    if index is not None:
        return "XL" in str(index.get("_class_name", "")) or _declared(index, "text_encoder_2")
    return _is_local(path_or_id) and (Path(path_or_id) / "text_encoder_2").is_dir()


def missing_components(path_or_id: str | os.PathLike[str]) -> list[str]:
    """The components a local diffusers directory lacks (``[]`` when complete, or for a Hub id).

    A component counts as present when ``model_index.json`` declares it and its subfolder exists and is not empty.

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
    required = _REQUIRED + (_REQUIRED_SDXL if _is_sdxl(index, root) else ())
    for name in required:
        folder = root / name
        on_disk = folder.is_dir() and any(folder.iterdir())
        if not on_disk or (index is not None and not _declared(index, name)):
            missing.append(name)
    return missing


def detect_family(path_or_id: str | os.PathLike[str], **hub_kwargs: Any) -> Family:
    """Tell SD 1.x, SD 2.x and SDXL apart from the configs alone (no weights are read).

    Rules, in order: SDXL when ``model_index.json``'s ``_class_name`` names an XL pipeline or a second text
    encoder is declared; SD 2.x when the text encoder is 1024 wide or OpenCLIP-style (``hidden_act == "gelu"``;
    CLIP ViT-L of SD 1.x uses ``quick_gelu``) or the scheduler predicts ``v_prediction``; SD 1.x otherwise.

    Args:
        path_or_id: a diffusers model directory or Hub id.
        **hub_kwargs: Hub options every config loader takes (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``).

    Returns:
        ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
    """
    index = _load_model_index(path_or_id, **hub_kwargs)
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


class Teacher:
    """A frozen diffusers text-to-image model: the English teacher of every recipe.

    Every parameter has ``requires_grad=False`` and every module is in eval mode. The VAE stays in fp32 when
    the rest is fp16 and its config asks for ``force_upcast`` (the SD VAEs overflow in fp16), as the pipelines do.

    Attributes:
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        unet: the frozen ``UNet2DConditionModel``.
        vae: the frozen ``AutoencoderKL``.
        scheduler: the training noise scheduler, a ``DDPMScheduler`` built from the pipeline's scheduler config
            (same betas, ``prediction_type``, timestep spacing).
        inference_scheduler: the pipeline's own scheduler (for sampling), or ``None`` when built from parts.
        tokenizers: one tokenizer (SD 1.x / 2.x) or two (SDXL).
        text_encoders: the matching frozen text encoders.
        clip_skip: hidden layers skipped from the end, as in the pipelines' ``clip_skip``; ``None`` = the default.
        force_zeros_for_empty_prompt: SDXL's rule that the unconditional embedding is all zeros.
    """

    def __init__(
        self,
        *,
        unet: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[nn.Module],
        family: Family,
        inference_scheduler: Any | None = None,
        force_zeros_for_empty_prompt: bool = False,
        clip_skip: int | None = None,
    ) -> None:
        """Wrap already-loaded components; :meth:`from_pretrained` is the usual door.

        Raises:
            ValueError: ``family`` unknown, or the number of tokenizers/text encoders does not fit it.
        """
        if family not in ("sd1", "sd2", "sdxl"):
            raise ValueError(f"`family` must be 'sd1', 'sd2' or 'sdxl', got {family!r}")
        expected = 2 if family == "sdxl" else 1
        if len(tokenizers) != expected or len(text_encoders) != expected:
            raise ValueError(
                f"a {family} teacher needs {expected} tokenizer(s) and text encoder(s), "
                f"got {len(tokenizers)} and {len(text_encoders)}"
            )
        if clip_skip is not None and clip_skip < 0:
            raise ValueError(f"`clip_skip` must be None or >= 0, got {clip_skip}")
        self.family: Family = family
        self.unet = _freeze(unet)
        self.vae = _freeze(vae)
        self.text_encoders: list[nn.Module] = [_freeze(m) for m in text_encoders]
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.inference_scheduler = inference_scheduler
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.clip_skip = clip_skip

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
        **hub_kwargs: Any,
    ) -> Teacher:
        """Load each component of a diffusers model directory (or Hub id) with its own ``from_pretrained``.

        Args:
            path_or_id: a local diffusers directory (``model_index.json`` + component subfolders) or a Hub id.
            dtype: weights dtype of the UNet and text encoders (``torch.float32`` / ``float16`` / ``bfloat16``).
            device: where the modules live.
            clip_skip: as the pipelines' ``clip_skip`` (``None`` = the pipeline default).
            vae_dtype: VAE dtype; ``None`` = ``dtype``, except fp32 when ``dtype`` is fp16 and the VAE config sets
                ``force_upcast``.
            variant: weights variant of the models (``"fp16"`` loads ``*.fp16.safetensors``).
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

        names = ("", "_2") if family == "sdxl" else ("",)
        tokenizers, text_encoders = [], []
        for suffix in names:
            tok_cls = _library_class("transformers", cls_name(f"tokenizer{suffix}"), "AutoTokenizer")
            tokenizers.append(tok_cls.from_pretrained(source, subfolder=f"tokenizer{suffix}", **hub_kwargs))
            fallback = "CLIPTextModelWithProjection" if suffix else "CLIPTextModel"
            te_cls = _library_class("transformers", cls_name(f"text_encoder{suffix}"), fallback)
            encoder = te_cls.from_pretrained(
                source, subfolder=f"text_encoder{suffix}", **text_kw, **weights_kw, **hub_kwargs
            )
            text_encoders.append(encoder.to(device=device, dtype=dtype))

        unet_cls = _library_class("diffusers", cls_name("unet"), "UNet2DConditionModel")
        unet = unet_cls.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **weights_kw, **hub_kwargs
        )
        vae_cls = _library_class("diffusers", cls_name("vae"), "AutoencoderKL")
        vae = vae_cls.from_pretrained(source, subfolder="vae", **weights_kw, **hub_kwargs)
        if vae_dtype is None:
            upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
            vae_dtype = torch.float32 if upcast else dtype

        sched_cls = _library_class("diffusers", cls_name("scheduler"), "DDPMScheduler")
        inference_scheduler = sched_cls.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
        # Training adds noise with DDPM's forward process over the same betas and prediction type, as the
        # diffusers training scripts do (DDPMScheduler.from_pretrained(..., subfolder="scheduler")).
        scheduler = diffusers.DDPMScheduler.from_config(inference_scheduler.config)

        return cls(
            unet=unet.to(device=device, dtype=dtype),
            vae=vae.to(device=device, dtype=vae_dtype),
            scheduler=scheduler,
            inference_scheduler=inference_scheduler,
            tokenizers=tokenizers,
            text_encoders=text_encoders,
            family=family,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
            clip_skip=clip_skip,
        )

    @classmethod
    def from_pipeline(
        cls, pipe: Any, *, family: Family | None = None, clip_skip: int | None = None
    ) -> Teacher:
        """Wrap the components of an already-built diffusers SD / SDXL pipeline (they are frozen in place).

        Args:
            pipe: a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (anything with the same parts).
            family: override the detection (``"sdxl"`` when ``text_encoder_2`` exists, else ``"sd2"`` for an
                OpenCLIP-style or v-prediction model, else ``"sd1"``).
            clip_skip: as in :meth:`from_pretrained`.
        """
        from diffusers import DDPMScheduler

        xl = getattr(pipe, "text_encoder_2", None) is not None
        if family is None:
            is_sd2 = _is_sd2(pipe.text_encoder.config, pipe.scheduler.config)
            family = "sdxl" if xl else ("sd2" if is_sd2 else "sd1")
        suffixes = ("", "_2") if family == "sdxl" else ("",)
        return cls(
            unet=pipe.unet,
            vae=pipe.vae,
            scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            inference_scheduler=pipe.scheduler,
            tokenizers=[getattr(pipe, f"tokenizer{s}") for s in suffixes],
            text_encoders=[getattr(pipe, f"text_encoder{s}") for s in suffixes],
            family=family,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
            clip_skip=clip_skip,
        )

    # ------------------------------------------------------------------ facts

    @property
    def components(self) -> dict[str, nn.Module]:
        """The frozen modules by their diffusers names: ``unet``, ``vae``, ``text_encoder`` (+ ``text_encoder_2``)."""
        out: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        for i, encoder in enumerate(self.text_encoders):
            out["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
        return out

    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Weights dtype of the UNet."""
        return next(self.unet.parameters()).dtype

    @property
    def cross_attention_dim(self) -> int:
        """Width ``D`` of ``prompt_embeds`` the UNet's cross-attention takes (768 / 1024 / 2048)."""
        dim = self.unet.config.cross_attention_dim
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def pooled_dim(self) -> int | None:
        """Width ``P`` of SDXL's pooled embedding (``text_encoder_2.config.projection_dim``); ``None`` otherwise."""
        if self.family != "sdxl":
            return None
        return int(self.text_encoders[-1].config.projection_dim)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``."""
        return str(self.scheduler.config.prediction_type)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for the SD VAEs)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image side in pixels: ``unet.config.sample_size * vae_scale_factor`` (512 / 768 / 1024)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        """Token length of ``prompt_embeds`` (the first tokenizer's ``model_max_length``, 77 for CLIP)."""
        return int(self.tokenizers[0].model_max_length)

    def to(self, device: str | torch.device) -> Teacher:
        """Move every module to ``device`` (dtypes unchanged); returns ``self``."""
        for module in self.components.values():
            module.to(device)
        return self

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

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> Conditioning:
        """English conditioning for ``prompts``, equal to the pipeline's ``encode_prompt(prompt)``.

        Args:
            prompts: ``B`` English prompts.

        Returns:
            ``prompt_embeds [B, 77, D]`` and, for SDXL, ``pooled_prompt_embeds [B, P]``.
        """
        prompts = self._prompt_list(prompts)
        if self.family == "sdxl":
            embeds, pooled = self._encode_sdxl(prompts, self.clip_skip)
            return Conditioning(embeds, pooled)
        return Conditioning(self._encode_sd(prompts, self.clip_skip))

    @torch.no_grad()
    def encode_unconditional(
        self, batch_size: int = 1, negative_prompts: Sequence[str] | None = None
    ) -> Conditioning:
        """The classifier-free-guidance branch, as ``encode_prompt(..., do_classifier_free_guidance=True)`` makes it.

        With no ``negative_prompts``: the empty prompt, or all zeros for SDXL with
        ``force_zeros_for_empty_prompt``. The pipelines encode negatives without ``clip_skip``; so does this.

        Args:
            batch_size: ``B`` when ``negative_prompts`` is ``None``.
            negative_prompts: ``B`` negative prompts instead of the empty one.

        Returns:
            ``prompt_embeds [B, 77, D]`` (+ ``pooled_prompt_embeds [B, P]`` for SDXL).
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
        if self.family == "sdxl":
            embeds, pooled = self._encode_sdxl(prompts, None)
            return Conditioning(embeds, pooled)
        return Conditioning(self._encode_sd(prompts, None))

    @torch.no_grad()
    def encode_images(
        self,
        pixels: Tensor,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample: bool = True,
    ) -> Tensor:
        """VAE latents of images, scaled as the UNet expects them.

        ``latents = (z - shift_factor) * scaling_factor`` with ``z`` a sample of (or, with ``sample=False``, the mode
        of) the VAE posterior; ``shift_factor`` is 0 for the SD VAEs.

        Args:
            pixels: ``[B, 3, H, W]`` images in ``[-1, 1]``, ``H`` and ``W`` multiples of :attr:`vae_scale_factor`.
            generator: RNG for the posterior sample, or one per image (``B`` CPU generators).
            sample: sample the posterior (training) or take its mode (deterministic caches).

        Returns:
            ``[B, C, H / f, W / f]`` latents in the UNet's dtype, ``f`` = :attr:`vae_scale_factor`.
        """
        if not isinstance(pixels, Tensor):
            raise TypeError(f"`pixels` must be a Tensor, got {type(pixels).__name__}")
        f = self.vae_scale_factor
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(
                f"`pixels` must be [B, 3, H, W] with H, W multiples of {f}, got {tuple(pixels.shape)}"
            )
        vae_param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(device=vae_param.device, dtype=vae_param.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        shift = self.vae.config.get("shift_factor", None) or 0.0
        latents = (z - shift) * self.vae.config.scaling_factor
        return latents.to(device=self.device, dtype=self.dtype)

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
            ``[B, 6]`` in the UNet's dtype, or ``None`` for SD 1.x / 2.x (no added conditions).

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

        SDXL: its ``pooled_prompt_embeds`` (taken from ``conditioning`` when given). SD 1.x / 2.x: the final-layer
        [EOS] state of the CLIP text encoder (``pooler_output``), which the UNet itself never reads.

        Args:
            prompts: ``B`` English prompts.
            conditioning: :meth:`encode` of the same prompts, to save SDXL a second encoding.
        """
        if self.family == "sdxl":
            conditioning = conditioning or self.encode(prompts)
            assert conditioning.pooled_prompt_embeds is not None  # encode gives SDXL one
            return conditioning.pooled_prompt_embeds
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = self._ids(tokenizer, self._prompt_list(prompts), self.max_length).input_ids
        with torch.no_grad():
            return encoder(ids.to(next(encoder.parameters()).device)).pooler_output

    def denoise(
        self,
        latents: Tensor,
        timesteps: Tensor,
        conditioning: Conditioning,
        *,
        attention_mask: Tensor | None = None,
        time_ids: Tensor | None = None,
    ) -> Tensor:
        """One denoiser forward as the pipelines make it, with whatever taps are installed.

        Inputs are cast to the UNet's dtype; gradients flow wherever the inputs (or trainable UNet weights) ask.

        Args:
            latents: ``[B, C, h, w]`` noisy latents.
            timesteps: ``[B]`` integer timesteps.
            conditioning: ``prompt_embeds [B, L, D]`` (+ ``pooled_prompt_embeds [B, P]`` for SDXL).
            attention_mask: ``[B, L]`` key padding mask of ``prompt_embeds`` (1 = attend), or ``None``: every
                position attends, as at generation.
            time_ids: SDXL's ``[B, 6]`` added time ids; ``None``: the square defaults of :meth:`add_time_ids`.

        Returns:
            The UNet's prediction ``[B, C, h, w]`` (epsilon, v or x0: :attr:`prediction_type`).
        """
        return self.unet(
            latents.to(self.dtype),
            timesteps,
            encoder_hidden_states=conditioning.prompt_embeds.to(self.dtype),
            encoder_attention_mask=attention_mask,
            added_cond_kwargs=self.added_cond_kwargs(conditioning, time_ids),
        ).sample

    def __repr__(self) -> str:
        return (
            f"Teacher(family={self.family!r}, cross_attention_dim={self.cross_attention_dim}, "
            f"pooled_dim={self.pooled_dim}, resolution={self.resolution}, prediction_type={self.prediction_type!r}, "
            f"dtype={self.dtype}, device={self.device})"
        )
