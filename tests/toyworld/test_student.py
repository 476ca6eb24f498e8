"""The committed toy students: tokenizer coverage, Hugging Face loading, and the pretraining helpers."""

from __future__ import annotations

import json

import pytest
import torch

from xling.train.toyworld import TOY_STUDENTS, world
from xling.train.toyworld import student as toy


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return toy.world_chinese_captions("all", variants=4)


@pytest.mark.parametrize("variant", TOY_STUDENTS)
def test_variant_loads_with_auto_classes(variant: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = toy.student_path(variant)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "BertModel" and tokenizer.is_fast
    record = json.loads((path / "toy_student.json").read_text())
    assert record["variant"] == variant
    family = "multilingual" if variant.startswith("multilingual") else "pretrained"
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(toy.student_path(family)).get_vocab()
    batch = tokenizer(["左边的红色圆形", "红色圆形"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], model.config.hidden_size)
    assert torch.isfinite(hidden).all()
    total = sum(p.numel() for p in model.parameters())
    assert total < 2_000_000  # "tiny": the whole variant stays a few MB


def test_tokenizer_covers_every_grammar_character(captions: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.student_path())
    unk = tokenizer.unk_token_id
    for caption in captions:
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert unk not in ids, f"{caption!r} has characters outside the vocabulary"
        # character level: one token per non-space character
        assert len(ids) == len(caption.replace(" ", "")), caption
    assert len(tokenizer(captions[0], truncation=True)["input_ids"]) <= tokenizer.model_max_length


def test_variants_share_initialisation_and_differ_by_pretraining() -> None:
    from transformers import AutoModel

    random = AutoModel.from_pretrained(toy.student_path("random")).state_dict()
    pretrained = AutoModel.from_pretrained(toy.student_path()).state_dict()
    assert random.keys() == pretrained.keys()
    # MLM never trains the pooler, so it keeps the shared seeded initialisation; the encoder moved.
    assert torch.equal(random["pooler.dense.weight"], pretrained["pooler.dense.weight"])
    assert not torch.equal(random["encoder.layer.0.attention.self.query.weight"],
                           pretrained["encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    stats = json.loads((toy.student_path() / "toy_student.json").read_text())["mlm"]
    assert stats["probe_masked_accuracy_after"] > stats["probe_masked_accuracy_before"] + 0.3


def test_aligned_student_continues_from_the_pretrained_one() -> None:
    from transformers import AutoModel

    pretrained = AutoModel.from_pretrained(toy.student_path()).state_dict()
    aligned = AutoModel.from_pretrained(toy.student_path("aligned")).state_dict()
    assert aligned.keys() == pretrained.keys()
    # distill trains the whole encoder; the embeddings of characters it never sees stay, the layers move
    moved = [k for k in pretrained if not torch.equal(pretrained[k], aligned[k])]
    assert any(k.startswith("encoder.layer.3.") for k in moved)
    record = json.loads((toy.student_path("aligned") / "toy_student.json").read_text())
    assert record["from"] == "student-pretrained" and record["distill"]["steps"] > 0
    assert record["distill"]["pooled"] < 0.5 * record["distill"]["first_loss"]  # validation vs first update


@pytest.mark.parametrize("language", [*world.TARGET_LANGUAGES, world.MIXED])
def test_multilingual_tokenizer_is_one_token_per_character_of_every_script(language: str) -> None:
    """Hangul syllables stay whole (no NFD into jamo), kana keep their voicing marks, accents stay."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.student_path("multilingual"))
    assert tokenizer.is_fast and tokenizer.cls_token_id == 2 and tokenizer.sep_token_id == 3
    for caption in toy.world_captions("all", variants=3, languages=(language,)):
        ids = tokenizer(caption)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert tokenizer.unk_token_id not in ids, caption
        assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == list(caption.lower().replace(" ", "")), caption
        assert len(ids) <= tokenizer.model_max_length
    assert tokenizer.convert_ids_to_tokens(tokenizer("가 が Í")["input_ids"][1:-1]) == ["가", "が", "í"]


def test_multilingual_students() -> None:
    from transformers import AutoModel

    record = json.loads((toy.student_path("multilingual") / "toy_student.json").read_text())
    assert record["variant"] == "multilingual" and record["languages"] == list(world.TARGET_LANGUAGES)
    assert record["corpus_captions"] == len(toy.world_captions("train", languages=world.TARGET_LANGUAGES))
    assert record["mlm"]["probe_masked_accuracy_after"] > record["mlm"]["probe_masked_accuracy_before"] + 0.3
    aligned = json.loads((toy.student_path("multilingual-aligned") / "toy_student.json").read_text())
    assert aligned["from"] == "student-multilingual" and aligned["languages"] == list(world.TARGET_LANGUAGES)
    assert aligned["distill"]["pooled"] < 0.5 * aligned["distill"]["first_loss"]
    a = AutoModel.from_pretrained(toy.student_path("multilingual")).state_dict()
    b = AutoModel.from_pretrained(toy.student_path("multilingual-aligned")).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("encoder.layer.3."))


def test_world_captions_keep_the_chinese_corpus_and_hold_out_every_language() -> None:
    assert toy.world_captions("train", languages=("zh",)) == toy.world_chinese_captions("train")
    train = set(toy.world_captions("train", variants=0, languages=world.TARGET_LANGUAGES))
    heldout = set(toy.world_captions("heldout", variants=0, languages=world.TARGET_LANGUAGES))
    assert heldout and not (train & heldout)


def test_unknown_variant_is_named() -> None:
    with pytest.raises(ValueError, match="unknown toy student 'aligend'"):
        toy.student_path("aligend")


def test_heldout_combinations_stay_out_of_the_mlm_corpus() -> None:
    train = set(toy.world_chinese_captions("train", variants=0))
    heldout = set(toy.world_chinese_captions("heldout", variants=0))
    assert heldout and not (train & heldout)


def test_mask_tokens_rules() -> None:
    ids = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 13, 3, 0, 0, 0]])
    special = torch.isin(ids, torch.tensor([0, 2, 3]))
    g = torch.Generator().manual_seed(0)
    inputs, labels = toy.mask_tokens(
        ids, special, mask_token_id=4, vocab_size=20, first_regular_id=5, probability=0.15, generator=g
    )
    assert (labels[special] == -100).all()
    assert ((labels != -100).sum(dim=1) >= 1).all()  # one target per row at least
    assert torch.equal(inputs[special], ids[special])
    picked = labels != -100
    assert torch.equal(labels[picked], ids[picked])
    again, labels2 = toy.mask_tokens(
        ids, special, mask_token_id=4, vocab_size=20, first_regular_id=5, probability=0.15,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(inputs, again) and torch.equal(labels, labels2)
    with pytest.raises(ValueError, match="shape"):
        toy.mask_tokens(ids, special[:, :3], mask_token_id=4, vocab_size=20, first_regular_id=5,
                        probability=0.15, generator=g)  # fmt: skip


def test_pretraining_is_seeded_and_learns(tmp_path) -> None:
    texts = ["左边的红色圆形", "右边的蓝色正方形", "上面的绿色三角形", "下面的黄色圆形"]
    config = toy.ToyStudentConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, mlm_steps=40,
        mlm_batch_size=8, mlm_lr=3e-3,
    )  # fmt: skip
    tokenizer = toy.build_student_tokenizer(texts, max_length=16)
    a, stats = toy.pretrain_mlm(tokenizer, texts, config, log_every=0)
    b, _ = toy.pretrain_mlm(tokenizer, texts, config, log_every=0)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert stats["probe_masked_accuracy_after"] > stats["probe_masked_accuracy_before"]
    path = toy.save_student(tmp_path / "s", a, tokenizer, config, {"variant": "test"})
    from transformers import AutoModel

    assert torch.equal(AutoModel.from_pretrained(path).embeddings.word_embeddings.weight,
                       a.embeddings.word_embeddings.weight)  # fmt: skip
    with pytest.raises(ValueError, match="divisible"):
        toy.ToyStudentConfig(hidden_size=10, num_attention_heads=4)
