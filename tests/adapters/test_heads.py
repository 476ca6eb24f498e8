"""Heads: parameter counts of the paper configurations, shapes for every teacher family, masking, errors."""

from __future__ import annotations

import pytest
import torch

from xling.adapters import (
    LinearHead,
    LinearHeadConfig,
    MixerTranslator,
    MixerTranslatorConfig,
    MLPAdapter,
    MLPAdapterConfig,
    config_from_dict,
)

# (family, teacher width D, pooled width P): the real teacher widths; the student side is kept small.
FAMILIES = [("sd1", 768, None), ("sd2", 1024, None), ("sdxl", 2048, 1280)]


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mlp_adapter_default_is_peas_6m_sdxl_adapter():
    with torch.device("meta"):  # counts only: no memory, no init time
        head = MLPAdapter()
    assert (head.config.student_width, head.config.teacher_width, head.config.pooled_width) == (
        1024,
        2048,
        1280,
    )
    assert head.num_parameters() == 6_033_408
    assert abs(head.num_parameters() - 6.0e6) / 6.0e6 < 0.01


def test_mixer_translator_depth5_is_gluenet_sized():
    with torch.device("meta"):
        head = MixerTranslator(MixerTranslatorConfig(student_width=1024, teacher_width=768, depth=5))
    encoder = _count(head.encoder)
    assert abs(encoder - 50e6) / 50e6 < 0.15, encoder
    # the decoder mirrors the encoder, so it is of the same size
    assert abs(_count(head.decoder) - encoder) / encoder < 0.1


@pytest.mark.parametrize(("family", "width", "pooled"), FAMILIES)
def test_mlp_shapes_per_family(family, width, pooled):
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=24, teacher_width=width, teacher_family=family, pooled_width=pooled, hidden_width=16
        )
    )
    out = head(torch.randn(2, 7, 24), torch.ones(2, 7))
    assert out.prompt_embeds.shape == (2, 7, width)
    assert (out.pooled_prompt_embeds is None) == (pooled is None)
    if pooled:
        assert out.pooled_prompt_embeds.shape == (2, pooled)


@pytest.mark.parametrize(("family", "width", "pooled"), FAMILIES)
def test_linear_shapes_per_family(family, width, pooled):
    head = LinearHead(
        LinearHeadConfig(student_width=24, teacher_width=width, teacher_family=family, pooled_width=pooled)
    )
    h = torch.randn(2, 5, 24)
    out = head(h)
    assert out.prompt_embeds.shape == (2, 5, width)
    if pooled:
        # pooled projection of the [CLS] position by default, of `pooled` when given
        torch.testing.assert_close(out.pooled_prompt_embeds, head.pooled_proj(h[:, 0]))
        other = torch.randn(2, 24)
        torch.testing.assert_close(head(h, pooled=other).pooled_prompt_embeds, head.pooled_proj(other))


@pytest.mark.parametrize(("family", "width", "pooled"), FAMILIES)
def test_mixer_shapes_per_family(family, width, pooled):
    cfg = MixerTranslatorConfig(
        student_width=16,
        teacher_width=width,
        teacher_family=family,
        pooled_width=pooled,
        source_length=12,
        depth=1,
        mult=1.0,
    )
    out = MixerTranslator(cfg)(torch.randn(2, 12, 16))
    assert out.prompt_embeds.shape == (2, 77, width)
    assert out.attention_mask.shape == (2, 77) and bool(out.attention_mask.all())
    assert (out.pooled_prompt_embeds is None) == (pooled is None)


@pytest.mark.parametrize("source_length", [77, 128, 256])
def test_mixer_source_lengths(source_length):
    cfg = MixerTranslatorConfig(
        student_width=8, teacher_width=12, source_length=source_length, depth=2, mult=1.0
    )
    head = MixerTranslator(cfg)
    full = head(torch.randn(2, source_length, 8))
    assert full.prompt_embeds.shape == (2, 77, 12)
    short = head(torch.randn(2, 40, 8), torch.ones(2, 40))  # shorter input is zero-padded to S
    assert short.prompt_embeds.shape == (2, 77, 12)
    assert head.reconstruct(full.prompt_embeds).shape == (2, source_length, 8)
    with pytest.raises(ValueError, match=f"source_length {source_length}"):
        head(torch.randn(1, source_length + 1, 8))


def test_padding_content_does_not_matter():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    h = torch.randn(2, 5, 8)
    h2 = h.clone()
    h2[0, 3:] = 100.0  # garbage where the mask is 0
    mlp = MLPAdapter(MLPAdapterConfig(student_width=8, teacher_width=6, pooled_width=4, hidden_width=8))
    torch.testing.assert_close(mlp(h, mask).pooled_prompt_embeds, mlp(h2, mask).pooled_prompt_embeds)
    # the pooled vector is a masked mean: it differs from the plain mean when padding is present
    assert not torch.allclose(mlp(h, mask).pooled_prompt_embeds[0], mlp(h, None).pooled_prompt_embeds[0])
    mixer = MixerTranslator(
        MixerTranslatorConfig(student_width=8, teacher_width=6, source_length=5, depth=1, mult=1.0)
    )
    torch.testing.assert_close(mixer(h, mask).prompt_embeds, mixer(h2, mask).prompt_embeds)


def test_heads_are_trainable():
    head = MLPAdapter(MLPAdapterConfig(student_width=8, teacher_width=6, pooled_width=4, hidden_width=8))
    out = head(torch.randn(2, 3, 8))
    (out.prompt_embeds.sum() + out.pooled_prompt_embeds.sum()).backward()
    assert all(p.grad is not None for p in head.parameters())
    mixer = MixerTranslator(
        MixerTranslatorConfig(student_width=8, teacher_width=6, source_length=4, depth=1, mult=1.0)
    )
    x, mask = mixer.pad_source(torch.randn(2, 3, 8), torch.ones(2, 3))
    rec = mixer.reconstruct(mixer(x, mask).prompt_embeds)
    ((rec - x) ** 2).mean().backward()
    assert all(p.grad is not None for p in mixer.decoder.parameters())


def test_bad_inputs_name_argument_and_shapes():
    head = MLPAdapter(
        MLPAdapterConfig(
            student_width=8, teacher_width=6, teacher_family="sd1", pooled_width=None, hidden_width=8
        )
    )
    with pytest.raises(ValueError, match=r"hidden_states.*\[B, L, 8\].*\(2, 3, 9\)"):
        head(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="attention_mask"):
        head(torch.randn(2, 3, 8), torch.ones(2, 4))
    with pytest.raises(TypeError, match="hidden_states"):
        head([[0.0] * 8])
    with pytest.raises(ValueError, match="pooled_width"):
        MLPAdapterConfig(teacher_family="sdxl", pooled_width=None)
    with pytest.raises(ValueError, match=r"teacher_family. must be one of"):
        LinearHeadConfig(teacher_family="kandinsky")
    with pytest.raises(ValueError, match=r"pooled_width. is required when .teacher_family. is 'sd3'"):
        LinearHeadConfig(teacher_family="sd3")
    with pytest.raises(ValueError, match="student_width"):
        LinearHeadConfig(student_width=0)
    with pytest.raises(ValueError, match="unknown MLPAdapterConfig fields"):
        config_from_dict({"head_type": "mlp", "hidden": 3})
    with pytest.raises(ValueError, match="unknown head_type"):
        config_from_dict({"head_type": "transformer"})
    with pytest.raises(TypeError, match="MixerTranslatorConfig"):
        MixerTranslator(LinearHeadConfig())


def test_mixer_output_is_not_normalised_over_tokens():
    # A text encoder's 77 output tokens are far from zero-mean / unit-variance per channel (a constant start
    # token, near-identical padding); a translator must be able to produce them. A token-axis LayerNorm at
    # the output made a fixed random target unreachable (MSE stayed near its variance).
    torch.manual_seed(0)
    head = MixerTranslator(
        MixerTranslatorConfig(student_width=8, teacher_width=6, source_length=10, target_length=12, depth=1)
    )
    target = torch.randn(12, 6) * torch.linspace(0.1, 2.0, 6) + torch.randn(6)  # [T, D], per-channel offsets
    x = torch.randn(4, 10, 8)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(head(x).prompt_embeds, target.expand(4, -1, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * target.var().item(), loss.item()


def test_gluenet_variant_is_gluegens_layout_and_scales(tmp_path):
    with torch.device("meta"):
        big = MixerTranslator(
            MixerTranslatorConfig(student_width=1024, teacher_width=768, translator="gluenet")
        )
    # GlueGen's Translator_noln(77, 1024, 768, 2, 5): 132 tensors (60 of them LayerNorm), 50,179,776 parameters
    assert len(big.encoder.state_dict()) == 132 and _count(big.encoder) == 50_179_776
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in big.encoder.modules()) == 30
    torch.manual_seed(0)
    scale = [float(i + 1) for i in range(6)]
    cfg = MixerTranslatorConfig(
        student_width=8, teacher_width=4, source_length=5, target_length=6, depth=1, translator="gluenet",
        positions="all", input_scale=0.5, output_scale=scale,
    )  # fmt: skip
    head = MixerTranslator(cfg)
    h, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = head(h, mask).prompt_embeds
    torch.testing.assert_close(out, head.encoder(h * 0.5) * torch.tensor(scale)[:, None])
    h2 = h.clone()
    h2[0, 3:] = 100.0  # padding is read with positions="all", as GlueGen reads it
    assert not torch.allclose(head(h2, mask).prompt_embeds[0], out[0])
    assert head.pad_source(h, mask)[1].tolist() == [[1.0] * 5] * 2
    # output_scale is rebuilt from config.json, not stored beside GlueGen's tensors
    assert "output_scale" not in head.state_dict()
    head.save_pretrained(tmp_path / "head")
    loaded = MixerTranslator.from_pretrained(tmp_path / "head")
    torch.testing.assert_close(loaded(h, mask).prompt_embeds, out)
    with pytest.raises(ValueError, match="`output_scale` has 2 values; one per output position"):
        MixerTranslatorConfig(target_length=6, output_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="`translator` must be 'gluenet' or 'xling'"):
        MixerTranslatorConfig(translator="glue")
