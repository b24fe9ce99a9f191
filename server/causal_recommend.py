"""Causal recommendations: rank items per person by estimated benefit, not by engagement.

The CATE model of each item (difference of the per-arm ridge models, released as DP sums and
fitted on the server) is public post-processing: an institution applies it to its own
people's covariates locally, at no privacy cost. In simulations, the ground truth grades the
ranking: the **policy value** of a recommender is the mean true benefit (true CATE, oriented by
the study's ``better`` direction, in outcome units) of the top-1 item over all people, and its
top-k value the mean total true benefit of following all top-k items (the simulators' outcome
adds the effects of every item a person takes up).

Peers: ``engagement`` ranks by expected engagement with the simulator's oracle
(``GroundTruth.expected_engagement`` — the best any engagement-trained recommender can do),
``oracle`` by true benefit (the upper bound), ``random`` an item drawn uniformly (its expected
value: the mean benefit over items).

The **safe** causal recommender (``causal_safe``) is what ``fedrec-client recommend`` outputs:
a person gets an item only where its estimated benefit's 95% interval lies above the status
quo (``none``: no item; ``current``: what the person takes now), never an item whose ATE
interval shows harm (:func:`fedrec.common.causal.recommend.item_blocks`); otherwise no
recommendation, whose value is the status quo's (0). Its ``gain`` is the mean true benefit over
the status quo; ``oracle_gain`` gives everyone whose best item truly helps that item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.causal.design import raw_design
from fedrec.common.causal.recommend import (
    benefit_intervals,
    benefit_scores,
    effect_limit,
    item_blocks,
    safe_top_k,
    scaled_design,
    top_k,
)
from fedrec.common.datasets import GroundTruth, InstitutionData

__all__ = ["policy_values", "safe_policy_value"]


def _taken(d: InstitutionData, items: Sequence[str]) -> np.ndarray:
    """(people, items): the person takes the item now (exposed = 1)."""
    inter = d.interactions[d.interactions["exposed"] == 1]
    pos = {p: i for i, p in enumerate(d.people["person_id"].astype(str))}
    out = np.zeros((len(d.people), len(items)), dtype=bool)
    col = {it: j for j, it in enumerate(items)}
    for p, it in zip(inter["person_id"].astype(str), inter["item_id"].astype(str)):
        if it in col and p in pos:
            out[pos[p], col[it]] = True
    return out


def safe_policy_value(institutions: Sequence[InstitutionData], truth: GroundTruth, item_results: Mapping[str, dict],
                      covariates: Sequence[str] | None = None, derived: Sequence[str] = (), *,
                      status_quo: str = "none") -> dict:
    """Ground-truth value of following the safe recommendations (top-1; none -> status quo)."""
    items = list(truth.item_ids)
    row_of = {p: i for i, p in enumerate(truth.person_ids.astype(str))}
    coef = {it: item_results[it]["cate_coef"] for it in items}
    cov = {it: np.asarray(item_results[it]["cate_cov"], dtype=np.float64) for it in items}
    shrink = {it: float(item_results[it].get("cate_shrinkage", 0.0)) for it in items}
    gains, best, recommended = [], [], []
    for d in institutions:
        x_raw, cols = raw_design(d, covariates, derived)
        x, names = scaled_design(x_raw, cols)
        ben, half = benefit_intervals(x, names, coef, cov, items, d.study.outcome_better,
                                      limit=effect_limit(d.study.outcome_bounds))
        taken = _taken(d, items) if status_quo == "current" else np.zeros_like(ben, dtype=bool)
        blocks = item_blocks(item_results, items, d.study.outcome_better, shrink)
        pick, _ = safe_top_k(ben, half, items, 1, blocks=blocks, taken=taken)
        true = truth.benefit[np.array([row_of[p] for p in d.people["person_id"].astype(str)])]
        true_gain = np.where(taken, 0.0, true)  # over the status quo: an item already taken adds nothing
        got = np.where(pick[:, 0] >= 0, np.take_along_axis(true_gain, np.maximum(pick, 0), axis=1)[:, 0], 0.0)
        gains.append(got)
        best.append(np.maximum(true_gain.max(axis=1), 0.0))
        recommended.append(pick[:, 0] >= 0)
    g, b = np.concatenate(gains), np.concatenate(best)
    return {"status_quo": status_quo, "gain": float(g.mean()), "oracle_gain": float(b.mean()),
            "share_of_oracle_gain": float(g.mean() / b.mean()) if b.mean() > 0 else None,
            "share_recommended": float(np.concatenate(recommended).mean()),
            "harmed_share": float(np.mean(g < 0))}


def policy_values(institutions: Sequence[InstitutionData], truth: GroundTruth, item_results: Mapping[str, dict],
                  covariates: Sequence[str] | None = None, derived: Sequence[str] = (), k: int = 3,
                  status_quo: str = "none") -> dict:
    """Policy values of causal, engagement, oracle and random recommendations over the
    federation's people: mean true benefit of the top-1 item (``policy_value``) and mean total
    true benefit of the top-``k`` items (``policy_value_top_k``), plus top-1 agreement with the
    oracle; and ``causal_safe``: :func:`safe_policy_value` (what the recommend command outputs)."""
    items = list(truth.item_ids)
    row_of = {p: i for i, p in enumerate(truth.person_ids.astype(str))}
    score_rows: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for d in institutions:
        x_raw, cols = raw_design(d, covariates, derived)
        scores = benefit_scores(x_raw, cols, {it: item_results[it]["cate_coef"] for it in items},
                                items, d.study.outcome_better)
        score_rows.append(scores)
        rows.append(np.array([row_of[p] for p in d.people["person_id"].astype(str)]))
    r = np.concatenate(rows)  # each person's row in the ground truth
    ben = truth.benefit[r]

    def values(scores: np.ndarray) -> dict:
        cols = top_k(scores, k)
        taken = np.take_along_axis(ben, cols, axis=1)
        return {"policy_value": float(taken[:, 0].mean()), "policy_value_top_k": float(taken.sum(axis=1).mean()),
                "agreement_with_oracle": float(np.mean(cols[:, 0] == ben.argmax(axis=1)))}

    k_eff = max(1, min(int(k), len(items)))
    out = {
        "unit": "mean true benefit of the top-1 item / total of the top-k items (outcome units, larger is better)",
        "k": k_eff,
        "engagement_model": "GroundTruth.expected_engagement (engagement oracle)",
        "causal": values(np.vstack(score_rows)),
        "engagement": values(truth.expected_engagement[r]),
        "oracle": values(ben),
        "random": {"policy_value": float(ben.mean()), "policy_value_top_k": float(k_eff * ben.mean()),
                   "agreement_with_oracle": 1.0 / len(items)},
    }
    if all("cate_cov" in item_results[it] for it in items):
        out["causal_safe"] = safe_policy_value(institutions, truth, item_results, covariates, derived,
                                               status_quo=status_quo)
    return out
