"""Training the student encoder itself: LoRA on its attention projections (peft), or its last k layers.

LoRA adapters are made and saved by peft, in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained(base, dir)`` reads them; xling loads
them only after checking the weight file (safetensors, recorded SHA-256). peft is imported only when these
functions run (``pip install "xling-adapters[peft]"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from xling.adapters.config import LoraHeadConfig
from xling.adapters.io import WeightFileError, check_model_folder

#: The weight file of a peft LoRA folder; peft would fall back to a pickled ``adapter_model.bin``.
LORA_WEIGHTS_NAME = "adapter_model.safetensors"

# Attention projections (query, key, value, output) by transformers ``model_type``.
_ATTENTION_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense"],
    "camembert": ["query", "key", "value", "attention.output.dense"],
    "ernie": ["query", "key", "value", "attention.output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense"],
    "t5": ["q", "k", "v", "o"],
    "mt5": ["q", "k", "v", "o"],
    "umt5": ["q", "k", "v", "o"],
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "clip_text_model": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "chinese_clip": ["query", "key", "value", "attention.output.dense"],
    "altclip": ["query", "key", "value", "attention.output.dense"],
}

# Attribute paths (tried in order) to the stack of transformer layers.
_LAYER_PATHS: tuple[str, ...] = (
    "encoder.layer",  # BERT, RoBERTa, XLM-R
    "encoder.block",  # T5 encoder
    "encoder.layers",  # CLIPTextTransformer
    "text_model.encoder.layers",  # CLIPTextModel
    "text_model.encoder.layer",  # ChineseCLIP / AltCLIP text
    "layers",
    "h",
)


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError('LoRA heads need peft: pip install "xling-adapters[peft]"') from e
    return peft


def default_lora_targets(model: nn.Module) -> list[str]:
    """The attention projections of ``model``'s architecture (by ``model.config.model_type``).

    Unknown architectures fall back to every ``nn.Linear`` whose name ends in a common projection name
    (``q_proj``, ``query``, ...).

    Raises:
        ValueError: no attention projection could be found.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _ATTENTION_TARGETS:
        return list(_ATTENTION_TARGETS[model_type])
    suffixes = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "query", "key", "value")
    found = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(suffixes)
        }
    )
    if not found:
        raise ValueError(
            f"no attention projections found in {type(model).__name__} (model_type {model_type!r}); "
            "pass LoraHeadConfig(target_modules=[...])"
        )
    return found


def apply_lora(model: nn.Module, config: LoraHeadConfig | None = None) -> nn.Module:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA on its attention projections.

    Only the LoRA weights are trainable afterwards. ``peft_model.save_pretrained(dir)`` writes peft's format.

    Args:
        model: a Hugging Face encoder (``PreTrainedModel``).
        config: rank, alpha, dropout, targets; defaults to ``LoraHeadConfig()`` (r=16, alpha=64).

    Returns:
        The ``peft.PeftModel``; call it like the base model.
    """
    peft = _require_peft()
    config = config if config is not None else LoraHeadConfig()
    if not isinstance(config, LoraHeadConfig):
        raise TypeError(f"`config` must be a LoraHeadConfig, got {type(config).__name__}")
    targets = list(config.target_modules) if config.target_modules else default_lora_targets(model)
    lora_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias=config.bias,
    )
    return peft.get_peft_model(model, lora_config)


def save_lora(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write a peft model's LoRA weights in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def load_lora(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Wrap ``model`` with the LoRA adapter in ``directory`` (frozen), once its weight file is checked.

    The file must be readable safetensors; comparing it with a recorded SHA-256 is the caller's part
    (:meth:`~xling.adapters.encoder.LanguageEncoder.from_pretrained` checks every file of the adapter first).

    Args:
        model: the base student.
        directory: a peft LoRA folder written by :func:`save_lora`.

    Returns:
        The ``peft.PeftModel``.

    Raises:
        WeightFileError: no ``adapter_model.safetensors`` (a pickled ``.bin`` is refused) or an unreadable
            one; the message names it.
        ValueError: peft cannot apply the adapter to ``model``; the message names the folder.
    """
    peft = _require_peft()
    directory = Path(directory)
    check_model_folder(directory)
    if not (directory / LORA_WEIGHTS_NAME).is_file():
        raise WeightFileError(
            f"no {LORA_WEIGHTS_NAME} in {directory}; xling loads LoRA weights only from safetensors "
            "(peft's save_pretrained(dir, safe_serialization=True) writes it)"
        )
    try:
        return peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the LoRA adapter in {directory}: {e}") from e


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer layers of ``model`` (BERT/XLM-R, T5, CLIP and similar).

    Raises:
        ValueError: no known layer stack in ``model``.
    """
    for path in _LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(f"cannot find the layer stack of {type(model).__name__}; tried {list(_LAYER_PATHS)}")


def unfreeze_last_layers(model: nn.Module, k: int = 3) -> list[str]:
    """Freeze every parameter of ``model`` except those of its last ``k`` transformer layers.

    Embeddings, earlier layers, final norms and poolers stay frozen.

    Args:
        model: a Hugging Face encoder.
        k: how many of the last layers to train (1 <= k <= number of layers).

    Returns:
        Names of the parameters left trainable.

    Raises:
        ValueError: ``k`` out of range.
    """
    layers = find_layers(model)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(layers):
        raise ValueError(
            f"`k` must be an int in [1, {len(layers)}] for this {len(layers)}-layer model, got {k!r}"
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - k :]:
        layer.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
