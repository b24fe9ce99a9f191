"""Why an item is recommended to a person: per-covariate contributions to the estimated benefit.

The CATE model of an item is linear on the bound-scaled design (``causal.json``
``items.<item>.cate_coef``, intercept first, with its covariance ``cate_cov``), so a person's
estimated benefit minus the benefit of the average person splits **exactly** into one term per
design column:

    benefit(x) − benefit(x̄) = Σ_k s · coef_k · (x_k − x̄_k),   s = +1 (higher is better) or −1

(the intercept cancels; ``x̄`` the mean design row of the reference people — for a linear
model ``benefit(x̄)`` is also their average benefit). Each contribution ``s coef_k δ_k`` has
the SE ``|δ_k| sqrt(cov_kk)``; the person's benefit ``x' C x`` and the difference ``δ' C δ``.
The covariance carries the sampling variance and the DP noise of the released statistics the
models come from (docs/causal.md).

Privacy: the coefficients and their covariance are public (released, DP); the person's
covariates and the reference mean are the institution's own and never leave it. Applying the
released model is post-processing: **no budget**, nothing sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

__all__ = ["CovariateContribution", "Explanation", "explain", "explain_rows"]


@dataclass(frozen=True)
class CovariateContribution:
    """One design column's part of (benefit − average benefit), outcome units, with its CI."""

    name: str
    value: float
    mean: float
    contribution: float
    se: float
    alpha: float = 0.05

    @property
    def ci(self) -> tuple[float, float]:
        z = float(norm.ppf(1 - self.alpha / 2))
        return self.contribution - z * self.se, self.contribution + z * self.se

    def to_json(self) -> dict:
        lo, hi = self.ci
        return {"covariate": self.name, "value": self.value, "mean": self.mean, "contribution": self.contribution,
                "se": self.se, "ci_low": lo, "ci_high": hi}


@dataclass(frozen=True)
class Explanation:
    """A person's estimated benefit of one item, the average's, and why they differ."""

    item: str
    benefit: float
    benefit_se: float
    average_benefit: float
    difference: float
    difference_se: float
    contributions: tuple[CovariateContribution, ...]
    evidence: Mapping[str, object] = field(default_factory=dict)
    alpha: float = 0.05

    def _ci(self, v: float, se: float) -> tuple[float, float]:
        z = float(norm.ppf(1 - self.alpha / 2))
        return v - z * se, v + z * se

    @property
    def benefit_ci(self) -> tuple[float, float]:
        return self._ci(self.benefit, self.benefit_se)

    @property
    def difference_ci(self) -> tuple[float, float]:
        return self._ci(self.difference, self.difference_se)

    def top(self, k: int = 5) -> list[CovariateContribution]:
        """The ``k`` largest contributions in absolute value."""
        return sorted(self.contributions, key=lambda c: -abs(c.contribution))[:k]

    def to_json(self, k: int | None = None) -> dict:
        lo, hi = self.benefit_ci
        dlo, dhi = self.difference_ci
        contrib = self.top(k) if k else sorted(self.contributions, key=lambda c: -abs(c.contribution))
        return {"item": self.item, "estimated_benefit": self.benefit, "benefit_ci_low": lo, "benefit_ci_high": hi,
                "average_benefit": self.average_benefit, "difference_from_average": self.difference,
                "difference_ci_low": dlo, "difference_ci_high": dhi,
                "contributions": [c.to_json() for c in contrib], "evidence": dict(self.evidence)}


def _check(x: np.ndarray, names: Sequence[str], coef: Mapping[str, float], cov: np.ndarray | None) -> np.ndarray:
    if list(names[:1]) != ["intercept"]:
        raise ValueError("the design's first column must be the intercept")
    missing = [n for n in names if n not in coef]
    if missing:
        raise ValueError(f"the CATE model has no coefficient for {missing[0]!r}")
    p = len(names)
    if x.shape[-1] != p:
        raise ValueError(f"design rows have {x.shape[-1]} columns, the model {p}")
    if cov is not None and np.asarray(cov).shape != (p, p):
        raise ValueError(f"cate_cov must be {p}x{p}, got {np.asarray(cov).shape}")
    return np.array([float(coef[n]) for n in names])


def explain(x: np.ndarray, x_mean: np.ndarray, names: Sequence[str], coef: Mapping[str, float],
            cov: np.ndarray | None, *, better: str = "higher", item: str = "", raw: np.ndarray | None = None,
            raw_mean: np.ndarray | None = None, evidence: Mapping[str, object] | None = None,
            alpha: float = 0.05) -> Explanation:
    """Explain one person's estimated benefit of ``item``.

    ``x``: the person's bound-scaled design row (intercept first, ``names`` its columns: the
    CATE model's ``cate_coef`` keys); ``x_mean``: the reference people's mean row; ``cov``: the
    coefficients' covariance in ``names`` order (None: no CIs, SEs are NaN); ``raw``/``raw_mean``:
    the same in the covariates' own units, for display only. ValueError (one line) on a
    mismatch between design and model."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', got {better!r}")
    x, x_mean = np.asarray(x, dtype=np.float64), np.asarray(x_mean, dtype=np.float64)
    b = _check(x, names, coef, cov)
    s = 1.0 if better == "higher" else -1.0
    delta = x - x_mean
    delta[0] = 0.0  # the intercept cancels exactly
    c = np.asarray(cov, dtype=np.float64) if cov is not None else np.full((len(names), len(names)), np.nan)
    parts = s * b * delta
    raw = x[1:] if raw is None else np.asarray(raw, dtype=np.float64)
    raw_mean = x_mean[1:] if raw_mean is None else np.asarray(raw_mean, dtype=np.float64)
    contribs = tuple(CovariateContribution(name=names[k], value=float(raw[k - 1]), mean=float(raw_mean[k - 1]),
                                           contribution=float(parts[k]),
                                           se=float(abs(delta[k]) * math.sqrt(max(c[k, k], 0.0)))
                                           if np.isfinite(c[k, k]) else math.nan, alpha=alpha)
                     for k in range(1, len(names)))

    def se(v: np.ndarray) -> float:
        q = float(v @ c @ v)
        return math.sqrt(max(q, 0.0)) if np.isfinite(q) else math.nan

    benefit = s * float(x @ b)
    average = s * float(x_mean @ b)
    return Explanation(item=item, benefit=benefit, benefit_se=se(x), average_benefit=average,
                       difference=float(parts.sum()), difference_se=se(delta), contributions=contribs,
                       evidence=dict(evidence or {}), alpha=alpha)


def explain_rows(x: np.ndarray, names: Sequence[str], coef: Mapping[str, float], cov: np.ndarray | None, *,
                 better: str = "higher", item: str = "", x_mean: np.ndarray | None = None,
                 evidence: Mapping[str, object] | None = None, alpha: float = 0.05) -> list[Explanation]:
    """:func:`explain` for every row of ``x`` against their own mean (default) or ``x_mean``."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    mean = x.mean(axis=0) if x_mean is None else np.asarray(x_mean, dtype=np.float64)
    return [explain(row, mean, names, coef, cov, better=better, item=item, evidence=evidence, alpha=alpha)
            for row in x]
