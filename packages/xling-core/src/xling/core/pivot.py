"""The pivot tap: shared-query dual cross-attention inside a frozen UNet (IAP, "images as pivots").

In every cross-attention layer of one UNet forward conditioned on the teacher's embeddings ``E_en``, the query
``Q`` is computed once from the image stream, then attended against the teacher's keys/values and against the
student's keys/values ``K_zh = to_k(E_zh)``, ``V_zh = to_v(E_zh)`` made with the same frozen projections:

    O_en = Attn(Q, K_en, V_en)   # flows on through to_out: the UNet runs exactly as stock
    O_zh = Attn(Q, K_zh, V_zh)   # to the loss; the only branch with a graph (to E_zh only)

Because ``Q`` is a constant, no UNet backward pass is ever needed. The attention function is passed in, so a
recipe can hand over the fused Triton kernel while core imports no other xling package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``attention_fn(q, k1, v1, k2, v2, *, mask2=None, scale=None) -> (o1, o2)`` or, fused, ``-> (o1, loss)``.
AttentionFn = Callable[..., tuple[Tensor, Tensor]]


def _masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None) -> Tensor:
    """SDPA with a key padding mask ``[B, M]`` (True = attend) -> ``[B, H, N, d]``.

    A fully masked row has no key to attend to; softmax over an empty set is undefined (NaN on some SDPA
    backends), so its output is defined as 0 with zero gradient, the rule the xling-kernels kernels follow.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"`mask2` must be [B, M2] = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=q.device, dtype=torch.bool)
    has_key = mask.any(dim=1)  # [B]
    # Empty rows attend everywhere (finite forward and backward), then are zeroed: grad through 0 is 0.
    attend = (mask | ~has_key[:, None])[:, None, None, :]  # [B, 1, 1, M]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)
    return torch.where(has_key[:, None, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))


def dual_attention_sdpa(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    mask2: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch dual attention: one query against two key/value sets.

    ``o1 = softmax(q k1^T * s) v1`` (no grad), ``o2 = softmax(q k2^T * s + mask) v2`` (grad to q, k2, v2),
    ``s = scale`` or ``1 / sqrt(d)``; the same computation as ``xling.kernels.dual_attention_reference``.

    Args:
        q: ``[B, H, N, d]`` queries.
        k1, v1: ``[B, H, M1, d]`` teacher keys/values.
        k2, v2: ``[B, H, M2, d]`` student keys/values.
        mask2: ``[B, M2]`` bool key padding mask of the student (True = attend), or ``None``; a fully
            masked row gives ``o2 = 0`` with zero gradient.
        scale: softmax scale; ``None`` = SDPA's default ``1 / sqrt(d)`` (what diffusers' ``AttnProcessor2_0`` uses).

    Returns:
        ``o1 [B, H, N, d]`` (a constant) and ``o2 [B, H, N, d]``.
    """
    with torch.no_grad():
        o1 = F.scaled_dot_product_attention(q, k1, v1, scale=scale)
    o2 = _masked_sdpa(q, k2, v2, mask2, scale)
    return o1, o2


def dual_attention_mse_sdpa(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    mask2: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused-interface reference: ``o1`` and ``mean((o1 - o2)^2)`` in fp32 (IAP eq. 3 for one layer).

    Args: as :func:`dual_attention_sdpa`.

    Returns:
        ``o1 [B, H, N, d]`` (a constant) and the scalar fp32 loss (grad to q, k2, v2).
    """
    o1, o2 = dual_attention_sdpa(q, k1, v1, k2, v2, mask2=mask2, scale=scale)
    return o1, (o1.float() - o2.float()).pow(2).mean()


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Module names of every cross-attention layer (diffusers ``Attention`` with ``is_cross_attention``).

    In the SD / SDXL UNets these are exactly the ``attn2`` modules: 16 in SD 1.x/2.x, 70 in SDXL.
    """
    return [
        name
        for name, module in unet.named_modules()
        if hasattr(module, "set_processor") and getattr(module, "is_cross_attention", False)
    ]


def _heads(x: Tensor, batch: int, heads: int) -> Tensor:
    """``[B, M, H * d]`` -> ``[B, H, M, d]``."""
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class PivotAttnProcessor:
    """Cross-attention processor of :class:`PivotTap` (diffusers processor call convention).

    Without a student set it computes exactly what ``AttnProcessor2_0`` computes. With one, it runs the dual
    attention and keeps ``O_en`` flowing through ``to_out``.
    """

    def __init__(self, tap: PivotTap, name: str) -> None:
        self.tap = tap
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """Run one cross-attention layer; records ``(o_teacher, o_student)`` or the layer loss on the tap."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        student = self.tap._student
        if student is None or encoder_hidden_states is None:
            out, query_dtype = self._stock(attn, hidden_states, encoder_hidden_states, attention_mask)
        else:
            out, query_dtype = self._dual(
                attn, hidden_states, encoder_hidden_states, attention_mask, *student
            )

        heads, head_dim = out.shape[1], out.shape[-1]
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query_dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _project(attn: Any, hidden_states: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q from the image stream, k/v from ``context``, each ``[B, H, *, d]`` (norms as ``AttnProcessor2_0``)."""
        batch = hidden_states.shape[0]
        query = _heads(attn.to_q(hidden_states), batch, attn.heads)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = _heads(attn.to_k(context), batch, attn.heads)
        value = _heads(attn.to_v(context), batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value

    def _stock(
        self, attn: Any, hidden_states: Tensor, context: Tensor | None, attention_mask: Tensor | None
    ) -> tuple[Tensor, torch.dtype]:
        query, key, value = self._project(attn, hidden_states, hidden_states if context is None else context)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        return out, query.dtype

    def _dual(
        self,
        attn: Any,
        hidden_states: Tensor,
        context: Tensor,
        attention_mask: Tensor | None,
        student: Tensor,
        student_mask: Tensor | None,
    ) -> tuple[Tensor, torch.dtype]:
        batch = hidden_states.shape[0]
        if student.shape[0] != batch:
            raise ValueError(
                f"student prompt_embeds batch {student.shape[0]} does not match the UNet batch {batch} "
                f"(student {tuple(student.shape)}, teacher {tuple(context.shape)})"
            )
        # The teacher branch is a constant: Q, K_en, V_en never need a graph, whatever the caller's grad mode.
        with torch.no_grad():
            query, key, value = self._project(attn, hidden_states, context)
        # The student branch keeps its graph exactly when the student's embeddings carry one, so the caller may
        # run the whole UNet under no_grad (recommended) and still get gradients to the student.
        with torch.set_grad_enabled(student.requires_grad):
            context2 = student.to(dtype=context.dtype)
            if attn.norm_cross:
                context2 = attn.norm_encoder_hidden_states(context2)
            key2 = _heads(attn.to_k(context2), batch, attn.heads)
            value2 = _heads(attn.to_v(context2), batch, attn.heads)
            if attn.norm_k is not None:
                key2 = attn.norm_k(key2)
            if attention_mask is None:
                o1, second = self.tap.attention_fn(
                    query, key, value, key2, value2, mask2=student_mask, scale=None
                )
            else:
                # A teacher key mask is outside the dual-attention contract: run the two branches separately.
                with torch.no_grad():
                    o1 = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
                second = _masked_sdpa(query, key2, value2, student_mask, None)
                if self.tap.fused:
                    second = (o1.float() - second.float()).pow(2).mean()
        o1 = o1.detach()
        self.tap._record(self.name, o1, second)
        return o1, query.dtype


class PivotTap:
    """Context manager that installs :class:`PivotAttnProcessor` on every cross-attention layer of a UNet.

    Self-attention layers keep their processors; on exit every original processor is restored. Run the UNet
    under ``torch.no_grad()``, not ``torch.inference_mode()``: the student branch saves ``Q`` for its backward,
    and inference tensors cannot be saved. The tensors handed to ``attention_fn`` are strided views
    (``[B, N, H, d]`` transposed to ``[B, H, N, d]``), as diffusers' own processors make them.

    Example::

        with PivotTap(teacher.unet, attention_fn=xling.kernels.dual_attention_mse, fused=True) as tap:
            tap.set_student(student_out.prompt_embeds, student_out.attention_mask)  # [B, L, D], [B, L]
            with torch.no_grad():
                teacher.unet(z_t, t, encoder_hidden_states=E_en)
            loss = torch.stack(tap.losses).sum()  # IAP eq. 3 with unit weights

    Args:
        unet: a diffusers UNet (anything with ``attn_processors`` / ``set_attn_processor``).
        attention_fn: ``(q, k1, v1, k2, v2, *, mask2, scale) -> (o1, o2)``, or ``-> (o1, loss)`` when ``fused``;
            ``None`` picks :func:`dual_attention_sdpa` / :func:`dual_attention_mse_sdpa`.
        fused: ``attention_fn`` returns the layer loss instead of the student output.

    Attributes:
        layers: names of the tapped cross-attention modules, in module order.
        pairs: ``[(o_teacher [B, H, N, d] detached, o_student [B, H, N, d]), ...]`` in call order (not fused).
        losses: ``[scalar fp32, ...]`` in call order (fused).
        recorded_layers: the layer name of each recorded entry.
    """

    def __init__(self, unet: nn.Module, attention_fn: AttentionFn | None = None, fused: bool = False) -> None:
        if not hasattr(unet, "set_attn_processor") or not hasattr(unet, "attn_processors"):
            raise TypeError(f"`unet` must have attn_processors/set_attn_processor, got {type(unet).__name__}")
        if attention_fn is not None and not callable(attention_fn):
            raise TypeError(f"`attention_fn` must be callable, got {type(attention_fn).__name__}")
        self.unet = unet
        self.fused = bool(fused)
        self.attention_fn: AttentionFn = attention_fn or (
            dual_attention_mse_sdpa if fused else dual_attention_sdpa
        )
        self.layers = cross_attention_layers(unet)
        if not self.layers:
            raise ValueError(f"{type(unet).__name__} has no cross-attention layers to tap")
        cross_dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        self.cross_attention_dim: int | None = (
            int(cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim)
            if cross_dim is not None
            else None
        )
        self._originals: dict[str, Any] | None = None
        self._student: tuple[Tensor, Tensor | None] | None = None
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.losses: list[Tensor] = []
        self.recorded_layers: list[str] = []

    # ------------------------------------------------------------------ install / remove

    @property
    def installed(self) -> bool:
        """Whether the tap's processors are in the UNet."""
        return self._originals is not None

    def install(self) -> PivotTap:
        """Swap in the pivot processors (``set_attn_processor`` with a full dict); returns ``self``."""
        if self.installed:
            raise RuntimeError("PivotTap is already installed")
        originals = dict(self.unet.attn_processors)
        tapped = {f"{name}.processor" for name in self.layers}
        processors = {
            key: PivotAttnProcessor(self, key.removesuffix(".processor")) if key in tapped else proc
            for key, proc in originals.items()
        }
        self.unet.set_attn_processor(processors)
        self._originals = originals
        return self

    def remove(self) -> None:
        """Restore the processors the UNet had before :meth:`install` and forget the student."""
        if self._originals is not None:
            self.unet.set_attn_processor(dict(self._originals))
            self._originals = None
        self._student = None

    def __enter__(self) -> PivotTap:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ student and records

    def set_student(self, prompt_embeds: Tensor, attention_mask: Tensor | None = None) -> None:
        """Set the student's conditioning for the next forward(s) and clear earlier records.

        Args:
            prompt_embeds: ``[B, L, D]`` student embeddings, ``D`` the UNet's ``cross_attention_dim``.
            attention_mask: ``[B, L]`` key padding mask (True / 1 = attend), or ``None`` (all tokens attend).

        Raises:
            TypeError: not tensors.
            ValueError: wrong rank, width or mask shape; the message names both shapes.
        """
        if not isinstance(prompt_embeds, Tensor):
            raise TypeError(f"`prompt_embeds` must be a Tensor, got {type(prompt_embeds).__name__}")
        if prompt_embeds.ndim != 3:
            raise ValueError(f"`prompt_embeds` must be [B, L, D], got {tuple(prompt_embeds.shape)}")
        if self.cross_attention_dim is not None and prompt_embeds.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"student prompt_embeds width {prompt_embeds.shape[-1]} does not fit the teacher's "
                f"cross_attention_dim {self.cross_attention_dim}"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor):
                raise TypeError(
                    f"`attention_mask` must be a Tensor or None, got {type(attention_mask).__name__}"
                )
            if tuple(attention_mask.shape) != tuple(prompt_embeds.shape[:2]):
                raise ValueError(
                    f"`attention_mask` must be [B, L] = {tuple(prompt_embeds.shape[:2])}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(device=prompt_embeds.device, dtype=torch.bool)
        self._student = (prompt_embeds, attention_mask)
        self.clear()

    def clear_student(self) -> None:
        """Forget the student: the tapped layers behave exactly as stock again."""
        self._student = None

    def clear(self) -> None:
        """Drop recorded pairs / losses (frees the student graphs they hold)."""
        self.pairs, self.losses, self.recorded_layers = [], [], []

    def _record(self, name: str, o1: Tensor, second: Tensor) -> None:
        self.recorded_layers.append(name)
        if self.fused:
            self.losses.append(second)
        else:
            self.pairs.append((o1, second))
