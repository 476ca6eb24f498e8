"""Every weight file of an adapter directory is hashed at save time and checked on load, before transformers
or peft read it; only safetensors load; every failure names the file; a loaded adapter never returns NaN."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xling.adapters import LanguageEncoder, LoraHeadConfig, MLPAdapter, MLPAdapterConfig, load_head
from xling.adapters.io import WeightFileError

transformers = pytest.importorskip("transformers")

CAT = "一只戴帽子的猫"

# (adapter, weight file, merged_lora): every kind of weight file an adapter directory holds, each loaded by
# the path that reads it (a LoRA adapter through peft reads student/ + student_lora/, merged student_merged/).
KINDS = [
    ("unfrozen", "head/model.safetensors", None),
    ("unfrozen", "student/model.safetensors", None),
    ("lora", "student/model.safetensors", False),
    ("lora", "student_lora/adapter_model.safetensors", False),
    ("lora", "student_merged/model.safetensors", True),
]


def _mlp(width: int) -> MLPAdapter:
    torch.manual_seed(0)
    return MLPAdapter(
        MLPAdapterConfig(student_width=width, teacher_width=32, teacher_family="sd1", hidden_width=16)
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_bert_path, tiny_xlmr_path) -> dict[str, Path]:
    """An unfrozen BERT adapter and a LoRA XLM-R adapter holding its base student: every kind of file."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("weight_files")
    unfrozen = LanguageEncoder.from_student(tiny_bert_path, _mlp(48), unfreeze_last=1)
    unfrozen.eval().save_pretrained(root / "unfrozen")
    lora = LanguageEncoder.from_student(tiny_xlmr_path, _mlp(40), lora=LoraHeadConfig())
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the student
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    lora.eval().save_pretrained(root / "lora", include_student=True)
    return {"unfrozen": root / "unfrozen", "lora": root / "lora"}


def _copy(saved: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[kind], tmp_path / kind))


def _load(adapter: Path, merged_lora: bool | None, **kwargs) -> LanguageEncoder:
    return LanguageEncoder.from_pretrained(
        adapter, student_path="/nonexistent", merged_lora=merged_lora, **kwargs
    )


def test_every_weight_file_is_recorded(saved):
    for adapter in saved.values():
        files = sorted(p.relative_to(adapter).as_posix() for p in adapter.rglob("*.safetensors"))
        recorded = json.loads((adapter / "config.json").read_text())["weights_sha256"]
        head = json.loads((adapter / "head" / "config.json").read_text())["weights_sha256"]
        assert sorted([*recorded, "head/model.safetensors"]) == files and len(head) == 64
    assert {"student/model.safetensors", "student_lora/adapter_model.safetensors"} <= set(
        json.loads((saved["lora"] / "config.json").read_text())["weights_sha256"]
    )


@pytest.mark.parametrize(("kind", "name", "merged_lora"), KINDS)
def test_a_flipped_byte_fails_before_any_tensor_is_read(
    saved, tmp_path, monkeypatch, kind, name, merged_lora
):
    import peft

    adapter = _copy(saved, kind, tmp_path)
    path = adapter / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: still a well-formed safetensors file
    path.write_bytes(bytes(data))

    def never(*args, **kwargs):
        raise AssertionError("a weight file was read before its hash was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(never))
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", classmethod(never))
    with pytest.raises(
        WeightFileError, match=re.escape(str(path)) + r" does not match the SHA-256.*modified or truncated"
    ):
        _load(adapter, merged_lora)


@pytest.mark.parametrize(("kind", "name", "merged_lora"), KINDS)
def test_a_truncated_file_fails_naming_it_with_or_without_hashes(saved, tmp_path, kind, name, merged_lora):
    adapter = _copy(saved, kind, tmp_path)
    path = adapter / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightFileError, match=re.escape(str(path)) + " does not match"):
        _load(adapter, merged_lora)
    # opted out of hashes, the header check still names the file (not a bare SafetensorError)
    with pytest.raises(WeightFileError, match=re.escape(str(path)) + r" is not a readable safetensors file"):
        _load(adapter, merged_lora, verify_hashes=False)


@pytest.mark.parametrize(("kind", "name", "merged_lora"), KINDS)
def test_a_missing_hash_is_an_error_that_says_how_to_opt_out(saved, tmp_path, kind, name, merged_lora):
    adapter = _copy(saved, kind, tmp_path)
    expected = _load(adapter, merged_lora)([CAT]).prompt_embeds
    config = adapter / ("head/config.json" if name.startswith("head/") else "config.json")
    cfg = json.loads(config.read_text())
    if name.startswith("head/"):
        del cfg["weights_sha256"]
    else:
        del cfg["weights_sha256"][name]
    config.write_text(json.dumps(cfg))
    message = re.escape(f"{adapter / name} has no SHA-256 recorded in {config}") + r".*verify_hashes=False"
    with pytest.raises(WeightFileError, match=message):
        _load(adapter, merged_lora)
    assert torch.equal(_load(adapter, merged_lora, verify_hashes=False)([CAT]).prompt_embeds, expected)


def test_a_head_config_without_a_hash_no_longer_skips_the_check(saved, tmp_path):
    head_dir = _copy(saved, "unfrozen", tmp_path) / "head"
    cfg = json.loads((head_dir / "config.json").read_text())
    del cfg["weights_sha256"]
    (head_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match="verify_hashes=False"):
        load_head(head_dir)
    with pytest.raises(WeightFileError, match="verify_hashes=False"):
        MLPAdapter.from_pretrained(head_dir)
    assert isinstance(load_head(head_dir, verify_hashes=False), MLPAdapter)


def _pickle_folder(folder: Path, safetensors_name: str, bin_name: str) -> Path:
    """Replace ``folder``'s safetensors weights by a torch pickle, as an old checkpoint would hold them."""
    weights = folder / safetensors_name
    torch.save(load_file(str(weights)), folder / bin_name)
    weights.unlink()
    return folder / bin_name


def test_pickled_students_and_lora_weights_are_refused(saved, tmp_path, tiny_bert_path):
    adapter = _copy(saved, "unfrozen", tmp_path)
    pickle = _pickle_folder(adapter / "student", "model.safetensors", "pytorch_model.bin")
    for verify in (True, False):
        with pytest.raises(WeightFileError, match=re.escape(str(pickle)) + r".*safe_serialization=True"):
            _load(adapter, None, verify_hashes=verify)
    # a base student given to from_student is not the adapter's, so it is not hashed; it must not be a pickle
    student = Path(shutil.copytree(tiny_bert_path, tmp_path / "bert"))
    pickle = _pickle_folder(student, "model.safetensors", "pytorch_model.bin")
    with pytest.raises(WeightFileError, match=re.escape(str(pickle)) + " is a pickle"):
        LanguageEncoder.from_student(student, _mlp(48))

    lora = _copy(saved, "lora", tmp_path)
    pickle = _pickle_folder(lora / "student_lora", "adapter_model.safetensors", "adapter_model.bin")
    with pytest.raises(WeightFileError, match=re.escape(str(pickle)) + " is a pickle"):
        _load(lora, False, verify_hashes=False)


@pytest.mark.parametrize("kind", ["unfrozen", "lora"])
def test_transformers_never_runs_folder_code_nor_reads_pickles(saved, tmp_path, monkeypatch, kind):
    """Every transformers ``from_pretrained`` a load makes says ``trust_remote_code=False``, and every model
    load ``use_safetensors=True`` (transformers' default would run an ``auto_map`` prompt or read a .bin)."""
    calls: list[tuple[str, dict]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    _load(_copy(saved, kind, tmp_path), None)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoTokenizer", "AutoModel"}
    assert all(kw.get("trust_remote_code") is False for _, kw in calls)
    assert all(kw.get("use_safetensors") is True for name, kw in calls if name == "AutoModel")


def test_a_loaded_adapter_refuses_non_finite_embeddings(saved, tmp_path):
    adapter = _copy(saved, "unfrozen", tmp_path)
    weights = adapter / "student" / "model.safetensors"
    state = load_file(str(weights))
    state["encoder.layer.1.output.dense.weight"] = torch.full_like(
        state["encoder.layer.1.output.dense.weight"], float("nan")
    )
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(WeightFileError, match="does not match"):
        _load(adapter, None)
    # loaded anyway (hashes opted out), it still cannot hand a pipeline NaN: the error names the adapter
    encoder = _load(adapter, None, verify_hashes=False)
    with pytest.raises(
        ValueError, match=re.escape(f"the adapter {adapter} produced non-finite prompt_embeds")
    ):
        encoder([CAT])
    # a training encoder is not checked in forward: the loop checks its loss
    encoder.source = None
    assert not torch.isfinite(encoder([CAT]).prompt_embeds).all()


def test_xling_generate_refuses_a_damaged_adapter_without_writing_an_image(
    saved, tmp_path, tiny_sd1_path, capsys
):
    from xling.train.cli import main

    adapter = _copy(saved, "unfrozen", tmp_path)
    weights = adapter / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    args = ["generate", "--adapter", str(adapter), CAT, "--teacher", str(tiny_sd1_path), "--steps", "2"]
    assert main([*args, "--out", str(out)]) == 2
    assert f"{weights} does not match the SHA-256" in capsys.readouterr().err
    assert not out.exists() or not list(out.rglob("*.png"))
