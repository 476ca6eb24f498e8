"""xling.train.cache: latent and teacher-embedding caches: hit, miss, invalidation, corruption."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from xling.core import Teacher
from xling.train.cache import (
    CachedDataset,
    CacheError,
    LatentCache,
    TextEmbeddingCache,
    module_fingerprint,
    tokenizer_fingerprint,
)
from xling.train.data import ParallelCorpus, collate_rows, load_corpus


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path: Path) -> Teacher:
    return Teacher.from_pretrained(tiny_sd1_path)


def _corpus(folder: Path, n: int = 5) -> ParallelCorpus:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (40, 32), (40 * i, 255 - 40 * i, 100)).save(folder / f"{i}.png")
        lines.append(json.dumps({"en": f"a shape number {i % 3}", "zh": f"形状 {i}", "image": f"{i}.png"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    corpus = load_corpus(folder / "data.jsonl", resolution=32)
    assert isinstance(corpus, ParallelCorpus)
    return corpus


def test_latent_cache_hit_miss_invalidation_and_corruption(tmp_path: Path, sd1: Teacher) -> None:
    corpus = _corpus(tmp_path / "data")
    folder = tmp_path / "cache"
    built = LatentCache.load_or_build(folder, corpus, sd1, batch_size=2, shard_size=2)
    assert built.status == "built: no cache yet" and len(built) == 5
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        f"latents-0000{i}.safetensors" for i in range(3)
    ]
    expected = sd1.encode_images(corpus[3]["image"][None], sample=False)[0]
    assert built[3].shape == (4, 16, 16)
    torch.testing.assert_close(built[3], expected)

    again = LatentCache.load_or_build(folder, corpus, sd1, batch_size=2, shard_size=2)
    assert again.hit and again.key == built.key
    torch.testing.assert_close(again[4], built[4])

    # A truncated shard is found at open and only its rows are re-encoded; "fail" reports it instead.
    shard = folder / "latents-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CacheError, match=r"latents-00001\.safetensors is truncated"):
        LatentCache.load_or_build(folder, corpus, sd1, on_corrupt="fail")
    repaired = LatentCache.load_or_build(folder, corpus, sd1, shard_size=2)
    assert repaired.status.startswith("repaired: latents-00001.safetensors is truncated")
    torch.testing.assert_close(repaired[2], built[2])
    assert LatentCache.load_or_build(folder, corpus, sd1, verify_hash=True).hit

    # A changed teacher VAE invalidates it, and the status names what changed.
    weight = sd1.vae.encoder.conv_in.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01)
    try:
        changed = LatentCache.load_or_build(folder, corpus, sd1, shard_size=2)
        assert changed.status == "rebuilt: vae changed" and changed.key != built.key
        assert not torch.allclose(changed[3], built[3])
    finally:
        with torch.no_grad():
            weight.copy_(original)

    # A changed corpus (an image rewritten) and a changed resolution invalidate it too.
    assert LatentCache.load_or_build(folder, corpus, sd1).status == "rebuilt: vae changed"  # restored VAE
    Image.new("RGB", (40, 32), (0, 0, 0)).save(tmp_path / "data" / "0.png")
    assert LatentCache.load_or_build(folder, _corpus_reload(corpus), sd1).status == "rebuilt: corpus changed"
    smaller = load_corpus(tmp_path / "data" / "data.jsonl", resolution=16)
    assert "transform" in LatentCache.load_or_build(folder, smaller, sd1).status


def _corpus_reload(corpus: ParallelCorpus) -> ParallelCorpus:
    return ParallelCorpus(corpus.paths, resolution=corpus.transform.resolution if corpus.transform else None)


def test_text_cache_hit_extend_invalidation_corruption_and_dataset(tmp_path: Path, sd1: Teacher) -> None:
    corpus = _corpus(tmp_path / "data")
    folder = tmp_path / "text"
    captions = corpus.captions("en")  # 3 unique of 5
    cache = TextEmbeddingCache.load_or_build(folder, captions, sd1, batch_size=2)
    assert cache.status == "built: no cache yet" and len(cache) == 3 and not cache.has_pooled
    torch.testing.assert_close(
        cache["a shape number 1"]["prompt_embeds"], sd1.encode(["a shape number 1"]).prompt_embeds[0]
    )
    second = TextEmbeddingCache.load_or_build(folder, captions, sd1)
    assert second.hit, second.status

    grown = TextEmbeddingCache.load_or_build(folder, [*captions, "a new caption"], sd1)
    assert grown.status == "extended: 1 new captions" and len(grown) == 4
    assert len(list(folder.glob("*.safetensors"))) == 2

    kept = cache["a shape number 0"]["prompt_embeds"]
    first = folder / "text-00000.safetensors"
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(CacheError, match="text-00000"):
        TextEmbeddingCache.load_or_build(folder, captions, sd1, on_corrupt="fail")
    repaired = TextEmbeddingCache.load_or_build(folder, [*captions, "a new caption"], sd1)
    assert repaired.status.startswith("repaired: text-00000.safetensors") and len(repaired) == 4
    torch.testing.assert_close(repaired["a shape number 0"]["prompt_embeds"], kept)

    # Another tokenizer (or text encoder) is another key.
    sd1.tokenizers[0].model_max_length = 64
    try:
        assert (
            TextEmbeddingCache.load_or_build(folder, captions, sd1).status
            == "rebuilt: encoding, tokenizers changed"
        )
    finally:
        sd1.tokenizers[0].model_max_length = 77
    assert (
        TextEmbeddingCache.load_or_build(folder, captions, sd1).status
        == "rebuilt: encoding, tokenizers changed"
    )

    latents = LatentCache.load_or_build(tmp_path / "lat", corpus, sd1)
    text = TextEmbeddingCache.load_or_build(folder, captions, sd1)
    dataset = CachedDataset(corpus, latents=latents, text=text)
    batch = collate_rows([(0, dataset[0]), (4, dataset[4])])
    assert batch.pixels is None  # the cached rows carry latents instead of images
    assert batch.latents.shape == (2, 4, 16, 16) and batch.extra["prompt_embeds"].shape == (2, 77, 32)
    torch.testing.assert_close(batch.extra["prompt_embeds"][1], text["a shape number 1"]["prompt_embeds"])
    with pytest.raises(ValueError, match="not in the teacher-embedding cache"):
        CachedDataset(corpus, text=TextEmbeddingCache.load_or_build(tmp_path / "other", ["x"], sd1))


def test_text_cache_pooled_for_sdxl(tmp_path: Path, tiny_sdxl_path: Path) -> None:
    teacher = Teacher.from_pretrained(tiny_sdxl_path)
    cache = TextEmbeddingCache.load_or_build(
        tmp_path / "xl", ["a cat", "a dog"], teacher, dtype=torch.float16
    )
    assert cache.has_pooled
    out = cache.lookup(["a dog", "a cat"])
    assert out["prompt_embeds"].dtype == torch.float16 and out["pooled_prompt_embeds"].shape == (2, 32)
    reference = teacher.encode(["a dog"])
    torch.testing.assert_close(
        out["pooled_prompt_embeds"][0].float(), reference.pooled_prompt_embeds[0], atol=2e-3, rtol=2e-3
    )


def test_fingerprints_follow_weights_and_tokenizer(sd1: Teacher) -> None:
    before = module_fingerprint(sd1.vae)
    assert module_fingerprint(copy.deepcopy(sd1.vae)) == before
    assert module_fingerprint(copy.deepcopy(sd1.vae).to(torch.float16)) != before
    assert tokenizer_fingerprint(sd1.tokenizers[0]) == tokenizer_fingerprint(sd1.tokenizers[0])


def test_text_cache_keeps_the_mask_of_a_pixart_teacher(tmp_path: Path, tiny_pixart_path: Path) -> None:
    from xling.train.data.batch import collate_rows

    teacher = Teacher.from_pretrained(tiny_pixart_path)
    captions = ["a cat", "a red circle on the left"]
    cache = TextEmbeddingCache.load_or_build(tmp_path / "pixart", captions, teacher)
    assert cache.has_mask and not cache.has_pooled
    out = cache.lookup(captions)
    reference = teacher.encode(captions)
    assert torch.equal(out["prompt_attention_mask"].long(), reference.attention_mask.long())
    torch.testing.assert_close(out["prompt_embeds"], reference.prompt_embeds)
    # the rows' batch carries it to the recipes, which condition PixArt with it
    batch = collate_rows([(i, {"en": c, "zh": "", **cache[c]}) for i, c in enumerate(captions)])
    assert torch.equal(batch.extra["prompt_attention_mask"].long(), reference.attention_mask.long())
    # another token length is another encoding: the cache is rebuilt, not reused
    longer = Teacher.from_pretrained(tiny_pixart_path, max_sequence_length=64)
    assert TextEmbeddingCache.load_or_build(tmp_path / "pixart", captions, longer).status.startswith(
        "rebuilt"
    )
