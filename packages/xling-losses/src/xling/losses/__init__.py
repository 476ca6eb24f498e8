"""Loss terms of the five cross-lingual text-to-image alignment methods (IAP, PEA, MTN/GlueNet, cosine, AltDiffusion).

Plain functions over explicit tensors, plus ``nn.Module``s where a term owns parameters. Depends on torch and
einops only. Pairs and features are passed as ``(teacher, student)``; the embedding terms take
``(student, teacher)``, as their names read.
"""

from .adversarial import (
    GradientReversal,
    SequenceDiscriminator,
    discriminator_loss,
    generator_loss,
    grad_reverse,
)
from .attention import attention_mse
from .combine import NonFiniteLossError, weighted_sum
from .cosine import cosine_alignment
from .denoising import compute_snr, denoising, denoising_target, min_snr_weights
from .kd import feature_kd, output_kd
from .pooled import pooled_kd
from .reconstruction import reconstruction

__all__ = [
    "GradientReversal",
    "NonFiniteLossError",
    "SequenceDiscriminator",
    "attention_mse",
    "compute_snr",
    "cosine_alignment",
    "denoising",
    "denoising_target",
    "discriminator_loss",
    "feature_kd",
    "generator_loss",
    "grad_reverse",
    "min_snr_weights",
    "output_kd",
    "pooled_kd",
    "reconstruction",
    "weighted_sum",
]
