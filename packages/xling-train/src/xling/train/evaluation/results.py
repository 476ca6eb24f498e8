"""What an evaluation returns: generations of a batch and the measured numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

#: Checker verdicts reported, in table order.
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "all")


@dataclass
class Samples:
    """Generations of a batch.

    Attributes:
        latents: ``[B, C, h, w]`` float32 on the CPU, the sampler's final latents before decoding.
        images: ``[B, H, W, 3]`` uint8, decoded.
    """

    latents: Tensor
    images: np.ndarray


@dataclass
class EvalResult:
    """Everything an evaluation measured. ``to_dict`` drops the images; the writers use them.

    Attributes:
        accuracy: Toy world: condition (``"zh_student"``, ``"perfect_translation"``, ``"en_teacher"``) ->
            attribute (:data:`ATTRIBUTES`) -> fraction correct over all scenes and seeds. Empty elsewhere.
        heldout_accuracy: The same restricted to the held-out scenes (no ``"en_teacher"`` row).
        relative_accuracy: Student ``all`` accuracy divided by the English teacher's (the issue's targets are
            >= 0.9 for IAP, >= 0.8 for PEA and MTN); ``None`` outside the toy world.
        intervals: Toy world: 95% bootstrap intervals over the images (scenes x seeds) of each condition's
            ``all`` accuracy, and of ``relative_accuracy`` (key ``"relative"``, paired rows):
            ``{name: [low, high]}``. Empty elsewhere.
        groups: Toy world: ``"<condition>/<kind>"`` -> one row per condition (``en_teacher``,
            ``perfect_translation``, ``<language>_student`` for each scored language) and scene kind
            (``single``, ``pair``): the attributes' accuracies (``relation`` too for pairs), ``n`` images,
            ``interval`` of ``all``, ``heldout_all`` and, for a student, ``relative`` to the teacher on the
            same kind with its paired ``relative_interval``. Empty elsewhere.
        verdicts: The checker's verdict on every image behind ``groups`` (same keys; each verdict with a
            ``heldout`` flag), so runs can be pooled (:func:`~xling.train.evaluation.toy.group_summary`); not in
            ``to_dict``.
        alignment: ``token_cosine`` (``None`` when the student's length differs from the teacher's),
            ``mean_cosine`` (token means), ``pooled_cosine`` (SDXL), ``attention_mse`` (``None`` when not
            computed; ``settings["attention_mse_note"]`` then says why).
        agreement: ``latent_mse`` and ``psnr`` (dB; ``inf`` when identical) between student- and
            teacher-conditioned generations at identical seeds.
        clip_score: ``{"zh_student": s, "perfect_translation": s}`` or ``None`` without a CLIP model.
        settings: Seeds, sampler steps, guidance, scene counts, teacher.
        examples: Grid items: ``en``, ``zh``, ``seed``, ``en_image``, ``zh_image`` (uint8 ``[H, W, 3]``),
            ``en_check`` and ``zh_check`` (checker verdicts or ``None``).
        seconds: Wall time of the evaluation.
    """

    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    heldout_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    relative_accuracy: float | None = None
    intervals: dict[str, list[float]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    verdicts: dict[str, list[dict[str, bool]]] = field(default_factory=dict)
    alignment: dict[str, float | None] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    clip_score: dict[str, float] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (no images; ``inf`` written as the string ``"inf"``)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, Mapping):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "accuracy": self.accuracy,
                "heldout_accuracy": self.heldout_accuracy,
                "relative_accuracy": self.relative_accuracy,
                "intervals": self.intervals,
                "groups": self.groups,
                "alignment": self.alignment,
                "agreement": self.agreement,
                "clip_score": self.clip_score,
                "settings": self.settings,
                "seconds": self.seconds,
            }
        )

    def summary(self) -> str:
        """One line: the headline numbers."""
        parts = []
        if "zh_student" in self.accuracy:
            parts.append(f"zh all {self.accuracy['zh_student']['all']:.3f}")
        if "en_teacher" in self.accuracy:
            parts.append(f"en all {self.accuracy['en_teacher']['all']:.3f}")
        if self.relative_accuracy is not None:
            parts.append(f"relative {self.relative_accuracy:.3f}")
        if self.agreement:
            parts.append(
                f"latent MSE {self.agreement['latent_mse']:.4g}, PSNR {self.agreement['psnr']:.2f} dB"
            )
        if self.alignment.get("attention_mse") is not None:
            parts.append(f"attention MSE {self.alignment['attention_mse']:.4g}")
        return "; ".join(parts)
