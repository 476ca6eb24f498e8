"""``xling import pea``: a state dict in PEA-Diffusion's layout (its ``MLP`` as the paper's code describes it,
rebuilt here: LayerNorm, three bias-free Linear layers with GELU between, and for SDXL ``fc`` after a GELU,
pooled = the mean over every window position) becomes an adapter that computes what PEA computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from xling.adapters import LanguageEncoder, MLPAdapter, MLPAdapterConfig
from xling.train.importers import import_checkpoint
from xling.train.importers.state import LayoutError

PROMPTS = ["左边的红色圆形", "一只戴帽子的猫在海滩上", ""]


class PEAMLP(nn.Module):
    """PEA's adapter, ``MLP(in_dim, out_dim, hidden_dim[, out_dim1])``; ``fc`` only for SDXL."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, out_dim1: int | None) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, out_dim, bias=False),
        )
        self.fc = nn.Linear(out_dim, out_dim1) if out_dim1 is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        x = self.projector(self.layernorm(x))
        if self.fc is None:
            return None, x
        return x.mean(1), self.fc(nn.functional.gelu(x))


def _save(module: nn.Module, tmp_path: Path) -> Path:
    folder = tmp_path / "proj_999"
    folder.mkdir()
    torch.nn.init.normal_(module.layernorm.weight)  # not the identity, so a mix-up of the norm shows
    torch.save(module.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_imported_adapter_computes_peas_output(
    family, tiny_sdxl_path, tiny_sd1_path, tiny_bert_path, tmp_path
):
    torch.manual_seed(0)
    teacher = tiny_sdxl_path if family == "sdxl" else tiny_sd1_path
    # Tiny widths: student 48; SDXL teacher D 64, P 32; SD1 teacher D 32.
    pea = PEAMLP(48, 32, 40, 64) if family == "sdxl" else PEAMLP(48, 32, 56, None)
    src = _save(pea, tmp_path)
    out = import_checkpoint(
        "pea", src, teacher=str(teacher), output=tmp_path / "adapter", student=str(tiny_bert_path)
    )
    encoder = LanguageEncoder.from_pretrained(out)
    assert encoder.head.config.pooled == "all"
    got = encoder(PROMPTS)
    hidden = encoder.encode(PROMPTS)
    assert (hidden.attention_mask == 0).any(), "the prompts must be padded for the pooled rule to matter"
    with torch.no_grad():
        pooled, tokens = pea(hidden.hidden_states)
    torch.testing.assert_close(got.prompt_embeds, tokens)
    if family == "sdxl":
        torch.testing.assert_close(got.pooled_prompt_embeds, pooled)
    else:
        assert got.pooled_prompt_embeds is None


def test_peas_sdxl_adapter_has_6_033_408_parameters_and_its_keys():
    head = MLPAdapter(
        MLPAdapterConfig(student_width=1024, teacher_width=2048, pooled_width=1280, hidden_width=1024)
    )
    assert sum(p.numel() for p in head.parameters()) == 6_033_408
    pea = PEAMLP(1024, 1280, 1024, 2048)
    renamed = {k.replace("fc.", "out_proj.1."): v.shape for k, v in pea.state_dict().items()}
    assert renamed == {k: v.shape for k, v in head.state_dict().items()}


def test_wrong_layout_names_the_key(tiny_sdxl_path, tiny_bert_path, tmp_path):
    def run(state: dict[str, torch.Tensor], name: str) -> str:
        path = tmp_path / f"{name}.bin"
        torch.save(state, path)
        with pytest.raises(LayoutError) as info:
            import_checkpoint(
                "pea", path, teacher=str(tiny_sdxl_path), output=tmp_path / name, student=str(tiny_bert_path)
            )
        return str(info.value)

    good = PEAMLP(48, 32, 40, 64).state_dict()
    assert "missing keys: fc.bias" in run({k: v for k, v in good.items() if k != "fc.bias"}, "nobias")
    assert "projector.4.weight: (31, 40), expected (32, 40)" in run(
        dict(good, **{"projector.4.weight": torch.zeros(31, 40)}), "shape"
    )
    # An SD 1.x adapter offered for the SDXL teacher: no fc, and its stack ends at D, not P.
    message = run(PEAMLP(48, 64, 40, None).state_dict(), "sd1")
    assert "fc.weight" in message and "sdxl adapter" in message
    with pytest.raises(ValueError, match="needs --student"):
        import_checkpoint(
            "pea", tmp_path / "nobias.bin", teacher=str(tiny_sdxl_path), output=tmp_path / "x", student=None
        )
