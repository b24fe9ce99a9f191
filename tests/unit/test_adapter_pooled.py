"""The hybrid's pooled popularity (common/models/hybrid.pooled_popularity): an institution's own exact
counts pooled with the DP release by inverse variance, checked against its limits and against the
two estimates it pools, and the benchmark's per-institution counts against MF's count release."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from fedrec.common.models.hybrid import pooled_popularity
from fedrec.common.models.mf import PersonRatings, weighted_item_counts

ROOT = Path(__file__).resolve().parents[2]


def test_non_private_release_gives_the_exact_popularity():
    rng = np.random.default_rng(0)
    s = rng.poisson(20, 50).astype(float)
    own = np.minimum(s, rng.poisson(2, 50)).astype(float)
    assert np.allclose(pooled_popularity(s, 0.0, own), np.log1p(s))


def test_overwhelming_noise_falls_back_to_the_own_counts():
    rng = np.random.default_rng(1)
    own = rng.poisson(5, 200).astype(float) + rng.random(200)  # no ties
    s = 10 * own + rng.normal(0, 1e5, 200)
    rho = spearmanr(pooled_popularity(s, 1e10, own), own).statistic
    assert rho > 0.999


def _simulate(rng, n_items=400, K=10, noise_sd=30.0):
    lam = rng.gamma(0.8, 6.0, n_items)  # per-institution expected counts of each item
    c = rng.poisson(lam, (K, n_items)).astype(float)
    total = c.sum(0)
    s = total + rng.normal(0, noise_sd, n_items)
    return total, s, c[0]


@pytest.mark.parametrize("noise_sd, gain", [(3.0, 1.0), (30.0, 0.8)])
def test_pooling_beats_each_estimate_it_pools(noise_sd, gain):
    """Mean squared error of the total count over replicates: the pooled estimate is better than
    the DP sum alone and than the own counts scaled up alone, clearly so (by 20%) when the DP
    noise is large (swapping or dropping a variance breaks it)."""
    rng = np.random.default_rng(2)
    err = {"pooled": 0.0, "dp": 0.0, "own": 0.0}
    for _ in range(30):
        total, s, own = _simulate(rng, noise_sd=noise_sd)
        pooled = np.expm1(pooled_popularity(s, noise_sd**2, own))
        r = (s.sum() - own.sum()) / own.sum()
        err["pooled"] += np.mean((pooled - total) ** 2)
        err["dp"] += np.mean((np.maximum(s, 0) - total) ** 2)
        err["own"] += np.mean((own * (1 + r) - total) ** 2)
    assert err["pooled"] < gain * min(err["dp"], err["own"]), err


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="own counts"):
        pooled_popularity(np.ones(3), 1.0, np.ones(4))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_adapter", ROOT / "benchmarks" / "adapter.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_adapter"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_own_counts_sum_to_mfs_weighted_counts():
    """The benchmark's per-institution exact counts use the MF count release's weights (1/√n_u):
    summed over institutions they equal ``weighted_item_counts`` on all persons."""
    bench = _bench()
    rng = np.random.default_rng(4)
    n_persons, n_items, K = 40, 30, 3
    person = rng.integers(0, n_persons, 300)
    item = rng.integers(0, n_items, 300)
    keep = np.unique(person * n_items + item, return_index=True)[1]
    person, item = person[keep], item[keep]
    owner = rng.integers(0, K, n_persons)
    own, mean_w = bench.own_counts(person, item, owner, K, n_items)
    ref = weighted_item_counts(PersonRatings.from_arrays(person, item, np.ones(len(item), np.float32), n_persons),
                               n_items).numpy()
    assert own.shape == (K, n_items)
    assert np.allclose(own.sum(0), ref, atol=1e-5)
    assert np.all((mean_w > 0) & (mean_w <= 1))
