"""The linear projection head of IAP ("images as pivots") and AltDiffusion (arXiv:2211.06679).

Tokens: ``Linear(d, D)`` on every position. Pooled (optional, for SDXL or AltDiffusion's distillation):
``Linear(d, P)`` on the student's pooled vector, i.e. its [CLS] / ``<s>`` hidden state. With ``pre_norm`` a
LayerNorm comes first on both, as AltCLIP's ``pre_LN`` before its ``transformation``
(``Linear(d, D)(LayerNorm(h))``).
"""

from __future__ import annotations

from torch import Tensor, nn

from xling.adapters.config import LinearHeadConfig
from xling.adapters.head import AdapterHead, HeadOutput, check_hidden


class LinearHead(AdapterHead):
    """``[B, L, d] -> [B, L, D]`` plus, with ``pooled_width``, ``[B, d] -> [B, P]`` from the pooled vector.

    Args:
        config: a :class:`~xling.adapters.config.LinearHeadConfig`.
    """

    config_class = LinearHeadConfig
    config: LinearHeadConfig

    def __init__(self, config: LinearHeadConfig | None = None) -> None:
        super().__init__(config if config is not None else LinearHeadConfig())
        c = self.config
        self.norm = nn.LayerNorm(c.student_width, eps=c.layer_norm_eps) if c.pre_norm else None
        self.proj = nn.Linear(c.student_width, c.teacher_width, bias=c.bias)
        self.pooled_proj = nn.Linear(c.student_width, c.pooled_width, bias=c.bias) if c.pooled_width else None

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, pooled: Tensor | None = None
    ) -> HeadOutput:
        """Project student hidden states to the teacher width.

        Args:
            hidden_states: ``[B, L, d]``.
            attention_mask: ``[B, L]``, passed through.
            pooled: ``[B, d]`` the student's pooled vector; ``None`` takes ``hidden_states[:, 0]`` (the
                [CLS] / ``<s>`` position of BERT-style encoders).

        Returns:
            :class:`HeadOutput` with ``prompt_embeds [B, L, D]`` and ``pooled_prompt_embeds [B, P]`` or ``None``.
        """
        check_hidden(hidden_states, attention_mask, self.config.student_width)
        pooled_out = None
        if self.pooled_proj is not None:
            if pooled is None:
                pooled = hidden_states[:, 0]
            elif tuple(pooled.shape) != (hidden_states.shape[0], self.config.student_width):
                raise ValueError(
                    f"`pooled` must be [B, d] = {(hidden_states.shape[0], self.config.student_width)}, "
                    f"got {tuple(pooled.shape)}"
                )
            pooled_out = self.pooled_proj(self.norm(pooled) if self.norm is not None else pooled)  # [B, P]
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return HeadOutput(
            prompt_embeds=self.proj(hidden_states),
            pooled_prompt_embeds=pooled_out,
            attention_mask=attention_mask,
        )
