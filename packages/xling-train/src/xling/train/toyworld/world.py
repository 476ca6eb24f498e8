"""The bilingual toy world: scenes of coloured shapes, a renderer, an English/Chinese grammar and a checker.

A scene is one object (``a red circle on the left``) or two (``a red circle left of a blue square``). The
renderer draws it on a plain dark background with a little seeded jitter; the grammar writes the same scene
in English and Chinese with paraphrase variety, so (en, zh, image) triples are unlimited and exactly
parallel; the checker reads colour, shape and position back from any image by colour segmentation,
connected components, centroid and fill ratio, so generated images can be scored against their scene.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import Literal

import numpy as np
import torch

__all__ = [
    "BACKGROUND",
    "COLORS",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "Obj",
    "Scene",
    "ToyWorldDataset",
    "all_pair_scenes",
    "all_scenes",
    "all_single_scenes",
    "caption_en",
    "caption_zh",
    "check",
    "evaluate_accuracy",
    "is_heldout",
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
    enough); keys ``color_0`` ... ``all_1`` per object and ``color``/``shape``/``position``/``all`` for both.

    Args:
        image: uint8 ``[H, W, 3]`` (as :func:`render` or a pipeline with ``output_type="np"`` * 255 gives).
        scene: The scene the image should show.

    Returns:
        ``{"color", "shape", "position", "all"}`` booleans (plus per-object keys for two-object scenes).
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
        for obj in scene.objects:
            comps = [c for c in _components(labels == COLORS.index(obj.color)) if len(c) >= min_area]
            if not comps:
                per_obj.append({"color": False, "shape": False, "position": False})
                continue
            blob = max(comps, key=len)
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
    return out


def evaluate_accuracy(images: np.ndarray | list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    """Mean of :func:`check` over paired ``images`` ``[B, H, W, 3]`` and ``scenes`` (length B).

    Returns:
        ``{"color", "shape", "position", "all"}`` accuracies in [0, 1] and ``"n"`` (the number of images).
    """
    if len(images) != len(scenes):
        raise ValueError(f"images and scenes differ in length: {len(images)} vs {len(scenes)}")
    if len(scenes) == 0:
        raise ValueError("evaluate_accuracy needs at least one image")
    keys = ("color", "shape", "position", "all")
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
    """Unlimited, exactly parallel (en, zh, image) samples, reproducible from ``seed``.

    Item ``i`` is drawn from ``numpy.random.default_rng((seed, i))``, so it is the same on every call, every
    worker and every machine. Each item: ``{"en": str, "zh": str, "image": float [3, H, W] in [-1, 1],
    "scene": Scene}``.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"`` scenes.
        size: Image side in pixels.
        seed: Seed of the whole stream.
        length: Number of items ``len()`` reports (the stream itself has no end).
        pair_fraction: Probability that an item is a two-object scene.
    """

    def __init__(
        self,
        split: Split = "train",
        size: int = 32,
        seed: int = 0,
        length: int = 10_000,
        pair_fraction: float = 0.0,
    ) -> None:
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        if not 0.0 <= pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in [0, 1], got {pair_fraction}")
        self.singles = all_single_scenes(split)
        self.pairs = all_pair_scenes(split)
        self.size, self.seed, self.length, self.pair_fraction = size, seed, length, pair_fraction

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
        return {"en": caption_en(scene, rng), "zh": caption_zh(scene, rng), "image": pixels, "scene": scene}

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.length):
            yield self[i]
