"""The MMDiT pivot: teacher-forced joint attention inside a frozen SD3 / Flux transformer (issue 18).

An MMDiT has no cross-attention: image and text tokens share one attention per block, and the text tokens
evolve through the blocks too. The pivot runs the transformer ONCE on the English conditioning and keeps, at
every joint block ``i``, the image tokens' ``Q``, ``K``, ``V``. The student's text stream starts as
``context_embedder(E_zh)`` and is advanced block by block through the frozen TEXT-stream weights of each block,
its text queries attending to ``[teacher image K/V; student text K/V]``; so the student's text at block ``i`` is
what the model would hold if the image evolved as in the English pass. The loss at block ``i`` compares the
image tokens' attention outputs (before ``to_out``) under the two texts, with the same image queries:

    o1 = softmax(q_img [k_img; k_en]^T * s) [v_img; v_en]     # the English pass's own output (what flows on)
    o2 = softmax(q_img [k_img; k_zh]^T * s) [v_img; v_zh]     # to the loss; the graph reaches E_zh only

Gradients reach the student only through its text stream; the image stream is never back-propagated and no
teacher weight ever records a graph, whether it requires grad or not. The English pass computes exactly what
the stock processors compute (``o1`` from the attention function is the flow), so no second image pass is
needed: per block the extra cost is the student's text tokens (``L`` rows) through the text-stream weights.

Supported blocks: SD3's ``JointTransformerBlock`` (``transformer_blocks``; the last one is ``context_pre_only``:
its loss is taken, there is no text output to carry on) and Flux's ``FluxTransformerBlock`` then
``FluxSingleTransformerBlock`` (``single_transformer_blocks``: text and image share the projections, text first,
rotary embeddings over ``[text; image]``). Only the stock processors (``JointAttnProcessor2_0``,
``FluxAttnProcessor``) are tapped; anything else (IP-Adapter) is refused.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from xling.core.pivot import AttentionFn, TapRecords, _outside_autograd, _takes_keyword, check_student

INFERENCE_MODE_MESSAGE = (
    "JointPivotTap cannot build the student's graph under torch.inference_mode() (inference tensors cannot be "
    "saved for backward); run the transformer under torch.no_grad() instead: the student's text stream keeps "
    "its graph by itself"
)

SD3 = "sd3"  # JointTransformerBlock: [image; text] order, optional qk norms, no rotary
FLUX = "flux"  # FluxTransformerBlock: [text; image] order, rotary over [text; image]
FLUX_SINGLE = "flux_single"  # FluxSingleTransformerBlock: text and image in one stream, shared projections


def _joint_branch(
    q: Tensor, k_img: Tensor, v_img: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None
) -> Tensor:
    """``softmax(q [k_img; k]^T * s + mask) [v_img; v]`` ``[B, H, N, d]``; ``mask`` ``[B, M]`` covers ``k`` only."""
    keys, values = torch.cat([k_img, k], dim=2), torch.cat([v_img, v], dim=2)
    if mask is None:
        return F.scaled_dot_product_attention(q, keys, values, scale=scale)
    if mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"`mask2` must be [B, M] = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=q.device, dtype=torch.bool)
    # Image keys are never masked, so no row is ever empty.
    attend = torch.cat([mask.new_ones(mask.shape[0], k_img.shape[2]), mask], dim=1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=scale)


def joint_dual_attention_sdpa(
    q: Tensor,
    k_img: Tensor,
    v_img: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    mask1: Tensor | None = None,
    mask2: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch joint dual attention by concatenation: the image queries under two text branches.

    ``o_i = softmax(q [k_img; k_i]^T * s + mask_i) [v_img; v_i]``, ``s = scale`` or ``1 / sqrt(d)``; the same
    computation as ``xling.kernels.joint_dual_attention_reference``. ``o1`` has no graph; ``o2`` reaches ``k2``,
    ``v2`` (and ``q`` if it requires grad); the image keys/values are constants (detached).

    Args:
        q: ``[B, H, N, d]`` image queries.
        k_img, v_img: ``[B, H, N_kv, d]`` image keys/values (never masked).
        k1, v1: ``[B, H, M1, d]`` teacher text keys/values.
        k2, v2: ``[B, H, M2, d]`` student text keys/values.
        mask1: ``[B, M1]`` bool key padding mask of ``k1`` (True = attend), or ``None``.
        mask2: ``[B, M2]`` bool key padding mask of ``k2`` (True = attend), or ``None``.
        scale: softmax scale; ``None`` = ``1 / sqrt(d)`` (what the stock MMDiT processors use).

    Returns:
        ``o1 [B, H, N, d]`` (a constant) and ``o2 [B, H, N, d]``.
    """
    k_img, v_img = k_img.detach(), v_img.detach()
    with torch.no_grad():
        o1 = _joint_branch(q, k_img, v_img, k1, v1, mask1, scale)
    return o1, _joint_branch(q, k_img, v_img, k2, v2, mask2, scale)


def joint_dual_attention_mse_sdpa(
    q: Tensor,
    k_img: Tensor,
    v_img: Tensor,
    k1: Tensor,
    v1: Tensor,
    k2: Tensor,
    v2: Tensor,
    *,
    mask1: Tensor | None = None,
    mask2: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused-interface reference: ``o1`` and ``mean((o1 - o2)^2)`` in fp32 (fp64 for fp64 inputs).

    Args: as :func:`joint_dual_attention_sdpa`.

    Returns:
        ``o1 [B, H, N, d]`` (a constant) and the scalar loss (grad to ``k2``, ``v2``).
    """
    o1, o2 = joint_dual_attention_sdpa(q, k_img, v_img, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o1, (o1.to(dtype) - o2.to(dtype)).pow(2).mean()


@functools.cache
def _block_types() -> dict[type, str]:
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    return {JointTransformerBlock: SD3, FluxTransformerBlock: FLUX, FluxSingleTransformerBlock: FLUX_SINGLE}


@functools.cache
def _stock_processors() -> dict[str, type]:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    try:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    except ImportError:  # diffusers before the Flux attention refactor
        from diffusers.models.attention_processor import FluxAttnProcessor2_0 as FluxAttnProcessor

    return {SD3: JointAttnProcessor2_0, FLUX: FluxAttnProcessor, FLUX_SINGLE: FluxAttnProcessor}


def joint_attention_blocks(transformer: nn.Module) -> list[tuple[str, str]]:
    """``(name, kind)`` of every MMDiT block in forward order (SD3 ``transformer_blocks``; Flux
    ``transformer_blocks`` then ``single_transformer_blocks``); ``kind`` is ``"sd3"``, ``"flux"`` or
    ``"flux_single"``. Empty for a model without MMDiT blocks."""
    types = _block_types()
    blocks = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, prefix, None) or ()):
            kind = types.get(type(block))
            if kind is not None:
                blocks.append((f"{prefix}.{i}", kind))
    return blocks


def _heads(attn: Any, x: Tensor) -> Tensor:
    """``[B, S, H * d]`` -> ``[B, S, H, d]``, the layout the stock processors normalise and rotate in.

    ``FluxAttnProcessor`` splits by the fixed ``head_dim``, ``JointAttnProcessor2_0`` by ``heads``.
    """
    head_dim = getattr(attn, "head_dim", None)
    if isinstance(head_dim, int):
        return x.unflatten(-1, (-1, head_dim))
    return x.unflatten(-1, (attn.heads, -1))


def _flat(o: Tensor) -> Tensor:
    """``[B, H, S, d]`` -> ``[B, S, H * d]``."""
    return o.transpose(1, 2).flatten(2, 3)


@dataclass
class _Step:
    """The student's state inside one block, between the block's pre-hook, its attention and its hook."""

    kind: str
    text_len: int  # English text tokens of this block's input (Flux single blocks: where the text ends)
    norm: Tensor  # [B, L, D] the student's text after the block's first (modulated) norm
    mods: tuple[Tensor, ...] = ()  # the text stream's gates / shifts / scales (double blocks), gate (single)
    mlp: Tensor | None = None  # Flux single blocks: the MLP branch of the student's text [B, L, D_mlp]
    attn: Tensor | None = None  # [B, L, H * d] the student's text-query attention output (pre to_out)


class JointAttnTapProcessor:
    """Joint-attention processor of :class:`JointPivotTap` for one MMDiT block (diffusers call convention).

    Without a student step pending it calls the stock processor it replaced. With one it computes the English
    pass exactly as the stock processor does, with the image tokens' output taken from the attention
    function's ``o1``; records ``(o1, o2)`` or the block loss; and leaves the student's text-query attention
    output on the step for the block's hook.

    Args:
        tap: the owning tap.
        name: the attention module's name, for records and messages.
        kind: ``"sd3"``, ``"flux"`` or ``"flux_single"``.
        processor: the stock processor it replaced.
    """

    def __init__(self, tap: JointPivotTap, name: str, kind: str, processor: Any) -> None:
        self.tap = tap
        self.name = name
        self.kind = kind
        self.inner = processor

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run the block's joint attention; see the class docstring."""
        step = self.tap._steps.get(self.name)
        if step is None:
            if self.kind == SD3:
                return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError(
                f"{self.name}: JointPivotTap takes no joint attention_mask (the stock MMDiTs pass none)"
            )
        if self.kind == FLUX_SINGLE:
            return self._single(attn, hidden_states, image_rotary_emb, step)
        return self._double(attn, hidden_states, encoder_hidden_states, image_rotary_emb, step)

    # ------------------------------------------------------------------ projections

    def _norm(self, module: Any, x: Tensor) -> Tensor:
        return x if module is None else module(x)

    def _rotate(self, x: Tensor, rotary: Any, start: int, length: int, what: str) -> Tensor:
        """Rotary embedding of the rows ``start:start + length`` of ``rotary`` on ``x`` ``[B, S, H, d]``."""
        if rotary is None:
            return x
        from diffusers.models.embeddings import apply_rotary_emb

        parts = rotary if isinstance(rotary, (tuple, list)) else (rotary,)
        rows = tuple(p[start : start + length] for p in parts)
        if rows[0].shape[0] != length:
            raise ValueError(f"{self.name}: the rotary embedding has no rows for the {what} positions")
        freqs = rows if isinstance(rotary, (tuple, list)) else rows[0]
        return apply_rotary_emb(x, freqs, sequence_dim=1)

    def _student_rotary(self, rotary: Any, text_len: int, student_len: int) -> Any:
        """Rotary rows for the student's text: the English text rows, or, for another length, row 0 repeated
        when every text position has the same embedding (Flux's ``txt_ids`` are all zero)."""
        if rotary is None or student_len == text_len:
            return rotary
        parts = rotary if isinstance(rotary, (tuple, list)) else (rotary,)
        text = [p[:text_len] for p in parts]
        if not all(torch.equal(t, t[:1].expand_as(t)) for t in text):
            raise ValueError(
                f"{self.name}: the student has {student_len} text tokens, the English pass {text_len}, and the "
                "text positions have distinct rotary embeddings; give the student the English text length"
            )
        rows = tuple(t[:1].expand(student_len, -1) for t in text)
        return rows if isinstance(rotary, (tuple, list)) else rows[0]

    def _text_qkv(
        self, attn: Any, text: Tensor, rotary: Any, start: int, added: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Text tokens ``[B, L, D]`` -> ``q, k, v`` ``[B, S, H, d]`` through the block's text projections."""
        if added:
            q, k, v = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
            nq, nk = attn.norm_added_q, attn.norm_added_k
        else:
            q, k, v = attn.to_q(text), attn.to_k(text), attn.to_v(text)
            nq, nk = attn.norm_q, attn.norm_k
        q, k, v = _heads(attn, q), _heads(attn, k), _heads(attn, v)
        q, k = self._norm(nq, q), self._norm(nk, k)
        length = text.shape[1]
        q = self._rotate(q, rotary, start, length, "text")
        k = self._rotate(k, rotary, start, length, "text")
        return q, k, v

    def _image_qkv(self, attn: Any, image: Tensor, rotary: Any, start: int) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (
            _heads(attn, attn.to_q(image)),
            _heads(attn, attn.to_k(image)),
            _heads(attn, attn.to_v(image)),
        )
        q, k = self._norm(attn.norm_q, q), self._norm(attn.norm_k, k)
        length = image.shape[1]
        return (
            self._rotate(q, rotary, start, length, "image"),
            self._rotate(k, rotary, start, length, "image"),
            v,
        )

    # ------------------------------------------------------------------ the pivot

    def _pivot(
        self,
        attn: Any,
        image_qkv: tuple[Tensor, Tensor, Tensor],
        english_qkv: tuple[Tensor, Tensor, Tensor],
        student_text: Tensor,
        rotary: Any,
        added: bool,
        step: _Step,
    ) -> tuple[Tensor, Tensor]:
        """Loss / pair of the image queries, the English text-query output (flow) and the student's text step.

        Returns ``o1 [B, H, N, d]`` (the image tokens' English output, detached) and the English text-query
        output ``[B, H, L_en, d]``; leaves the student's text-query output on ``step.attn``.
        """
        # Contiguous [B, H, S, d]: the CPU attention kernels run markedly slower on the transposed views, and
        # the copies are O(S * d) against the O(N * (N + L) * d) attention.
        q_img, k_img, v_img = (t.transpose(1, 2).contiguous() for t in image_qkv)
        q_en, k_en, v_en = (t.transpose(1, 2).contiguous() for t in english_qkv)
        with torch.no_grad():
            # The stock processors attend over one concatenation; the text queries' part, split off here, is
            # the same softmax (the key order does not change it).
            o_en = F.scaled_dot_product_attention(
                q_en, torch.cat([k_img, k_en], 2), torch.cat([v_img, v_en], 2)
            )
        student_mask = self.tap._student_mask
        requires_grad = student_text.requires_grad
        with torch.set_grad_enabled(requires_grad), _outside_autograd(attn):
            s_rotary = self._student_rotary(rotary, step.text_len, student_text.shape[1])
            q_zh, k_zh, v_zh = (
                t.transpose(1, 2).contiguous() for t in self._text_qkv(attn, student_text, s_rotary, 0, added)
            )
            o1, second = self.tap._attend(
                self.name, q_img, k_img, v_img, k_en, v_en, k_zh, v_zh, student_mask
            )
            # The student's text queries see the teacher's image keys (constants) and its own text keys.
            o_zh = _joint_branch(q_zh, k_img, v_img, k_zh, v_zh, student_mask, None)
            step.attn = _flat(o_zh).to(q_zh.dtype)
        o1 = o1.detach()
        self.tap._record(self.name, o1, second)
        return o1, o_en

    def _double(
        self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, rotary: Any, step: _Step
    ) -> tuple[Tensor, Tensor]:
        """SD3 / Flux double block: returns ``(image output, text output)`` as the stock processor does."""
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: a joint block was called without encoder_hidden_states")
        text_len = encoder_hidden_states.shape[1]
        # Flux rotates over [text; image] positions; SD3 has no rotary.
        text_start, image_start = (0, text_len) if self.kind == FLUX else (0, 0)
        with torch.no_grad():
            image_qkv = self._image_qkv(attn, hidden_states, rotary, image_start)
            english_qkv = self._text_qkv(attn, encoder_hidden_states, rotary, text_start, added=True)
        o1, o_en = self._pivot(attn, image_qkv, english_qkv, step.norm, rotary, True, step)
        dtype = image_qkv[0].dtype
        image = attn.to_out[1](attn.to_out[0](_flat(o1).to(dtype).contiguous()))
        text = _flat(o_en).to(dtype).contiguous()
        if not getattr(attn, "context_pre_only", False):
            text = attn.to_add_out(text)
        return image, text

    def _single(self, attn: Any, hidden_states: Tensor, rotary: Any, step: _Step) -> Tensor:
        """Flux single block: ``hidden_states`` is ``[text; image]`` (normed); returns the attention output of all
        tokens ``[B, L + N, H * d]`` (no ``to_out``: the block projects it), as ``FluxAttnProcessor`` does."""
        text_len = step.text_len
        with torch.no_grad():
            english_qkv = self._text_qkv(attn, hidden_states[:, :text_len], rotary, 0, added=False)
            image_qkv = self._image_qkv(attn, hidden_states[:, text_len:], rotary, text_len)
        o1, o_en = self._pivot(attn, image_qkv, english_qkv, step.norm, rotary, False, step)
        return torch.cat([_flat(o_en), _flat(o1)], dim=1).to(image_qkv[0].dtype)


class JointPivotTap(TapRecords):
    """Context manager for the MMDiT pivot on a diffusers SD3 / Flux transformer (see the module docstring).

    Installs a :class:`JointAttnTapProcessor` on the joint attention of every MMDiT block and hooks that carry
    the student's text stream through the blocks. The transformer's output is always the stock English one.
    Run the transformer under ``torch.no_grad()`` (not ``inference_mode``, which is refused): the student's
    text stream keeps its graph by itself, and only ``prompt_embeds`` get gradients.

    Example::

        with JointPivotTap(teacher.transformer, attention_fn=xling.kernels.joint_dual_attention_mse, fused=True) as tap:
            tap.set_student(student_out.prompt_embeds, student_out.attention_mask)  # [B, L, D_joint], [B, L]
            with torch.no_grad():
                teacher.transformer(z_t, encoder_hidden_states=E_en, pooled_projections=p_en, timestep=t)
            loss = torch.stack(tap.losses).sum()

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` or ``FluxTransformer2DModel`` (any module whose
            ``transformer_blocks`` / ``single_transformer_blocks`` are stock MMDiT blocks).
        attention_fn: ``(q_img, k_img, v_img, k_en, v_en, k_zh, v_zh, *, mask1, mask2, scale) -> (o1, o2)``, or
            ``-> (o1, loss)`` when ``fused`` (all ``[B, H, S, d]``; ``mask2`` ``[B, L]`` bool, True = attend;
            ``mask1`` is always ``None``: the stock MMDiTs mask no text); ``None`` picks
            :func:`joint_dual_attention_sdpa` / :func:`joint_dual_attention_mse_sdpa`.
        fused: ``attention_fn`` returns the block loss instead of the student output.

    Attributes:
        layers: names of the tapped joint attention modules (``transformer_blocks.{i}.attn``, then Flux's
            ``single_transformer_blocks.{i}.attn``), in forward order.
        joint_attention_dim: the width of the student's ``prompt_embeds`` (``context_embedder.in_features``).
        pairs: ``[(o1 [B, H, N, d] detached, o2 [B, H, N, d]), ...]`` in call order (not fused).
        losses: ``[scalar, ...]`` in call order (fused).
        recorded_layers: the layer name of each recorded entry.

    Raises:
        TypeError: ``transformer`` has no MMDiT blocks or no ``context_embedder``; ``attention_fn`` not callable.
        ValueError: on :meth:`install`, a block's attention has a non-stock processor (IP-Adapter, fused
            projections).
    """

    def __init__(
        self, transformer: nn.Module, attention_fn: AttentionFn | None = None, fused: bool = False
    ) -> None:
        if not isinstance(transformer, nn.Module):
            raise TypeError(f"`transformer` must be an nn.Module, got {type(transformer).__name__}")
        blocks = joint_attention_blocks(transformer)
        if not blocks:
            raise TypeError(
                f"JointPivotTap needs an MMDiT (SD3 / Flux transformer with JointTransformerBlock / "
                f"FluxTransformerBlock blocks); {type(transformer).__name__} has none (a UNet or a cross-attention "
                "DiT takes xling.core.PivotTap)"
            )
        embedder = getattr(transformer, "context_embedder", None)
        if not isinstance(embedder, nn.Module):
            raise TypeError(
                f"{type(transformer).__name__} has no `context_embedder` to map the student's embeddings"
            )
        if attention_fn is not None and not callable(attention_fn):
            raise TypeError(f"`attention_fn` must be callable, got {type(attention_fn).__name__}")
        self.transformer = transformer
        self.fused = bool(fused)
        self.attention_fn: AttentionFn = attention_fn or (
            joint_dual_attention_mse_sdpa if fused else joint_dual_attention_sdpa
        )
        self.takes_mask1 = _takes_keyword(self.attention_fn, "mask1")
        self._blocks = blocks
        self.layers = [f"{name}.attn" for name, _ in blocks]
        in_features = getattr(embedder, "in_features", None)
        self.joint_attention_dim: int | None = int(in_features) if in_features is not None else None
        self._originals: dict[str, Any] | None = None
        self._handles: list[RemovableHandle] = []
        self._student: Tensor | None = None
        self._student_mask: Tensor | None = None
        self._text: Tensor | None = None  # the student's text stream entering the next block
        self._steps: dict[str, _Step] = {}
        self.pairs: list[tuple[Tensor, Tensor]] = []
        self.losses: list[Tensor] = []
        self.recorded_layers: list[str] = []

    # ------------------------------------------------------------------ install / remove

    @property
    def installed(self) -> bool:
        """Whether the tap's processors and hooks are in the transformer."""
        return self._originals is not None

    def install(self) -> JointPivotTap:
        """Replace the stock joint processors and register the hooks; returns ``self``."""
        if self.installed:
            raise RuntimeError("JointPivotTap is already installed")
        stock = _stock_processors()
        for name, kind in self._blocks:
            attn = self.transformer.get_submodule(f"{name}.attn")
            processor = attn.processor
            if type(processor) is not stock[kind]:
                raise ValueError(
                    f"{name}.attn has a {type(processor).__name__} processor; JointPivotTap taps the stock "
                    f"{stock[kind].__name__} only (IP-Adapter for MMDiT is not supported)"
                )
            if getattr(attn, "fused_projections", False):
                raise ValueError(
                    f"{name}.attn has fused QKV projections; call unfuse_qkv_projections() first"
                )
        originals: dict[str, Any] = {}
        try:
            self._handles.append(self.transformer.register_forward_pre_hook(self._start, with_kwargs=True))
            for name, kind in self._blocks:
                block = self.transformer.get_submodule(name)
                originals[name] = block.attn.processor
                block.attn.set_processor(
                    JointAttnTapProcessor(self, f"{name}.attn", kind, block.attn.processor)
                )
                self._handles.append(
                    block.register_forward_pre_hook(self._enter(name, kind), with_kwargs=True)
                )
                self._handles.append(block.register_forward_hook(self._exit(name, kind)))
        except BaseException:
            self._originals = originals
            self.remove()
            raise
        self._originals = originals
        return self

    def remove(self) -> None:
        """Restore the original processors, remove the hooks and forget the student."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._originals is not None:
            for name, processor in self._originals.items():
                self.transformer.get_submodule(name).attn.set_processor(processor)
            self._originals = None
        self._student = self._student_mask = self._text = None
        self._steps = {}

    def __enter__(self) -> JointPivotTap:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ student and records

    def set_student(self, prompt_embeds: Tensor, attention_mask: Tensor | None = None) -> None:
        """Set the student's conditioning for the next forward(s) and clear earlier records.

        Args:
            prompt_embeds: ``[B, L, D_joint]`` student embeddings, ``D_joint`` the transformer's
                ``joint_attention_dim`` (the input width of ``context_embedder``).
            attention_mask: ``[B, L]`` key padding mask (True / 1 = attend), or ``None``. Padded student tokens
                are never attended to (by image or text queries); they still run through the text stream.

        Raises:
            TypeError: not tensors.
            ValueError: wrong rank, width or mask shape; the message names both shapes.
            RuntimeError: called under ``torch.inference_mode()``.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_MESSAGE)
        attention_mask = check_student(prompt_embeds, attention_mask)
        if self.joint_attention_dim is not None and prompt_embeds.shape[-1] != self.joint_attention_dim:
            raise ValueError(
                f"student prompt_embeds width {prompt_embeds.shape[-1]} does not fit the teacher's "
                f"joint_attention_dim {self.joint_attention_dim} (context_embedder input)"
            )
        self._student, self._student_mask = prompt_embeds, attention_mask
        self.clear()

    def clear_student(self) -> None:
        """Forget the student: the transformer behaves exactly as stock again."""
        self._student = self._student_mask = self._text = None
        self._steps = {}

    def _attend(
        self,
        layer: str,
        q: Tensor,
        k_img: Tensor,
        v_img: Tensor,
        k1: Tensor,
        v1: Tensor,
        k2: Tensor,
        v2: Tensor,
        mask2: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        if self.takes_mask1:
            return self.attention_fn(q, k_img, v_img, k1, v1, k2, v2, mask1=None, mask2=mask2, scale=None)
        return self.attention_fn(q, k_img, v_img, k1, v1, k2, v2, mask2=mask2, scale=None)

    # ------------------------------------------------------------------ hooks: the student's text stream

    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Transformer pre-hook: the student's text stream starts as ``context_embedder(E_zh)``."""
        self._steps = {}
        self._text = None
        student = self._student
        if student is None:
            return
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_MESSAGE)
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
            raise RuntimeError(
                "JointPivotTap: the transformer has gradient checkpointing on and runs with grad enabled (its "
                "blocks would run twice); run it under torch.no_grad(): the student keeps its graph by itself"
            )
        embedder = module.context_embedder
        weight = getattr(embedder, "weight", None)
        dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else student.dtype
        with torch.set_grad_enabled(student.requires_grad), _outside_autograd(embedder):
            self._text = embedder(student.to(dtype=dtype))

    def _enter(self, name: str, kind: str) -> Callable[[nn.Module, tuple, dict], None]:
        signature = None

        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            nonlocal signature
            text = self._text
            if text is None:
                return
            signature = signature or inspect.signature(block.forward)
            bound = signature.bind(*args, **kwargs).arguments
            image, english, temb = bound["hidden_states"], bound["encoder_hidden_states"], bound["temb"]
            if text.shape[0] != image.shape[0]:
                raise ValueError(
                    f"{name}: student prompt_embeds batch {text.shape[0]} does not match the transformer batch "
                    f"{image.shape[0]} (student text {tuple(text.shape)}, teacher text {tuple(english.shape)})"
                )
            with torch.set_grad_enabled(text.requires_grad), _outside_autograd(block):
                if kind == FLUX_SINGLE:
                    norm, gate = block.norm(text, emb=temb)
                    mlp = block.act_mlp(block.proj_mlp(norm))
                    step = _Step(kind, english.shape[1], norm, (gate,), mlp)
                elif getattr(block, "context_pre_only", False):
                    step = _Step(kind, english.shape[1], block.norm1_context(text, temb))
                else:
                    norm, *mods = block.norm1_context(text, emb=temb)
                    step = _Step(kind, english.shape[1], norm, tuple(mods))
            self._steps[f"{name}.attn"] = step

        return hook

    def _exit(self, name: str, kind: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(block: nn.Module, args: tuple, output: Any) -> None:
            step = self._steps.pop(f"{name}.attn", None)
            text = self._text
            if step is None or text is None:
                return
            if step.attn is None:
                raise RuntimeError(
                    f"{name}: the block ran without its joint attention; cannot advance the student"
                )
            with torch.set_grad_enabled(text.requires_grad), _outside_autograd(block):
                if kind == FLUX_SINGLE:
                    (gate,) = step.mods
                    out = block.proj_out(torch.cat([step.attn, step.mlp], dim=2))
                    text = text + gate.unsqueeze(1) * out
                elif not step.mods:  # context_pre_only: the text stream ends here
                    text = None
                else:
                    gate_msa, shift_mlp, scale_mlp, gate_mlp = step.mods
                    text = text + gate_msa.unsqueeze(1) * block.attn.to_add_out(step.attn.contiguous())
                    norm = block.norm2_context(text) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                    text = text + gate_mlp.unsqueeze(1) * block.ff_context(norm)
                if text is not None and kind != SD3 and text.dtype == torch.float16:
                    text = text.clip(-65504, 65504)  # as the Flux blocks do
            self._text = text

        return hook
