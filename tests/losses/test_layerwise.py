"""attention_mse (IAP eq. 3), feature_kd (PEA eq. 3), output_kd (PEA eq. 2) against written-out references."""

from __future__ import annotations

import pytest
import torch

from xling.losses import attention_mse, feature_kd, output_kd


def _layers(seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 16, 8), (2, 2, 9, 5), (2, 8, 4, 3)]  # [B, H, N_i, d_i], layers differ
    return [
        (torch.randn(s, generator=g, dtype=dtype), torch.randn(s, generator=g, dtype=dtype)) for s in shapes
    ]


def _ref_layer_mse(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # Mean over every element, written as an explicit sum / count.
    diff = (t.double() - s.double()).flatten()
    return (diff * diff).sum() / diff.numel()


def test_attention_mse_matches_reference() -> None:
    pairs = _layers(0)
    weights = [0.5, 2.0, 1.5]
    expected = sum(w * _ref_layer_mse(t, s) for w, (t, s) in zip(weights, pairs, strict=True))
    got = attention_mse(pairs, weights)
    assert got.shape == ()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # Default weights are 1.0 each.
    expected_plain = sum(_ref_layer_mse(t, s) for t, s in pairs)
    torch.testing.assert_close(attention_mse(pairs).double(), expected_plain, rtol=1e-5, atol=1e-6)


def test_attention_mse_per_layer_weights_scale_linearly() -> None:
    pairs = _layers(1)
    base = [attention_mse([p]) for p in pairs]
    got = attention_mse(pairs, [3.0, 0.0, 1.0])
    torch.testing.assert_close(got, 3.0 * base[0] + base[2])
    # Doubling one layer's weight adds exactly that layer's term once more.
    torch.testing.assert_close(
        attention_mse(pairs, [1.0, 2.0, 1.0]) - attention_mse(pairs), base[1], rtol=1e-5, atol=1e-6
    )


def test_attention_mse_zero_when_student_equals_teacher() -> None:
    pairs = [(t, t.clone()) for t, _ in _layers(2)]
    for reduction in ("mean", "sum", "none"):
        assert torch.count_nonzero(attention_mse(pairs, reduction=reduction)) == 0


@pytest.mark.parametrize("fn", ["attention", "feature"])
def test_layerwise_reductions_agree(fn: str) -> None:
    pairs = _layers(3)
    numels = [t.numel() for t, _ in pairs]

    def call(weights: list[float], reduction: str) -> torch.Tensor:
        if fn == "attention":
            return attention_mse(pairs, weights, reduction=reduction)
        return feature_kd([t for t, _ in pairs], [s for _, s in pairs], weights, reduction=reduction)

    for i in range(len(pairs)):
        one_hot = [float(j == i) for j in range(len(pairs))]
        # Per layer: sum == mean * numel.
        torch.testing.assert_close(
            call(one_hot, "sum"), call(one_hot, "mean") * numels[i], rtol=1e-5, atol=1e-5
        )
    weights = [0.3, 1.0, 2.0]
    none = call(weights, "none")
    assert none.shape == (2,)
    # Each layer has the same element count per sample, so the per-sample means average to the mean.
    torch.testing.assert_close(none.mean(), call(weights, "mean"), rtol=1e-5, atol=1e-6)
    b0 = [(t[:1], s[:1]) for t, s in pairs]
    torch.testing.assert_close(none[0], attention_mse(b0, weights), rtol=1e-5, atol=1e-6)


def test_feature_kd_sequence_and_mapping() -> None:
    pairs = _layers(4)
    teacher = [t for t, _ in pairs]
    student = [s for _, s in pairs]
    expected = sum(_ref_layer_mse(t, s) * w for (t, s), w in zip(pairs, [1.0, 0.25, 4.0], strict=True))
    torch.testing.assert_close(
        feature_kd(teacher, student, [1.0, 0.25, 4.0]).double(), expected, rtol=1e-5, atol=1e-6
    )
    names = ["down.0", "mid", "up.1"]
    got = feature_kd(
        dict(zip(names, teacher, strict=True)),
        dict(zip(names, student, strict=True)),
        {"mid": 0.25, "up.1": 4.0},
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # Mapping order does not matter: names, not positions, pair the blocks.
    shuffled = {n: s for n, s in reversed(list(zip(names, student, strict=True)))}
    got2 = feature_kd(dict(zip(names, teacher, strict=True)), shuffled, {"mid": 0.25, "up.1": 4.0})
    torch.testing.assert_close(got2, got)


def test_feature_kd_sum_is_squared_l2() -> None:
    t, s = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(feature_kd([t], [s], reduction="sum"), torch.linalg.vector_norm(t - s) ** 2)


def test_output_kd_matches_reference() -> None:
    g = torch.Generator().manual_seed(5)
    t, s = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(output_kd(t, s), torch.nn.functional.mse_loss(s, t))
    torch.testing.assert_close(output_kd(t, s, "sum"), output_kd(t, s) * t.numel())
    per_sample = torch.stack([((t[b] - s[b]) ** 2).mean() for b in range(3)])
    torch.testing.assert_close(output_kd(t, s, "none"), per_sample)
    assert output_kd(t, t.clone()) == 0


def test_half_precision_accumulates_in_float32() -> None:
    t = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    s = (t.float() + 1e-2).to(torch.bfloat16)
    got = output_kd(t, s)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ((t.float() - s.float()) ** 2).mean())


def test_gradcheck_layerwise() -> None:
    pairs = [
        (torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)),
        (torch.randn(2, 1, 5, 2, dtype=torch.float64, requires_grad=True),
         torch.randn(2, 1, 5, 2, dtype=torch.float64, requires_grad=True)),
    ]  # fmt: skip
    flat = [x for p in pairs for x in p]
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, c, d, r=reduction: attention_mse([(a, b), (c, d)], [0.7, 1.3], reduction=r), flat
        )
        assert torch.autograd.gradcheck(
            lambda a, b, c, d, r=reduction: feature_kd([a, c], [b, d], [2.0, 0.5], reduction=r), flat
        )
        assert torch.autograd.gradcheck(lambda a, b, r=reduction: output_kd(a, b, r), flat[:2])
