"""xling.losses depends on torch and einops only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import xling.losses

PACKAGE_DIR = Path(xling.losses.__file__).parent
FORBIDDEN = (
    "transformers",
    "diffusers",
    "peft",
    "accelerate",
    "safetensors",
    "tokenizers",
    "huggingface_hub",
)


def test_import_pulls_in_no_other_stack() -> None:
    code = (
        "import json, sys; import xling.losses as L; "
        "assert all(hasattr(L, n) for n in L.__all__); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    modules = json.loads(out.stdout)
    roots = {m.split(".")[0] for m in modules}
    assert not roots & set(FORBIDDEN), sorted(roots & set(FORBIDDEN))
    others = [m for m in modules if m.startswith("xling.") and not m.startswith("xling.losses")]
    assert others == []


def test_source_imports_only_torch_einops_and_stdlib() -> None:
    allowed = {"torch", "einops", *sys.stdlib_module_names}
    files = sorted(PACKAGE_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, f"{path.name} imports {root}"


def test_public_api_is_exported() -> None:
    expected = {
        "attention_mse", "feature_kd", "output_kd", "cosine_alignment", "pooled_kd", "reconstruction",
        "SequenceDiscriminator", "discriminator_loss", "generator_loss", "grad_reverse", "GradientReversal",
        "denoising", "weighted_sum", "NonFiniteLossError",
    }  # fmt: skip
    assert expected <= set(xling.losses.__all__)
    assert all(callable(getattr(xling.losses, name)) for name in xling.losses.__all__)
