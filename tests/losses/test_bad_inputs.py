"""Every bad input raises ValueError/TypeError naming the function, the argument and both shapes."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from xling.losses import (
    GradientReversal,
    SequenceDiscriminator,
    attention_mse,
    compute_snr,
    cosine_alignment,
    denoising,
    discriminator_loss,
    feature_kd,
    generator_loss,
    grad_reverse,
    min_snr_weights,
    output_kd,
    pooled_kd,
    reconstruction,
)

T = torch.zeros(2, 8, 64, 40)
ALPHAS = torch.linspace(0.99, 0.01, 10)
E = torch.zeros(2, 5, 6)  # [B, L, D]
META = torch.zeros(2, 5, 6, device="meta")  # a second device that exists without a GPU


def _denoise(**overrides: object) -> torch.Tensor:
    kw: dict = {
        "noise": torch.zeros(2, 4, 3, 3),
        "sample": torch.zeros(2, 4, 3, 3),
        "timesteps": torch.tensor([0, 9]),
        "alphas_cumprod": ALPHAS,
    }
    pred = overrides.pop("pred", torch.zeros(2, 4, 3, 3))
    kw.update(overrides)
    return denoising(pred, **kw)


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # attention_mse
    ("attn shape", lambda: attention_mse([(T, T)] * 3 + [(T, torch.zeros(2, 8, 64, 80))]), ValueError,
     "attention_mse: pairs[3] teacher shape (2, 8, 64, 40) != student shape (2, 8, 64, 80)"),
    ("attn empty", lambda: attention_mse([]), ValueError, "attention_mse: pairs is empty"),
    ("attn weights", lambda: attention_mse([(T, T)] * 2, [1.0]), ValueError,
     "attention_mse: weights has 1 entries != pairs has 2 layers"),
    ("attn dtype", lambda: attention_mse([(T, T.double())]), TypeError,
     "attention_mse: pairs[0] teacher dtype torch.float32 != student dtype torch.float64"),
    ("attn device", lambda: attention_mse([(E, META)]), ValueError,
     "attention_mse: pairs[0] teacher device cpu != student device meta"),
    ("attn batch", lambda: attention_mse([(T, T), (E[:1], E[:1])]), ValueError,
     "attention_mse: pairs[1] teacher shape (1, 5, 6) on cpu does not share batch size"),
    ("attn pair", lambda: attention_mse([T]), TypeError, "attention_mse: pairs[0] must be a (teacher, student) pair"),
    ("attn int", lambda: attention_mse([(T.long(), T.long())]), TypeError,
     "attention_mse: pairs[0] teacher must have a floating dtype, got torch.int64"),
    ("attn reduction", lambda: attention_mse([(T, T)], reduction="avg"), ValueError,
     "attention_mse: reduction must be one of ('mean', 'sum', 'none'), got 'avg'"),
    ("attn weight nan", lambda: attention_mse([(T, T)], [float("nan")]), ValueError,
     "attention_mse: weights[0] must be finite"),
    # feature_kd / output_kd
    ("feat count", lambda: feature_kd([E, E], [E]), ValueError, "feature_kd: teacher has 2 blocks != student has 1 blocks"),
    ("feat empty", lambda: feature_kd([], []), ValueError, "feature_kd: teacher and student are empty"),
    ("feat shape", lambda: feature_kd([E, E], [E, E[:, :4]]), ValueError,
     "feature_kd: teacher[1] shape (2, 5, 6) != student[1] shape (2, 4, 6)"),
    ("feat names", lambda: feature_kd({"a": E}, {"b": E}), ValueError,
     "feature_kd: teacher and student name different blocks: only in teacher ['a'], only in student ['b']"),
    ("feat map shape", lambda: feature_kd({"mid": E}, {"mid": E[:1]}), ValueError,
     "feature_kd: teacher['mid'] shape (2, 5, 6) != student['mid'] shape (1, 5, 6)"),
    ("feat weight names", lambda: feature_kd({"a": E}, {"a": E}, {"z": 2.0}), ValueError,
     "feature_kd: weights names blocks ['z']"),
    ("feat mixed", lambda: feature_kd({"a": E}, [E]), TypeError, "feature_kd: teacher and student must both be"),
    ("feat tensor", lambda: feature_kd(E, E), TypeError, "feature_kd: teacher and student must be sequences of tensors"),
    ("out shape", lambda: output_kd(E, E[:, :, :3]), ValueError,
     "output_kd: teacher_pred shape (2, 5, 6) != student_pred shape (2, 5, 3)"),
    ("out type", lambda: output_kd(E, E.numpy()), TypeError, "output_kd: student_pred must be a torch.Tensor"),
    ("out empty", lambda: output_kd(E[:0], E[:0]), ValueError, "output_kd: teacher_pred is empty"),
    # cosine / reconstruction / pooled
    ("cos shape", lambda: cosine_alignment(E, E[:, :4]), ValueError,
     "cosine_alignment: student shape (2, 5, 6) != teacher shape (2, 4, 6)"),
    ("cos mask", lambda: cosine_alignment(E, E, torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "cosine_alignment: mask shape (2, 4) does not fit student shape (2, 5, 6); expected (2, 5)"),
    ("cos mask 3d", lambda: cosine_alignment(E, E, torch.ones(2, 5, 1)), ValueError,
     "cosine_alignment: mask shape (2, 5, 1) does not fit student shape (2, 5, 6)"),
    ("cos mask values", lambda: cosine_alignment(E, E, torch.full((2, 5), 0.5)), ValueError,
     "cosine_alignment: mask must hold only 0 and 1"),
    ("cos mask type", lambda: cosine_alignment(E, E, [[1] * 5] * 2), TypeError,
     "cosine_alignment: mask must be a torch.Tensor or None, got list"),
    ("cos mask device", lambda: cosine_alignment(E, E, torch.ones(2, 5, device="meta")), ValueError,
     "cosine_alignment: mask device meta != student device cpu"),
    ("cos mask pooled", lambda: cosine_alignment(E[:, 0], E[:, 0], torch.ones(2, 5)), ValueError,
     "cosine_alignment: mask applies to [B, L, D] inputs only, got student shape (2, 6)"),
    ("cos ndim", lambda: cosine_alignment(T, T), ValueError,
     "cosine_alignment: student must be [B, L, D] or [B, D], got shape (2, 8, 64, 40)"),
    ("cos dtype", lambda: cosine_alignment(E.half(), E), TypeError,
     "cosine_alignment: student dtype torch.float16 != teacher dtype torch.float32"),
    ("cos device", lambda: cosine_alignment(E, META), ValueError,
     "cosine_alignment: student device cpu != teacher device meta"),
    ("cos eps", lambda: cosine_alignment(E, E, eps=0.0), ValueError, "cosine_alignment: eps must be > 0, got 0.0"),
    ("rec mask", lambda: reconstruction(E, E, torch.ones(3, 5)), ValueError,
     "reconstruction: mask shape (3, 5) does not fit source shape (2, 5, 6); expected (2, 5)"),
    ("rec shape", lambda: reconstruction(E, E[:, :, :2]), ValueError,
     "reconstruction: source shape (2, 5, 6) != reconstructed shape (2, 5, 2)"),
    ("pool proj", lambda: pooled_kd(E[:, 0], E[:, 0, :3], torch.nn.Linear(6, 4)), ValueError,
     "pooled_kd: projection(student_cls (2, 6)) shape (2, 4) != teacher_pooled shape (2, 3)"),
    ("pool no proj", lambda: pooled_kd(E[:, 0], E[:, 0, :3]), ValueError,
     "pooled_kd: student_cls shape (2, 6) != teacher_pooled shape (2, 3)"),
    ("pool ndim", lambda: pooled_kd(E, E), ValueError, "pooled_kd: student_cls must be [B, d], got shape (2, 5, 6)"),
    ("pool module", lambda: pooled_kd(E[:, 0], E[:, 0], lambda x: x), TypeError,
     "pooled_kd: projection must be an nn.Module or None, got function"),
    # adversarial
    ("disc width", lambda: SequenceDiscriminator(6)(torch.zeros(2, 5, 7)), ValueError,
     "SequenceDiscriminator: x shape (2, 5, 7) has width 7 != dim 6"),
    ("disc mask", lambda: SequenceDiscriminator(6)(E, torch.ones(2, 3)), ValueError,
     "SequenceDiscriminator: mask shape (2, 3) does not fit x shape (2, 5, 6); expected (2, 5)"),
    ("disc ctor", lambda: SequenceDiscriminator(0), ValueError, "SequenceDiscriminator: dim must be a positive int"),
    ("dloss dtype", lambda: discriminator_loss(torch.zeros(2), torch.zeros(3).double()), TypeError,
     "discriminator_loss: real_logits dtype torch.float32 != fake_logits dtype torch.float64 (shapes (2,), (3,))"),
    ("dloss device", lambda: discriminator_loss(torch.zeros(2), torch.zeros(3, device="meta")), ValueError,
     "discriminator_loss: real_logits device cpu != fake_logits device meta"),
    ("dloss empty", lambda: discriminator_loss(torch.zeros(0), torch.zeros(3)), ValueError,
     "discriminator_loss: real_logits is empty (shape (0,))"),
    ("dloss none", lambda: discriminator_loss(torch.zeros(2), torch.zeros(2), "none"), ValueError,
     "discriminator_loss: reduction must be one of ('mean', 'sum')"),
    ("gloss type", lambda: generator_loss([0.0]), TypeError, "generator_loss: fake_logits must be a torch.Tensor"),
    ("grl scale", lambda: grad_reverse(E, float("inf")), ValueError, "grad_reverse: scale must be finite"),
    ("grl scale type", lambda: GradientReversal("1"), TypeError, "GradientReversal: scale must be a number"),
    # denoising
    ("dn shape", lambda: _denoise(pred=torch.zeros(2, 4, 3, 2)), ValueError,
     "denoising: pred shape (2, 4, 3, 2) != noise shape (2, 4, 3, 3)"),
    ("dn sample", lambda: _denoise(sample=torch.zeros(1, 4, 3, 3)), ValueError,
     "denoising: noise shape (2, 4, 3, 3) != sample shape (1, 4, 3, 3)"),
    ("dn timesteps shape", lambda: _denoise(timesteps=torch.tensor([0, 1, 2])), ValueError,
     "denoising: timesteps shape (3,) != (2,), the batch of noise shape (2, 4, 3, 3)"),
    ("dn timesteps range", lambda: _denoise(timesteps=torch.tensor([0, 10])), ValueError,
     "denoising: timesteps must lie in [0, 10) for alphas_cumprod shape (10,), got range [0, 10]"),
    ("dn timesteps dtype", lambda: _denoise(timesteps=torch.tensor([0.0, 1.0])), TypeError,
     "denoising: timesteps must be integer indices into alphas_cumprod, got dtype torch.float32"),
    ("dn type", lambda: _denoise(prediction_type="x0"), ValueError,
     "denoising: prediction_type must be one of ('epsilon', 'v_prediction', 'sample', 'flow'), got 'x0'"),
    ("dn gamma", lambda: _denoise(snr_gamma=0.0), ValueError, "min_snr_weights: snr_gamma must be > 0, got 0.0"),
    ("dn alphas", lambda: _denoise(alphas_cumprod=ALPHAS[None]), ValueError,
     "denoising: alphas_cumprod must be [T], got shape (1, 10)"),
    ("dn dtype", lambda: _denoise(pred=torch.zeros(2, 4, 3, 3, dtype=torch.float64)), TypeError,
     "denoising: pred dtype torch.float64 != noise dtype torch.float32"),
    ("snr range", lambda: compute_snr(torch.tensor([-1]), ALPHAS), ValueError, "compute_snr: timesteps must lie in"),
    ("weights type", lambda: min_snr_weights(torch.ones(2), 5.0, "eps"), ValueError,
     "min_snr_weights: prediction_type must be one of"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_with_a_clear_message(
    name: str, call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()
