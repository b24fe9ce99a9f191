"""Causal recommendations: rank items per person by estimated benefit, not by engagement.

The CATE model of each item (difference of the per-arm ridge models, released as DP sums and
fitted on the server) is public post-processing: an institution applies it to its own
people's covariates locally, at no privacy cost. In simulations, the ground truth grades the
ranking: the **policy value** of a recommender is the mean true benefit (true CATE, oriented by
the study's ``better`` direction, in outcome units) of the top-1 item over all people.

Peers: ``engagement`` ranks by expected engagement with the simulator's oracle
(``GroundTruth.most_engaging_item`` — the best any engagement-trained recommender can do),
``oracle`` by true benefit (``GroundTruth.best_item``, the upper bound).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.causal.estimators import design, scale_covariates
from fedrec.common.datasets import GroundTruth, InstitutionData

__all__ = ["benefit_scores", "recommend", "policy_values"]


def benefit_scores(x_raw: np.ndarray, columns: Sequence[tuple[str, float, float]],
                   cate_coef: Mapping[str, Mapping[str, float]], items: Sequence[str], better: str) -> np.ndarray:
    """(people, items) estimated benefit: CATE, negated when a lower outcome is better."""
    x = design(scale_covariates(x_raw, [(lo, hi) for _, lo, hi in columns]))
    names = ["intercept"] + [c[0] for c in columns]
    coef = np.column_stack([[cate_coef[it][n] for n in names] for it in items])
    tau = x @ coef
    return tau if better == "higher" else -tau


def recommend(scores: np.ndarray, items: Sequence[str]) -> np.ndarray:
    """Top-1 item per person by score."""
    return np.asarray(items, dtype=object)[scores.argmax(axis=1)]


def policy_values(institutions: Sequence[InstitutionData], truth: GroundTruth, item_results: Mapping[str, dict],
                  covariates: Sequence[str] | None = None, derived: Sequence[str] = ()) -> dict:
    """Policy value (mean true benefit of the top-1 item) of causal, engagement and oracle
    recommendations over the federation's people, plus agreement with the oracle."""
    from fedrec.client.statistics import raw_design  # simulation-side helper (column order)

    items = list(truth.item_ids)
    row_of = {p: i for i, p in enumerate(truth.person_ids.astype(str))}
    benefit = truth.benefit
    col_of = {it: j for j, it in enumerate(items)}
    recs: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for d in institutions:
        x_raw, cols = raw_design(d, covariates, derived)
        scores = benefit_scores(x_raw, cols, {it: item_results[it]["cate_coef"] for it in items},
                                items, d.study.outcome_better)
        recs.append(recommend(scores, items))
        rows.append(np.array([row_of[p] for p in d.people["person_id"].astype(str)]))
    rec = np.concatenate(recs)
    r = np.concatenate(rows)

    def value(chosen: np.ndarray) -> float:
        return float(np.mean(benefit[r, [col_of[c] for c in chosen]]))

    best = truth.best_item[r]
    eng = truth.most_engaging_item[r]
    return {
        "unit": "mean true benefit of the top-1 item (outcome units, larger is better)",
        "engagement_model": "GroundTruth.most_engaging_item (engagement oracle)",
        "causal": {"policy_value": value(rec), "agreement_with_oracle": float(np.mean(rec == best))},
        "engagement": {"policy_value": value(eng), "agreement_with_oracle": float(np.mean(eng == best))},
        "oracle": {"policy_value": value(best), "agreement_with_oracle": 1.0},
    }
