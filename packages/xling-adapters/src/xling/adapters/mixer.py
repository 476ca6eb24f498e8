"""GlueNet's translator (Qin et al., "GlueGen", ICCV 2023, arXiv:2303.10056), the MTN recipe's head.

An MLP-mixer: each block mixes across features (channel MLP) and across the sequence (token MLP), both
residual; every MLP is ``Linear -> GELU -> Linear -> GELU -> Linear`` with hidden size ``mult`` times its
input. The encoder is ``depth`` blocks at the student's ``(S, d)`` followed by a transition block to the
teacher's ``(T, D)``. Two variants (``MixerTranslatorConfig.translator``):

* ``"gluenet"``: GlueGen's multilingual ``Translator_noln`` (``multilingual-gluenet/model.py``), post-norm: a
  LayerNorm after every Linear of a block, the block (channel then token mixing, each residual) wrapped as
  ``x <- GELU(block(x) + x)``, a transition without LayerNorms. Its decoder (GlueGen's ``adapter_rec``) is
  ``depth`` such blocks at the teacher's ``(T, D)`` and a transition back to ``(S, d)``. The parameter names
  are GlueGen's with ``blocks.i.net_sen`` / ``net_tok`` / ``tail`` read as ``encoder.blocks.i.channel`` /
  ``token`` / ``encoder.transition``, index for index. ``(77, 1024) -> (77, 768)`` with depth 5: 50,179,776
  parameters in the encoder (132 tensors, GlueGen's checkpoint; its decoder at 768 wide: 29,057,216).
* ``"xling"``: pre-norm MLPs (``LayerNorm`` first, as in MLP-Mixer), plain residual blocks, and a mirror
  decoder (transition first, then ``depth`` blocks at ``(S, d)``); ``(77, 1024) -> (77, 768)`` with depth 5:
  50,137,938 parameters in the encoder.

The token MLPs are built for a fixed source length ``S``: shorter inputs are zero-padded to ``S``. With
``positions="masked"`` padded positions are zeroed before mixing, so what a tokenizer put there does not
matter; with ``"all"`` they are translated as the student produced them (GlueGen). ``input_scale`` multiplies
the student's states on the way in and ``output_scale`` (one factor per output position) the translation on
the way out, as GlueGen's ``/ 3`` and ``* (tensor_norm / 2)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from xling.adapters.config import MixerTranslatorConfig
from xling.adapters.head import AdapterHead, HeadOutput, check_hidden

__all__ = ["GLUEGEN_INPUT_SCALE", "GLUEGEN_OUTPUT_SCALE", "GLUEGEN_POSITION_NORMS", "MixerTranslator"]

#: GlueGen's per-position norms of the CLIP ViT-L/14 text embeddings (SD 1.x's text encoder), position 0 the
#: start token: ``tensor_norm`` of ``multilingual-gluenet/train_gluenet_multi.py`` and of its inference
#: embedder. The teacher's embeddings are divided by ``norm / 2`` for training, the translation multiplied by it.
GLUEGEN_POSITION_NORMS: tuple[float, ...] = (
    43.8203, 28.3668, 27.9345, 28.0084, 28.2958, 28.2576, 28.3373, 28.2695, 28.4097, 28.2790, 28.2825,
    28.2807, 28.2775, 28.2708, 28.2682, 28.2624, 28.2589, 28.2611, 28.2616, 28.2639, 28.2613, 28.2566,
    28.2615, 28.2665, 28.2799, 28.2885, 28.2852, 28.2863, 28.2780, 28.2818, 28.2764, 28.2532, 28.2412,
    28.2336, 28.2514, 28.2734, 28.2763, 28.2977, 28.2971, 28.2948, 28.2818, 28.2676, 28.2831, 28.2890,
    28.2979, 28.2999, 28.3117, 28.3363, 28.3554, 28.3626, 28.3589, 28.3597, 28.3543, 28.3660, 28.3731,
    28.3717, 28.3812, 28.3753, 28.3810, 28.3777, 28.3693, 28.3713, 28.3670, 28.3691, 28.3679, 28.3624,
    28.3703, 28.3703, 28.3720, 28.3594, 28.3576, 28.3562, 28.3438, 28.3376, 28.3389, 28.3433, 28.3191,
)  # fmt: skip
#: ``output_scale`` of a GlueGen translator: ``tensor_norm / 2``.
GLUEGEN_OUTPUT_SCALE: tuple[float, ...] = tuple(n / 2 for n in GLUEGEN_POSITION_NORMS)
#: ``input_scale`` of a GlueGen translator: XLM-R's last hidden state ``/ 3``.
GLUEGEN_INPUT_SCALE = 1.0 / 3.0

Norm = Literal["pre", "post", "none"]


class MixerMLP(nn.Sequential):
    """``[..., n_in] -> [..., n_out]``: three Linear layers with GELU between, normalised as ``norm`` says.

    ``"pre"`` (xling): ``LayerNorm, Linear, GELU, Linear, GELU, Linear``. ``"post"`` (GlueGen's blocks):
    ``Linear, LayerNorm, GELU, Linear, LayerNorm, GELU, Linear, LayerNorm``. ``"none"`` (GlueGen's
    transition): ``Linear, GELU, Linear, GELU, Linear``. The indices are GlueGen's ``nn.Sequential`` ones.

    xling's output is left unnormalised on purpose: the transition's token MLP is the translator's last
    layer, and a LayerNorm there would force every output channel to zero mean and unit variance across the
    77 positions, which text-encoder embeddings (a constant start token, near-identical padding) do not have.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int, eps: float = 1e-5, norm: Norm = "pre") -> None:
        widths = [(n_in, n_hidden), (n_hidden, n_hidden), (n_hidden, n_out)]
        layers: list[nn.Module] = [nn.LayerNorm(n_in, eps=eps)] if norm == "pre" else []
        for i, (a, b) in enumerate(widths):
            layers.append(nn.Linear(a, b))
            if norm == "post":
                layers.append(nn.LayerNorm(b, eps=eps))
            if i < len(widths) - 1:
                layers.append(nn.GELU())
        super().__init__(*layers)


class MixerBlock(nn.Module):
    """Residual mixer block on ``[B, n, d]``: channel mixing, then token mixing (each residual).

    With ``gluenet`` its MLPs are post-norm and the block is wrapped once more, ``GELU(block(x) + x)``, as
    GlueGen's ``Translator_noln.forward`` adds each block's input back before a GELU.
    """

    def __init__(self, n: int, d: int, mult: float, eps: float = 1e-5, gluenet: bool = False) -> None:
        super().__init__()
        norm: Norm = "post" if gluenet else "pre"
        self.gluenet = gluenet
        self.channel = MixerMLP(d, int(d * mult), d, eps, norm)
        self.token = MixerMLP(n, int(n * mult), n, eps, norm)

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.channel(x)  # [B, n, d]
        y = y + self.token(y.transpose(1, 2)).transpose(1, 2)  # [B, n, d]
        return nn.functional.gelu(y + x) if self.gluenet else y


class MixerTransition(nn.Module):
    """Non-residual mixer block changing the shape ``[B, n_in, d_in] -> [B, n_out, d_out]``."""

    def __init__(
        self, n_in: int, d_in: int, n_out: int, d_out: int, mult: float, eps: float = 1e-5, norm: Norm = "pre"
    ) -> None:
        super().__init__()
        self.channel = MixerMLP(d_in, int(d_in * mult), d_out, eps, norm)
        self.token = MixerMLP(n_in, int(n_in * mult), n_out, eps, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.channel(x)  # [B, n_in, d_out]
        return self.token(x.transpose(1, 2)).transpose(1, 2)  # [B, n_out, d_out]


def _blocks(n: int, d: int, c: MixerTranslatorConfig) -> nn.ModuleList:
    gluenet = c.translator == "gluenet"
    return nn.ModuleList([MixerBlock(n, d, c.mult, c.layer_norm_eps, gluenet) for _ in range(c.depth)])


def _transition(n_in: int, d_in: int, n_out: int, d_out: int, c: MixerTranslatorConfig) -> MixerTransition:
    norm: Norm = "none" if c.translator == "gluenet" else "pre"
    return MixerTransition(n_in, d_in, n_out, d_out, c.mult, c.layer_norm_eps, norm)


class MixerEncoder(nn.Module):
    """``depth`` residual blocks at ``(S, d)``, then a transition to ``(T, D)``."""

    def __init__(self, c: MixerTranslatorConfig) -> None:
        super().__init__()
        self.blocks = _blocks(c.source_length, c.student_width, c)
        self.transition = _transition(c.source_length, c.student_width, c.target_length, c.teacher_width, c)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)  # [B, S, d]
        return self.transition(x)  # [B, T, D]


class MixerDecoder(nn.Module):
    """``(T, D) -> (S, d)``. xling: a transition, then ``depth`` blocks at ``(S, d)`` (the encoder's mirror).
    GlueNet: ``depth`` blocks at ``(T, D)``, then the transition (GlueGen's ``adapter_rec``, the encoder's
    architecture with the widths swapped)."""

    def __init__(self, c: MixerTranslatorConfig) -> None:
        super().__init__()
        self.teacher_first = c.translator == "gluenet"
        n, d = (
            (c.target_length, c.teacher_width) if self.teacher_first else (c.source_length, c.student_width)
        )
        self.transition = _transition(c.target_length, c.teacher_width, c.source_length, c.student_width, c)
        self.blocks = _blocks(n, d, c)

    def forward(self, x: Tensor) -> Tensor:
        if not self.teacher_first:
            x = self.transition(x)  # [B, S, d]
        for block in self.blocks:
            x = block(x)
        return self.transition(x) if self.teacher_first else x  # [B, S, d]


class MixerTranslator(AdapterHead):
    """Sequence translator ``[B, L<=S, d] -> [B, T, D]`` with a decoder ``[B, T, D] -> [B, S, d]``.

    ``forward = head_output(encoder(pad_source(h)))``: the input scaled (and masked, ``positions="masked"``),
    translated, scaled per position. With ``pooled_width`` set, the pooled output is ``Linear(D, P)`` of the
    mean output token.

    Args:
        config: a :class:`~xling.adapters.config.MixerTranslatorConfig`.
    """

    config_class = MixerTranslatorConfig
    config: MixerTranslatorConfig
    output_scale: Tensor | None

    def __init__(self, config: MixerTranslatorConfig | None = None) -> None:
        super().__init__(config if config is not None else MixerTranslatorConfig())
        c = self.config
        self.encoder = MixerEncoder(c)
        self.decoder = MixerDecoder(c) if c.with_decoder else None
        self.pooled_proj = nn.Linear(c.teacher_width, c.pooled_width) if c.pooled_width is not None else None
        # Rebuilt from the config, not stored: the weights file holds exactly the public checkpoint's keys.
        scale = torch.tensor(c.output_scale).unsqueeze(-1) if c.output_scale is not None else None  # [T, 1]
        self.register_buffer("output_scale", scale, persistent=False)

    def pad_source(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zero-pad ``[B, L, d]`` to ``[B, S, d]``, scale it by ``input_scale`` and, with
        ``positions="masked"``, zero its padded positions.

        Returns:
            ``(x [B, S, d], mask [B, S])``: the encoder's input and which positions count, also the target (and
            mask) of the reconstruction loss. ``"masked"``: the real tokens; ``"all"``: every position of a row
            with any real token (a row without one, a filler window, counts nowhere).
        """
        check_hidden(hidden_states, attention_mask, self.config.student_width)
        c = self.config
        b, n, _ = hidden_states.shape
        s = c.source_length
        if n > s:
            raise ValueError(
                f"`hidden_states` has {n} tokens but this translator was built for source_length {s}: "
                f"got {tuple(hidden_states.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=hidden_states.device)
        x = torch.nn.functional.pad(hidden_states, (0, 0, 0, s - n)) * c.input_scale  # [B, S, d]
        if c.positions == "all":
            real = attention_mask.to(torch.bool).any(dim=1, keepdim=True)  # [B, 1]
            return x, real.to(x.dtype).expand(b, s)
        mask = torch.zeros(b, s, dtype=hidden_states.dtype, device=hidden_states.device)
        mask[:, :n] = attention_mask.to(hidden_states.dtype)
        return x * mask.unsqueeze(-1), mask

    def head_output(self, translated: Tensor) -> HeadOutput:
        """The head's output from the encoder's ``[B, T, D]`` translation: scaled by ``output_scale`` per
        position, pooled by ``pooled_proj``, with an all-ones ``attention_mask [B, T]`` (every output token is
        meaningful)."""
        out = (
            translated * self.output_scale.to(translated.dtype)
            if self.output_scale is not None
            else translated
        )
        pooled_out = self.pooled_proj(out.mean(dim=1)) if self.pooled_proj is not None else None
        ones = torch.ones(out.shape[:2], dtype=torch.long, device=out.device)
        return HeadOutput(prompt_embeds=out, pooled_prompt_embeds=pooled_out, attention_mask=ones)

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
            and an all-ones ``attention_mask [B, T]``.
        """
        x, _ = self.pad_source(hidden_states, attention_mask)
        return self.head_output(self.encoder(x))  # [B, T, D]

    def reconstruct(self, translated: Tensor) -> Tensor:
        """Decode the encoder's ``[B, T, D]`` translation (before ``output_scale``, as GlueGen decodes it) back
        to the student's ``[B, S, d]`` (compare with :meth:`pad_source`'s output)."""
        if self.decoder is None:
            raise ValueError("this MixerTranslator was built with with_decoder=False; it cannot reconstruct")
        c = self.config
        if translated.ndim != 3 or tuple(translated.shape[1:]) != (c.target_length, c.teacher_width):
            raise ValueError(
                f"`translated` must be [B, {c.target_length}, {c.teacher_width}], got {tuple(translated.shape)}"
            )
        return self.decoder(translated)
