"""Adapters on the Hub: push_to_hub, repo ids in from_pretrained / load_head / attach, the cache offline, the card.

Every request goes to a fake Hub on 127.0.0.1 (tests/adapters/_fakehub.py) through huggingface_hub's own client,
so the cache under ``tmp_path`` is laid out exactly as huggingface_hub lays it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants

from tests.adapters._fakehub import FakeHub, point_hub_at, repo
from xling.adapters import (
    HubAdapterNotFoundError,
    LanguageEncoder,
    LoraHeadConfig,
    MLPAdapter,
    MLPAdapterConfig,
    ModelCardFacts,
    WeightFileError,
    attach,
    load_head,
    write_model_card,
)

pytest.importorskip("transformers")

CAT = ["一只戴帽子的猫", "左边的红色圆形"]
RUN = {"num_inference_steps": 2, "output_type": "np", "height": 32, "width": 32}


def _encoder(student: Path, seed: int = 0, **kwargs) -> LanguageEncoder:
    torch.manual_seed(seed)
    head = MLPAdapter(
        MLPAdapterConfig(student_width=48, teacher_width=32, teacher_family="sd1", hidden_width=16)
    )
    return LanguageEncoder.from_student(student, head, **kwargs).eval()


def _embeds(encoder: LanguageEncoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(CAT).prompt_embeds


def _hub_requests(hub: FakeHub) -> list[tuple[str, str]]:
    # huggingface_hub may ask the endpoint for its agent registry once per process; not a download.
    return [r for r in hub.requests if not r[1].startswith("/api/agent-harnesses")]


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as server:
        point_hub_at(monkeypatch, server)
        yield server


@pytest.fixture
def pushed(hub, tiny_bert_path):
    """``org/name`` on the fake Hub: a frozen-student adapter pushed with its student; its local twin."""
    encoder = _encoder(tiny_bert_path)
    info = encoder.push_to_hub("org/name", include_student=True, teacher="toy")
    return encoder, info


def test_push_then_load_by_repo_id_gives_the_same_embeddings(hub, pushed, tmp_path):
    encoder, info = pushed
    assert (
        str(info).startswith(f"{hub.endpoint}/org/name/commit/")
        and info.oid == hub.repos["org/name"].refs["main"]
    )
    files = set(hub.files("org/name"))
    assert {"config.json", "README.md", "head/model.safetensors", "student/model.safetensors"} <= files
    loaded = LanguageEncoder.from_pretrained(repo("name"), cache_dir=tmp_path / "cache")
    # the snapshot huggingface_hub laid out, under the cache given
    assert loaded.source.is_relative_to((tmp_path / "cache").resolve())
    assert loaded.source.parent.name == "snapshots" or loaded.source.parent.parent.name == "snapshots"
    assert torch.equal(_embeds(loaded), _embeds(encoder))
    assert loaded.teacher["name_or_path"] == "toy"


def test_only_the_parts_a_load_reads_are_downloaded(hub, tiny_bert_path, tmp_path):
    pytest.importorskip("peft")
    lora = _encoder(tiny_bert_path, lora=LoraHeadConfig())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    lora.push_to_hub("org/lora", include_student=True)
    assert {"student/", "student_lora/", "student_merged/"} <= {
        p.split("/")[0] + "/" for p in hub.files("org/lora")
    }
    merged = LanguageEncoder.from_pretrained(repo("lora"), cache_dir=tmp_path / "c1", merged_lora=True)
    got = {p.relative_to(merged.source).parts[0] for p in merged.source.rglob("*") if p.is_file()}
    assert got == {"config.json", "head", "tokenizer", "student_merged"}  # no base student, no LoRA, no card
    peft = LanguageEncoder.from_pretrained(repo("lora"), cache_dir=tmp_path / "c2", merged_lora=False)
    got = {p.relative_to(peft.source).parts[0] for p in peft.source.rglob("*") if p.is_file()}
    assert got == {"config.json", "head", "tokenizer", "student", "student_lora"}
    assert torch.allclose(_embeds(merged), _embeds(lora), atol=1e-5)
    assert torch.allclose(_embeds(peft), _embeds(lora), atol=1e-5)


def test_revision_and_subfolder(hub, pushed, tiny_bert_path, tmp_path):
    encoder, first = pushed
    other = _encoder(tiny_bert_path, seed=1)
    other.push_to_hub("org/name", include_student=True, revision="v2")
    assert hub.repos["org/name"].refs["main"] == first.oid  # the branch took the commit, not main
    cache = tmp_path / "cache"
    on_v2 = LanguageEncoder.from_pretrained(repo("name"), revision="v2", cache_dir=cache)
    on_main = LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache)
    by_sha = LanguageEncoder.from_pretrained(repo("name"), revision=first.oid, cache_dir=cache)
    assert torch.equal(_embeds(on_v2), _embeds(other)) and not torch.equal(_embeds(on_v2), _embeds(encoder))
    assert torch.equal(_embeds(on_main), _embeds(encoder)) and torch.equal(_embeds(by_sha), _embeds(encoder))

    # an adapter in a folder of a bigger repo, uploaded with huggingface_hub's own upload_folder
    folder = other.save_pretrained(tmp_path / "local", include_student=True)
    api = HfApi()
    api.create_repo("org/many")
    api.upload_folder(repo_id="org/many", folder_path=folder, path_in_repo="adapters/zh")
    nested = LanguageEncoder.from_pretrained(repo("many"), subfolder="adapters/zh", cache_dir=cache)
    assert nested.source.as_posix().endswith("adapters/zh") and torch.equal(_embeds(nested), _embeds(other))
    with pytest.raises(HubAdapterNotFoundError, match=r"org/many.*has no config\.json.*subfolder="):
        LanguageEncoder.from_pretrained(repo("many"), cache_dir=cache)

    # load_head takes the same arguments: the head of the encoder repo
    head = load_head("org/name", subfolder="head", cache_dir=cache)
    state = encoder.head.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items())


def test_attach_by_repo_id_runs_the_pipeline(hub, pushed, tiny_sd1_path, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    encoder, _ = pushed
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1_path)
    pipe.set_progress_bar_config(disable=True)
    by_id = attach(pipe, "org/name", cache_dir=tmp_path / "cache")
    image = by_id(prompt=CAT[0], generator=torch.Generator().manual_seed(0), **RUN).images
    local = attach(pipe, encoder)(prompt=CAT[0], generator=torch.Generator().manual_seed(0), **RUN).images
    assert image.shape == (1, 32, 32, 3) and (image == local).all()


def test_offline_with_the_cache_filled_makes_no_request(hub, pushed, tmp_path, monkeypatch):
    encoder, _ = pushed
    cache = tmp_path / "cache"
    LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache)
    assert _hub_requests(hub)
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at call time, as the environment variable
    offline = LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache)
    assert _hub_requests(hub) == [] and torch.equal(_embeds(offline), _embeds(encoder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cached = LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache, local_files_only=True)
    assert _hub_requests(hub) == [] and torch.equal(_embeds(cached), _embeds(encoder))
    with pytest.raises(ValueError, match=r"force_download=True needs the network.*local_files_only=True"):
        LanguageEncoder.from_pretrained(
            repo("name"), cache_dir=cache, local_files_only=True, force_download=True
        )


def test_offline_with_an_empty_cache_is_a_clear_error(hub, pushed, tmp_path, monkeypatch):
    hub.requests.clear()
    with pytest.raises(
        HubAdapterNotFoundError, match=r"'org/name' \(revision 'main'\).*local_files_only=True"
    ):
        LanguageEncoder.from_pretrained(repo("name"), cache_dir=tmp_path / "empty", local_files_only=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        HubAdapterNotFoundError, match=r"'org/name' \(revision 'v3'\).*unset HF_HUB_OFFLINE"
    ) as e:
        attach(object(), "org/name", revision="v3", cache_dir=tmp_path / "empty")
    assert isinstance(e.value, FileNotFoundError) and "cache_dir=" in str(e.value)
    assert _hub_requests(hub) == []


def test_unknown_repo_and_revision_are_clear_errors(hub, pushed, tmp_path):
    with pytest.raises(HubAdapterNotFoundError, match=r"'org/missing' \(revision 'main'\).*token="):
        LanguageEncoder.from_pretrained(repo("missing"), cache_dir=tmp_path)
    with pytest.raises(HubAdapterNotFoundError, match=r"'org/name'.*has no revision 'nope'"):
        LanguageEncoder.from_pretrained(repo("name"), revision="nope", cache_dir=tmp_path)
    with pytest.raises(HubAdapterNotFoundError, match=r"'org/missing'"):
        load_head("org/missing", cache_dir=tmp_path)


@pytest.mark.parametrize("weight_file", ["head/model.safetensors", "student/model.safetensors"])
def test_a_tampered_cached_blob_is_refused(hub, pushed, tmp_path, weight_file):
    encoder, _ = pushed
    cache = tmp_path / "cache"
    snapshot = LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache).source
    link = snapshot / weight_file
    blob = Path(os.path.realpath(link))
    assert blob != link and blob.parent.name == "blobs"  # the snapshot file is a link to the blob
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match=rf"{weight_file} does not match.*force_download=True"):
        LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache)
    fresh = LanguageEncoder.from_pretrained(repo("name"), cache_dir=cache, force_download=True)
    assert torch.equal(_embeds(fresh), _embeds(encoder))


def test_push_without_a_local_student_warns(hub, tiny_bert_path, tmp_path):
    encoder = _encoder(tiny_bert_path)
    with pytest.warns(UserWarning, match="without its student.*include_student=True"):
        encoder.push_to_hub("org/frozen")
    assert not any(p.startswith("student/") for p in hub.files("org/frozen"))
    loaded = LanguageEncoder.from_pretrained(
        repo("frozen"), cache_dir=tmp_path
    )  # the student still lies here
    assert torch.equal(_embeds(loaded), _embeds(encoder))


def test_push_to_a_pull_request(hub, pushed, tiny_bert_path, tmp_path):
    other = _encoder(tiny_bert_path, seed=2)
    info = other.push_to_hub("org/name", include_student=True, create_pr=True, commit_message="zh v2")
    refs = hub.repos["org/name"].refs
    assert info.pr_url and refs["refs/pr/1"] == info.oid != refs["main"]
    proposed = LanguageEncoder.from_pretrained(repo("name"), revision="refs/pr/1", cache_dir=tmp_path)
    assert torch.equal(_embeds(proposed), _embeds(other))


# ---- the model card -----------------------------------------------------------------------------------------


def _grid(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 4), (255, 0, 0)).save(path)
    return path


EVAL = "### Checker accuracy\n\n| condition | all |\n|---|---|\n| Student (Chinese prompts) | 87.5% |\n"


@pytest.mark.parametrize(
    ("teacher", "base_model", "license_"),
    [("toy", None, "apache-2.0"), ("org/sd-teacher", "org/sd-teacher", "other")],
)
def test_the_card_metadata_and_body(tiny_bert_path, tmp_path, teacher, base_model, license_):
    facts = ModelCardFacts(
        recipe="iap",
        config={"recipe": "iap", "lr": 0.0001, "data": {"path": "toy"}},
        evaluation=EVAL,
        grid=_grid(tmp_path / "run-grid.png"),
    )
    folder = _encoder(tiny_bert_path).save_pretrained(tmp_path / "adapter", teacher=teacher, card=facts)
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["language"] == ["zh", "en"] and data["library_name"] == "xling"
    assert data["pipeline_tag"] == "text-to-image" and data["license"] == license_
    assert data["tags"] == ["xling", "text-to-image", "diffusers", "iap", "mlp"]
    assert data.get("base_model") == base_model
    body = card.text
    assert "```yaml\nrecipe: iap\nlr: 0.0001\ndata:\n  path: toy\n```" in body
    assert "| Student (Chinese prompts) | 87.5% |" in body
    assert (
        "](grid.png)" in body
        and (folder / "grid.png").read_bytes() == (tmp_path / "run-grid.png").read_bytes()
    )
    assert 'attach(pipe, "<org>/<name>")' in body and 'prompt="左边的红色圆形"' in body
    assert "student width 48 -> teacher width 32" in body
    assert ("teacher's own license applies" in body) == (teacher != "toy")
    if teacher == "toy":
        assert "from_pretrained(teacher_path())" in body
    else:
        assert f'DiffusionPipeline.from_pretrained("{teacher}")' in body


def test_the_card_without_run_facts_and_with_a_license(tiny_bert_path, tmp_path):
    folder = _encoder(tiny_bert_path).save_pretrained(tmp_path / "adapter", teacher=str(tmp_path / "my-sd"))
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "other" and card.data.base_model is None  # a local teacher is no Hub id
    assert "Not evaluated." in card.text and "## Training" not in card.text and "grid.png" not in card.text
    assert str(tmp_path) not in card.text and 'from_pretrained("path/to/my-sd")' in card.text
    write_model_card(folder, ModelCardFacts(license="mit", repo_id="org/zh"))
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit" and 'attach(pipe, "org/zh")' in card.text
    with pytest.raises(FileNotFoundError, match="grid image"):
        write_model_card(folder, ModelCardFacts(grid=tmp_path / "nope.png"))


def test_the_pushed_card_names_the_repo(hub, pushed):
    card = ModelCard(hub.files("org/name")["README.md"].decode())
    assert 'attach(pipe, "org/name")' in card.text and card.data.license == "apache-2.0"
    saved = json.loads(hub.files("org/name")["config.json"])
    assert saved["teacher"]["name_or_path"] == "toy"


def test_push_while_offline_is_refused_before_any_request(hub, tiny_bert_path, monkeypatch):
    encoder = _encoder(tiny_bert_path)
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"'org/offline'.*HF_HUB_OFFLINE is set"):
        encoder.push_to_hub("org/offline", include_student=True)
    assert hub.requests == [] and hub.repos == {}
