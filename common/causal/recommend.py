"""Rank items per person by estimated benefit (the released CATE models), not by engagement.

Pure functions on public coefficients and one institution's own covariates: applying a released
CATE model is post-processing, so it costs no privacy budget and sends nothing anywhere. Used by
``fedrec-client recommend`` (an institution ranks its own people) and by the simulations'
policy-value grading (``fedrec.server.causal_recommend``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.causal.scaling import design, scale_covariates

__all__ = ["CATE_SHRINKAGE_CAVEAT", "STATUS_QUO", "NO_BENEFIT", "BLOCKED", "ate_verdict", "benefit_intervals",
           "benefit_scores", "check_status_quo", "design_benefit", "effect_limit", "item_blocks", "safe_top_k",
           "scaled_design", "shrinkage_caveat", "top_k"]

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


# --------------------------------------------------------------------------- safe recommendations
#: what a recommendation is compared with: ``none`` = the person takes no item (benefit 0);
#: ``current`` = the person keeps what they take now (an item they already take gains nothing,
#: a new one adds its effect: the simulators' outcome adds the effects of every item taken up)
STATUS_QUO = ("none", "current")

#: why a person gets no recommendation (the CSV's ``reason`` column, one per person)
NO_BENEFIT = "no item's 95% benefit interval excludes 'no better than the status quo'"
BLOCKED = "the items whose benefit interval excludes the status quo are blocked by their ATE"


def check_status_quo(status_quo: str) -> str:
    if status_quo not in STATUS_QUO:
        from fedrec.common.errors import FedrecInputError

        raise FedrecInputError(f"--status-quo {status_quo!r}: fix: use none (no item) or current (what each "
                               "person takes now)")
    return status_quo


def effect_limit(outcome_bounds: Sequence[float]) -> float:
    """The largest effect the declared outcome bounds allow: ``max - min`` (an ATE or a CATE
    beyond ±this is impossible, whatever the noise made of it)."""
    return float(outcome_bounds[1]) - float(outcome_bounds[0])


def ate_verdict(ci_low: float, ci_high: float, better: str) -> str:
    """``benefit`` / ``harm`` where the ATE's CI excludes 0 on that side (the study's better
    direction), else ``unclear``."""
    lo, hi = (ci_low, ci_high) if better == "higher" else (-ci_high, -ci_low)
    return "benefit" if lo > 0 else "harm" if hi < 0 else "unclear"


def item_blocks(ate_rows: Mapping[str, Mapping[str, float]], items: Sequence[str], better: str,
                shrinkage: Mapping[str, float] | None = None) -> dict[str, str]:
    """Items no one may be recommended, with the reason, so the ATE table and the CATE ranking
    never contradict silently: an item whose ATE interval shows harm; an item whose CATE model the
    DP ridge/floor shrank so much (``cate_shrinkage`` >= :data:`CATE_SHRINKAGE_CAVEAT`) that its
    per-person intervals under-cover, unless its ATE interval itself shows a benefit."""
    shrinkage = shrinkage or {}
    out: dict[str, str] = {}
    for it in items:
        row = ate_rows.get(it) or {}
        if "ci_low" not in row:
            continue
        v = ate_verdict(float(row["ci_low"]), float(row["ci_high"]), better)
        if v == "harm":
            out[it] = "its ATE interval shows harm"
        elif shrinkage.get(it, 0.0) >= CATE_SHRINKAGE_CAVEAT and v != "benefit":
            out[it] = (f"its CATE model is shrunk (cate_shrinkage {shrinkage[it]:.2f}) and its ATE interval "
                       "does not show a benefit")
    return out


def benefit_intervals(x: np.ndarray, names: Sequence[str], cate_coef: Mapping[str, Mapping[str, float]],
                      cate_cov: Mapping[str, np.ndarray], items: Sequence[str], better: str, *,
                      limit: float = math.inf, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(people, items) estimated benefit, cut to ±``limit`` (:func:`effect_limit`), and the
    half-width of its pointwise ``1 - alpha`` interval. ``cate_cov[item]``: the covariance of
    the coefficients in ``cate_coef[item]``'s key order; ``x``: :func:`scaled_design` rows."""
    from scipy.stats import norm

    ben = np.clip(design_benefit(x, names, cate_coef, items, better), -limit, limit)
    z = float(norm.ppf(1 - alpha / 2))
    half = []
    for it in items:
        keys = list(cate_coef[it])
        idx = [keys.index(n) for n in names]
        cov = np.asarray(cate_cov[it], dtype=np.float64)[np.ix_(idx, idx)]
        half.append(z * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, cov, x), 0.0)))
    return ben, np.column_stack(half) if half else np.zeros_like(ben)


def safe_top_k(benefit: np.ndarray, half: np.ndarray, items: Sequence[str], k: int, *,
               blocks: Mapping[str, str] | None = None, taken: np.ndarray | None = None
               ) -> tuple[np.ndarray, list[str]]:
    """Each person's up to ``k`` items whose benefit interval lies above the status quo, best
    (largest estimated benefit) first; -1 where fewer qualify. Returns (people, k) indices and
    one reason per person ("" when at least one item qualifies).

    An item qualifies for a person when ``benefit - half > 0`` (the interval excludes "no better
    than the status quo"), it is not in ``blocks`` (:func:`item_blocks`) and, with the status quo
    ``current``, the person does not take it already (``taken``: (people, items) bool)."""
    blocks = blocks or {}
    ok = (benefit - half) > 0
    above = ok.copy()
    if taken is not None:
        ok &= ~taken.astype(bool)
        above &= ~taken.astype(bool)
    for j, it in enumerate(items):
        if it in blocks:
            ok[:, j] = False
    score = np.where(ok, benefit, -np.inf)
    k = max(1, min(int(k), len(items)))
    cols = np.argsort(-score, axis=1, kind="stable")[:, :k]
    cols = np.where(np.take_along_axis(ok, cols, axis=1), cols, -1)
    reasons = []
    for i in range(benefit.shape[0]):
        if cols[i, 0] >= 0:
            reasons.append("")
        elif above[i].any():
            why = "; ".join(f"{items[j]}: {blocks[items[j]]}" for j in np.flatnonzero(above[i]) if items[j] in blocks)
            reasons.append(f"{BLOCKED} ({why})")
        else:
            reasons.append(NO_BENEFIT)
    return cols, reasons
