"""The multilingual toy world: scenes of coloured shapes, a renderer, grammars in six languages and a checker.

A scene is one object (``a red circle on the left``) or two (``a red circle left of a blue square``). The
renderer draws it on a plain dark background with a little seeded jitter; the grammars write the same scene
in English and in each target language of :data:`TARGET_LANGUAGES` (Chinese, Japanese, Korean, Spanish,
Arabic: four scripts, SVO, SOV and noun-before-adjective orders, right to left) with paraphrase variety, and
:func:`caption_mixed` code-switches between them inside one prompt, so (en, target, image) triples are
unlimited and exactly parallel; the checker reads colour, shape and position back from any image by colour segmentation,
connected components, centroid and fill ratio, so generated images can be scored against their scene.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import torch

__all__ = [
    "BACKGROUND",
    "COLORS",
    "LANGUAGES",
    "MIXED",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "TARGET_LANGUAGES",
    "Obj",
    "Scene",
    "ToyWorldDataset",
    "all_pair_scenes",
    "all_scenes",
    "all_single_scenes",
    "caption",
    "caption_ar",
    "caption_en",
    "caption_es",
    "caption_ja",
    "caption_ko",
    "caption_mixed",
    "caption_zh",
    "check",
    "evaluate_accuracy",
    "is_heldout",
    "pair_eval_scenes",
    "parse_languages",
    "render",
]

Split = Literal["train", "heldout", "all"]

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")

# Saturated, mutually distant colours on a near-black background: nearest-palette segmentation stays exact.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
}
BACKGROUND: tuple[int, int, int] = (20, 20, 20)

# Object centre as (x, y) fractions of the image side.
_ANCHOR: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
_RADIUS = 0.17  # half the object's extent, as a fraction of the side
# Two-object layouts: (position of objects[0], position of objects[1]).
_PAIR_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("left", "right"),
    ("right", "left"),
    ("top", "bottom"),
    ("bottom", "top"),
)

_ZH_COLOR = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
_ZH_SHAPE = {"circle": "圆形", "square": "方形", "triangle": "三角形"}
_ZH_SHAPE_ALT = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
_ZH_POS = {"left": "左边", "right": "右边", "top": "上边", "bottom": "下边"}
_ZH_POS_ALT = {"left": "左侧", "right": "右侧", "top": "上方", "bottom": "下方"}
_EN_POS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_EN_REL = {
    ("left", "right"): "left of",
    ("right", "left"): "right of",
    ("top", "bottom"): "above",
    ("bottom", "top"): "below",
}
_EN_REL_ALT = {
    ("left", "right"): "to the left of",
    ("right", "left"): "to the right of",
    ("top", "bottom"): "above",
    ("bottom", "top"): "below",
}


@dataclass(frozen=True)
class Obj:
    """One coloured shape at one of the four positions."""

    color: str
    shape: str
    position: str

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")


@dataclass(frozen=True)
class Scene:
    """One object, or two of different colours on opposite sides (left/right or top/bottom)."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene holds 1 or 2 objects, got {len(self.objects)}")
        if len(self.objects) == 2:
            a, b = self.objects
            if (a.position, b.position) not in _PAIR_LAYOUTS:
                raise ValueError(
                    f"two objects must sit on opposite sides, got {a.position!r} and {b.position!r}"
                )
            if a.color == b.color:
                raise ValueError(f"two objects must differ in colour, both are {a.color!r}")

    @property
    def is_pair(self) -> bool:
        return len(self.objects) == 2


# ----------------------------------------------------------------------------------------------- scenes


def is_heldout(scene: Scene) -> bool:
    """Whether ``scene`` belongs to the held-out split (a fixed Latin-square-like set of combinations).

    Single objects: ``(color + shape + position) % 4 == 0``, so every (colour, shape) pair is held out at
    exactly one position and every colour, shape and position still occurs in training (12 of 48 held out).
    Pairs: ``(c0 + s0 + c1 + s1 + layout) % 5 == 0`` (about one in five).
    """
    if not scene.is_pair:
        (o,) = scene.objects
        return (COLORS.index(o.color) + SHAPES.index(o.shape) + POSITIONS.index(o.position)) % 4 == 0
    a, b = scene.objects
    layout = _PAIR_LAYOUTS.index((a.position, b.position))
    total = (
        COLORS.index(a.color) + SHAPES.index(a.shape) + COLORS.index(b.color) + SHAPES.index(b.shape) + layout
    )
    return total % 5 == 0


def _filter(scenes: list[Scene], split: Split) -> list[Scene]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if split == "all":
        return scenes
    return [s for s in scenes if is_heldout(s) == (split == "heldout")]


def all_single_scenes(split: Split = "all") -> list[Scene]:
    """Every one-object scene (4 colours x 3 shapes x 4 positions = 48) of ``split``, in a fixed order."""
    scenes = [Scene((Obj(c, s, p),)) for c, s, p in product(COLORS, SHAPES, POSITIONS)]
    return _filter(scenes, split)


def all_pair_scenes(split: Split = "all") -> list[Scene]:
    """Every two-object scene (distinct colours, 4 layouts: 4*3*3*3*4 = 432) of ``split``, in a fixed order."""
    scenes = [
        Scene((Obj(c0, s0, p0), Obj(c1, s1, p1)))
        for (p0, p1), c0, s0, c1, s1 in product(_PAIR_LAYOUTS, COLORS, SHAPES, COLORS, SHAPES)
        if c0 != c1
    ]
    return _filter(scenes, split)


#: How many two-object scenes :func:`pair_eval_scenes` gives by default.
PAIR_EVAL_SCENES = 48


def pair_eval_scenes(count: int = PAIR_EVAL_SCENES) -> list[Scene]:
    """The fixed two-object scenes every evaluation scores: the first ``count`` of a seeded shuffle of all 432
    (both splits, about one in five held out)."""
    pairs = all_pair_scenes()
    return [pairs[i] for i in np.random.default_rng(1).permutation(len(pairs))[:count]]


def all_scenes(split: Split = "all", kind: Literal["single", "pair", "both"] = "single") -> list[Scene]:
    """Scenes of ``split`` of one ``kind`` (single objects, pairs, or both)."""
    if kind not in ("single", "pair", "both"):
        raise ValueError(f"kind must be 'single', 'pair' or 'both', got {kind!r}")
    out: list[Scene] = []
    if kind in ("single", "both"):
        out += all_single_scenes(split)
    if kind in ("pair", "both"):
        out += all_pair_scenes(split)
    return out


# --------------------------------------------------------------------------------------------- renderer

_SUPERSAMPLE = 4


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` in [0, 1] of a shape centred at (cx, cy) pixels, half-extent r."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE  # pixel units, sample centres
    x, y = np.meshgrid(coords, coords)  # [n, n]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        half = r * 0.88  # about the circle's area, so size alone does not give the shape away
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle pointing up, base at the bottom; bbox about 2.3r wide so it is not just smaller
        half_w, top, bottom = r * 1.15, -r * 1.05, r * 0.95
        t = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= half_w * t)
    cov = inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    return cov.astype(np.float32)


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``scene`` as a uint8 image ``[size, size, 3]``.

    Args:
        scene: The scene to draw.
        size: Image side in pixels (>= 16).
        rng: With a generator, each object's centre moves by up to 4% of the side and its size by up to
            +-12%; ``None`` draws the canonical, unjittered image.

    Returns:
        ``np.ndarray`` uint8 ``[size, size, 3]``.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"scene must be a Scene, got {type(scene).__name__}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND
    for obj in scene.objects:
        ax, ay = _ANCHOR[obj.position]
        r = _RADIUS * size
        cx, cy = ax * size, ay * size
        if rng is not None:
            cx += rng.uniform(-0.04, 0.04) * size
            cy += rng.uniform(-0.04, 0.04) * size
            r *= rng.uniform(0.88, 1.12)
        cov = _shape_mask(obj.shape, cx, cy, r, size)[..., None]  # [H, W, 1]
        img = img * (1 - cov) + np.asarray(PALETTE[obj.color], np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- grammar


def _pick(options: list[str], rng: np.random.Generator | None) -> str:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def caption_en(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """English caption of ``scene``; ``rng=None`` gives the canonical form ("a red circle on the left")."""
    if not scene.is_pair:
        (o,) = scene.objects
        c, s, p = o.color, o.shape, _EN_POS[o.position]
        return _pick(
            [
                f"a {c} {s} {p}",
                f"{o.position}: a {c} {s}",
                f"{p}, a {c} {s}",
                f"there is a {c} {s} {p}",
                f"a {s} that is {c}, {p}",
                f"{c} {s} {p}",
            ],
            rng,
        )
    a, b = scene.objects
    rel = (a.position, b.position)
    inverse = (b.position, a.position)
    return _pick(
        [
            f"a {a.color} {a.shape} {_EN_REL[rel]} a {b.color} {b.shape}",
            f"a {b.color} {b.shape} {_EN_REL[inverse]} a {a.color} {a.shape}",
            f"a {a.color} {a.shape} {_EN_REL_ALT[rel]} a {b.color} {b.shape}",
            f"a {a.color} {a.shape} {_EN_POS[a.position]} and a {b.color} {b.shape} {_EN_POS[b.position]}",
        ],
        rng,
    )


def caption_zh(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Chinese caption of ``scene``; ``rng=None`` gives the canonical form ("左边的红色圆形")."""
    if not scene.is_pair:
        (o,) = scene.objects
        c, s, s2 = _ZH_COLOR[o.color], _ZH_SHAPE[o.shape], _ZH_SHAPE_ALT[o.shape]
        p, p2 = _ZH_POS[o.position], _ZH_POS_ALT[o.position]
        return _pick(
            [
                f"{p}的{c}{s}",
                f"{c}{s}在{p}",
                f"{p}有一个{c}的{s2}",
                f"一个{c}的{s}，在{p2}",
                f"{p2}的{c}{s2}",
                f"{c}{s2}位于{p2}",
            ],
            rng,
        )
    a, b = scene.objects
    ca, sa, cb, sb = _ZH_COLOR[a.color], _ZH_SHAPE[a.shape], _ZH_COLOR[b.color], _ZH_SHAPE[b.shape]
    pa, pb = _ZH_POS[a.position], _ZH_POS[b.position]
    return _pick(
        [
            f"{ca}{sa}在{cb}{sb}的{pa}",
            f"{cb}{sb}在{ca}{sa}的{pb}",
            f"{pa}是{ca}{sa}，{pb}是{cb}{sb}",
            f"一个{ca}的{sa}在一个{cb}的{sb}的{pa}",
        ],
        rng,
    )


#: The target languages of the toy world, each with its own grammar; English is the teacher's language.
TARGET_LANGUAGES: tuple[str, ...] = ("zh", "ja", "ko", "es", "ar")
#: Every language a caption can be written in.
LANGUAGES: tuple[str, ...] = ("en", *TARGET_LANGUAGES)
#: The code-switched pseudo-language of :func:`caption_mixed` (two target languages in one prompt).
MIXED = "mixed"

# Japanese (SOV; kanji, hiragana): an adjective or ``の`` phrase before the noun, ``にある`` "which is at".
_JA_COLOR = {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い"}
_JA_COLOR_ALT = {"red": "赤色の", "green": "緑色の", "blue": "青色の", "yellow": "黄色の"}
_JA_SHAPE = {"circle": "丸", "square": "四角", "triangle": "三角"}
_JA_SHAPE_ALT = {"circle": "円", "square": "正方形", "triangle": "三角形"}
_JA_POS = {"left": "左", "right": "右", "top": "上", "bottom": "下"}
_JA_POS_ALT = {"left": "左側", "right": "右側", "top": "上側", "bottom": "下側"}
# Korean (SOV; Hangul, spaced words): adnominal colour before the noun, particles chosen by the final consonant.
_KO_COLOR = {"red": "빨간", "green": "초록색", "blue": "파란", "yellow": "노란"}
_KO_COLOR_ALT = {"red": "빨간색", "green": "녹색", "blue": "파란색", "yellow": "노란색"}
_KO_SHAPE = {"circle": "원", "square": "사각형", "triangle": "삼각형"}
_KO_SHAPE_ALT = {"circle": "동그라미", "square": "정사각형", "triangle": "세모"}
_KO_POS = {"left": "왼쪽", "right": "오른쪽", "top": "위쪽", "bottom": "아래쪽"}
_KO_POS_ALT = {"left": "좌측", "right": "우측", "top": "상단", "bottom": "하단"}
# Spanish (Latin script shared with English; the noun before its adjective; every shape is masculine).
_ES_COLOR = {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo"}
_ES_SHAPE = {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"}
_ES_POS = {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo"}
_ES_POS_ALT = {
    "left": "en la parte izquierda",
    "right": "en la parte derecha",
    "top": "en la parte superior",
    "bottom": "en la parte inferior",
}
_ES_REL = {
    ("left", "right"): "a la izquierda de",
    ("right", "left"): "a la derecha de",
    ("top", "bottom"): "encima de",
    ("bottom", "top"): "debajo de",
}
_ES_REL_ALT = {
    ("left", "right"): "al lado izquierdo de",
    ("right", "left"): "al lado derecho de",
    ("top", "bottom"): "por encima de",
    ("bottom", "top"): "por debajo de",
}
# Arabic (right to left; the adjective after the noun, agreeing in gender: the circle is feminine).
_AR_SHAPE = {"circle": "دائرة", "square": "مربع", "triangle": "مثلث"}
_AR_FEMININE = {"circle"}
_AR_COLOR_M = {"red": "أحمر", "green": "أخضر", "blue": "أزرق", "yellow": "أصفر"}
_AR_COLOR_F = {"red": "حمراء", "green": "خضراء", "blue": "زرقاء", "yellow": "صفراء"}
_AR_POS = {"left": "على اليسار", "right": "على اليمين", "top": "في الأعلى", "bottom": "في الأسفل"}
_AR_POS_ALT = {
    "left": "في الجهة اليسرى",
    "right": "في الجهة اليمنى",
    "top": "في الجزء العلوي",
    "bottom": "في الجزء السفلي",
}
_AR_REL = {
    ("left", "right"): "على يسار",
    ("right", "left"): "على يمين",
    ("top", "bottom"): "فوق",
    ("bottom", "top"): "تحت",
}


def _ko_subject(word: str) -> str:
    """``word`` with the subject particle its last syllable takes: 이 after a final consonant, else 가."""
    return word + ("이" if (ord(word[-1]) - 0xAC00) % 28 else "가")


def _ko_topic(word: str) -> str:
    """``word`` with the topic particle: 은 after a final consonant, else 는."""
    return word + ("은" if (ord(word[-1]) - 0xAC00) % 28 else "는")


def caption_ja(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Japanese caption of ``scene``; ``rng=None`` gives the canonical form ("左にある赤い丸")."""
    if not scene.is_pair:
        (o,) = scene.objects
        c, c2, s, s2 = _JA_COLOR[o.color], _JA_COLOR_ALT[o.color], _JA_SHAPE[o.shape], _JA_SHAPE_ALT[o.shape]
        p, p2 = _JA_POS[o.position], _JA_POS_ALT[o.position]
        return _pick(
            [
                f"{p}にある{c}{s}",
                f"{c}{s}が{p}にある",
                f"{p2}に{c2}{s2}があります",
                f"{p}の{c}{s2}",
                f"{c2}{s}、{p2}",
                f"{c}{s2}は{p2}にあります",
            ],
            rng,
        )
    a, b = scene.objects
    ca, sa, cb, sb = _JA_COLOR[a.color], _JA_SHAPE[a.shape], _JA_COLOR[b.color], _JA_SHAPE[b.shape]
    ca2, sa2 = _JA_COLOR_ALT[a.color], _JA_SHAPE_ALT[a.shape]
    cb2, sb2 = _JA_COLOR_ALT[b.color], _JA_SHAPE_ALT[b.shape]
    pa, pb = _JA_POS[a.position], _JA_POS[b.position]
    return _pick(
        [
            f"{cb}{sb}の{pa}にある{ca}{sa}",
            f"{cb}{sb}が{ca}{sa}の{pb}にある",
            f"{ca2}{sa2}が{cb2}{sb2}の{_JA_POS_ALT[a.position]}にあります",
            f"{pa}に{ca}{sa}、{pb}に{cb}{sb}",
        ],
        rng,
    )


def caption_ko(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Korean caption of ``scene``; ``rng=None`` gives the canonical form ("왼쪽에 있는 빨간 원")."""
    if not scene.is_pair:
        (o,) = scene.objects
        c, c2, s, s2 = _KO_COLOR[o.color], _KO_COLOR_ALT[o.color], _KO_SHAPE[o.shape], _KO_SHAPE_ALT[o.shape]
        p, p2 = _KO_POS[o.position], _KO_POS_ALT[o.position]
        return _pick(
            [
                f"{p}에 있는 {c} {s}",
                f"{c} {_ko_subject(s)} {p}에 있다",
                f"{p2}에 {c2} {_ko_subject(s2)} 있습니다",
                f"{p}의 {c} {s2}",
                f"{c2} {s}, {p2}",
                f"{c} {_ko_topic(s2)} {p2}에 있어요",
            ],
            rng,
        )
    a, b = scene.objects
    ca, sa, cb, sb = _KO_COLOR[a.color], _KO_SHAPE[a.shape], _KO_COLOR[b.color], _KO_SHAPE[b.shape]
    pa, pb = _KO_POS[a.position], _KO_POS[b.position]
    return _pick(
        [
            f"{cb} {sb}의 {pa}에 있는 {ca} {sa}",
            f"{cb} {_ko_subject(sb)} {ca} {sa}의 {pb}에 있다",
            f"{_KO_COLOR_ALT[a.color]} {_ko_subject(sa)} {_KO_COLOR_ALT[b.color]} {sb}의 {_KO_POS_ALT[a.position]}에 있습니다",
            f"{pa}에 {ca} {sa}, {pb}에 {cb} {sb}",
        ],
        rng,
    )


def caption_es(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Spanish caption of ``scene``; ``rng=None`` gives the canonical form ("un círculo rojo a la izquierda")."""
    if not scene.is_pair:
        (o,) = scene.objects
        c, s, p, p2 = _ES_COLOR[o.color], _ES_SHAPE[o.shape], _ES_POS[o.position], _ES_POS_ALT[o.position]
        return _pick(
            [
                f"un {s} {c} {p}",
                f"{p}, un {s} {c}",
                f"hay un {s} {c} {p2}",
                f"un {s} de color {c} {p}",
                f"el {s} {c} está {p}",
                f"{s} {c} {p2}",
            ],
            rng,
        )
    a, b = scene.objects
    ca, sa, cb, sb = _ES_COLOR[a.color], _ES_SHAPE[a.shape], _ES_COLOR[b.color], _ES_SHAPE[b.shape]
    rel, inverse = (a.position, b.position), (b.position, a.position)
    return _pick(
        [
            f"un {sa} {ca} {_ES_REL[rel]} un {sb} {cb}",
            f"un {sb} {cb} {_ES_REL[inverse]} un {sa} {ca}",
            f"hay un {sa} {ca} {_ES_REL_ALT[rel]} un {sb} {cb}",
            f"un {sa} {ca} {_ES_POS[a.position]} y un {sb} {cb} {_ES_POS[b.position]}",
        ],
        rng,
    )


def _ar_noun(obj: Obj, definite: bool = False) -> str:
    """``دائرة حمراء`` / ``المربع الأحمر``: the shape and its colour, agreeing in gender (and definiteness)."""
    colors = _AR_COLOR_F if obj.shape in _AR_FEMININE else _AR_COLOR_M
    noun, adjective = _AR_SHAPE[obj.shape], colors[obj.color]
    return f"ال{noun} ال{adjective}" if definite else f"{noun} {adjective}"


def caption_ar(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Arabic caption of ``scene``; ``rng=None`` gives the canonical form ("دائرة حمراء على اليسار")."""
    if not scene.is_pair:
        (o,) = scene.objects
        noun, p, p2 = _ar_noun(o), _AR_POS[o.position], _AR_POS_ALT[o.position]
        feminine = o.shape in _AR_FEMININE
        there_is = "توجد" if feminine else "يوجد"
        # "a square whose colour is red": the colour noun is masculine, so the adjective is too.
        whose_colour = f"{_AR_SHAPE[o.shape]} {'لونها' if feminine else 'لونه'} {_AR_COLOR_M[o.color]}"
        return _pick(
            [
                f"{noun} {p}",
                f"{p} {noun}",
                f"{there_is} {noun} {p2}",
                f"{whose_colour} {p}",
                f"{_ar_noun(o, definite=True)} {p}",
                f"{noun} {p2}",
            ],
            rng,
        )
    a, b = scene.objects
    na, nb = _ar_noun(a), _ar_noun(b)
    rel, inverse = (a.position, b.position), (b.position, a.position)
    there_is = "توجد" if a.shape in _AR_FEMININE else "يوجد"
    return _pick(
        [
            f"{na} {_AR_REL[rel]} {nb}",
            f"{nb} {_AR_REL[inverse]} {na}",
            f"{there_is} {na} {_AR_REL[rel]} {nb}",
            f"{na} {_AR_POS[a.position]} و{nb} {_AR_POS[b.position]}",
        ],
        rng,
    )


_GRAMMARS = {
    "en": caption_en,
    "zh": caption_zh,
    "ja": caption_ja,
    "ko": caption_ko,
    "es": caption_es,
    "ar": caption_ar,
}


def _object_phrase(obj: Obj, language: str) -> tuple[str, str]:
    """``(noun phrase, position phrase)`` of one object in one target language, canonical forms."""
    if language == "zh":
        return _ZH_COLOR[obj.color] + _ZH_SHAPE[obj.shape], f"在{_ZH_POS[obj.position]}"
    if language == "ja":
        return _JA_COLOR[obj.color] + _JA_SHAPE[obj.shape], f"{_JA_POS[obj.position]}に"
    if language == "ko":
        return f"{_KO_COLOR[obj.color]} {_KO_SHAPE[obj.shape]}", f"{_KO_POS[obj.position]}에"
    if language == "es":
        return f"un {_ES_SHAPE[obj.shape]} {_ES_COLOR[obj.color]}", _ES_POS[obj.position]
    return _ar_noun(obj), _AR_POS[obj.position]


def caption_mixed(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A code-switched caption: two different target languages inside one prompt.

    One object: its colour and shape in one language, its position in another ("赤い丸, a la izquierda").
    Two objects: each object's own description (what, where) in its own language ("左边的红色圆形, un
    cuadrado azul a la derecha"), the relation then read from the two positions. ``rng=None`` takes Chinese
    and Spanish; a generator draws the two languages.
    """
    if rng is None:
        first, second = "zh", "es"
    else:
        i, j = rng.choice(len(TARGET_LANGUAGES), size=2, replace=False)
        first, second = TARGET_LANGUAGES[int(i)], TARGET_LANGUAGES[int(j)]
    if not scene.is_pair:
        (o,) = scene.objects
        return f"{_object_phrase(o, first)[0]}, {_object_phrase(o, second)[1]}"
    a, b = scene.objects
    return f"{caption(Scene((a,)), first)}, {caption(Scene((b,)), second)}"


def parse_languages(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"zh"`` / ``"ja,ko"`` / ``"all"`` / ``["es", "mixed"]`` -> the target-language codes, validated.

    ``"all"`` is every language of :data:`TARGET_LANGUAGES`; :data:`MIXED` is allowed beside them.

    Raises:
        ValueError: an unknown code (naming the known ones), a repeat, or nothing at all.
    """
    items = (
        [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    )
    codes: list[str] = []
    for item in items:
        for code in TARGET_LANGUAGES if item == "all" else (item,):
            if code not in (*TARGET_LANGUAGES, MIXED):
                raise ValueError(
                    f"unknown toy-world language {code!r}; expected one of {', '.join(TARGET_LANGUAGES)}, "
                    f"{MIXED!r} or 'all' (comma-separated for several)"
                )
            if code in codes:
                raise ValueError(f"language {code!r} is given twice in {value!r}")
            codes.append(code)
    if not codes:
        raise ValueError(f"no language in {value!r}")
    return tuple(codes)


def caption(scene: Scene, language: str, rng: np.random.Generator | None = None) -> str:
    """The caption of ``scene`` in ``language`` (``"en"``, a code of :data:`TARGET_LANGUAGES` or ``"mixed"``).

    Every grammar draws its paraphrase with one call on ``rng``, so two generators in the same state pick the
    same template index in every language (the evaluation's parallel captions rely on it).
    """
    if language == MIXED:
        return caption_mixed(scene, rng)
    try:
        grammar = _GRAMMARS[language]
    except KeyError:
        raise ValueError(
            f"no toy-world grammar for language {language!r}; expected one of {', '.join(LANGUAGES)} or {MIXED!r}"
        ) from None
    return grammar(scene, rng)


# ---------------------------------------------------------------------------------------------- checker

_MIN_AREA_FRAC = 0.02  # a blob smaller than 2% of the image is noise, not an object


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean ``[H, W]`` mask, each as an ``[n, 2]`` array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps: list[np.ndarray] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(np.asarray(pixels))
    return comps


def _classify_shape(pixels: np.ndarray) -> str:
    """Shape of a blob from its bounding-box fill ratio and how its width changes from top to bottom.

    Square fills its box (~1.0), circle ~0.79, triangle ~0.5; a triangle is also much wider at the bottom.
    """
    ys, xs = pixels[:, 0], pixels[:, 1]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(pixels) / float(h * w)
    rows = ys - ys.min()
    third = max(1, h // 3)
    top_w = np.bincount(rows[rows < third]).mean() if (rows < third).any() else 0.0
    bot_w = np.bincount(rows[rows >= h - third] - (h - third)).mean() if (rows >= h - third).any() else 0.0
    if fill < 0.66 or bot_w > 1.8 * max(top_w, 1e-6):
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def _position_of(pixels: np.ndarray, size_hw: tuple[int, int]) -> str:
    """The anchor nearest to the blob's centroid."""
    h, w = size_hw
    cy, cx = (pixels[:, 0].mean() + 0.5) / h, (pixels[:, 1].mean() + 0.5) / w
    return min(POSITIONS, key=lambda p: (_ANCHOR[p][0] - cx) ** 2 + (_ANCHOR[p][1] - cy) ** 2)


def _segment(image: np.ndarray) -> np.ndarray:
    """Per-pixel label ``[H, W]``: -1 background, else the index into ``COLORS`` of the nearest palette colour."""
    pal = np.asarray([BACKGROUND] + [PALETTE[c] for c in COLORS], np.float32)  # [5, 3]
    dist = ((image.astype(np.float32)[:, :, None, :] - pal[None, None]) ** 2).sum(-1)  # [H, W, 5]
    return dist.argmin(-1) - 1


def check(image: np.ndarray, scene: Scene) -> dict[str, bool]:
    """Score ``image`` against ``scene``: is each object's colour, shape and position right?

    Single object: the largest non-background blob is the object; ``color`` is its majority palette
    colour, ``shape`` comes from :func:`_classify_shape`, ``position`` from the anchor nearest its centroid.
    Two objects: each object is the largest blob of its own colour (``color`` fails when none is large
    enough); keys ``color_0`` ... ``all_1`` per object, ``color``/``shape``/``position``/``all`` for both, and
    ``relation``: both objects are found and the first lies on its stated side of the second (centroids
    compared along the relation's axis, wherever the pair sits in the image).

    Args:
        image: uint8 ``[H, W, 3]`` (as :func:`render` or a pipeline with ``output_type="np"`` * 255 gives).
        scene: The scene the image should show.

    Returns:
        ``{"color", "shape", "position", "all"}`` booleans (plus per-object keys and ``relation`` for two-object
        scenes).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.min() >= 0.0 and image.max() <= 1.0:
            image = np.rint(image * 255)
        image = np.clip(image, 0, 255).astype(np.uint8)
    hw = image.shape[:2]
    labels = _segment(image)
    min_area = max(3, int(_MIN_AREA_FRAC * hw[0] * hw[1]))
    per_obj: list[dict[str, bool]] = []
    if not scene.is_pair:
        (obj,) = scene.objects
        comps = [c for c in _components(labels >= 0) if len(c) >= min_area]
        if not comps:
            per_obj.append({"color": False, "shape": False, "position": False})
        else:
            blob = max(comps, key=len)
            colors = np.bincount(labels[blob[:, 0], blob[:, 1]], minlength=len(COLORS))
            per_obj.append(
                {
                    "color": COLORS[int(colors.argmax())] == obj.color,
                    "shape": _classify_shape(blob) == obj.shape,
                    "position": _position_of(blob, hw) == obj.position,
                }
            )
    else:
        centroids: list[np.ndarray] = []
        for obj in scene.objects:
            comps = [c for c in _components(labels == COLORS.index(obj.color)) if len(c) >= min_area]
            if not comps:
                per_obj.append({"color": False, "shape": False, "position": False})
                continue
            blob = max(comps, key=len)
            centroids.append(blob.mean(axis=0))  # (y, x)
            per_obj.append(
                {
                    "color": True,
                    "shape": _classify_shape(blob) == obj.shape,
                    "position": _position_of(blob, hw) == obj.position,
                }
            )
    out: dict[str, bool] = {}
    for key in ("color", "shape", "position"):
        out[key] = all(o[key] for o in per_obj)
    out["all"] = out["color"] and out["shape"] and out["position"]
    if scene.is_pair:
        for i, o in enumerate(per_obj):
            for key in ("color", "shape", "position"):
                out[f"{key}_{i}"] = o[key]
            out[f"all_{i}"] = all(o.values())
        out["relation"] = False
        if len(centroids) == 2:
            a = scene.objects[0]
            axis = 1 if a.position in ("left", "right") else 0
            first_lower = centroids[0][axis] < centroids[1][axis]  # left of / above the second
            out["relation"] = bool(first_lower == (a.position in ("left", "top")))
    return out


def evaluate_accuracy(images: np.ndarray | list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    """Mean of :func:`check` over paired ``images`` ``[B, H, W, 3]`` and ``scenes`` (length B).

    Returns:
        ``{"color", "shape", "position", "all"}`` accuracies in [0, 1] (and ``"relation"`` when every scene is a
        two-object one) and ``"n"`` (the number of images).
    """
    if len(images) != len(scenes):
        raise ValueError(f"images and scenes differ in length: {len(images)} vs {len(scenes)}")
    if len(scenes) == 0:
        raise ValueError("evaluate_accuracy needs at least one image")
    keys = ("color", "shape", "position", "all") + (("relation",) if all(s.is_pair for s in scenes) else ())
    totals = dict.fromkeys(keys, 0.0)
    for image, scene in zip(images, scenes):
        result = check(image, scene)
        for k in keys:
            totals[k] += float(result[k])
    out = {k: v / len(scenes) for k, v in totals.items()}
    out["n"] = float(len(scenes))
    return out


# ---------------------------------------------------------------------------------------------- dataset


class ToyWorldDataset(torch.utils.data.Dataset):
    """Unlimited, exactly parallel (en, target, image) samples, reproducible from ``seed``.

    Item ``i`` is drawn from ``numpy.random.default_rng((seed, i))``, so it is the same on every call, every
    worker and every machine. Each item: ``{"en": str, "zh": str, "target": str, "language": str, "image":
    float [3, H, W] in [-1, 1], "scene": Scene}``; ``target`` is the caption in the item's language (one of
    ``languages``, drawn per item), ``zh`` the Chinese one. The target language and its caption come from a
    second generator, ``default_rng((seed, i, 1))``, so the scene, image, English and Chinese of an item are
    the same whatever ``languages`` is.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"`` scenes (the split is by scene, so a held-out combination
            is kept out of every language's training data).
        size: Image side in pixels.
        seed: Seed of the whole stream.
        length: Number of items ``len()`` reports (the stream itself has no end).
        pair_fraction: Probability that an item is a two-object scene.
        languages: Target languages, drawn uniformly per item (``"zh"``, ``"ja,ko"``, ``"all"``, or a sequence;
            see :func:`parse_languages`; ``"mixed"`` is the code-switched grammar).
    """

    def __init__(
        self,
        split: Split = "train",
        size: int = 32,
        seed: int = 0,
        length: int = 10_000,
        pair_fraction: float = 0.0,
        languages: str | Sequence[str] = "zh",
    ) -> None:
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        if not 0.0 <= pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in [0, 1], got {pair_fraction}")
        self.singles = all_single_scenes(split)
        self.pairs = all_pair_scenes(split)
        self.size, self.seed, self.length, self.pair_fraction = size, seed, length, pair_fraction
        self.languages = parse_languages(languages)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        rng = np.random.default_rng((self.seed, index))
        pool = self.pairs if rng.random() < self.pair_fraction else self.singles
        scene = pool[int(rng.integers(len(pool)))]
        image = render(scene, self.size, rng)
        pixels = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]
        en, zh = caption_en(scene, rng), caption_zh(scene, rng)
        if self.languages == ("zh",):
            language, target = "zh", zh
        else:
            side = np.random.default_rng((self.seed, index, 1))
            language = self.languages[int(side.integers(len(self.languages)))]
            target = caption(scene, language, side)
        return {"en": en, "zh": zh, "target": target, "language": language, "image": pixels, "scene": scene}

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.length):
            yield self[i]
