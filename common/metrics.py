"""Recommendation metrics as additive sums, so institutions' parts add up at the server.

Each ``*_sums`` function returns sums and counts; :func:`finalize` turns summed parts into
RMSE, MAE, NDCG@k and HR@k. Ranking protocol: each held-out rating of a person is ranked
against the same ``negatives`` items that person never rated (sampled once per person,
seeded), as in the usual "1 positive vs 99 sampled negatives" evaluation.

These metrics read held-out institution data: in deployment they are releases. fedrec
computes them only with ``eval.metrics-release = simulation``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported by the one helper that needs it, not at import
    import torch

__all__ = ["rating_sums", "ranking_sums", "finalize", "add_sums", "sample_negatives", "ranking_from_scores"]


def rating_sums(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    err = np.asarray(pred, float) - np.asarray(truth, float)
    return {"sse": float((err**2).sum()), "sae": float(np.abs(err).sum()), "n_ratings": float(len(err))}


def sample_negatives(
    rated_by_person: list[np.ndarray], n_items: int, negatives: int, *, seed: int
) -> np.ndarray:
    """[P, k] items each person never rated (seeded), k = min(negatives, fewest unrated).

    A small catalogue (8 health programmes) cannot supply 99 negatives: k shrinks to what
    every person has, and is 0 when someone rated everything (ranking metrics are then
    skipped rather than computed against a made-up candidate set).
    """
    rng = np.random.default_rng(seed)
    most_rated = max((len(np.unique(r)) for r in rated_by_person), default=0)
    k = max(0, min(negatives, n_items - most_rated))
    out = np.empty((len(rated_by_person), k), dtype=np.int64)
    if k == 0:
        return out
    for u, rated in enumerate(rated_by_person):
        if n_items > 50 * k:  # big catalogue: rejection sampling is fast
            seen = set(rated.tolist())
            picked: list[int] = []
            while len(picked) < k:
                for c in rng.integers(0, n_items, size=2 * k).tolist():
                    if c not in seen:
                        seen.add(c)
                        picked.append(c)
                        if len(picked) == k:
                            break
            out[u] = picked
        else:
            out[u] = rng.choice(np.setdiff1d(np.arange(n_items), rated), size=k, replace=False)
    return out


def ranking_from_scores(pos_scores: np.ndarray, neg_scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per positive: (NDCG@k, HR@k) given its score and its person's negatives' scores.

    Ties count against the positive (a constant scorer gets no credit).
    """
    rank = (neg_scores >= pos_scores[:, None]).sum(1)  # 0 = top
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return ndcg, hit.astype(float)


def ranking_sums(pos_scores: np.ndarray, neg_scores: np.ndarray, k: int) -> dict[str, float]:
    if neg_scores.shape[1] == 0:
        return {}
    ndcg, hit = ranking_from_scores(pos_scores, neg_scores, k)
    return {"ndcg_sum": float(ndcg.sum()), "hr_sum": float(hit.sum()), "n_ranked": float(len(ndcg))}


def add_sums(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for key, v in part.items():
            total[key] = total.get(key, 0.0) + float(v)
    return total


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    if sums.get("n_ratings", 0) > 0:
        out["rmse"] = float(np.sqrt(sums["sse"] / sums["n_ratings"]))
        out["mae"] = float(sums["sae"] / sums["n_ratings"])
    if sums.get("n_ranked", 0) > 0:
        out["ndcg10"] = float(sums["ndcg_sum"] / sums["n_ranked"])
        out["hr10"] = float(sums["hr_sum"] / sums["n_ranked"])
    return out


def as_tensor(a: np.ndarray) -> torch.Tensor:
    import torch

    return torch.as_tensor(a)
