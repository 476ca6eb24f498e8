"""The pivot tap leaves the UNet stock, returns the right shared-query pairs and sends gradients only to the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.core._helpers import capture_attn2_inputs, unet_inputs
from xling.core import PivotTap, Teacher, cross_attention_layers, dual_attention_mse_sdpa, dual_attention_sdpa

FAMILIES = ["sd1_pipe", "sd2_pipe", "sdxl_pipe"]


@pytest.fixture(params=FAMILIES)
def teacher(request) -> Teacher:
    return Teacher.from_pipeline(request.getfixturevalue(request.param))


def _attn2_names(unet: nn.Module) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(".attn2")]


def _student_embeds(teacher: Teacher, batch: int, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, teacher.cross_attention_dim, generator=g)


def test_tap_covers_every_attn2_layer(teacher):
    names = _attn2_names(teacher.unet)
    assert cross_attention_layers(teacher.unet) == names
    # tiny fixtures: SD-1/SD-2 have 1 down + 1 mid + 2 up transformer layers; SDXL 2 down + 2 mid + 4 up
    assert len(names) == (8 if teacher.family == "sdxl" else 4)
    tap = PivotTap(teacher.unet)
    assert tap.layers == names
    inputs = unet_inputs(teacher)
    with tap, torch.no_grad():
        tap.set_student(_student_embeds(teacher, 2))
        teacher.unet(**inputs)
    assert len(tap.pairs) == len(names)
    assert sorted(tap.recorded_layers) == sorted(names)


def test_stock_output_unchanged_and_processors_restored(teacher):
    unet = teacher.unet
    inputs = unet_inputs(teacher)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        stock = unet(**inputs).sample
        with PivotTap(unet) as tap:
            tapped = set(cross_attention_layers(unet))
            now = unet.attn_processors
            for key, proc in now.items():
                is_cross = key.removesuffix(".processor") in tapped
                assert (type(proc).__name__ == "PivotAttnProcessor") == is_cross
                if not is_cross:
                    assert proc is before[key]  # self-attention keeps its stock processor
            no_student = unet(**inputs).sample
            tap.set_student(_student_embeds(teacher, 2))
            with_student = unet(**inputs).sample
        after = unet.attn_processors
    assert (no_student - stock).abs().max().item() == 0.0
    # the teacher branch flows on unchanged even while the student branch runs
    assert (with_student - stock).abs().max().item() == 0.0
    assert not tap.installed
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def _by_hand(attn, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One layer's attention from its own projections and SDPA: ``[B, H, N, d]``."""
    b, h = hidden.shape[0], attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))
    bias = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_pairs_equal_hand_computed_reference(teacher):
    unet = teacher.unet
    inputs = unet_inputs(teacher)
    student = _student_embeds(teacher, 2)
    mask = torch.ones(2, student.shape[1], dtype=torch.bool)
    mask[1, 4:] = False  # the second prompt is shorter: its padding must not be attended
    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        unet(**inputs)
    for handle in handles:
        handle.remove()
    with PivotTap(unet) as tap, torch.no_grad():
        tap.set_student(student, mask)
        unet(**inputs)
    assert len(tap.pairs) == len(seen)
    context = inputs["encoder_hidden_states"]
    with torch.no_grad():
        for name, (o_teacher, o_student) in zip(tap.recorded_layers, tap.pairs, strict=True):
            attn = unet.get_submodule(name)
            expected_t = _by_hand(attn, seen[name], context, None)
            expected_s = _by_hand(attn, seen[name], student, mask)
            assert (
                o_teacher.shape
                == expected_t.shape
                == (2, attn.heads, seen[name].shape[1], expected_t.shape[-1])
            )
            torch.testing.assert_close(o_teacher, expected_t, rtol=0, atol=0)
            torch.testing.assert_close(o_student, expected_s, rtol=1e-6, atol=1e-6)
            assert not torch.allclose(o_teacher, o_student)


def test_teacher_key_mask_path(sd1_teacher):
    """With an ``encoder_attention_mask`` the tap still matches stock and the masked hand-computed pairs."""
    unet = sd1_teacher.unet
    inputs = unet_inputs(sd1_teacher)
    en_mask = torch.ones(2, 77)
    en_mask[:, 10:] = 0
    inputs["encoder_attention_mask"] = en_mask
    student = _student_embeds(sd1_teacher, 2)
    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        stock = unet(**inputs).sample
    for handle in handles:
        handle.remove()
    with torch.no_grad(), PivotTap(unet) as tap:
        tap.set_student(student)
        tapped = unet(**inputs).sample
    with torch.no_grad(), PivotTap(unet, fused=True) as fused:
        fused.set_student(student)
        unet(**inputs)
    assert (tapped - stock).abs().max().item() == 0.0
    context = inputs["encoder_hidden_states"]
    with torch.no_grad():
        for name, (o_t, o_s), loss in zip(tap.recorded_layers, tap.pairs, fused.losses, strict=True):
            attn = unet.get_submodule(name)
            torch.testing.assert_close(o_t, _by_hand(attn, seen[name], context, en_mask.bool()))
            torch.testing.assert_close(o_s, _by_hand(attn, seen[name], student, None))
            torch.testing.assert_close(loss, (o_t - o_s).pow(2).mean())


def test_gradients_reach_student_only(teacher):
    torch.manual_seed(0)
    unet = teacher.unet
    inputs = unet_inputs(teacher)
    head = nn.Linear(6, teacher.cross_attention_dim)
    words = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with PivotTap(unet) as tap:
        embeds = head(words)
        embeds.retain_grad()
        tap.set_student(embeds, mask)
        with torch.no_grad():  # the recommended use: the UNet pass itself builds no graph
            unet(**inputs)
        loss = sum(F.mse_loss(o_s, o_t) for o_t, o_s in tap.pairs)
        loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all()
    assert all(p.grad is None for p in unet.parameters())
    # padded student tokens are never attended, so they get exactly zero gradient
    assert embeds.grad[1, 3:].abs().max().item() == 0.0
    assert embeds.grad[1, :3].abs().max().item() > 0.0


def test_fused_losses_match_pairs_and_backprop(sd1_teacher):
    unet = sd1_teacher.unet
    inputs = unet_inputs(sd1_teacher)
    student = _student_embeds(sd1_teacher, 2).requires_grad_(True)
    with PivotTap(unet) as tap, torch.no_grad():
        tap.set_student(student)
        unet(**inputs)
        pairs = tap.pairs
    with PivotTap(unet, fused=True) as fused, torch.no_grad():
        fused.set_student(student)
        unet(**inputs)
    assert fused.attention_fn is dual_attention_mse_sdpa and tap.attention_fn is dual_attention_sdpa
    assert len(fused.losses) == len(pairs) and not fused.pairs
    for loss, (o_t, o_s) in zip(fused.losses, pairs, strict=True):
        assert loss.dtype == torch.float32 and loss.ndim == 0
        torch.testing.assert_close(loss, (o_t - o_s).pow(2).mean())
    torch.stack(fused.losses).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_passed_attention_fn_is_used_with_head_shaped_tensors(sd1_teacher):
    calls = []

    def spy(q, k1, v1, k2, v2, *, mask2=None, scale=None):
        calls.append((q.shape, k1.shape, k2.shape, None if mask2 is None else mask2.dtype, q.requires_grad))
        return dual_attention_sdpa(q, k1, v1, k2, v2, mask2=mask2, scale=scale)

    inputs = unet_inputs(sd1_teacher)
    with PivotTap(sd1_teacher.unet, attention_fn=spy) as tap:
        tap.set_student(_student_embeds(sd1_teacher, 2, length=5).requires_grad_(True), torch.ones(2, 5))
        sd1_teacher.unet(**inputs)  # even without no_grad, q and the teacher k/v carry no graph
    assert len(calls) == len(tap.layers)
    for q_shape, k1_shape, k2_shape, mask_dtype, q_grad in calls:
        assert len(q_shape) == 4 and k1_shape[:2] == k2_shape[:2] == q_shape[:2]
        assert k1_shape[2] == 77 and k2_shape[2] == 5
        assert mask_dtype == torch.bool and not q_grad


def test_student_width_and_batch_checked(sd1_teacher):
    tap = PivotTap(sd1_teacher.unet)
    with pytest.raises(
        ValueError, match="student prompt_embeds width 48 does not fit the teacher's cross_attention_dim 32"
    ):
        tap.set_student(torch.zeros(2, 7, 48))
    with pytest.raises(ValueError, match=r"attention_mask.*\(2, 7\)"):
        tap.set_student(torch.zeros(2, 7, 32), torch.ones(2, 6))
    inputs = unet_inputs(sd1_teacher)
    with tap, torch.no_grad():
        tap.set_student(torch.zeros(3, 7, 32))
        with pytest.raises(ValueError, match="batch 3 does not match the UNet batch 2"):
            sd1_teacher.unet(**inputs)
    assert not tap.installed
    with pytest.raises(RuntimeError, match="already installed"), PivotTap(sd1_teacher.unet) as again:
        again.install()


# Full-size layouts (configs written out, no download); built on the meta device, so no memory and ~1 s.
SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}


@pytest.mark.parametrize(("config", "count"), [(SD15_UNET, 16), (SDXL_UNET, 70)], ids=["sd15", "sdxl"])
def test_full_size_layouts_count_cross_attention(config, count):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert len(_attn2_names(unet)) == count
    tap = PivotTap(unet)
    assert len(tap.layers) == count
    with tap:
        kinds = [type(p).__name__ for p in unet.attn_processors.values()]
    assert kinds.count("PivotAttnProcessor") == count
    assert "PivotAttnProcessor" not in {type(p).__name__ for p in unet.attn_processors.values()}


@pytest.mark.parametrize("fused", [False, True])
def test_fully_masked_student_row_gives_zero_output_and_zero_gradient(fused):
    """One rule with xling-kernels: a batch element whose student keys are all masked gets ``o2 = 0`` and no
    gradient (SDPA alone would give NaN), while the other elements are exactly SDPA's."""
    g = torch.Generator().manual_seed(0)
    q, k1, v1 = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    k2, v2 = (torch.randn(2, 2, 3, 8, generator=g).requires_grad_() for _ in range(2))
    q.requires_grad_()
    mask2 = torch.tensor([[True, True, False], [False, False, False]])
    fn = dual_attention_mse_sdpa if fused else dual_attention_sdpa
    o1, second = fn(q, k1, v1, k2, v2, mask2=mask2)
    expected = F.scaled_dot_product_attention(q[:1], k2[:1, :, :2], v2[:1, :, :2])
    if fused:
        o2_rows = torch.cat([expected, torch.zeros_like(expected)])
        assert torch.allclose(second, (o1 - o2_rows).pow(2).mean(), atol=1e-6)
    else:
        assert torch.allclose(second[:1], expected, atol=1e-6)
        assert torch.equal(second[1], torch.zeros_like(second[1]))
    second.sum().backward()
    for grad in (q.grad, k2.grad, v2.grad):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert q.grad[0].abs().sum() > 0


def test_unfrozen_teacher_gets_no_gradient(teacher):
    """Whatever the caller left trainable, the pivot loss reaches the student's embeddings only."""
    unet = teacher.unet
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    inputs = unet_inputs(teacher)
    try:
        unet.requires_grad_(True)
        embeds = _student_embeds(teacher, 2).requires_grad_(True)
        with PivotTap(unet, fused=True) as tap:
            tap.set_student(embeds)
            unet(**inputs)  # grad mode on: the flow may build a graph, the pivot loss never reaches the UNet
            torch.stack(tap.losses).sum().backward()
        assert [name for name, p in unet.named_parameters() if p.grad is not None] == []
        assert all(p.requires_grad for p in unet.parameters())
        assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None


def test_soft_teacher_mask_is_refused(sd1_teacher):
    """An encoder_attention_mask that is no 0/1 key padding mask cannot be a ``mask1``: a clear error, not a
    silent reinterpretation."""
    inputs = unet_inputs(sd1_teacher)
    soft = torch.full((2, 77), 0.99)  # diffusers makes it a bias of -100: neither attend (0) nor masked
    with torch.no_grad(), PivotTap(sd1_teacher.unet) as tap:
        tap.set_student(_student_embeds(sd1_teacher, 2))
        with pytest.raises(ValueError, match=r"attn2: the teacher attention mask is a soft bias"):
            sd1_teacher.unet(**inputs, encoder_attention_mask=soft)
