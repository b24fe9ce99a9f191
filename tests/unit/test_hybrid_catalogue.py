"""The hybrid z-scores each component over the person's whole catalogue, not over the sampled
candidates (issue 30): on cold candidates (no interactions anywhere) the popularity slot is DP
noise only, and a per-candidate-set z-score blew that noise up to the text prior's scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedrec.common.config import RunConfig
from fedrec.common.metrics import ranking_from_scores
from fedrec.common.models.hybrid import DEFAULT_WEIGHTS, blend, catalogue_moments, fit_blend


def test_catalogue_moments_are_each_persons_mean_and_sd_over_every_item():
    rng = np.random.default_rng(0)
    full = rng.gamma(2.0, size=(7, 31)) * rng.uniform(0.1, 5.0, size=(7, 1))  # [persons, items]
    persons = np.array([3, 0, 3, 6, 2, 2, 5])  # repeats, unsorted, person 1 and 4 absent
    loc, sd = catalogue_moments(lambda p, c: full[np.asarray(p)[:, None], c], persons, 31, chunk=2)
    assert loc.shape == sd.shape == (7, 1)
    for row, u in enumerate(persons):  # textbook formulas, one person at a time
        m = sum(full[u]) / 31
        np.testing.assert_allclose(loc[row, 0], m, rtol=1e-12)
        np.testing.assert_allclose(sd[row, 0], np.sqrt(sum((x - m) ** 2 for x in full[u]) / 31), rtol=1e-12)
    with pytest.raises(ValueError, match="n_items"):
        catalogue_moments(lambda p, c: c, persons, 0)


def test_noise_only_component_is_not_inflated_on_cold_candidates():
    """A catalogue of warm items (real popularity spread) and cold ones (popularity = small
    noise only); each person's cold positive is ranked against 99 cold items. The text prior
    alone ranks well; blended with weight 1 each, the per-candidate z-score (the old scoring)
    gives the noise the text prior's scale and loses much of that, the catalogue z-score keeps it."""
    rng = np.random.default_rng(1)
    n_warm, n_cold, persons = 800, 200, 400
    pop = np.concatenate([np.log1p(rng.lognormal(1.0, 1.5, n_warm)),
                          np.log1p(np.maximum(rng.normal(0.0, 0.1, n_cold), 0.0))])
    affinity = rng.normal(size=(persons, n_warm + n_cold))  # text prior: informative, noisy
    cold = np.arange(n_warm, n_warm + n_cold)
    pos = rng.choice(cold, size=persons)
    affinity[np.arange(persons), pos] += 1.5
    negs = np.stack([rng.choice(np.setdiff1d(cold, [p]), size=99, replace=False) for p in pos])
    cands = np.concatenate([pos[:, None], negs], axis=1)
    who = np.arange(persons)
    fns = {"dp_popularity": lambda p, c: pop[c], "text_prior": lambda p, c: affinity[np.asarray(p)[:, None], c]}
    comps = {n: f(who, cands) for n, f in fns.items()}
    moments = {n: catalogue_moments(f, who, n_warm + n_cold) for n, f in fns.items()}
    w = {"dp_popularity": 1.0, "text_prior": 1.0}

    def ndcg(s: np.ndarray) -> float:
        return float(ranking_from_scores(s[:, 0], s[:, 1:], 10)[0].mean())

    text_alone, per_candidates, per_catalogue = ndcg(comps["text_prior"]), ndcg(blend(w, comps)), \
        ndcg(blend(w, comps, moments))
    assert per_candidates < text_alone - 0.05, (per_candidates, text_alone)  # the failure mode is real here
    assert per_catalogue > text_alone - 0.01, (per_catalogue, text_alone)
    # an item's blended score no longer depends on the other candidates beside it
    swapped = np.concatenate([cands[:, :1], cands[::-1, 1:]], axis=1)
    again = blend(w, {n: f(who, swapped) for n, f in fns.items()}, moments)
    np.testing.assert_allclose(again[:, 0], blend(w, comps, moments)[:, 0], rtol=1e-12)


def test_blend_and_fit_blend_refuse_missing_moments():
    a = np.random.default_rng(2).normal(size=(3, 5))
    with pytest.raises(KeyError, match="no catalogue moments"):
        blend({"a": 1.0, "b": 1.0}, {"a": a, "b": a}, {"a": (a.mean(1, keepdims=True), a.std(1, keepdims=True))})
    with pytest.raises(KeyError, match="moments for"):
        fit_blend({"a": [a], "b": [a]}, lambda s, t: 0.0, moments={"a": [(0.0, 1.0)]})


# ---------------------------------------------------------------------- production scoring
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A ratings institution: 24 titled items (items 19-24 cold: nobody rated them), 30 persons."""
    from titled_institution import write_titled_institution

    rng = np.random.default_rng(0)
    rows = [(u, int(i), 4.0) for u in range(1, 31) for i in rng.choice(np.arange(1, 19), size=4, replace=False)]
    return write_titled_institution(tmp_path_factory.mktemp("hybrid") / "institution_00", rows)


def test_flower_hybrid_scores_with_the_persons_catalogue_scale(folder):
    """``client/adapter_round.hybrid_components`` + ``blend`` (what the Flower hybrid's evaluate
    runs) equals an independent computation: each component z-scored by the mean and sd of that
    person's scores over all 24 catalogue items, then read off at the candidates — so the score
    of an item does not change with the candidates sampled beside it."""
    from fedrec.client.adapter_round import _text_side, hybrid_components
    from fedrec.common.models.hybrid import dp_popularity

    cfg = RunConfig().override(**{"institutions": 1, "model": "hybrid", "data-dir": str(folder.parent)})
    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.uniform(0, 20, 18), rng.normal(0, 2.0, 6)])  # cold items: noise only
    bias = rng.normal(size=24)

    def mf_score(p: np.ndarray, c: np.ndarray) -> np.ndarray:
        return bias[c] + 0.1 * np.asarray(p)[:, None]

    persons = np.array([0, 5, 5, 29])
    cands = np.array([[18, 19, 20, 21], [22, 23, 0, 1], [22, 2, 3, 4], [5, 19, 23, 10]])
    comps, moments = hybrid_components(folder, cfg, mf_score, counts, 4.0, persons, cands)
    got = blend(DEFAULT_WEIGHTS, comps, moments)

    emb, prof = _text_side(str(folder), tuple(sorted(cfg.to_flat().items())))
    unit = emb - emb.mean(0)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    full = {"dp_popularity": np.tile(dp_popularity(counts, 4.0), (len(persons), 1)),
            "mf": bias[None, :] + 0.1 * persons[:, None],
            "text_prior": prof[persons] @ unit.T}  # [rows, 24]: every item of the catalogue
    want = sum(w * (np.take_along_axis(full[n], cands, 1) - full[n].mean(1, keepdims=True))
               / full[n].std(1, keepdims=True) for n, w in DEFAULT_WEIGHTS.items() if w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # person 5's item 22 scores alike beside different candidates (rows 1 and 2)
    assert got[1, 0] == pytest.approx(got[2, 0], abs=1e-12)
