"""GlueNet's translator (Qin et al., "GlueGen", ICCV 2023, arXiv:2303.10056), the MTN recipe's head.

An MLP-mixer: each block mixes across features (channel MLP) and across the sequence (token MLP), both
residual; every MLP is pre-norm, ``LayerNorm -> Linear -> GELU -> Linear -> GELU -> Linear``, with hidden
size ``mult`` times its input (GlueNet's three-layer MLPs, normalised on the way in as in MLP-Mixer). The
encoder is ``depth`` blocks at the student's ``(S, d)`` followed by a transition block to the teacher's
``(T, D)``; the decoder mirrors it back for the reconstruction loss. Mapping ``(77, 1024) -> (77, 768)``
with depth 5 the encoder has 50,137,938 parameters (GlueNet: ~50M).

The token MLPs are built for a fixed source length ``S``: shorter inputs are zero-padded to ``S`` and
padded positions are zeroed before mixing, so what a tokenizer put there does not matter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xling.adapters.config import MixerTranslatorConfig
from xling.adapters.head import AdapterHead, HeadOutput, check_hidden


class MixerMLP(nn.Sequential):
    """``[..., n_in] -> [..., n_out]``: LayerNorm, then three Linear layers with GELU between.

    The output is left unnormalised on purpose: the transition's token MLP is the translator's last layer,
    and a LayerNorm there would force every output channel to zero mean and unit variance across the 77
    positions, which text-encoder embeddings (a constant start token, near-identical padding) do not have.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, eps: float = 1e-5) -> None:
        super().__init__(
            nn.LayerNorm(n_in, eps=eps),
            nn.Linear(n_in, n_hidden),
            nn.GELU(),
            nn.Linear(n_hidden, n_hidden),
            nn.GELU(),
            nn.Linear(n_hidden, n_out),
        )


class MixerBlock(nn.Module):
    """Residual mixer block on ``[B, n, d]``: channel mixing, then token mixing."""

    def __init__(self, n: int, d: int, mult: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.channel = MixerMLP(d, int(d * mult), d, eps)
        self.token = MixerMLP(n, int(n * mult), n, eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.channel(x)  # [B, n, d]
        return x + self.token(x.transpose(1, 2)).transpose(1, 2)  # [B, n, d]


class MixerTransition(nn.Module):
    """Non-residual mixer block changing the shape ``[B, n_in, d_in] -> [B, n_out, d_out]``."""

    def __init__(self, n_in: int, d_in: int, n_out: int, d_out: int, mult: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.channel = MixerMLP(d_in, int(d_in * mult), d_out, eps)
        self.token = MixerMLP(n_in, int(n_in * mult), n_out, eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel(x)  # [B, n_in, d_out]
        return self.token(x.transpose(1, 2)).transpose(1, 2)  # [B, n_out, d_out]


class MixerEncoder(nn.Module):
    """``depth`` residual blocks at ``(S, d)``, then a transition to ``(T, D)``."""

    def __init__(self, c: MixerTranslatorConfig) -> None:
        super().__init__()
        eps = c.layer_norm_eps
        self.blocks = nn.ModuleList(
            [MixerBlock(c.source_length, c.student_width, c.mult, eps) for _ in range(c.depth)]
        )
        self.transition = MixerTransition(
            c.source_length, c.student_width, c.target_length, c.teacher_width, c.mult, eps
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)  # [B, S, d]
        return self.transition(x)  # [B, T, D]


class MixerDecoder(nn.Module):
    """Mirror of :class:`MixerEncoder`: a transition ``(T, D) -> (S, d)``, then ``depth`` residual blocks."""

    def __init__(self, c: MixerTranslatorConfig) -> None:
        super().__init__()
        eps = c.layer_norm_eps
        self.transition = MixerTransition(
            c.target_length, c.teacher_width, c.source_length, c.student_width, c.mult, eps
        )
        self.blocks = nn.ModuleList(
            [MixerBlock(c.source_length, c.student_width, c.mult, eps) for _ in range(c.depth)]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.transition(x)  # [B, S, d]
        for block in self.blocks:
            x = block(x)
        return x


class MixerTranslator(AdapterHead):
    """Sequence translator ``[B, L<=S, d] -> [B, T, D]`` with a mirror decoder ``[B, T, D] -> [B, S, d]``.

    With ``pooled_width`` set, the pooled output is ``Linear(D, P)`` of the mean output token.

    Args:
        config: a :class:`~xling.adapters.config.MixerTranslatorConfig`.
    """

    config_class = MixerTranslatorConfig
    config: MixerTranslatorConfig

    def __init__(self, config: MixerTranslatorConfig | None = None) -> None:
        super().__init__(config if config is not None else MixerTranslatorConfig())
        c = self.config
        self.encoder = MixerEncoder(c)
        self.decoder = MixerDecoder(c) if c.with_decoder else None
        self.pooled_proj = nn.Linear(c.teacher_width, c.pooled_width) if c.pooled_width is not None else None

    def pad_source(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zero-pad ``[B, L, d]`` to ``[B, S, d]`` and zero its padded positions.

        Returns:
            ``(x [B, S, d], mask [B, S])``: the encoder's input and which positions are real; also the
            target (and mask) of the reconstruction loss.
        """
        check_hidden(hidden_states, attention_mask, self.config.student_width)
        b, n, _ = hidden_states.shape
        s = self.config.source_length
        if n > s:
            raise ValueError(
                f"`hidden_states` has {n} tokens but this translator was built for source_length {s}: "
                f"got {tuple(hidden_states.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=hidden_states.device)
        mask = torch.zeros(b, s, dtype=hidden_states.dtype, device=hidden_states.device)
        mask[:, :n] = attention_mask.to(hidden_states.dtype)
        x = torch.nn.functional.pad(hidden_states, (0, 0, 0, s - n)) * mask.unsqueeze(-1)  # [B, S, d]
        return x, mask

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, pooled: Tensor | None = None
    ) -> HeadOutput:
        """Translate a student sequence to the teacher's ``(T, D)``.

        Args:
            hidden_states: ``[B, L, d]`` with ``L <= source_length``.
            attention_mask: ``[B, L]`` 1 for real tokens.
            pooled: ignored; accepted for the common head interface.

        Returns:
            :class:`HeadOutput` with ``prompt_embeds [B, T, D]``, ``pooled_prompt_embeds [B, P]`` or ``None``,
            and an all-ones ``attention_mask [B, T]`` (every output token is meaningful).
        """
        x, _ = self.pad_source(hidden_states, attention_mask)
        out = self.encoder(x)  # [B, T, D]
        pooled_out = self.pooled_proj(out.mean(dim=1)) if self.pooled_proj is not None else None
        ones = torch.ones(out.shape[:2], dtype=torch.long, device=out.device)
        return HeadOutput(prompt_embeds=out, pooled_prompt_embeds=pooled_out, attention_mask=ones)

    def reconstruct(self, prompt_embeds: Tensor) -> Tensor:
        """Decode ``[B, T, D]`` back to the student's ``[B, S, d]`` (compare with :meth:`pad_source`'s output)."""
        if self.decoder is None:
            raise ValueError("this MixerTranslator was built with with_decoder=False; it cannot reconstruct")
        c = self.config
        if prompt_embeds.ndim != 3 or tuple(prompt_embeds.shape[1:]) != (c.target_length, c.teacher_width):
            raise ValueError(
                f"`prompt_embeds` must be [B, {c.target_length}, {c.teacher_width}], got {tuple(prompt_embeds.shape)}"
            )
        return self.decoder(prompt_embeds)
