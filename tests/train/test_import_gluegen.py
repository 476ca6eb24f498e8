"""``xling import gluegen``: a state dict in GlueGen's ``Translator_noln`` layout (salesforce/GlueGen
``multilingual-gluenet/model.py``), built here from its description and saved as GlueGen saves it
(``torch.save(adapter.state_dict())``), imported, and run against GlueGen's inference written here:
``Translator_noln(XLM-R(prompt padded to 77).last_hidden_state / 3) * tensor_norm / 2``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train.conftest import make_rows

DEPTH = 5  # the released translators' depth
TOKENS = 77


def gluegen_layout(d: int, big_d: int, depth: int = DEPTH) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``Translator_noln(77, d, D, 2, depth)``: per block ``net_sen`` (width ``d``) and ``net_tok``
    (77 positions), each ``Linear(n, 2n), LayerNorm, GELU, Linear(2n, 2n), LayerNorm, GELU, Linear(2n, n),
    LayerNorm``; the tail the same without LayerNorms, ``net_sen`` ending at ``D``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        for name, n in (("net_sen", d), ("net_tok", TOKENS)):
            for j, (a, b) in zip((0, 3, 6), ((n, 2 * n), (2 * n, 2 * n), (2 * n, n)), strict=True):
                p = f"blocks.{i}.{name}"
                shapes |= {f"{p}.{j}.weight": (b, a), f"{p}.{j}.bias": (b,)}
                shapes |= {f"{p}.{j + 1}.weight": (b,), f"{p}.{j + 1}.bias": (b,)}
    for name, n, out in (("net_sen", d, big_d), ("net_tok", TOKENS, TOKENS)):
        for j, (a, b) in zip((0, 2, 4), ((n, 2 * n), (2 * n, 2 * n), (2 * n, out)), strict=True):
            shapes |= {f"tail.{name}.{j}.weight": (b, a), f"tail.{name}.{j}.bias": (b,)}
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the layout; LayerNorm weights away from 1 so a misplaced one would show."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if len(shape) == 2:
            state[key] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif key.endswith(".weight"):  # a LayerNorm's
            state[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def _mlp(x: torch.Tensor, p: dict[str, torch.Tensor], prefix: str, post_norm: bool) -> torch.Tensor:
    for k, j in enumerate((0, 3, 6) if post_norm else (0, 2, 4)):
        x = F.linear(x, p[f"{prefix}.{j}.weight"], p[f"{prefix}.{j}.bias"])
        if post_norm:
            x = F.layer_norm(
                x, x.shape[-1:], p[f"{prefix}.{j + 1}.weight"], p[f"{prefix}.{j + 1}.bias"], 1e-5
            )
        if k < 2:
            x = F.gelu(x)
    return x


def gluenet_forward(x: torch.Tensor, p: dict[str, torch.Tensor], depth: int = DEPTH) -> torch.Tensor:
    """``Translator_noln.forward`` on ``[B, 77, d]``: ``x = GELU(block(x) + x)`` per block, where ``block`` adds
    ``net_sen`` (over features) then ``net_tok`` (over positions) residually; then the tail, no residual."""
    for i in range(depth):
        y = x + _mlp(x, p, f"blocks.{i}.net_sen", True)
        y = y + _mlp(y.transpose(1, 2), p, f"blocks.{i}.net_tok", True).transpose(1, 2)
        x = F.gelu(y + x)
    x = _mlp(x, p, "tail.net_sen", False)
    return _mlp(x.transpose(1, 2), p, "tail.net_tok", False).transpose(1, 2)


@pytest.fixture(scope="module")
def xlmr77(tiny_xlmr_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny XLM-R with room for GlueGen's 77-token window (positions start after padding_idx: 77 + 2)."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    out = tmp_path_factory.mktemp("xlmr77")
    config = XLMRobertaConfig.from_pretrained(tiny_xlmr_path)
    config.max_position_embeddings = TOKENS + 2
    torch.manual_seed(0)
    XLMRobertaModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_xlmr_path)
    tokenizer.model_max_length = TOKENS
    tokenizer.save_pretrained(out)
    return out


def _widths(teacher: Path, student: Path) -> tuple[int, int]:
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig

    big_d = UNet2DConditionModel.load_config(teacher, subfolder="unet")["cross_attention_dim"]
    return int(AutoConfig.from_pretrained(student).hidden_size), int(big_d)


def test_imported_translator_computes_what_gluegen_computes(tiny_sd1_path, xlmr77, tmp_path, capsys):
    from transformers import AutoTokenizer, XLMRobertaModel

    from xling.adapters import LanguageEncoder
    from xling.adapters.mixer import GLUEGEN_POSITION_NORMS
    from xling.train.cli import main

    d, big_d = _widths(tiny_sd1_path, xlmr77)
    state = random_state(gluegen_layout(d, big_d))
    assert len(state) == 132  # 24 tensors a block, 12 in the tail
    src = tmp_path / "gluenet_Chinese_clip_overnorm_over3_noln.ckpt"
    torch.save(state, src)
    out = tmp_path / "adapter"
    argv = ["import", "gluegen", str(src), "--teacher", str(tiny_sd1_path), "--output", str(out)]
    assert main([*argv, "--student", str(xlmr77)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out

    # GlueGen's tensor_norm (train_gluenet_multi.py and RobMlgEmbedder_multi): a few of its 77 values.
    norms = torch.tensor(GLUEGEN_POSITION_NORMS).reshape(TOKENS, 1)
    assert norms.shape == (77, 1) and (norms[0, 0], norms[1, 0], norms[76, 0]) == pytest.approx(
        (43.8203, 28.3668, 28.3191)
    )
    prompts = [row["zh"] for row in make_rows(4, images=False)] + ["一碗面条和一双筷子" * 3]
    tokenizer = AutoTokenizer.from_pretrained(xlmr77)
    # float64 on both sides: what is compared is the computation, not float32 rounding through 6 blocks.
    student = XLMRobertaModel.from_pretrained(xlmr77).eval().double()
    with torch.no_grad():
        tokens = tokenizer(prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
        feat = student(**tokens).last_hidden_state / 3  # [B, 77, d], padding positions included
        weights = {k: v.double() for k, v in state.items()}
        expected = gluenet_forward(feat, weights) * (norms.double() / 2)  # [B, 77, D]
        encoder = LanguageEncoder.from_pretrained(out).eval().double()
        got = encoder(prompts).prompt_embeds
    assert got.shape == (len(prompts), 77, big_d)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    head = encoder.head.config
    assert (head.translator, head.positions, head.depth, head.with_decoder) == ("gluenet", "all", 5, False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("blocks.2.net_tok.4.bias"), r"missing keys: blocks\.2\.net_tok\.4\.bias"),
        (
            lambda s: s.__setitem__("blocks.0.net_sen.8.weight", torch.ones(3)),
            r"unexpected keys: blocks\.0\.net_sen\.8\.weight",
        ),
        (
            lambda s: s.__setitem__(
                "tail.net_sen.4.weight", torch.zeros(1024, s["tail.net_sen.4.weight"].shape[1])
            ),
            r"wrong shapes: tail\.net_sen\.4\.weight: \(1024, \d+\), expected \(\d+, \d+\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_wrong_key_or_shape_is_named(edit, message, tiny_sd1_path, tiny_xlmr_path, tmp_path):
    from xling.train.importers import import_checkpoint
    from xling.train.importers.state import LayoutError

    d, big_d = _widths(tiny_sd1_path, tiny_xlmr_path)
    state = random_state(gluegen_layout(d, big_d))
    edit(state)
    src = tmp_path / "gluenet.ckpt"
    torch.save(state, src)
    with pytest.raises(LayoutError, match=message) as err:
        import_checkpoint(
            "gluegen", src, teacher=str(tiny_sd1_path), output=tmp_path / "out", student=str(tiny_xlmr_path)
        )
    assert "Translator_noln(77" in str(err.value) and not (tmp_path / "out").exists()


def test_sdxl_teacher_is_refused(tiny_sdxl_path, tiny_xlmr_path, tmp_path):
    from xling.train.importers import import_checkpoint

    src = tmp_path / "gluenet.ckpt"
    torch.save(random_state(gluegen_layout(40, 64, depth=1)), src)
    with pytest.raises(ValueError, match=r"SDXL model; GlueGen's translators condition SD 1\.x"):
        import_checkpoint(
            "gluegen", src, teacher=str(tiny_sdxl_path), output=tmp_path / "out", student=str(tiny_xlmr_path)
        )
