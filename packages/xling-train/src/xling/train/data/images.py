"""Image decoding and the resize + crop to the teacher's resolution.

Follows the diffusers training scripts (resize the shorter side, crop, scale to [-1, 1]) without
torchvision. There is deliberately no horizontal flip: captions name positions ("on the left").
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

CropPolicy = Literal["center", "random"]

# Grayscale modes wider than 8 bits (16-bit PNGs open as I;16*; "I" is 32-bit but holds 16-bit PNG values).
_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def default_min_size(resolution: int | None) -> int:
    """The default shortest image side for ``resolution``: an eighth of it (64 px at 512), 0 without images."""
    return max(1, resolution // 8) if resolution else 0


def too_small(image: Image.Image, min_size: int) -> str | None:
    """Why ``image`` is below ``min_size`` pixels on its shorter side, or ``None``."""
    width, height = image.size
    if min(width, height) < min_size:
        return f"{width}x{height} pixels, below the minimum side of {min_size} (data.min_image_size)"
    return None


def open_rgb(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Decode an image file (path or raw bytes) fully and convert it to RGB.

    Raises:
        FileNotFoundError: The path does not exist.
        OSError: The file is not a decodable image (PIL's ``UnidentifiedImageError`` is an ``OSError``).
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(stream) as image:
        image.load()  # decode now, so truncated files fail here and not later in a worker
        if image.mode in _WIDE_GRAY:
            # PIL's I;16 -> RGB conversion clips every value above 255 to white; scale 16 bits down instead.
            wide = np.asarray(image, dtype=np.float64)  # [H, W]
            gray = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
            return Image.fromarray(gray, mode="L").convert("RGB")
        if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
            # Composite onto white: dropping alpha would expose arbitrary colours under transparent pixels.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to ``resolution``, crop a ``resolution`` square, map to [-1, 1].

    Args:
        resolution: Output height and width in pixels (the teacher's resolution, e.g. 512).
        crop: ``"center"`` or ``"random"``. A random crop is drawn from ``seed`` and the row index, so a
            row always gets the same crop: runs are reproducible and latents stay cacheable.
        seed: Seed for random crops.
    """

    resolution: int
    crop: CropPolicy = "center"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {self.resolution!r}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")

    def crop_box(self, width: int, height: int, index: int = 0) -> tuple[int, int]:
        """Top-left ``(top, left)`` of the crop in an image already resized to ``width x height``."""
        extra_h, extra_w = height - self.resolution, width - self.resolution
        if self.crop == "center":
            return round(extra_h / 2), round(extra_w / 2)
        digest = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        draw = int.from_bytes(digest, "little")
        return draw % (extra_h + 1), (draw >> 32) % (extra_w + 1)

    def __call__(self, image: Image.Image, index: int = 0) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
        """Transform one RGB image.

        Args:
            image: A PIL image (converted to RGB if it is not).
            index: Row index, only used to draw a random crop.

        Returns:
            ``pixels`` float32 ``[3, R, R]`` in [-1, 1], and ``{"original_size": (h, w),
            "crop_top_left": (top, left)}`` in resized-image coordinates (what SDXL's added time ids use).
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        # max(.., resolution) guards against rounding a side just below the crop size.
        new_w = max(self.resolution, round(width * scale))
        new_h = max(self.resolution, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = self.crop_box(new_w, new_h, index)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        array = np.asarray(image, dtype=np.uint8)  # [R, R, 3]
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # [3, R, R]
        return pixels, {"original_size": (height, width), "crop_top_left": (top, left)}

    def fingerprint(self) -> str:
        """A string that changes whenever the transform would produce different pixels."""
        seed = f",seed={self.seed}" if self.crop == "random" else ""
        return f"ImageTransform(resolution={self.resolution},crop={self.crop}{seed},resample=bicubic)"
