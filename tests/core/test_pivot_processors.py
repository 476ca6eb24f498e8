"""The pivot tap as a well-behaved diffusers processor: it composes with the layer's own processor (IP-Adapter),
hands a teacher mask to the attention function, never gives the teacher's weights a gradient and refuses
``torch.inference_mode()`` at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from tests.core._helpers import capture_attn2_inputs, unet_inputs
from xling.core import PivotTap, cross_attention_layers, dual_attention_mse_sdpa, dual_attention_sdpa

IMAGE_EMBED_DIM = 12
IP_TOKENS = 4


def _fresh_unet(path) -> UNet2DConditionModel:
    """A private copy of the tiny SD-1 UNet (the session teacher's stays untouched)."""
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def _with_ip_adapter(unet: UNet2DConditionModel, seed: int = 3) -> UNet2DConditionModel:
    """Load a random IP-Adapter through diffusers' own loader: ``IPAdapterAttnProcessor2_0`` on every attn2 and
    an ``ImageProjection`` as ``encoder_hid_proj`` (so the UNet hands attn2 a ``(text, [ip_tokens])`` tuple)."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(IP_TOKENS * dim, IMAGE_EMBED_DIM, generator=g) * 0.2,
        "proj.bias": torch.randn(IP_TOKENS * dim, generator=g) * 0.1,
        "norm.weight": torch.ones(dim),
        "norm.bias": torch.zeros(dim),
    }
    ip_adapter = {}
    for i, name in enumerate(cross_attention_layers(unet)):
        hidden = unet.get_submodule(name).to_k.out_features
        key_id = 2 * i + 1  # diffusers numbers attn2 processors 1, 3, 5, ... in attn_processors order
        ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, dim, generator=g) * 0.3
        ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, dim, generator=g) * 0.3
    unet._load_ip_adapter_weights(
        [{"image_proj": image_proj, "ip_adapter": ip_adapter}], low_cpu_mem_usage=False
    )
    return unet


def _ip_inputs(teacher) -> dict:
    inputs = unet_inputs(teacher)
    g = torch.Generator().manual_seed(5)
    inputs["added_cond_kwargs"] = {"image_embeds": [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=g)]}
    return inputs


def _student(width: int, batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


def _reference(attn, hidden: torch.Tensor, context: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """One layer's attention from scratch: its own projections, an explicit softmax; ``[B, H, N, d]``."""
    b, h = hidden.shape[0], attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [B, H, N, M]
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ v


def _assert_pairs_match(unet, tap, seen, context, student, keep_text=None, keep_student=None):
    assert len(tap.pairs) == len(cross_attention_layers(unet)) == len(seen)
    with torch.no_grad():
        for name, (o_t, o_s) in zip(tap.recorded_layers, tap.pairs, strict=True):
            attn = unet.get_submodule(name)
            torch.testing.assert_close(
                o_t, _reference(attn, seen[name], context, keep_text), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(
                o_s, _reference(attn, seen[name], student, keep_student), rtol=1e-5, atol=1e-6
            )


# ---------------------------------------------------------------------------------------------- composition


def test_ip_adapter_output_kept_and_pair_over_text_keys(tiny_sd1_path, sd1_teacher):
    unet = _with_ip_adapter(_fresh_unet(tiny_sd1_path))
    inputs = _ip_inputs(sd1_teacher)
    student = _student(unet.config.cross_attention_dim)
    before = dict(unet.attn_processors)
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in before.values()) == 4
    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        stock = unet(**inputs).sample
    for handle in handles:
        handle.remove()
    with torch.no_grad(), PivotTap(unet) as tap:
        assert all(
            type(p).__name__ == "PivotAttnProcessor" for k, p in unet.attn_processors.items() if "attn2" in k
        )
        no_student = unet(**inputs).sample
        tap.set_student(student)
        with_student = unet(**inputs).sample
    # the IP-Adapter's image-prompt attention still flows: bit-identical UNet output with and without the tap
    assert torch.equal(no_student, stock) and torch.equal(with_student, stock)
    # the pair is over the TEXT keys only (the image-prompt tokens are the IP processor's business)
    _assert_pairs_match(unet, tap, seen, inputs["encoder_hidden_states"], student)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_ip_adapter_contribution_is_real(tiny_sd1_path, sd1_teacher):
    """Guard for the test above: the IP-Adapter changes the output, so 'identical' means 'IP kept'."""
    plain = _fresh_unet(tiny_sd1_path)
    unet = _with_ip_adapter(_fresh_unet(tiny_sd1_path))
    inputs = _ip_inputs(sd1_teacher)
    with torch.no_grad():
        with_ip = unet(**inputs).sample
        without = plain(**{k: v for k, v in inputs.items() if k != "added_cond_kwargs"}).sample
    assert (with_ip - without).abs().max().item() > 1e-3


def test_ip_adapter_kwargs_reach_the_wrapped_processor(tiny_sd1_path, sd1_teacher):
    """diffusers drops cross_attention_kwargs a processor's signature does not name; the tap exposes the
    IP processor's, so ``ip_adapter_masks`` still takes effect."""
    unet = _with_ip_adapter(_fresh_unet(tiny_sd1_path))
    inputs = _ip_inputs(sd1_teacher)
    side = inputs["sample"].shape[-1]
    region = torch.zeros(1, 1, side, side)
    region[..., : side // 2] = 1.0  # the image prompt applies to the left half only
    kwargs = {"ip_adapter_masks": [region]}
    with torch.no_grad():
        unmasked = unet(**inputs).sample
        stock = unet(**inputs, cross_attention_kwargs=kwargs).sample
        with PivotTap(unet) as tap:
            tap.set_student(_student(unet.config.cross_attention_dim))
            tapped = unet(**inputs, cross_attention_kwargs=kwargs).sample
    assert (stock - unmasked).abs().max().item() > 1e-4
    assert torch.equal(tapped, stock)


def test_ip_adapter_concatenated_tokens(tiny_sd1_path, sd1_teacher):
    """The deprecated form: image-prompt tokens appended behind the text; the pair strips ``num_tokens``."""
    unet = _fresh_unet(tiny_sd1_path)
    dim = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(7)
    processors = {}
    for key, proc in unet.attn_processors.items():
        if key.removesuffix(".processor") in cross_attention_layers(unet):
            hidden = unet.get_submodule(key.removesuffix(".processor")).to_k.out_features
            proc = IPAdapterAttnProcessor2_0(hidden, dim, num_tokens=(IP_TOKENS,))
            for lin in (*proc.to_k_ip, *proc.to_v_ip):
                lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.3
        processors[key] = proc
    unet.set_attn_processor(processors)
    inputs = unet_inputs(sd1_teacher)
    text = inputs["encoder_hidden_states"]
    inputs["encoder_hidden_states"] = torch.cat([text, torch.randn(2, IP_TOKENS, dim, generator=g)], dim=1)
    student = _student(dim)
    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        stock = unet(**inputs).sample
    for handle in handles:
        handle.remove()
    with torch.no_grad(), PivotTap(unet) as tap:
        tap.set_student(student)
        tapped = unet(**inputs).sample
    assert torch.equal(tapped, stock)
    _assert_pairs_match(unet, tap, seen, text, student)


class _Halving(AttnProcessor2_0):
    """A custom processor (a subclass, so not the stock fast path) that changes the layer's output."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return 0.5 * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_custom_processor_composed(tiny_sd1_path, sd1_teacher):
    unet = _fresh_unet(tiny_sd1_path)
    layers = set(cross_attention_layers(unet))
    unet.set_attn_processor(
        {
            k: _Halving() if k.removesuffix(".processor") in layers else p
            for k, p in unet.attn_processors.items()
        }
    )
    inputs = unet_inputs(sd1_teacher)
    student = _student(unet.config.cross_attention_dim)
    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        stock = unet(**inputs).sample
    for handle in handles:
        handle.remove()
    with torch.no_grad(), PivotTap(unet, fused=True) as tap:
        tap.set_student(student)
        tapped = unet(**inputs).sample
    assert torch.equal(tapped, stock)
    with torch.no_grad():
        for name, loss in zip(tap.recorded_layers, tap.losses, strict=True):
            attn = unet.get_submodule(name)
            o_t = _reference(attn, seen[name], inputs["encoder_hidden_states"], None)
            o_s = _reference(attn, seen[name], student, None)
            torch.testing.assert_close(loss, (o_t - o_s).pow(2).mean(), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------- teacher mask


def _en_mask() -> torch.Tensor:
    mask = torch.ones(2, 77)
    mask[0, 9:] = 0
    mask[1, 14:] = 0
    return mask


@pytest.mark.parametrize("ip", [False, True], ids=["stock", "ip_adapter"])
def test_teacher_mask_goes_to_attention_fn(tiny_sd1_path, sd1_teacher, ip):
    unet = _fresh_unet(tiny_sd1_path)
    inputs = unet_inputs(sd1_teacher)
    if ip:
        unet = _with_ip_adapter(unet)
        inputs = _ip_inputs(sd1_teacher)
    en_mask = _en_mask()
    inputs["encoder_attention_mask"] = en_mask
    student = _student(unet.config.cross_attention_dim)
    student_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    calls = []

    def spy(q, k1, v1, k2, v2, *, mask1=None, mask2=None, scale=None):
        calls.append((mask1, mask2))
        return dual_attention_sdpa(q, k1, v1, k2, v2, mask1=mask1, mask2=mask2, scale=scale)

    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        stock = unet(**inputs).sample
    for handle in handles:
        handle.remove()
    with torch.no_grad(), PivotTap(unet, attention_fn=spy) as tap:
        tap.set_student(student, student_mask)
        tapped = unet(**inputs).sample
    assert len(calls) == len(tap.layers) == 4
    for mask1, mask2 in calls:
        assert mask1.dtype == torch.bool and torch.equal(mask1, en_mask.bool())
        assert torch.equal(mask2, student_mask)
    torch.testing.assert_close(tapped, stock, rtol=1e-5, atol=1e-6)
    _assert_pairs_match(
        unet,
        tap,
        seen,
        inputs["encoder_hidden_states"],
        student,
        keep_text=en_mask.bool(),
        keep_student=student_mask,
    )


def test_attention_fn_without_mask1_is_refused_on_a_masked_call(sd1_teacher):
    def old_contract(q, k1, v1, k2, v2, *, mask2=None, scale=None):
        return dual_attention_mse_sdpa(q, k1, v1, k2, v2, mask2=mask2, scale=scale)

    unet = sd1_teacher.unet
    inputs = unet_inputs(sd1_teacher)
    tap = PivotTap(unet, attention_fn=old_contract, fused=True)
    assert not tap.takes_mask1 and PivotTap(unet).takes_mask1
    with torch.no_grad(), tap:
        tap.set_student(_student(32))
        unet(**inputs)  # unmasked: the old contract is enough
        assert len(tap.losses) == 4
        with pytest.raises(TypeError, match=r"old_contract takes no `mask1`"):
            unet(**inputs, encoder_attention_mask=_en_mask())
    assert not tap.installed


def test_mask1_fully_masked_row_is_zero():
    g = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(5))
    mask1 = torch.tensor([[True, True, False, False, True], [False] * 5])
    o1, _ = dual_attention_sdpa(q, k1, v1, k2, v2, mask1=mask1)
    keep = mask1[0]
    torch.testing.assert_close(
        o1[:1], F.scaled_dot_product_attention(q[:1], k1[:1, :, keep], v1[:1, :, keep])
    )
    assert torch.equal(o1[1], torch.zeros_like(o1[1]))


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("ip", [False, True], ids=["stock", "ip_adapter"])
def test_unfrozen_teacher_gets_no_gradient(tiny_sd1_path, sd1_teacher, ip):
    def student_grad(unet: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
        embeds = _student(unet.config.cross_attention_dim).requires_grad_(True)
        with PivotTap(unet) as tap:
            tap.set_student(embeds, torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))
            unet(**inputs)  # grad mode on, as a caller who forgot no_grad would run it
            loss = sum(F.mse_loss(o_s, o_t) for o_t, o_s in tap.pairs)
        loss.backward()
        return embeds.grad

    inputs = _ip_inputs(sd1_teacher) if ip else unet_inputs(sd1_teacher)
    make = (
        (lambda: _with_ip_adapter(_fresh_unet(tiny_sd1_path))) if ip else (lambda: _fresh_unet(tiny_sd1_path))
    )
    unfrozen = make()
    assert all(p.requires_grad for p in unfrozen.parameters())
    grad = student_grad(unfrozen, inputs)
    assert [n for n, p in unfrozen.named_parameters() if p.grad is not None] == []
    assert all(p.requires_grad for p in unfrozen.parameters())  # the caller's flags are given back
    frozen = make().requires_grad_(False)
    expected = student_grad(frozen, inputs)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- inference mode


def test_inference_mode_is_refused_at_once(sd1_teacher):
    unet = sd1_teacher.unet
    inputs = unet_inputs(sd1_teacher)
    student = _student(32)
    with PivotTap(unet) as tap:
        with (
            torch.inference_mode(),
            pytest.raises(RuntimeError, match=r"inference_mode\(\).*torch\.no_grad\(\)"),
        ):
            tap.set_student(student)
        tap.set_student(student)
        with (
            torch.inference_mode(),
            pytest.raises(RuntimeError, match=r"attn2: .*inference_mode\(\).*no_grad"),
        ):
            unet(**inputs)
        assert tap.pairs == []
        tap.clear_student()
        with torch.inference_mode():
            stock = unet(
                **inputs
            ).sample  # without a student the tapped UNet is stock, inference mode included
    with torch.no_grad():
        torch.testing.assert_close(stock.clone(), unet(**inputs).sample, rtol=0, atol=0)


def test_lora_wrapped_projections_run_but_get_no_gradient(tiny_sd1_path, sd1_teacher):
    """A peft LoRA on to_k / to_v (trainable, as peft leaves it) is part of the teacher: the student's K/V go
    through it, and neither its weights nor the base weights get a gradient."""
    from peft import LoraConfig

    unet = _fresh_unet(tiny_sd1_path)
    unet.add_adapter(
        LoraConfig(r=2, lora_alpha=4, target_modules=["attn2.to_k", "attn2.to_v"], init_lora_weights=False)
    )
    lora = [n for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora
    inputs = unet_inputs(sd1_teacher)
    student = _student(unet.config.cross_attention_dim).requires_grad_(True)
    seen, handles = capture_attn2_inputs(unet)
    with torch.no_grad():
        unet(**inputs)
    for handle in handles:
        handle.remove()
    with PivotTap(unet) as tap:
        tap.set_student(student)
        unet(**inputs)
        loss = sum(F.mse_loss(o_s, o_t) for o_t, o_s in tap.pairs)
    loss.backward()
    assert [n for n, p in unet.named_parameters() if p.grad is not None] == []
    assert student.grad is not None and student.grad.abs().sum() > 0
    _assert_pairs_match(unet, tap, seen, inputs["encoder_hidden_states"], student.detach())


@pytest.mark.parametrize("name", ["dual_attention_mse", "dual_attention_mse_reference"])
def test_kernels_entry_points_with_a_teacher_mask(sd1_teacher, name):
    """The IAP recipe's attention functions: with ``mask1`` they match the SDPA reference under a teacher mask;
    without it the tap refuses the masked call by the function's name (it never runs SDPA behind their back)."""
    fn = getattr(pytest.importorskip("xling.kernels"), name)
    unet = sd1_teacher.unet
    inputs = {**unet_inputs(sd1_teacher), "encoder_attention_mask": _en_mask()}
    student = _student(32)
    with torch.no_grad(), PivotTap(unet, attention_fn=fn, fused=True) as tap:
        tap.set_student(student)
        if not tap.takes_mask1:
            with pytest.raises(TypeError, match=rf"attention_fn \S*{name} takes no `mask1`"):
                unet(**inputs)
            return
        unet(**inputs)
    with torch.no_grad(), PivotTap(unet, fused=True) as reference:
        reference.set_student(student)
        unet(**inputs)
    torch.testing.assert_close(torch.stack(tap.losses), torch.stack(reference.losses), rtol=1e-4, atol=1e-7)
