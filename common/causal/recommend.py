"""Rank items per person by estimated benefit (the released CATE models), not by engagement.

Pure functions on public coefficients and one institution's own covariates: applying a released
CATE model is post-processing, so it costs no privacy budget and sends nothing anywhere. Used by
``fedrec-client recommend`` (an institution ranks its own people) and by the simulations'
policy-value grading (``fedrec.server.causal_recommend``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.causal.estimators import design, scale_covariates

__all__ = ["CATE_SHRINKAGE_CAVEAT", "benefit_scores", "design_benefit", "scaled_design", "shrinkage_caveat", "top_k"]

#: ``cate_shrinkage`` from which the CATE's pointwise intervals are flagged. Measured on the
#: three simulators (benchmarks/cate_coverage.py; 8 institutions of ~312 and of 2,500; one item
#: and every item per run): every cell that covered under 0.93 (0.36-0.92) had a mean shrinkage
#: of 0.83 or more, and the cells below 0.8 covered 0.93 or more (docs/causal.md, CATE coverage).
CATE_SHRINKAGE_CAVEAT = 0.8


def shrinkage_caveat(shrinkage: Mapping[str, float]) -> str | None:
    """One line for the items whose ``cate_shrinkage`` reaches :data:`CATE_SHRINKAGE_CAVEAT`
    (None when no item does): their pointwise CATE intervals carry the noise, not the
    shrinkage's bias. The ATE's interval is not concerned (its SE carries the nuisance noise)."""
    shrunk = {it: v for it, v in shrinkage.items() if v >= CATE_SHRINKAGE_CAVEAT}
    if not shrunk:
        return None
    return (f"caveat: the DP ridge and eigenvalue floor shrink the CATE models of {', '.join(sorted(shrunk))} "
            f"heavily (cate_shrinkage up to {max(shrunk.values()):.2f}, >= {CATE_SHRINKAGE_CAVEAT}): their per-person effect CIs "
            "carry the noise, not that shrinkage's bias, and under-covered at this level in the simulators "
            "(docs/causal.md, CATE coverage); a larger ε, fewer items per run or more people shrink less.")


def scaled_design(x_raw: np.ndarray, columns: Sequence[tuple[str, float, float]]) -> tuple[np.ndarray, list[str]]:
    """The bound-scaled design the CATE coefficients apply to, and its column names
    (``"intercept"`` first). ``columns``: ``(name, lower, upper)`` of ``x_raw``'s columns (public bounds)."""
    x = design(scale_covariates(x_raw, [(lo, hi) for _, lo, hi in columns]))
    return x, ["intercept"] + [c[0] for c in columns]


def benefit_scores(x_raw: np.ndarray, columns: Sequence[tuple[str, float, float]],
                   cate_coef: Mapping[str, Mapping[str, float]], items: Sequence[str], better: str) -> np.ndarray:
    """(people, items) estimated benefit: CATE, negated when a lower outcome is better.

    ``columns``: ``(name, lower, upper)`` of the design columns in ``x_raw``'s order (public
    bounds); ``cate_coef[item]`` maps ``"intercept"`` and every column name to its coefficient
    on the bound-scaled design (``causal.json`` ``items.<item>.cate_coef``)."""
    x, names = scaled_design(x_raw, columns)
    return design_benefit(x, names, cate_coef, items, better)


def design_benefit(x: np.ndarray, names: Sequence[str], cate_coef: Mapping[str, Mapping[str, float]],
                   items: Sequence[str], better: str) -> np.ndarray:
    """:func:`benefit_scores` on a design already scaled by :func:`scaled_design` (``names`` its
    column names), for callers that need that design again (the CATE's pointwise CIs)."""
    coef = np.column_stack([[cate_coef[it][n] for n in names] for it in items])
    tau = x @ coef
    return tau if better == "higher" else -tau


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(people, k) column indices of each person's k highest scores, best first."""
    k = max(1, min(int(k), scores.shape[1]))
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
