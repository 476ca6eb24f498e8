"""The toy world: renderer, grammar, held-out split, checker and dataset."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from xling.train import toyworld as tw
from xling.train.toyworld import Obj, Scene


def test_scene_counts_and_validation() -> None:
    assert len(tw.all_single_scenes()) == len(tw.COLORS) * len(tw.SHAPES) * len(tw.POSITIONS) == 48
    assert len(tw.all_pair_scenes()) == 4 * 3 * 3 * 3 * 4
    with pytest.raises(ValueError, match="color"):
        Obj("purple", "circle", "left")
    with pytest.raises(ValueError, match="opposite"):
        Scene((Obj("red", "circle", "left"), Obj("blue", "square", "top")))
    with pytest.raises(ValueError, match="colour"):
        Scene((Obj("red", "circle", "left"), Obj("red", "square", "right")))
    with pytest.raises(ValueError, match="split"):
        tw.all_single_scenes("test")


@pytest.mark.parametrize("kind", ["single", "pair"])
def test_heldout_split_is_disjoint_and_covers_every_attribute(kind: str) -> None:
    train, held = tw.all_scenes("train", kind), tw.all_scenes("heldout", kind)
    assert held and train
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(tw.all_scenes("all", kind))
    assert tw.all_scenes("heldout", kind) == held  # deterministic
    # Only combinations are held out: every colour, shape and position is still seen in training.
    seen = {(a, getattr(o, a)) for s in train for o in s.objects for a in ("color", "shape", "position")}
    assert len(seen) == len(tw.COLORS) + len(tw.SHAPES) + len(tw.POSITIONS)


def test_render_shape_dtype_determinism_and_jitter() -> None:
    scene = tw.all_single_scenes()[7]
    img = tw.render(scene)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tw.render(scene, 48).shape == (48, 48, 3)
    np.testing.assert_array_equal(img, tw.render(scene))
    a = tw.render(scene, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, tw.render(scene, rng=np.random.default_rng(3)))
    assert not np.array_equal(a, tw.render(scene, rng=np.random.default_rng(4)))
    assert (img == np.asarray(tw.BACKGROUND, np.uint8)).all(-1).mean() > 0.7  # plain background
    with pytest.raises(ValueError, match="size"):
        tw.render(scene, 8)


def test_grammar_canonical_parallel_and_varied() -> None:
    scene = Scene((Obj("red", "circle", "left"),))
    assert tw.caption_en(scene) == "a red circle on the left"
    assert tw.caption_zh(scene) == "左边的红色圆形"
    pair = Scene((Obj("red", "circle", "left"), Obj("blue", "square", "right")))
    assert tw.caption_en(pair) == "a red circle left of a blue square"
    rng = np.random.default_rng(0)
    for s in tw.all_single_scenes() + tw.all_pair_scenes()[::17]:
        en = {tw.caption_en(s, rng) for _ in range(40)}
        zh = {tw.caption_zh(s, rng) for _ in range(40)}
        assert len(en) >= 3 and len(zh) >= 3
        for o in s.objects:  # every paraphrase names every attribute of every object
            assert all(o.color in c and o.shape in c for c in en)
            assert all(
                re.search({"red": "红", "green": "绿", "blue": "蓝", "yellow": "黄"}[o.color], c) for c in zh
            )


def test_checker_is_exact_on_every_render() -> None:
    rng = np.random.default_rng(0)
    scenes = tw.all_single_scenes() + tw.all_pair_scenes()[::4]
    for scene in scenes:
        for r in (None, rng):
            result = tw.check(tw.render(scene, rng=r), scene)
            assert result["all"], (scene, result)
    assert set(tw.check(tw.render(scenes[-1]), scenes[-1])) >= {"color_0", "shape_1", "all_1", "all"}


def test_checker_catches_each_wrong_attribute() -> None:
    scene = Scene((Obj("red", "circle", "left"),))
    for wrong, key in (
        (Obj("blue", "circle", "left"), "color"),
        (Obj("red", "triangle", "left"), "shape"),
        (Obj("red", "square", "left"), "shape"),
        (Obj("red", "circle", "bottom"), "position"),
    ):
        result = tw.check(tw.render(Scene((wrong,))), scene)
        assert not result[key] and not result["all"]
        assert all(result[k] for k in ("color", "shape", "position") if k != key)
    assert not tw.check(np.full((32, 32, 3), 20, np.uint8), scene)["all"]  # empty image
    with pytest.raises(ValueError, match="image"):
        tw.check(np.zeros((32, 32)), scene)


def test_checker_degrades_gracefully_with_noise() -> None:
    rng = np.random.default_rng(1)
    scenes = tw.all_single_scenes()
    acc = []
    for sigma in (0, 10, 30, 120):
        noisy = [
            np.clip(tw.render(s, rng=rng) + rng.normal(0, sigma, (32, 32, 3)), 0, 255).astype(np.uint8)
            for s in scenes
        ]
        acc.append(tw.evaluate_accuracy(noisy, scenes))
    assert acc[0]["all"] == 1.0
    assert acc[1]["all"] >= 0.9  # mild noise: still almost always right
    assert acc[1]["all"] >= acc[2]["all"] >= acc[3]["all"]
    assert acc[3]["all"] < 0.6  # heavy noise: no longer trusted
    assert acc[3]["position"] > 0.75  # but the coarse attributes survive
    assert acc[3]["n"] == 48


def test_dataset_parallel_reproducible() -> None:
    ds = tw.ToyWorldDataset("train", size=32, seed=5, length=20, pair_fraction=0.5)
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    again = tw.ToyWorldDataset("train", size=32, seed=5, length=20, pair_fraction=0.5)[3]
    assert (
        item["en"] == again["en"] and item["zh"] == again["zh"] and torch.equal(item["image"], again["image"])
    )
    items = list(ds)
    assert (
        len(items) == 20
        and any(i["scene"].is_pair for i in items)
        and any(not i["scene"].is_pair for i in items)
    )
    for i in items:
        assert not tw.is_heldout(i["scene"])
        pixels = ((i["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert tw.check(pixels, i["scene"])["all"]  # image, captions and scene agree
        assert all(o.color in i["en"] for o in i["scene"].objects)
    held = tw.ToyWorldDataset("heldout", seed=0, length=10)
    assert all(tw.is_heldout(held[k]["scene"]) for k in range(10))
    with pytest.raises(IndexError):
        ds[20]
