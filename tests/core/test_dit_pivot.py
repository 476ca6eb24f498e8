"""PivotTap on cross-attention DiTs (PixArt, Sana): the caption projection as ``context_module``, the T5 / Gemma
padding mask as ``mask1``, stock output, a from-scratch reference per layer, student-only gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import PixArtTransformer2DModel, SanaTransformer2DModel
from torch import nn

from xling.core.pivot import PivotTap, caption_context_module, cross_attention_layers

B, TEXT, STUDENT, CAPTION = 2, 7, 5, 20


def _save_load(cls: type, model: nn.Module, path: Path) -> nn.Module:
    model.save_pretrained(path)
    return cls.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=CAPTION,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return _save_load(PixArtTransformer2DModel, model, tmp_path_factory.mktemp("tiny-pixart"))


@pytest.fixture(scope="module")
def sana(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=CAPTION,
        sample_size=8,
        qk_norm="rms_norm_across_heads",  # the q / k norm runs before the head split (Sana 1.5)
    )
    return _save_load(SanaTransformer2DModel, model, tmp_path_factory.mktemp("tiny-sana"))


@pytest.fixture(params=["pixart", "sana"])
def dit(request) -> nn.Module:
    return request.getfixturevalue(request.param)


def _inputs(dit: nn.Module, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, TEXT)
    mask[1, 4:] = 0  # the second prompt is padded, as the T5 / Gemma tokenizers pad
    inputs: dict[str, Any] = {
        "hidden_states": torch.randn(B, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(B, TEXT, CAPTION, generator=g),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([300, 700]),
        "return_dict": False,
    }
    if isinstance(dit, PixArtTransformer2DModel):
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return inputs


def _student(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, STUDENT, dtype=torch.bool)
    mask[0, 3:] = False
    return torch.randn(B, STUDENT, CAPTION, generator=g), mask


def _tap(dit: nn.Module, **kwargs: Any) -> PivotTap:
    return PivotTap(dit, context_module=caption_context_module(dit), **kwargs)


def _capture_attn2(dit: nn.Module) -> tuple[dict[str, dict], list]:
    seen: dict[str, dict] = {}
    handles = []
    for name in cross_attention_layers(dit):

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[name] = {
                "image": hidden,
                "text": kwargs["encoder_hidden_states"],
                "bias": kwargs.get("attention_mask"),
            }

        handles.append(dit.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _context_by_hand(dit: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    proj = dit.caption_projection
    out = proj.linear_2(proj.act_1(proj.linear_1(embeds)))
    if isinstance(dit, SanaTransformer2DModel):
        out = (
            out
            * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + dit.caption_norm.eps)
            * dit.caption_norm.weight
        )
    return out


def _reference(
    attn: nn.Module, image: torch.Tensor, text: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """Cross-attention of the image tokens over ``text`` before ``to_out``, ``[B, H, N, d]``, by hand."""
    sana = type(attn.processor).__name__ == "SanaAttnProcessor2_0"
    q, k, v = attn.to_q(image), attn.to_k(text), attn.to_v(text)
    if sana and attn.norm_q is not None:  # across-heads norms act on [B, N, H * d]
        q, k = attn.norm_q(q), attn.norm_k(k)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    if not sana and attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def test_layers_and_context_module(pixart, sana):
    assert len(cross_attention_layers(pixart)) == 2 and len(cross_attention_layers(sana)) == 2
    assert caption_context_module(pixart) is pixart.caption_projection
    sana_attn2 = sana.get_submodule(cross_attention_layers(sana)[0])
    assert sana_attn2.norm_q.weight.shape == (16,)  # across heads: normalised before the head split
    seq = caption_context_module(sana)
    assert list(seq) == [sana.caption_projection, sana.caption_norm]
    tap = _tap(pixart)
    assert tap.conditioning_dim == CAPTION
    assert PivotTap(pixart).conditioning_dim == 24  # without a context module: the inner width, as before
    assert (
        PivotTap(pixart, context_module=pixart.caption_projection, conditioning_dim=99).conditioning_dim == 99
    )


def test_stock_output_and_pairs_match_from_scratch_reference(dit):
    inputs = _inputs(dit)
    embeds, mask = _student()
    with torch.no_grad():
        stock = dit(**inputs)[0]
    seen, handles = _capture_attn2(dit)
    try:
        with _tap(dit) as tap, torch.no_grad():
            tap.set_student(embeds, mask)
            tapped = dit(**inputs)[0]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(tapped, stock, rtol=1e-5, atol=1e-6)
    assert tap.recorded_layers == cross_attention_layers(dit)
    teacher_keep = inputs["encoder_attention_mask"].bool()
    with torch.no_grad():
        student_context = _context_by_hand(dit, embeds)
        for name, (o1, o2) in zip(tap.recorded_layers, tap.pairs, strict=True):
            attn, rec = dit.get_submodule(name), seen[name]
            # the mask reached the layer as PixArt / Sana's additive bias [B, 1, M]
            assert rec["bias"] is not None and rec["bias"].shape == (B, 1, TEXT)
            torch.testing.assert_close(
                o1, _reference(attn, rec["image"], rec["text"], teacher_keep), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(
                o2, _reference(attn, rec["image"], student_context, mask), rtol=1e-5, atol=1e-6
            )
            # the teacher's padding mattered: without it o1 differs
            assert not torch.allclose(o1, _reference(attn, rec["image"], rec["text"], None), atol=1e-4)


def test_gradients_reach_only_the_student_and_fused_losses(dit):
    inputs = _inputs(dit)
    embeds, mask = _student()
    assert all(p.requires_grad for p in dit.parameters())  # left trainable: still no teacher gradient
    calls = []
    handle = dit.caption_projection.register_forward_hook(lambda *a: calls.append(1))
    try:
        student = embeds.clone().requires_grad_(True)
        with _tap(dit) as tap:
            tap.set_student(student, mask)
            with torch.no_grad():
                dit(**inputs)
            assert len(calls) == 2  # the English text once, the student once (not once per layer)
            pair_losses = [(o1 - o2).pow(2).mean() for o1, o2 in tap.pairs]
            torch.stack(pair_losses).sum().backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert student.grad[0, 3:].abs().max() == 0  # padded student tokens get no gradient
        assert all(p.grad is None for p in dit.parameters())

        fused_student = embeds.clone().requires_grad_(True)
        with _tap(dit, fused=True) as fused:
            fused.set_student(fused_student, mask)
            for _ in range(2):  # a fresh projection per forward: each forward's losses backward on their own
                with torch.no_grad():
                    dit(**inputs)
                torch.testing.assert_close(torch.stack(fused.losses), torch.stack(pair_losses).detach())
                torch.stack(fused.losses).sum().backward()
                fused.clear()
        torch.testing.assert_close(fused_student.grad, 2 * student.grad)
        assert all(p.grad is None for p in dit.parameters())
    finally:
        handle.remove()
        dit.zero_grad(set_to_none=True)


def test_wrong_width_names_both(pixart):
    with pytest.raises(ValueError, match=r"width 24 does not fit the teacher's conditioning width 20"):
        _tap(pixart).set_student(torch.randn(B, STUDENT, 24))
    with pytest.raises(ValueError, match=r"width 20 .* cross_attention_dim 24.*caption_channels 20"):
        PivotTap(pixart).set_student(torch.randn(B, STUDENT, CAPTION))
    with pytest.raises(TypeError, match="context_module"):
        PivotTap(pixart, context_module=lambda x: x)  # type: ignore[arg-type]


def test_teacher_padding_mask_reaches_attention_fn_as_mask1(dit):
    from xling.core.pivot import dual_attention_sdpa

    masks: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []

    def recording(q, k1, v1, k2, v2, *, mask1=None, mask2=None, scale=None):
        masks.append((mask1, mask2))
        return dual_attention_sdpa(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)

    inputs = _inputs(dit)
    embeds, mask = _student()
    with _tap(dit, attention_fn=recording) as tap, torch.no_grad():
        tap.set_student(embeds, mask)
        dit(**inputs)
    assert len(masks) == len(cross_attention_layers(dit))
    for mask1, mask2 in masks:
        assert mask1 is not None and mask1.dtype == torch.bool
        torch.testing.assert_close(mask1, inputs["encoder_attention_mask"].bool(), rtol=0, atol=0)
        torch.testing.assert_close(mask2, mask, rtol=0, atol=0)
