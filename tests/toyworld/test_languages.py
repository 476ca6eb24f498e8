"""The toy world's grammars in every language, code-switched captions, the language option and two-object
checking."""

from __future__ import annotations

import numpy as np
import pytest

from xling.train.toyworld import world

SINGLE = world.Scene((world.Obj("red", "circle", "left"),))
PAIR = world.Scene((world.Obj("red", "circle", "left"), world.Obj("blue", "square", "right")))

CANONICAL = {
    "en": ("a red circle on the left", "a red circle left of a blue square"),
    "zh": ("左边的红色圆形", "红色圆形在蓝色方形的左边"),
    "ja": ("左にある赤い丸", "青い四角の左にある赤い丸"),
    "ko": ("왼쪽에 있는 빨간 원", "파란 사각형의 왼쪽에 있는 빨간 원"),
    "es": ("un círculo rojo a la izquierda", "un círculo rojo a la izquierda de un cuadrado azul"),
    "ar": ("دائرة حمراء على اليسار", "دائرة حمراء على يسار مربع أزرق"),
}

# Words that name each attribute value in each language (any of them may appear in a paraphrase).
WORDS = {
    "ja": {
        "red": ("赤",),
        "green": ("緑",),
        "blue": ("青",),
        "yellow": ("黄",),
        "circle": ("丸", "円"),
        "square": ("四角", "正方形"),
        "triangle": ("三角",),
        "left": ("左",),
        "right": ("右",),
        "top": ("上",),
        "bottom": ("下",),
    },
    "ko": {
        "red": ("빨간",),
        "green": ("초록", "녹색"),
        "blue": ("파란",),
        "yellow": ("노란",),
        "circle": ("원", "동그라미"),
        "square": ("사각형",),
        "triangle": ("삼각형", "세모"),
        "left": ("왼쪽", "좌측"),
        "right": ("오른쪽", "우측"),
        "top": ("위쪽", "상단"),
        "bottom": ("아래쪽", "하단"),
    },
    "es": {
        "red": ("roj",),
        "green": ("verde",),
        "blue": ("azul",),
        "yellow": ("amarill",),
        "circle": ("círculo",),
        "square": ("cuadrado",),
        "triangle": ("triángulo",),
        "left": ("izquierd",),
        "right": ("derech",),
        "top": ("arriba", "superior", "encima"),
        "bottom": ("abajo", "inferior", "debajo"),
    },
    "ar": {
        "red": ("أحمر", "حمراء"),
        "green": ("أخضر", "خضراء"),
        "blue": ("أزرق", "زرقاء"),
        "yellow": ("أصفر", "صفراء"),
        "circle": ("دائرة",),
        "square": ("مربع",),
        "triangle": ("مثلث",),
        "left": ("يسار", "اليسرى"),
        "right": ("يمين", "اليمنى"),
        "top": ("أعلى", "العلوي", "فوق"),
        "bottom": ("أسفل", "السفلي", "تحت"),
    },
}


def _paraphrases(scene: world.Scene, language: str, draws: int = 200) -> set[str]:
    rng = np.random.default_rng(0)
    return {world.caption(scene, language)} | {world.caption(scene, language, rng) for _ in range(draws)}


@pytest.mark.parametrize("language", world.LANGUAGES)
def test_canonical_captions(language: str) -> None:
    assert (world.caption(SINGLE, language), world.caption(PAIR, language)) == CANONICAL[language]
    assert world.caption(SINGLE, language) == world.caption(SINGLE, language)  # no hidden state


@pytest.mark.parametrize("language", world.TARGET_LANGUAGES)
def test_paraphrases_are_varied(language: str) -> None:
    assert len(_paraphrases(SINGLE, language)) >= 5
    assert len(_paraphrases(PAIR, language)) >= 4


@pytest.mark.parametrize("language", world.LANGUAGES)
def test_captions_identify_their_scene(language: str) -> None:
    """No caption, canonical or paraphrased, describes two different pictures (a pair listed in either order is
    one picture), so a student can always recover the scene."""
    seen: dict[str, frozenset] = {}
    for scene in world.all_single_scenes() + world.all_pair_scenes():
        picture = frozenset(scene.objects)
        for text in _paraphrases(scene, language, draws=40):
            assert seen.setdefault(text, picture) == picture, f"{text!r} names two scenes"


@pytest.mark.parametrize("language", sorted(WORDS))
def test_every_paraphrase_names_every_attribute(language: str) -> None:
    words = WORDS[language]
    for scene in world.all_single_scenes()[::5] + world.all_pair_scenes()[::37]:
        for text in _paraphrases(scene, language, draws=60):
            for obj in scene.objects:
                for value in (obj.color, obj.shape):
                    assert any(w in text for w in words[value]), (text, value)
            if not scene.is_pair:
                (obj,) = scene.objects
                assert any(w in text for w in words[obj.position]), (text, obj.position)


def test_language_specific_grammar() -> None:
    # Korean particles follow the final consonant: 원이 (batchim), 동그라미가 / 세모가 (none).
    ko = _paraphrases(SINGLE, "ko") | _paraphrases(world.Scene((world.Obj("red", "triangle", "top"),)), "ko")
    assert any("원이 " in t for t in ko) and any("동그라미가 " in t for t in ko)
    assert any("세모는 " in t or "세모가 " in t for t in ko) and not any(
        "원가" in t or "세모이" in t for t in ko
    )
    # Arabic adjectives agree with the noun's gender: the circle is feminine, the square masculine.
    assert "دائرة حمراء" in world.caption(SINGLE, "ar") and "مربع أزرق" in world.caption(PAIR, "ar")
    assert not any("دائرة أحمر" in t for t in _paraphrases(SINGLE, "ar"))
    # Spanish puts the noun before its adjective; Japanese and Korean put the position first (SOV).
    assert world.caption(SINGLE, "es").startswith("un círculo rojo")
    assert world.caption(SINGLE, "ja").startswith("左") and world.caption(SINGLE, "ko").startswith("왼쪽")


def test_mixed_captions_switch_language_inside_one_prompt() -> None:
    assert world.caption(SINGLE, "mixed") == "红色圆形, a la izquierda"
    assert world.caption(PAIR, "mixed") == "左边的红色圆形, un cuadrado azul a la derecha"
    rng = np.random.default_rng(0)
    texts = {world.caption(PAIR, "mixed", rng) for _ in range(60)}
    assert len(texts) >= 10
    for text in texts:
        first, second = text.split(", ", 1)
        assert first in {
            world.caption(world.Scene(PAIR.objects[:1]), lang) for lang in world.TARGET_LANGUAGES
        }
        assert first != world.caption(world.Scene(PAIR.objects[:1]), "es") or "izquierda" not in second


def test_parse_languages() -> None:
    assert world.parse_languages("zh") == ("zh",)
    assert world.parse_languages("all") == world.TARGET_LANGUAGES
    assert world.parse_languages(" ja, ko ") == ("ja", "ko")
    assert world.parse_languages(["es", "mixed"]) == ("es", "mixed")
    with pytest.raises(ValueError, match=r"unknown toy-world language 'de'.*zh, ja, ko, es, ar"):
        world.parse_languages("zh,de")
    with pytest.raises(ValueError, match="given twice"):
        world.parse_languages("zh,all")
    with pytest.raises(ValueError, match="no toy-world grammar for language 'fr'"):
        world.caption(SINGLE, "fr")


def test_dataset_languages_leave_the_rest_of_the_stream_unchanged() -> None:
    chinese = world.ToyWorldDataset("train", seed=3, length=200, pair_fraction=0.3)
    every = world.ToyWorldDataset("train", seed=3, length=200, pair_fraction=0.3, languages="all")
    counts = dict.fromkeys(world.TARGET_LANGUAGES, 0)
    for i in range(200):
        a, b = chinese[i], every[i]
        assert a["target"] == a["zh"] and a["language"] == "zh"
        assert (a["en"], a["zh"], a["scene"]) == (b["en"], b["zh"], b["scene"])
        assert (a["image"] == b["image"]).all()
        assert b["target"] in _paraphrases(b["scene"], b["language"], draws=100)
        counts[b["language"]] += 1
    assert min(counts.values()) >= 25  # about 40 each


def test_heldout_scenes_stay_out_of_every_language() -> None:
    data = world.ToyWorldDataset("train", seed=0, length=300, pair_fraction=0.5, languages="all")
    assert not any(world.is_heldout(data[i]["scene"]) for i in range(300))


def test_checker_scores_the_relation_of_two_objects() -> None:
    verdict = world.check(world.render(PAIR), PAIR)
    assert verdict["all"] and verdict["relation"] and verdict["all_0"] and verdict["all_1"]
    # The same two objects drawn the other way round: each position is wrong, and so is the relation.
    swapped = world.Scene((world.Obj("red", "circle", "right"), world.Obj("blue", "square", "left")))
    verdict = world.check(world.render(swapped), PAIR)
    assert not verdict["relation"] and not verdict["position"] and verdict["color"] and verdict["shape"]
    # A pair drawn vertically where it should be side by side has no left/right relation either way.
    assert world.check(world.render(world.pair_eval_scenes()[0]), world.pair_eval_scenes()[0])["relation"]
    # One object missing: no relation to speak of.
    alone = world.check(world.render(world.Scene(PAIR.objects[:1])), PAIR)
    assert not alone["relation"] and not alone["color"]


def test_checker_on_every_two_object_render() -> None:
    """Exact on every canonical pair render; on jittered ones (objects shrunk 12% at 32 px) one in 1,296 of seeds
    0-2 has a shape misread, so the bar there is 99.5%."""
    scenes = world.all_pair_scenes()
    for scene in scenes:
        verdict = world.check(world.render(scene), scene)
        assert verdict["all"] and verdict["relation"], scene
    rng = np.random.default_rng(0)
    right = [world.check(world.render(s, rng=rng), s) for s in scenes]
    assert np.mean([v["all"] and v["relation"] for v in right]) >= 0.995
    accuracy = world.evaluate_accuracy(
        [world.render(s) for s in world.pair_eval_scenes()], world.pair_eval_scenes()
    )
    assert accuracy["relation"] == accuracy["all"] == 1.0


def test_pair_eval_scenes_are_fixed_and_cover_both_splits() -> None:
    scenes = world.pair_eval_scenes()
    assert scenes == world.pair_eval_scenes() and len(set(scenes)) == world.PAIR_EVAL_SCENES
    held = sum(world.is_heldout(s) for s in scenes)
    assert 3 <= held <= 20
