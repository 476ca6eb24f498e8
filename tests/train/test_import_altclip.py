"""``xling import altclip``: tiny towers in the released layouts (transformers' AltCLIPModel as saved by
``save_pretrained``; AltDiffusion's ``text_encoder`` folder as diffusers reads it, torch.save'd) are imported,
and the adapter's ``prompt_embeds`` equal a forward written here from the published architecture:
AltCLIP ``transformation(pre_LN(h_last))``, AltDiffusion ``transformation(h_last)``, AltDiffusion-m18
``transformation_pre(pre_LN(h_{-2}))``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xling.adapters import LanguageEncoder
from xling.train.importers import import_checkpoint
from xling.train.importers.state import LayoutError

PROMPTS = ["一只戴帽子的猫", "左边的红色圆形在右边的蓝色正方形旁边"]
D = 32  # the tiny SD1 teacher's cross_attention_dim
_TOKENIZER = ("tokenizer_config.json", "tokenizer.json", "sentencepiece.bpe.model", "special_tokens_map.json")


def _xlmr_fields(tiny_xlmr_path: Path) -> dict:
    cfg = json.loads((tiny_xlmr_path / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    keys += ("max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "layer_norm_eps")
    return {k: cfg[k] for k in keys}


def _copy_tokenizer(tiny_xlmr_path: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER:
        if (tiny_xlmr_path / name).is_file():
            shutil.copy(tiny_xlmr_path / name, directory / name)


def _random_(module: torch.nn.Module, seed: int) -> None:
    # off the LayerNorm / bias initialisation, so a missing affine or bias would show
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _tokens(encoder: LanguageEncoder):
    tok = encoder.tokenizer(PROMPTS, padding="max_length", max_length=encoder.window, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def _imported(source: Path, teacher: Path, tmp_path: Path, **kw) -> LanguageEncoder:
    out = import_checkpoint("altclip", source, teacher=str(teacher), output=tmp_path / "adapter", **kw)
    return LanguageEncoder.from_pretrained(out)


@pytest.mark.parametrize("tower", ["AltCLIPModel", "AltCLIPTextModel"])
def test_altclip_matches_transformers(tower, tmp_path, tiny_sd1_path, tiny_xlmr_path):
    from transformers import AltCLIPConfig, AltCLIPModel

    text = dict(_xlmr_fields(tiny_xlmr_path), project_dim=D)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32
    )
    torch.manual_seed(0)
    model = AltCLIPModel(
        AltCLIPConfig(text_config=text, vision_config=dict(vision, patch_size=16), projection_dim=8)
    )
    _random_(model.text_model, 1)
    src = tmp_path / "AltCLIP"
    # as released: text_model.roberta.*, text_model.pre_LN.*, vision_model.*, ... (the text tower: roberta.*, ...)
    (model if tower == "AltCLIPModel" else model.text_model).save_pretrained(src)
    _copy_tokenizer(tiny_xlmr_path, src)

    encoder = _imported(src, tiny_sd1_path, tmp_path)
    assert encoder.head.config.pre_norm and encoder.config.hidden_layer == -1
    ids, mask = _tokens(encoder)
    model.eval()
    with torch.no_grad():
        out = encoder(PROMPTS)
        h = model.text_model.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        tm = model.text_model
        eps = tm.config.layer_norm_eps
        normed = F.layer_norm(h, h.shape[-1:], tm.pre_LN.weight, tm.pre_LN.bias, eps)  # pre_LN
        expected = F.linear(normed, tm.transformation.weight, tm.transformation.bias)
        public = tm(input_ids=ids, attention_mask=mask)  # transformers' own AltCLIPTextModel forward
    torch.testing.assert_close(out.prompt_embeds, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.prompt_embeds, public.last_hidden_state, rtol=1e-4, atol=1e-5)
    assert out.prompt_embeds.shape == (2, encoder.window, D)


def _altdiffusion(tmp_path: Path, tiny_xlmr_path: Path, *, m18: bool, width: int = D):
    """A pipeline folder with ``text_encoder/`` (config + pytorch_model.bin) and ``tokenizer/`` beside it."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    fields = _xlmr_fields(tiny_xlmr_path)
    torch.manual_seed(0)
    roberta = XLMRobertaModel(XLMRobertaConfig(**fields), add_pooling_layer=False)
    _random_(roberta, 2)
    d = fields["hidden_size"]
    g = torch.Generator().manual_seed(4)
    state = {f"roberta.{k}": v for k, v in roberta.state_dict().items()}
    state.update(
        {
            "transformation.weight": torch.randn(width, d, generator=g),
            "transformation.bias": torch.randn(width, generator=g),
        }
    )
    if m18:
        state.update(
            {
                "transformation_pre.weight": torch.randn(D, d, generator=g),
                "transformation_pre.bias": torch.randn(D, generator=g),
                "pre_LN.weight": 1 + torch.randn(d, generator=g),
                "pre_LN.bias": torch.randn(d, generator=g),
            }
        )
    src = tmp_path / "AltDiffusion" / "text_encoder"
    src.mkdir(parents=True)
    config = dict(
        fields,
        architectures=["RobertaSeriesModelWithTransformation"],
        model_type="xlm-roberta",
        project_dim=width,
    )
    if m18:
        config["has_pre_transformation"] = True
    (src / "config.json").write_text(json.dumps(config))
    torch.save(state, src / "pytorch_model.bin")
    _copy_tokenizer(tiny_xlmr_path, src.parent / "tokenizer")
    return src, state, roberta


@pytest.mark.parametrize("m18", [False, True], ids=["altdiffusion", "altdiffusion-m18"])
def test_altdiffusion_text_encoder(m18, tmp_path, tiny_sd1_path, tiny_xlmr_path):
    src, state, roberta = _altdiffusion(tmp_path, tiny_xlmr_path, m18=m18)
    encoder = _imported(src, tiny_sd1_path, tmp_path)
    ids, mask = _tokens(encoder)
    roberta.eval()
    eps = roberta.config.layer_norm_eps
    with torch.no_grad():
        out = encoder(PROMPTS)
        hs = roberta(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        if m18:
            x = F.layer_norm(hs[-2], hs[-2].shape[-1:], state["pre_LN.weight"], state["pre_LN.bias"], eps)
            expected = F.linear(x, state["transformation_pre.weight"], state["transformation_pre.bias"])
        else:
            expected = F.linear(hs[-1], state["transformation.weight"], state["transformation.bias"])
    torch.testing.assert_close(out.prompt_embeds, expected, rtol=1e-4, atol=1e-5)
    assert encoder.head.config.pre_norm is m18


def test_wrong_key_and_shape_are_named(tmp_path, tiny_sd1_path, tiny_xlmr_path):
    src, state, _ = _altdiffusion(tmp_path, tiny_xlmr_path, m18=False)
    state["transformation.weight"] = state["transformation.weight"][:, :-1]
    state["roberta.encoder.layer.0.attention.self.qkv.weight"] = state.pop(
        "roberta.encoder.layer.0.attention.self.query.weight"
    )
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(LayoutError) as err:
        import_checkpoint("altclip", src, teacher=str(tiny_sd1_path), output=tmp_path / "out")
    msg = str(err.value)
    assert "missing keys: roberta.encoder.layer.0.attention.self.query.weight" in msg
    assert "unexpected keys: roberta.encoder.layer.0.attention.self.qkv.weight" in msg
    assert "transformation.weight: (32, 39), expected (32, 40)" in msg


def test_wrong_teacher_and_config_are_refused(tmp_path, tiny_sd1_path, tiny_sdxl_path, tiny_xlmr_path):
    src, _, _ = _altdiffusion(tmp_path, tiny_xlmr_path, m18=False, width=16)
    with pytest.raises(ValueError, match="SDXL"):
        import_checkpoint("altclip", src, teacher=str(tiny_sdxl_path), output=tmp_path / "a")
    with pytest.raises(ValueError, match=r"projects to 16 .* has cross_attention_dim 32"):
        import_checkpoint("altclip", src, teacher=str(tiny_sd1_path), output=tmp_path / "b")
    config = json.loads((src / "config.json").read_text())
    del config["project_dim"]
    (src / "config.json").write_text(json.dumps(dict(config, model_type="bert", architectures=["BertModel"])))
    with pytest.raises(LayoutError, match=r"'bert' .* is not an AltCLIP text tower"):
        import_checkpoint("altclip", src, teacher=str(tiny_sd1_path), output=tmp_path / "c")
