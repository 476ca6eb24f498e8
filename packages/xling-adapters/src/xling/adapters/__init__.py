"""Trainable language heads (MLP adapter, mixer translator, LoRA) and inference for diffusers pipelines.

Importing this package needs only torch, safetensors and einops; the student encoder needs
``[transformers]``, LoRA ``[peft]``, and attaching to a pipeline ``[diffusers]``.
"""

from xling.adapters.card import ModelCardFacts, write_model_card
from xling.adapters.config import (
    FORMAT_VERSION,
    HeadConfig,
    LinearHeadConfig,
    LoraHeadConfig,
    MixerTranslatorConfig,
    MLPAdapterConfig,
    config_from_dict,
)
from xling.adapters.encoder import Conditioning, LanguageEncoder, LanguageEncoderConfig, StudentHiddenStates
from xling.adapters.head import AdapterHead, HeadOutput
from xling.adapters.hub import HubAdapterNotFoundError, resolve_pretrained
from xling.adapters.io import WeightFileError, WidthMismatchError, check_widths, load_head
from xling.adapters.linear import LinearHead
from xling.adapters.lora import apply_lora, default_lora_targets, unfreeze_last_layers
from xling.adapters.mixer import MixerTranslator
from xling.adapters.mlp import MLPAdapter
from xling.adapters.pipeline import (
    FAMILIES,
    PipelineFamily,
    XlingPipeline,
    attach,
    check_pipeline_widths,
    pipeline_family,
    pipeline_widths,
)

__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "AdapterHead",
    "Conditioning",
    "HeadConfig",
    "HeadOutput",
    "HubAdapterNotFoundError",
    "LanguageEncoder",
    "LanguageEncoderConfig",
    "LinearHead",
    "LinearHeadConfig",
    "LoraHeadConfig",
    "MLPAdapter",
    "MLPAdapterConfig",
    "MixerTranslator",
    "MixerTranslatorConfig",
    "ModelCardFacts",
    "PipelineFamily",
    "StudentHiddenStates",
    "WeightFileError",
    "WidthMismatchError",
    "XlingPipeline",
    "apply_lora",
    "attach",
    "check_pipeline_widths",
    "check_widths",
    "config_from_dict",
    "default_lora_targets",
    "load_head",
    "pipeline_family",
    "pipeline_widths",
    "resolve_pretrained",
    "unfreeze_last_layers",
    "write_model_card",
]
