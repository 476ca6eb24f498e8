"""What conditions a denoiser on text: the one type the teacher, the student and the evaluation exchange."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Text conditioning of a batch, as a diffusers pipeline takes it (``prompt_embeds`` is the public door).

    ``xling.adapters.Conditioning`` has the same fields: core and adapters may not import each other, and
    every consumer reads the fields only, so either satisfies the other's users.

    Attributes:
        prompt_embeds: ``[B, L, D]``, ``D`` the denoiser's ``cross_attention_dim``.
        pooled_prompt_embeds: ``[B, P]`` (SDXL's pooled text embedding) or ``None``.
        attention_mask: ``[B, L]`` key padding mask (1 = real token), or ``None``: every position counts, as
            the pipelines attend to CLIP's whole 77-token window.
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

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The embeddings cast to ``dtype`` (the mask is left as it is)."""
        pooled = self.pooled_prompt_embeds
        return Conditioning(
            self.prompt_embeds.to(dtype), None if pooled is None else pooled.to(dtype), self.attention_mask
        )
