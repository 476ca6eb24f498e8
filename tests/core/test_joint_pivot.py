"""The MMDiT pivot (SD3, Flux): stock English output, exact against a naive block-by-block reference, student-only
gradients, student masks, clear errors, and the xling-kernels joint attention functions as drop-ins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import nn

from xling.core.joint_pivot import (
    JointPivotTap,
    joint_attention_blocks,
    joint_dual_attention_mse_sdpa,
    joint_dual_attention_sdpa,
)

B, TEXT, JOINT = 2, 6, 24


def _save_load(cls: type, model: nn.Module, path: Path) -> nn.Module:
    model.save_pretrained(path)
    return cls.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def sd3(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return _save_load(SD3Transformer2DModel, model, tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=JOINT,
        pooled_projection_dim=12,
        axes_dims_rope=(2, 2, 4),
    )
    return _save_load(FluxTransformer2DModel, model, tmp_path_factory.mktemp("tiny-flux"))


def _inputs(model: nn.Module, seed: int = 0, text_ids: str = "random") -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    common = {
        "encoder_hidden_states": torch.randn(B, TEXT, JOINT, generator=g),
        "pooled_projections": torch.randn(B, 12, generator=g),
        "timestep": torch.tensor([0.3, 0.7]),
        "return_dict": False,
    }
    if isinstance(model, SD3Transformer2DModel):
        return {
            "hidden_states": torch.randn(B, 4, 8, 8, generator=g),
            **common,
            "timestep": torch.tensor([300, 700]),
        }
    n = 16
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
    )
    txt = (
        torch.randint(0, 5, (TEXT, 3), generator=g).float() if text_ids == "random" else torch.zeros(TEXT, 3)
    )
    return {
        "hidden_states": torch.randn(B, n, 4, generator=g),
        **common,
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": txt,
    }


def _student(seed: int = 1, length: int = TEXT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, length, JOINT, generator=g)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [model.get_submodule(name) for name, _ in joint_attention_blocks(model)]


def _pre_to_out_capture(block: nn.Module, out: list[torch.Tensor]) -> list:
    """Hooks recording the image tokens' attention output before to_out ([B, N, H * d])."""
    attn = block.attn
    if getattr(
        attn, "pre_only", False
    ):  # Flux single block: the attention returns [text; image] un-projected
        text_len: list[int] = []

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            text_len[:] = [kwargs["encoder_hidden_states"].shape[1]]

        def post(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            out.append(output[:, text_len[0] :])

        return [block.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post)]

    def to_out(module: nn.Module, args: tuple) -> None:
        out.append(args[0])

    return [attn.to_out[0].register_forward_pre_hook(to_out)]


def _naive(model: nn.Module, inputs: dict, student: torch.Tensor) -> list[torch.Tensor]:
    """Per-block losses of the MMDiT pivot computed by calling the blocks themselves."""
    block_inputs: list[dict] = []
    o1: list[torch.Tensor] = []
    handles = []
    for block in _blocks(model):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k: block_inputs.append(dict(k)), with_kwargs=True)
        )
        handles += _pre_to_out_capture(block, o1)
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    text = model.context_embedder(student)
    losses = []
    for block, kwargs in zip(_blocks(model), block_inputs, strict=True):
        o2: list[torch.Tensor] = []
        handles = _pre_to_out_capture(block, o2)
        call = {**kwargs, "encoder_hidden_states": text, "hidden_states": kwargs["hidden_states"]}
        text, _ = block(**call)
        for h in handles:
            h.remove()
        losses.append((o1[len(losses)].float() - o2[0].float()).pow(2).mean())
    return losses


def _tapped_losses(
    model: nn.Module, inputs: dict, student: torch.Tensor, **tap_kwargs: Any
) -> list[torch.Tensor]:
    tap_kwargs.setdefault("fused", True)
    with JointPivotTap(model, **tap_kwargs) as tap:
        tap.set_student(student)
        with torch.no_grad():
            model(**inputs)
        if tap.fused:
            return list(tap.losses)
        return [(o1.float() - o2.float()).pow(2).mean() for o1, o2 in tap.pairs]


MODELS = ["sd3", "flux"]


@pytest.fixture(params=MODELS)
def model(request) -> nn.Module:
    return request.getfixturevalue(request.param)


def test_blocks_and_layers(sd3, flux):
    assert [k for _, k in joint_attention_blocks(sd3)] == ["sd3"] * 3
    assert [n for n, _ in joint_attention_blocks(flux)] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    tap = JointPivotTap(flux)
    assert tap.layers[-1] == "single_transformer_blocks.1.attn"
    assert tap.joint_attention_dim == JOINT


def test_english_output_is_stock_and_processors_restored(model):
    inputs = _inputs(model)
    before = {name: model.get_submodule(name).attn.processor for name, _ in joint_attention_blocks(model)}
    with torch.no_grad():
        stock = model(**inputs)[0]
        with JointPivotTap(model) as tap:
            assert tap.installed
            no_student = model(**inputs)[0]
            tap.set_student(_student())
            tapped = model(**inputs)[0]
    assert not tap.installed
    assert len(tap.pairs) == len(tap.layers) == len(before)
    assert tap.recorded_layers == tap.layers
    torch.testing.assert_close(no_student, stock, rtol=0, atol=0)
    torch.testing.assert_close(tapped, stock, rtol=1e-5, atol=1e-5)
    for name, proc in before.items():
        assert model.get_submodule(name).attn.processor is proc


def test_matches_naive_reference_losses_and_gradient(model):
    inputs = _inputs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    student = _student().requires_grad_(True)
    ref = _naive(model, inputs, student)
    (ref_grad,) = torch.autograd.grad(torch.stack(ref).sum(), student)

    for p in model.parameters():
        p.requires_grad_(True)  # left trainable on purpose: the tap must still give them no gradient
    try:
        student2 = _student().requires_grad_(True)
        losses = _tapped_losses(model, inputs, student2)
        assert len(losses) == len(ref)
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref), rtol=1e-4, atol=1e-7)
        torch.stack(losses).sum().backward()
        torch.testing.assert_close(student2.grad, ref_grad, rtol=1e-4, atol=1e-7)
        assert all(p.grad is None for p in model.parameters())
        assert student2.grad.abs().sum() > 0
        assert all(loss > 0 for loss in losses)
    finally:
        model.zero_grad(set_to_none=True)


def test_pairs_and_fused_agree_and_student_equal_to_english_gives_zero(model):
    inputs = _inputs(model)
    fused = _tapped_losses(model, inputs, _student(), fused=True)
    pairs = _tapped_losses(model, inputs, _student(), fused=False)
    torch.testing.assert_close(torch.stack(fused), torch.stack(pairs), rtol=1e-5, atol=1e-8)
    # the student given the English embeddings holds the English text at every block: every loss vanishes
    same = _tapped_losses(model, inputs, inputs["encoder_hidden_states"])
    assert max(float(x) for x in same) < 1e-10


@pytest.mark.parametrize("name", MODELS)
def test_student_mask_is_a_key_padding_mask(request, name):
    model = request.getfixturevalue(name)
    inputs = _inputs(model, text_ids="zeros")  # Flux: every text position has the same rotary row
    student = _student(length=4)
    padded = torch.cat([student, 50 * torch.randn(B, 3, JOINT)], dim=1)
    mask = torch.tensor([[1] * 4 + [0] * 3] * B, dtype=torch.bool)
    plain = _tapped_losses(model, inputs, student)
    with JointPivotTap(model, fused=True) as tap:
        tap.set_student(padded, mask)
        with torch.no_grad():
            model(**inputs)
        masked = list(tap.losses)
    torch.testing.assert_close(torch.stack(masked), torch.stack(plain), rtol=1e-5, atol=1e-8)
    unmasked = _tapped_losses(model, inputs, padded)
    assert not torch.allclose(torch.stack(unmasked), torch.stack(plain))


def test_flux_distinct_text_rotary_needs_the_english_length(flux):
    inputs = _inputs(flux, text_ids="random")
    with JointPivotTap(flux) as tap, torch.no_grad():
        tap.set_student(_student(length=TEXT + 1))
        with pytest.raises(ValueError, match="distinct rotary"):
            flux(**inputs)


def test_kernels_as_attention_fn(model):
    kernels = pytest.importorskip("xling.kernels")
    inputs = _inputs(model)
    base = _tapped_losses(model, inputs, _student(), attention_fn=joint_dual_attention_mse_sdpa)
    for fn in (kernels.joint_dual_attention_mse, kernels.joint_dual_attention_mse_reference):
        student = _student().requires_grad_(True)
        losses = _tapped_losses(model, inputs, student, attention_fn=fn)
        torch.testing.assert_close(torch.stack(losses), torch.stack(base), rtol=1e-4, atol=1e-7)
        torch.stack(losses).sum().backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
    pairs = _tapped_losses(model, inputs, _student(), attention_fn=kernels.joint_dual_attention, fused=False)
    torch.testing.assert_close(torch.stack(pairs), torch.stack(base), rtol=1e-4, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_sdpa_reference_functions():
    g = torch.Generator().manual_seed(0)
    q, ki, vi = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    k1, v1, k2, v2 = (torch.randn(2, 2, 3, 4, generator=g) for _ in range(4))
    k2.requires_grad_(True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    o1, o2 = joint_dual_attention_sdpa(q, ki, vi, k1, v1, k2, v2, mask2=mask)
    scores = torch.cat([ki, k2[..., :2, :]], 2)
    ref = (
        torch.softmax(q[0:1] @ scores[0:1].transpose(-1, -2) / 2.0, -1)
        @ torch.cat([vi, v2[..., :2, :]], 2)[0:1]
    )
    torch.testing.assert_close(o2[0:1], ref)
    assert not o1.requires_grad and o2.requires_grad
    _, loss = joint_dual_attention_mse_sdpa(q, ki, vi, k1, v1, k2, v2, mask2=mask)
    torch.testing.assert_close(loss, (o1 - o2).pow(2).mean())


def test_errors(sd3):
    tap = JointPivotTap(sd3)
    with pytest.raises(ValueError, match=r"width 7 .* joint_attention_dim 24"):
        tap.set_student(torch.randn(B, TEXT, 7))
    with pytest.raises(ValueError, match=r"attention_mask"):
        tap.set_student(torch.randn(B, TEXT, JOINT), torch.ones(B, TEXT + 1, dtype=torch.bool))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        tap.set_student(torch.randn(B, TEXT, JOINT))
    with pytest.raises(TypeError, match="MMDiT"):
        JointPivotTap(nn.Linear(2, 2))
    with tap, torch.no_grad():
        tap.set_student(torch.randn(B + 1, TEXT, JOINT))
        with pytest.raises(ValueError, match="batch 3 does not match the transformer batch 2"):
            sd3(**_inputs(sd3))
    with tap:
        tap.set_student(torch.randn(B, TEXT, JOINT))
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            sd3(**_inputs(sd3))


def test_non_stock_processor_is_refused(sd3):
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = sd3.transformer_blocks[1].attn
    original = attn.processor
    attn.set_processor(AttnProcessor2_0())
    try:
        with pytest.raises(ValueError, match=r"transformer_blocks.1.attn has a AttnProcessor2_0"):
            JointPivotTap(sd3).install()
        assert sd3.transformer_blocks[0].attn.processor is not None
        assert type(sd3.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"
    finally:
        attn.set_processor(original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_losses_follow_fp32(model, dtype, tmp_path):
    # a copy in the half dtype (the module fixtures stay fp32 for the other tests)
    model.save_pretrained(tmp_path / "m")
    half = type(model).from_pretrained(tmp_path / "m", torch_dtype=dtype).eval()
    inputs = _inputs(model)
    half_inputs = {
        k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()
    }
    student = _student()
    reference = torch.stack(_tapped_losses(model, inputs, student))
    s = student.to(dtype).requires_grad_(True)
    losses = _tapped_losses(half, half_inputs, s)
    total = torch.stack([loss.float() for loss in losses])
    assert all(torch.isfinite(loss) for loss in losses)
    torch.testing.assert_close(total, reference, rtol=0.1, atol=1e-3)
    total.sum().backward()
    assert s.grad is not None and s.grad.dtype == dtype and torch.isfinite(s.grad).all()
    with torch.no_grad():
        # the English output still flows as the stock half-precision forward
        stock = half(**half_inputs)[0]
        with JointPivotTap(half) as tap:
            tap.set_student(s.detach())
            tapped = half(**half_inputs)[0]
    torch.testing.assert_close(tapped.float(), stock.float(), rtol=2e-2, atol=2e-2)
