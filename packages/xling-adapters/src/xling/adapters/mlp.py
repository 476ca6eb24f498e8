"""PEA-Diffusion's parameter-efficient adapter (Ma et al., ECCV 2024, arXiv:2311.17086).

LayerNorm, then a stack of bias-free Linear layers with GELU between them. For an SD 1.x / 2.x teacher the
stack ends at the teacher width. For SDXL it ends at the pooled width ``P``: the pooled vector is the token
mean of that output, and the tokens go through ``GELU`` and one more Linear ``P -> D``, as the PEA code's
SDXL adapter does. With the defaults (1024-wide student, SDXL: D=2048, P=1280, hidden 1024, 3 layers)::

    LayerNorm(1024)                      2,048
    Linear(1024, 1024, bias=False)   1,048,576
    Linear(1024, 1024, bias=False)   1,048,576
    Linear(1024, 1280, bias=False)   1,310,720
    Linear(1280, 2048)               2,623,488
                                     ---------
                                     6,033,408   (the paper's "6M")

The pooled mean follows ``config.pooled``: ``"all"`` averages every position of the padded window, padding
included, as the PEA code does (so a PEA checkpoint gets the ``text_embeds`` it was trained with);
``"masked"`` averages the real tokens only (``attention_mask``), so it does not depend on how far a prompt
was padded.
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from xling.adapters.config import MLPAdapterConfig
from xling.adapters.head import AdapterHead, HeadOutput, check_hidden, masked_mean


class MLPAdapter(AdapterHead):
    """Token-wise MLP adapter ``[B, L, d] -> [B, L, D]`` (+ pooled ``[B, P]`` when ``pooled_width`` is set).

    Args:
        config: an :class:`~xling.adapters.config.MLPAdapterConfig`.
    """

    config_class = MLPAdapterConfig
    config: MLPAdapterConfig

    def __init__(self, config: MLPAdapterConfig | None = None) -> None:
        super().__init__(config if config is not None else MLPAdapterConfig())
        c = self.config
        stack_out = c.pooled_width if c.pooled_width is not None else c.teacher_width
        widths = [c.student_width] + [c.hidden_width] * (c.num_layers - 1) + [stack_out]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(w_in, w_out, bias=False))
        self.layernorm = nn.LayerNorm(c.student_width, eps=c.layer_norm_eps)
        self.projector = nn.Sequential(*layers)
        # SDXL only: the pooled-width stack output is mapped to the token width by one more Linear.
        self.out_proj = (
            nn.Sequential(nn.GELU(), nn.Linear(c.pooled_width, c.teacher_width))
            if c.pooled_width is not None
            else None
        )

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, pooled: Tensor | None = None
    ) -> HeadOutput:
        """Map student hidden states to teacher embeddings.

        Args:
            hidden_states: ``[B, L, d]`` student hidden states.
            attention_mask: ``[B, L]`` 1 for real tokens; only used for the pooled mean (``pooled="masked"``).
            pooled: ignored (the pooled output is the token mean); accepted for the common head interface.

        Returns:
            :class:`HeadOutput` with ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, P]`` or ``None``,
            and ``attention_mask`` passed through.
        """
        check_hidden(hidden_states, attention_mask, self.config.student_width)
        x = self.projector(self.layernorm(hidden_states))  # [B, L, P or D]
        if self.out_proj is None:
            return HeadOutput(prompt_embeds=x, pooled_prompt_embeds=None, attention_mask=attention_mask)
        pooled_out = masked_mean(x, attention_mask if self.config.pooled == "masked" else None)  # [B, P]
        return HeadOutput(
            prompt_embeds=self.out_proj(x), pooled_prompt_embeds=pooled_out, attention_mask=attention_mask
        )
