"""The head interface: student hidden states in, teacher-shaped embeddings out, one file format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from torch import Tensor, nn

from xling.adapters.config import HeadConfig
from xling.adapters.io import load_state_into, read_head_config, save_head

H = TypeVar("H", bound="AdapterHead")


@dataclass
class HeadOutput:
    """What every head returns.

    Attributes:
        prompt_embeds: ``[B, L', D]`` teacher-width token embeddings (``L' = L`` for token-wise heads,
            ``target_length`` for the mixer).
        pooled_prompt_embeds: ``[B, P]`` pooled embedding, or ``None`` when the head has no pooled output.
        attention_mask: ``[B, L']`` which output tokens stand for real input (1) or padding (0).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    attention_mask: Tensor | None = None


def check_hidden(hidden_states: Tensor, attention_mask: Tensor | None, width: int) -> None:
    """Validate ``hidden_states [B, L, d]`` against ``width`` and ``attention_mask [B, L]``."""
    if not isinstance(hidden_states, Tensor):
        raise TypeError(f"`hidden_states` must be a Tensor, got {type(hidden_states).__name__}")
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != width:
        raise ValueError(f"`hidden_states` must be [B, L, {width}], got {tuple(hidden_states.shape)}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(
            f"`attention_mask` must be [B, L] = {tuple(hidden_states.shape[:2])}, got {tuple(attention_mask.shape)}"
        )


def masked_mean(x: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean over tokens of ``x [B, L, C]`` counting only ``attention_mask [B, L]`` positions -> ``[B, C]``."""
    if attention_mask is None:
        return x.mean(dim=1)
    m = attention_mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
    # clamp: an all-padding row (a filler chunk) gives zeros rather than NaN
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class AdapterHead(nn.Module):
    """Base of the trainable heads: holds the config, saves and loads ``config.json`` + ``model.safetensors``.

    Subclasses set ``config_class`` and implement ``forward(hidden_states, attention_mask, pooled)``.
    """

    config_class: ClassVar[type[HeadConfig]] = HeadConfig

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, pooled: Tensor | None = None
    ) -> HeadOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Total parameter count (trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory``."""
        return save_head(self, directory)

    @classmethod
    def from_pretrained(
        cls: type[H],
        directory: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        verify_hashes: bool = True,
    ) -> H:
        """Load a head of this class from ``directory`` (a head of another type raises ``ValueError``).

        ``verify_hashes=False`` loads a hand-made folder whose ``config.json`` records no ``weights_sha256``.
        """
        config, file_info = read_head_config(directory)
        if not isinstance(config, cls.config_class):
            raise ValueError(
                f"{Path(directory) / 'config.json'} holds a {config.head_type!r} head, not a {cls.__name__}; "
                "use xling.adapters.load_head to load any head type"
            )
        head = cls(config)
        load_state_into(head, directory, file_info, verify_hashes=verify_hashes)
        if device is not None:
            head = head.to(device)
        return head.eval()


def head_class(head_type: str) -> type[AdapterHead]:
    """The head class registered for ``head_type`` (``"mlp"``, ``"mixer"``, ``"linear"``)."""
    # Imported here: the head modules import this one.
    from xling.adapters.linear import LinearHead
    from xling.adapters.mixer import MixerTranslator
    from xling.adapters.mlp import MLPAdapter

    classes = {c.config_class.head_type: c for c in (MLPAdapter, MixerTranslator, LinearHead)}
    if head_type not in classes:
        raise ValueError(f"unknown head_type {head_type!r}; expected one of {sorted(classes)}")
    return classes[head_type]
