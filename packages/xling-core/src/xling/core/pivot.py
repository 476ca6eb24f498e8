"""The pivot tap: shared-query dual cross-attention inside a frozen UNet (IAP, "images as pivots").

In every cross-attention layer of one UNet forward conditioned on the teacher's embeddings ``E_en``, the query
``Q`` is computed once from the image stream, then attended against the teacher's keys/values and against the
student's keys/values ``K_zh = to_k(E_zh)``, ``V_zh = to_v(E_zh)`` made with the same frozen projections:

    O_en = Attn(Q, K_en, V_en)   # the teacher branch over the text keys (a constant)
    O_zh = Attn(Q, K_zh, V_zh)   # to the loss; the only branch with a graph (to E_zh only)

The tap composes with the processor each layer already has; what flows on through the UNet is always what
that processor computes:

- stock layer (diffusers ``AttnProcessor2_0`` / ``AttnProcessor``): the fast path. ``O_en`` from the
  attention function is reused for the flow through ``to_out``, so a tapped layer costs one student K/V
  projection and the student half of the dual attention on top of stock.
- any other processor (an IP-Adapter processor that also attends to image-prompt tokens, a custom one): the
  layer's own processor runs unchanged for the flow, and the pivot pair is computed beside it from the TEXT
  part of ``encoder_hidden_states`` only (IP-Adapter tokens, given as a ``(text, ip_tokens)`` tuple or appended
  behind ``num_tokens``, are left out). This costs a second ``to_q`` and teacher ``to_k``/``to_v`` projection
  and a second teacher attention per layer (under ``no_grad``, no activations kept).

Cross-attention DiTs (PixArt, Sana) map the text through ``caption_projection`` (Sana: then ``caption_norm``)
before the blocks; give that map as ``context_module`` (see :func:`caption_context_module`) and the student's
embeddings, in the text encoder's width (``caption_channels``), go through it once per forward before the
per-layer K/V, its weights kept out of autograd like ``to_k`` / ``to_v``. Sana's ``SanaAttnProcessor2_0`` is
taken as stock (it normalises ``q`` / ``k`` before splitting the heads, as the tap then does).

Every path calls the attention function it was given, the teacher's key padding mask included (``mask1``).
Gradients never reach the teacher's weights, frozen or not: the student's K/V are made with the projections'
parameters excluded from autograd, so only ``E_zh`` gets a gradient. Because ``Q`` is a constant, no UNet
backward pass is ever needed. The attention function is passed in, so a recipe can hand over the fused Triton
kernel while core imports no other xling package.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: ``attention_fn(q, k1, v1, k2, v2, *, mask1=None, mask2=None, scale=None) -> (o1, o2)`` or, fused,
#: ``-> (o1, loss)``. ``mask1`` / ``mask2``: ``[B, M1]`` / ``[B, M2]`` bool key padding masks (True = attend).
AttentionFn = Callable[..., tuple[Tensor, Tensor]]

INFERENCE_MODE_MESSAGE = (
    "PivotTap cannot build the student's graph under torch.inference_mode() (inference tensors cannot be saved "
    "for backward); run the UNet under torch.no_grad() instead: the student branch keeps its graph by itself"
)


def _masked_sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, name: str = "mask2"
) -> Tensor:
    """SDPA with a key padding mask ``[B, M]`` (True = attend) -> ``[B, H, N, d]``.

    A fully masked row has no key to attend to; softmax over an empty set is undefined (NaN on some SDPA
    backends), so its output is defined as 0 with zero gradient, the rule the xling-kernels kernels follow.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"`{name}` must be [B, M] = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}")
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
    mask1: Tensor | None = None,
    mask2: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch dual attention: one query against two key/value sets.

    ``o1 = softmax(q k1^T * s + mask1) v1`` (no grad), ``o2 = softmax(q k2^T * s + mask2) v2`` (grad to q, k2,
    v2), ``s = scale`` or ``1 / sqrt(d)``; the same computation as ``xling.kernels.dual_attention_reference``.

    Args:
        q: ``[B, H, N, d]`` queries.
        k1, v1: ``[B, H, M1, d]`` teacher keys/values.
        k2, v2: ``[B, H, M2, d]`` student keys/values.
        mask1: ``[B, M1]`` bool key padding mask of the teacher (True = attend), or ``None``.
        mask2: ``[B, M2]`` bool key padding mask of the student (True = attend), or ``None``.
            For either mask, a fully masked row gives that branch's output 0 (with zero gradient).
        scale: softmax scale; ``None`` = SDPA's default ``1 / sqrt(d)`` (what diffusers' ``AttnProcessor2_0`` uses).

    Returns:
        ``o1 [B, H, N, d]`` (a constant) and ``o2 [B, H, N, d]``.
    """
    with torch.no_grad():
        o1 = _masked_sdpa(q, k1, v1, mask1, scale, name="mask1")
    o2 = _masked_sdpa(q, k2, v2, mask2, scale)
    return o1, o2


def dual_attention_mse_sdpa(
    q: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    mask1: Tensor | None = None,
    mask2: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused-interface reference: ``o1`` and ``mean((o1 - o2)^2)`` in fp32 (IAP eq. 3 for one layer).

    Args: as :func:`dual_attention_sdpa`.

    Returns:
        ``o1 [B, H, N, d]`` (a constant) and the scalar fp32 loss (grad to q, k2, v2).
    """
    o1, o2 = dual_attention_sdpa(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)
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


@functools.cache
def _stock_processor_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor, AttnProcessor2_0, *_heads_after_norm_types())


@functools.cache
def _heads_after_norm_types() -> tuple[type, ...]:
    """Stock processors that apply ``norm_q`` / ``norm_k`` to ``[B, N, H * d]`` before splitting the heads."""
    try:
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    except ImportError:  # a diffusers without Sana
        return ()
    return (SanaAttnProcessor2_0,)


def _is_stock(processor: Any) -> bool:
    """Exactly diffusers' plain processors (a subclass may change the computation, so it is composed)."""
    return type(processor) in _stock_processor_types()


def caption_context_module(denoiser: nn.Module) -> nn.Module | None:
    """The map a cross-attention DiT applies to the text before its blocks, or ``None`` (a UNet, none there).

    PixArt: ``caption_projection`` (``caption_channels`` -> inner width); Sana: ``caption_projection`` then
    ``caption_norm`` (an RMSNorm). The modules are the denoiser's own (not copies), for
    ``PivotTap(context_module=...)``.
    """
    projection = getattr(denoiser, "caption_projection", None)
    if not isinstance(projection, nn.Module):
        return None
    norm = getattr(denoiser, "caption_norm", None)
    return nn.Sequential(projection, norm) if isinstance(norm, nn.Module) else projection


def _input_width(module: nn.Module) -> int | None:
    """``in_features`` of the first ``nn.Linear`` in ``module`` (its input width), or ``None``."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return int(sub.in_features)
    return None


def _function_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{name}" if module else name


def _takes_keyword(fn: Any, keyword: str) -> bool:
    """Whether ``fn`` accepts ``keyword=...`` (by name or through ``**kwargs``); unknown signatures: assume yes."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == keyword and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params
    )


def _call_signature(processor: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(processor.__call__)
    except (TypeError, ValueError):
        return None


def _text_tokens(processor: Any, context: Tensor | tuple) -> Tensor:
    """The text part of a cross-attention layer's ``encoder_hidden_states`` ``[B, M, D]``.

    diffusers 0.42 hands IP-Adapter processors ``(text [B, M, D], [ip_tokens [B, T, D], ...])`` (the UNet's
    ``encoder_hid_proj`` builds it), or, deprecated, one tensor with the first adapter's ``num_tokens[0]``
    image tokens appended behind the text; the processor splits them the same way.
    """
    if isinstance(context, tuple):
        return context[0]
    num_tokens = getattr(processor, "num_tokens", None)
    if num_tokens:
        return context[:, : context.shape[1] - int(num_tokens[0])]
    return context


def _key_padding_mask(mask: Tensor, keys: int, layer: str) -> Tensor:
    """A processor's prepared mask ``[B, H, Q, M]`` -> ``[B, M]`` bool key padding mask (True = attend).

    diffusers turns the UNet's ``encoder_attention_mask`` into an additive bias (0 = attend, -10000 = not);
    a bool mask (True = attend) is taken as is. A mask that varies over heads or queries, or a soft bias,
    is no key padding mask and cannot be handed to a dual-attention function, so it is refused.
    """
    if mask.shape[-1] != keys:
        raise ValueError(
            f"{layer}: the teacher attention mask covers {mask.shape[-1]} keys, the text has {keys}"
        )
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool((keep | (mask <= -1000.0)).all()):
            raise ValueError(
                f"{layer}: the teacher attention mask is a soft bias (values other than 0 and <= -1000), not a "
                "key padding mask; PivotTap only takes encoder_attention_mask as a 0/1 key padding mask"
            )
    first = keep[:, :1, :1, :]  # [B, 1, 1, M]
    if not torch.equal(keep, first.expand_as(keep)):
        raise ValueError(
            f"{layer}: the teacher attention mask varies over heads or queries; PivotTap takes "
            "a key padding mask [B, M] only"
        )
    return first[:, 0, 0, :]


@contextmanager
def _outside_autograd(*modules: nn.Module | None) -> Iterator[None]:
    """Take the modules' parameters out of autograd for the block, whatever their ``requires_grad``.

    The module's own forward still runs, so a LoRA-wrapped or quantised projection computes what it always
    does, and gradients still reach its input; only its weights record no graph.
    """
    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def check_student(prompt_embeds: Tensor, attention_mask: Tensor | None) -> Tensor | None:
    """The input checks every tap's ``set_student`` makes before its own width check; returns the mask as bool.

    Args:
        prompt_embeds: ``[B, L, D]`` student embeddings.
        attention_mask: ``[B, L]`` key padding mask (True / 1 = attend), or ``None``.

    Raises:
        TypeError: not tensors.
        ValueError: wrong rank or mask shape; the message names both shapes.
    """
    if not isinstance(prompt_embeds, Tensor):
        raise TypeError(f"`prompt_embeds` must be a Tensor, got {type(prompt_embeds).__name__}")
    if prompt_embeds.ndim != 3:
        raise ValueError(f"`prompt_embeds` must be [B, L, D], got {tuple(prompt_embeds.shape)}")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"`attention_mask` must be a Tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(prompt_embeds.shape[:2]):
        raise ValueError(
            f"`attention_mask` must be [B, L] = {tuple(prompt_embeds.shape[:2])}, got {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device=prompt_embeds.device, dtype=torch.bool)


class TapRecords:
    """What a pivot tap records per tapped layer, in call order: ``pairs`` (``fused=False``) or ``losses``."""

    fused: bool
    pairs: list[tuple[Tensor, Tensor]]
    losses: list[Tensor]
    recorded_layers: list[str]

    def clear(self) -> None:
        """Drop recorded pairs / losses (frees the student graphs they hold)."""
        self.pairs, self.losses, self.recorded_layers = [], [], []

    def _record(self, name: str, o1: Tensor, second: Tensor) -> None:
        self.recorded_layers.append(name)
        if self.fused:
            self.losses.append(second)
        else:
            self.pairs.append((o1, second))


class PivotAttnProcessor(nn.Module):
    """Cross-attention processor of :class:`PivotTap`: wraps the layer's own processor (diffusers call convention).

    Without a student set it calls the wrapped processor and nothing else. With one it records the pivot pair
    (``O_en`` over the text keys, ``O_zh``) and returns what the wrapped processor computes: reusing ``O_en``
    for the flow when that processor is the stock one, calling it otherwise (see the module docstring).
    A wrapped ``nn.Module`` processor (IP-Adapter) stays a submodule, so its weights still move with the UNet.

    Args:
        tap: the owning tap (student, attention function, records).
        name: the layer's module name, for records and messages.
        processor: the processor the layer had before the tap.
    """

    def __init__(self, tap: PivotTap, name: str, processor: Any) -> None:
        super().__init__()
        self.tap = tap
        self.name = name
        self.inner = processor
        self.stock = _is_stock(processor)
        self.heads_after_norm = type(processor) in _heads_after_norm_types()
        # diffusers' Attention.forward keeps only the cross_attention_kwargs named in
        # inspect.signature(processor.__call__); expose the wrapped processor's names so that its own arguments
        # (IP-Adapter's `ip_adapter_masks`, `scale`) still reach it through the tap.
        signature = _call_signature(processor)
        if signature is not None:
            call = functools.partial(type(self).__call__, self)
            call.__signature__ = signature  # type: ignore[attr-defined]
            self.__dict__["__call__"] = call

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | tuple | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """Run one cross-attention layer; records ``(o_teacher, o_student)`` or the layer loss on the tap."""
        if self.tap._student is None or encoder_hidden_states is None:
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name}: {INFERENCE_MODE_MESSAGE}")
        student = self.tap._conditioning()
        if self.stock:
            return self._fast(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *student)
        out = self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs)
        with torch.no_grad():
            image, _ = self._image_tokens(attn, hidden_states, temb)
        context = _text_tokens(self.inner, encoder_hidden_states)
        self._pivot(attn, image, context, attention_mask, *student)
        return out

    def _inner(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Any,
        attention_mask: Tensor | None,
        temb: Tensor | None,
        args: tuple,
        kwargs: dict,
    ) -> Tensor:
        if args:
            return self.inner(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        # Attention.forward passes no temb; keep it out unless given, so processors without a temb slot work.
        if temb is not None:
            kwargs = {**kwargs, "temb": temb}
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )

    @staticmethod
    def _image_tokens(attn: Any, hidden_states: Tensor, temb: Tensor | None) -> tuple[Tensor, tuple | None]:
        """Image stream as ``AttnProcessor2_0`` prepares it: ``[B, N, C]`` and the 4-D shape to restore, if any."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = None
        if hidden_states.ndim == 4:
            shape = tuple(hidden_states.shape)
            batch, channel, height, width = shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape

    def _fast(
        self,
        attn: Any,
        hidden_states: Tensor,
        context: Tensor,
        attention_mask: Tensor | None,
        temb: Tensor | None,
        student: Tensor,
        student_mask: Tensor | None,
    ) -> Tensor:
        """Stock layer: ``O_en`` from the attention function is the flow (``AttnProcessor2_0``'s tail)."""
        residual = hidden_states
        image, shape = self._image_tokens(attn, hidden_states, temb)
        o1, query_dtype = self._pivot(attn, image, context, attention_mask, student, student_mask)
        batch, heads, _, head_dim = o1.shape
        hidden_states = o1.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query_dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _split(self, attn: Any, x: Tensor, norm: nn.Module | None, batch: int) -> Tensor:
        """``[B, M, H * d]`` -> ``[B, H, M, d]`` with the layer's q / k norm where its processor applies it."""
        if norm is not None and self.heads_after_norm:
            x = norm(x)
        x = _heads(x, batch, attn.heads)
        if norm is not None and not self.heads_after_norm:
            x = norm(x)
        return x

    def _pivot(
        self,
        attn: Any,
        image: Tensor,
        context: Tensor,
        attention_mask: Tensor | None,
        student: Tensor,
        student_mask: Tensor | None,
    ) -> tuple[Tensor, torch.dtype]:
        """Dual attention of the image tokens ``[B, N, C]`` against the text ``[B, M1, D]`` and the student.

        Records the pair (or the fused loss); returns ``o1 [B, H, N, d]`` (detached) and the query's dtype.
        """
        batch = image.shape[0]
        if student.shape[0] != batch:
            raise ValueError(
                f"student prompt_embeds batch {student.shape[0]} does not match the UNet batch {batch} "
                f"(student {tuple(student.shape)}, teacher {tuple(context.shape)})"
            )
        # The teacher branch is a constant: Q, K_en, V_en never need a graph, whatever the caller's grad mode.
        with torch.no_grad():
            text = attn.norm_encoder_hidden_states(context) if attn.norm_cross else context
            query = self._split(attn, attn.to_q(image), attn.norm_q, batch)
            key = self._split(attn, attn.to_k(text), attn.norm_k, batch)
            value = _heads(attn.to_v(text), batch, attn.heads)
            mask1 = None
            if attention_mask is not None:
                prepared = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
                prepared = prepared.view(batch, attn.heads, -1, prepared.shape[-1])
                mask1 = _key_padding_mask(prepared, context.shape[1], self.name)
        # The student branch keeps its graph exactly when the student's embeddings carry one, so the caller may
        # run the whole UNet under no_grad (recommended) and still get gradients to the student; the teacher's
        # projections record no graph even when the caller left them trainable.
        with (
            torch.set_grad_enabled(student.requires_grad),
            _outside_autograd(attn.to_k, attn.to_v, attn.norm_cross, attn.norm_k),
        ):
            context2 = student.to(dtype=context.dtype)
            if attn.norm_cross:
                context2 = attn.norm_encoder_hidden_states(context2)
            key2 = self._split(attn, attn.to_k(context2), attn.norm_k, batch)
            value2 = _heads(attn.to_v(context2), batch, attn.heads)
            o1, second = self.tap._attend(self.name, query, key, value, key2, value2, mask1, student_mask)
        o1 = o1.detach()
        self.tap._record(self.name, o1, second)
        return o1, query.dtype


class PivotTap(TapRecords):
    """Context manager that wraps the processor of every cross-attention layer of a UNet in a
    :class:`PivotAttnProcessor`.

    Self-attention layers keep their processors; on exit every original processor object is restored. The
    UNet's output is always what its own processors compute (an IP-Adapter's contribution included); the pivot
    pair is recorded beside it. Run the UNet under ``torch.no_grad()``, not ``torch.inference_mode()``: the
    student branch saves ``Q`` for its backward and inference tensors cannot be saved, so a student under
    inference mode is refused at once. The tensors handed to ``attention_fn`` are strided views
    (``[B, N, H, d]`` transposed to ``[B, H, N, d]``), as diffusers' own processors make them. A teacher
    ``encoder_attention_mask`` reaches ``attention_fn`` as ``mask1``; a function without a ``mask1`` keyword
    works on unmasked calls and raises a ``TypeError`` naming it on the first masked one.

    Example::

        with PivotTap(teacher.unet, attention_fn=xling.kernels.dual_attention_mse, fused=True) as tap:
            tap.set_student(student_out.prompt_embeds, student_out.attention_mask)  # [B, L, D], [B, L]
            with torch.no_grad():
                teacher.unet(z_t, t, encoder_hidden_states=E_en)
            loss = torch.stack(tap.losses).sum()  # IAP eq. 3 with unit weights

    A cross-attention DiT (PixArt, Sana) takes the student in the text encoder's width::

        dit = teacher.transformer
        with PivotTap(dit, context_module=caption_context_module(dit)) as tap:
            tap.set_student(E_zh, mask_zh)  # [B, L, caption_channels]
            with torch.no_grad():
                dit(z_t, encoder_hidden_states=E_en, encoder_attention_mask=mask_en, timestep=t, ...)

    Args:
        unet: a diffusers UNet (anything with ``attn_processors`` / ``set_attn_processor``).
        attention_fn: ``(q, k1, v1, k2, v2, *, mask1, mask2, scale) -> (o1, o2)``, or ``-> (o1, loss)`` when
            ``fused`` (``mask1`` / ``mask2``: ``[B, M1]`` / ``[B, M2]`` bool, True = attend); ``None`` picks
            :func:`dual_attention_sdpa` / :func:`dual_attention_mse_sdpa`.
        fused: ``attention_fn`` returns the layer loss instead of the student output.
        context_module: applied to the student's ``prompt_embeds`` ``[B, L, D]`` once per forward, before the
            per-layer K/V (a DiT's ``caption_projection``, see :func:`caption_context_module`); its weights
            record no graph. ``None``: the student's embeddings go to ``to_k`` / ``to_v`` as they are (a UNet).
        conditioning_dim: the student width ``set_student`` checks. ``None``: with a ``context_module`` the
            denoiser's ``config.caption_channels`` (else the module's first ``nn.Linear`` input width), without
            one the denoiser's ``cross_attention_dim`` (for PixArt / Sana that is the inner width, after the
            projection).

    Attributes:
        layers: names of the tapped cross-attention modules, in module order.
        takes_mask1: whether ``attention_fn`` accepts ``mask1`` (from its signature).
        conditioning_dim: the width of the student's ``prompt_embeds`` (``None``: not checked).
        pairs: ``[(o_teacher [B, H, N, d] detached, o_student [B, H, N, d]), ...]`` in call order (not fused).
        losses: ``[scalar fp32, ...]`` in call order (fused).
        recorded_layers: the layer name of each recorded entry.
    """

    def __init__(
        self,
        unet: nn.Module,
        attention_fn: AttentionFn | None = None,
        fused: bool = False,
        *,
        context_module: nn.Module | None = None,
        conditioning_dim: int | None = None,
    ) -> None:
        if not hasattr(unet, "set_attn_processor") or not hasattr(unet, "attn_processors"):
            raise TypeError(f"`unet` must have attn_processors/set_attn_processor, got {type(unet).__name__}")
        if attention_fn is not None and not callable(attention_fn):
            raise TypeError(f"`attention_fn` must be callable, got {type(attention_fn).__name__}")
        self.unet = unet
        self.fused = bool(fused)
        self.attention_fn: AttentionFn = attention_fn or (
            dual_attention_mse_sdpa if fused else dual_attention_sdpa
        )
        self.takes_mask1 = _takes_keyword(self.attention_fn, "mask1")
        self.layers = cross_attention_layers(unet)
        if not self.layers:
            raise ValueError(f"{type(unet).__name__} has no cross-attention layers to tap")
        cross_dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
        self.cross_attention_dim: int | None = (
            int(cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim)
            if cross_dim is not None
            else None
        )
        if context_module is not None and not isinstance(context_module, nn.Module):
            raise TypeError(
                f"`context_module` must be an nn.Module or None, got {type(context_module).__name__}"
            )
        self.context_module = context_module
        if conditioning_dim is not None:
            if (
                isinstance(conditioning_dim, bool)
                or not isinstance(conditioning_dim, int)
                or conditioning_dim < 1
            ):
                raise ValueError(
                    f"`conditioning_dim` must be a positive int or None, got {conditioning_dim!r}"
                )
            self.conditioning_dim: int | None = conditioning_dim
        elif context_module is not None:
            channels = getattr(getattr(unet, "config", None), "caption_channels", None)
            self.conditioning_dim = int(channels) if channels is not None else _input_width(context_module)
        else:
            self.conditioning_dim = self.cross_attention_dim
        self._originals: dict[str, Any] | None = None
        self._handle: RemovableHandle | None = None
        self._student: tuple[Tensor, Tensor | None] | None = None
        self._context: Tensor | None = None  # context_module(student), once per forward
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.losses: list[Tensor] = []
        self.recorded_layers: list[str] = []

    # ------------------------------------------------------------------ install / remove

    @property
    def installed(self) -> bool:
        """Whether the tap's processors are in the UNet."""
        return self._originals is not None

    def install(self) -> PivotTap:
        """Wrap every cross-attention processor (``set_attn_processor`` with a full dict); returns ``self``."""
        if self.installed:
            raise RuntimeError("PivotTap is already installed")
        originals = dict(self.unet.attn_processors)
        tapped = {f"{name}.processor" for name in self.layers}
        processors = {
            key: PivotAttnProcessor(self, key.removesuffix(".processor"), proc) if key in tapped else proc
            for key, proc in originals.items()
        }
        self.unet.set_attn_processor(processors)
        self._originals = originals
        if self.context_module is not None:
            # A fresh projection per forward: each forward's losses own their graph (one backward each).
            self._handle = self.unet.register_forward_pre_hook(lambda module, args: self._forget_context())
        return self

    def remove(self) -> None:
        """Restore the processors the UNet had before :meth:`install` and forget the student."""
        if self._originals is not None:
            self.unet.set_attn_processor(dict(self._originals))
            self._originals = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._student = None
        self._context = None

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
            RuntimeError: called under ``torch.inference_mode()`` (the student could get no graph).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_MESSAGE)
        attention_mask = check_student(prompt_embeds, attention_mask)
        width = prompt_embeds.shape[-1]
        if self.conditioning_dim is not None and width != self.conditioning_dim:
            if self.context_module is not None:
                raise ValueError(
                    f"student prompt_embeds width {width} does not fit the teacher's conditioning width "
                    f"{self.conditioning_dim} (the input of context_module {type(self.context_module).__name__})"
                )
            hint = ""
            if caption_context_module(self.unet) is not None:
                channels = getattr(getattr(self.unet, "config", None), "caption_channels", None)
                hint = (
                    f"; {type(self.unet).__name__} projects its text (caption_channels {channels}) before the "
                    "blocks: pass context_module=caption_context_module(denoiser)"
                )
            raise ValueError(
                f"student prompt_embeds width {width} does not fit the teacher's "
                f"cross_attention_dim {self.cross_attention_dim}{hint}"
            )
        self._student = (prompt_embeds, attention_mask)
        self._context = None
        self.clear()

    def clear_student(self) -> None:
        """Forget the student: the tapped layers behave exactly as stock again."""
        self._student = None
        self._context = None

    def _forget_context(self) -> None:
        self._context = None

    def _conditioning(self) -> tuple[Tensor, Tensor | None]:
        """The student's text as the layers' ``to_k`` / ``to_v`` take it, ``[B, L, D_cross]``, and its mask.

        Without a ``context_module`` it is ``prompt_embeds`` itself. With one, ``context_module(prompt_embeds)``
        is computed once per forward (the denoiser's pre-hook drops it), its weights outside autograd.
        """
        assert self._student is not None
        embeds, mask = self._student
        if self.context_module is None:
            return embeds, mask
        if self._context is None:
            param = next((p for p in self.context_module.parameters() if p.is_floating_point()), None)
            dtype = param.dtype if param is not None else embeds.dtype
            with torch.set_grad_enabled(embeds.requires_grad), _outside_autograd(self.context_module):
                self._context = self.context_module(embeds.to(dtype=dtype))
        return self._context, mask

    def _attend(
        self,
        layer: str,
        q: Tensor,
        k1: Tensor,
        v1: Tensor,
        k2: Tensor,
        v2: Tensor,
        mask1: Tensor | None,
        mask2: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Call ``attention_fn``; ``mask1`` is passed whenever the function takes it, and required when set."""
        if not self.takes_mask1:
            if mask1 is not None:
                raise TypeError(
                    f"{layer}: the UNet was given an encoder_attention_mask, but attention_fn "
                    f"{_function_name(self.attention_fn)} takes no `mask1` (the teacher's [B, M1] key padding "
                    "mask); pass one that does, e.g. xling.core.dual_attention_sdpa / dual_attention_mse_sdpa"
                )
            return self.attention_fn(q, k1, v1, k2, v2, mask2=mask2, scale=None)
        return self.attention_fn(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=None)
