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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.causal.recommend import benefit_scores, top_k
from fedrec.common.datasets import GroundTruth, InstitutionData

__all__ = ["policy_values"]


def policy_values(institutions: Sequence[InstitutionData], truth: GroundTruth, item_results: Mapping[str, dict],
                  covariates: Sequence[str] | None = None, derived: Sequence[str] = (), k: int = 3) -> dict:
    """Policy values of causal, engagement, oracle and random recommendations over the
    federation's people: mean true benefit of the top-1 item (``policy_value``) and mean total
    true benefit of the top-``k`` items (``policy_value_top_k``), plus top-1 agreement with the
    oracle."""
    from fedrec.client.statistics import raw_design  # simulation-side helper (column order)

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
    return {
        "unit": "mean true benefit of the top-1 item / total of the top-k items (outcome units, larger is better)",
        "k": k_eff,
        "engagement_model": "GroundTruth.expected_engagement (engagement oracle)",
        "causal": values(np.vstack(score_rows)),
        "engagement": values(truth.expected_engagement[r]),
        "oracle": values(ben),
        "random": {"policy_value": float(ben.mean()), "policy_value_top_k": float(k_eff * ben.mean()),
                   "agreement_with_oracle": 1.0 / len(items)},
    }
