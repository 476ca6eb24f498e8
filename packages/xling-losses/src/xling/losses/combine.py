"""A weighted sum of named loss terms that also returns each term for logging."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ._checks import check_number

__all__ = ["NonFiniteLossError", "weighted_sum"]


class NonFiniteLossError(FloatingPointError):
    """A loss term or the total is NaN or infinite.

    Attributes:
        terms: Names of the non-finite terms (``"total"`` when only the sum overflowed).
        values: Their values as floats.
    """

    def __init__(self, terms: list[str], values: dict[str, float]) -> None:
        self.terms = terms
        self.values = values
        listed = ", ".join(f"{name}={values[name]}" for name in terms)
        super().__init__(f"weighted_sum: non-finite loss terms: {listed}")


def weighted_sum(
    terms: Mapping[str, Tensor],
    weights: Mapping[str, float] | None = None,
    *,
    require_finite: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Combines named scalar losses into one total.

        total = sum_k w_k * term_k        (w_k = weights.get(k, 1.0))

    A term whose weight is exactly 0 is logged but left out of the total, so a recipe can switch a term off
    without its NaN (or its graph) reaching the backward pass.

    Args:
        terms: Name to 0-d loss tensor, e.g. ``{"attn": attention_mse(...), "cos": cosine_alignment(...)}``;
            all on one device. ``"total"`` is reserved.
        weights: Optional name to weight; every name must be a key of ``terms``.
        require_finite: Check the terms and the total (one device sync) and raise
            :class:`NonFiniteLossError` naming every non-finite one.

    Returns:
        ``(total, logs)``: ``total`` a 0-d tensor with grad; ``logs`` maps each name to its unweighted term,
        detached, plus ``"total"`` to the detached total.

    Raises:
        ValueError: No terms, a term named ``"total"``, weight names that are not terms, a non-scalar term,
            terms on different devices, a non-finite weight, or every weight 0.
        TypeError: A term that is not a floating tensor, or a weight that is not a number.
        NonFiniteLossError: With ``require_finite``, a contributing term or the total is NaN or infinite.
    """
    fn = "weighted_sum"
    if not isinstance(terms, Mapping):
        raise TypeError(f"{fn}: terms must be a mapping from name to loss tensor, got {type(terms).__name__}")
    if not terms:
        raise ValueError(f"{fn}: terms is empty; expected at least one named loss")
    if "total" in terms:
        raise ValueError(f"{fn}: 'total' is reserved for the sum; rename that term")
    weights = {} if weights is None else weights
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"{fn}: weights must be a mapping from term name to number, got {type(weights).__name__}"
        )
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        raise ValueError(f"{fn}: weights name {unknown} that are not in terms {sorted(terms)}")

    device: torch.device | None = None
    first = ""
    total: Tensor | None = None
    contributing: list[str] = []
    for name, term in terms.items():
        if not isinstance(term, Tensor) or not term.is_floating_point():
            kind = f"dtype {term.dtype}" if isinstance(term, Tensor) else type(term).__name__
            raise TypeError(f"{fn}: terms[{name!r}] must be a floating tensor, got {kind}")
        if term.ndim != 0:
            raise ValueError(
                f"{fn}: terms[{name!r}] must be a scalar (0-d), got shape {tuple(term.shape)}; reduce it first"
            )
        if device is None:
            device, first = term.device, name
        elif term.device != device:
            raise ValueError(f"{fn}: terms[{name!r}] is on {term.device} but terms[{first!r}] is on {device}")
        w = check_number(fn, f"weights[{name!r}]", weights.get(name, 1.0))
        if w == 0.0:
            continue
        contributing.append(name)
        weighted = term if w == 1.0 else w * term
        total = weighted if total is None else total + weighted
    if total is None:
        raise ValueError(f"{fn}: every weight is 0 ({dict(weights)}); nothing would be optimised")

    logs = {name: term.detach() for name, term in terms.items()}
    logs["total"] = total.detach()
    if require_finite:
        checked = [*contributing, "total"]
        finite = torch.stack([torch.isfinite(logs[name].float()) for name in checked]).tolist()  # one sync
        bad = [name for name, ok in zip(checked, finite, strict=True) if not ok]
        if bad:
            values = {name: float(logs[name]) for name in bad}
            # Name the culprits; "total" alone is only worth naming when no single term explains it.
            culprits = [name for name in bad if name != "total"] or ["total"]
            raise NonFiniteLossError(culprits, {name: values[name] for name in culprits})
    return total, logs
