"""weighted_sum: the total, the logs, and NonFiniteLossError."""

from __future__ import annotations

import pytest
import torch

from xling.losses import NonFiniteLossError, weighted_sum


def _terms() -> dict[str, torch.Tensor]:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    return {"attn": (w**2).sum(), "cos": w.sum() * 0.1, "adv": w.prod()}


def test_weighted_sum_total_and_logs() -> None:
    terms = _terms()
    total, logs = weighted_sum(terms, {"cos": 10.0, "adv": 0.5})
    torch.testing.assert_close(total, terms["attn"] + 10.0 * terms["cos"] + 0.5 * terms["adv"])
    assert total.requires_grad
    assert set(logs) == {"attn", "cos", "adv", "total"}
    # Logs hold the unweighted terms, detached.
    assert all(not v.requires_grad for v in logs.values())
    torch.testing.assert_close(logs["cos"], terms["cos"].detach())
    torch.testing.assert_close(logs["total"], total.detach())


def test_weights_scale_gradients() -> None:
    x = torch.tensor(3.0, requires_grad=True)
    total, _ = weighted_sum({"a": x**2, "b": x}, {"a": 2.0})
    total.backward()
    assert x.grad.item() == pytest.approx(2.0 * 2 * 3.0 + 1.0)


def test_zero_weight_is_logged_but_excluded() -> None:
    terms = _terms()
    terms["broken"] = torch.tensor(float("nan"))
    total, logs = weighted_sum(terms, {"broken": 0.0}, require_finite=True)
    assert torch.isfinite(total)
    assert torch.isnan(logs["broken"])
    with pytest.raises(ValueError, match="every weight is 0"):
        weighted_sum({"a": torch.tensor(1.0)}, {"a": 0.0})


def test_require_finite_names_the_terms() -> None:
    terms = _terms()
    terms["cos"] = torch.tensor(float("nan"))
    terms["adv"] = torch.tensor(float("inf"))
    weighted_sum(terms)  # no check by default
    with pytest.raises(NonFiniteLossError, match="cos=nan") as info:
        weighted_sum(terms, require_finite=True)
    assert info.value.terms == ["cos", "adv"]
    assert isinstance(info.value, FloatingPointError)
    # Finite terms whose weighted sum overflows: the total is the culprit.
    big = torch.tensor(3e38)
    with pytest.raises(NonFiniteLossError, match="total=inf"):
        weighted_sum({"a": big, "b": big}, require_finite=True)


@pytest.mark.parametrize(
    ("terms", "weights", "error", "match"),
    [
        ({}, None, ValueError, "terms is empty"),
        ({"a": torch.tensor(1.0)}, {"b": 1.0}, ValueError, r"weights name \['b'\]"),
        ({"total": torch.tensor(1.0)}, None, ValueError, "'total' is reserved"),
        ({"a": torch.ones(2)}, None, ValueError, r"terms\['a'\] must be a scalar \(0-d\), got shape \(2,\)"),
        ({"a": 1.0}, None, TypeError, r"terms\['a'\] must be a floating tensor"),
        (
            {"a": torch.tensor(1)},
            None,
            TypeError,
            r"terms\['a'\] must be a floating tensor, got dtype torch.int64",
        ),
        ({"a": torch.tensor(1.0)}, {"a": "x"}, TypeError, r"weights\['a'\] must be a number"),
        ({"a": torch.tensor(1.0)}, {"a": float("nan")}, ValueError, r"weights\['a'\] must be finite"),
    ],
)
def test_weighted_sum_bad_input(terms: dict, weights: dict | None, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        weighted_sum(terms, weights)


def test_gradcheck_weighted_sum() -> None:
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: weighted_sum({"x": (x**2).sum(), "y": y.prod()}, {"y": -0.5})[0], (a, b)
    )
