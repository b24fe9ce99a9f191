"""The empirical-Bayes item prior: public features, the weighted fit, the posterior update."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrec.common.models.item_prior import apply_prior_mean, catalogue_features, fit_prior_mean
from fedrec.common.models.mf import preconditioner


def test_catalogue_features_one_hot_genres_and_standardised_year():
    items = pd.DataFrame({
        "item_id": [1, 2, 3, 4],
        "genres": ["Drama|Comedy", "Drama", "Comedy", "Western"],  # Western on one item: dropped
        "year": [1990, 2000, None, 2010],
    })
    f = catalogue_features(items)
    assert f.shape == (4, 3)
    np.testing.assert_array_equal(f[:, :2], [[1, 1], [0, 1], [1, 0], [0, 0]])  # Comedy, Drama
    year = f[:, 2]
    assert year[2] == pytest.approx(year[1])  # missing year -> median (2000)
    assert year.mean() == pytest.approx(0.0, abs=1e-6)


def test_catalogue_features_empty_when_no_metadata():
    assert catalogue_features(pd.DataFrame({"item_id": [1, 2, 3]})).shape == (3, 0)


def _simulated_round(seed: int, n_items: int = 3000, noise_var: float = 40.0, prior_var: float = 0.05):
    """A round-1 update with known truth: b = features·β + deviation, noisy sums, Wiener gain."""
    rng = np.random.default_rng(seed)
    genre = rng.integers(0, 4, n_items)
    features = np.eye(4)[genre][:, 1:]  # 3 one-hots, genre 0 is the baseline
    beta = np.array([0.6, -0.5, 0.3])
    truth = -0.1 + features @ beta + rng.normal(0, np.sqrt(prior_var), n_items)
    counts = rng.pareto(1.2, n_items) * 10  # heavy-tailed popularity, most items rare
    grad = -counts * truth + rng.normal(0, np.sqrt(counts + noise_var))  # Σ over raters + DP noise
    precond = preconditioner(counts, 1.0, noise_var, prior_var)
    gain = precond * counts
    update = -precond * grad
    return truth, features, counts, gain, update, -0.1 + features @ beta


def test_fit_prior_mean_recovers_the_feature_effects():
    truth, features, counts, gain, update, mean = _simulated_round(0)
    prior = fit_prior_mean(update, gain, counts, features, count_noise_var=0.0)
    rare = gain < 0.5
    assert rare.mean() > 0.5
    # genre-level means are recovered on the items whose own data is noise-dominated
    # (group means span -0.6..0.5)
    assert np.abs(prior - mean)[rare].mean() < 0.07
    # and the posterior beats shrinking towards 0 there
    posterior = apply_prior_mean(update, gain, prior)
    err_zero = np.mean((update[rare] - truth[rare]) ** 2)
    err_prior = np.mean((posterior[rare] - truth[rare]) ** 2)
    assert err_prior < 0.5 * err_zero
    assert err_prior < 1.3 * 0.05  # close to the prior variance: the best any estimator can do there


def test_fit_prior_mean_without_signal_is_zero():
    gain = np.zeros(100)
    assert not fit_prior_mean(np.zeros(100), gain, np.zeros(100), np.zeros((100, 2)), count_noise_var=1.0).any()


def test_apply_prior_mean_keeps_well_measured_items_and_fills_unmeasured_ones():
    update = np.array([0.4, 0.0, 0.1])
    gain = np.array([1.0, 0.0, 0.5])
    prior = np.array([9.0, -0.3, 0.2])
    np.testing.assert_allclose(apply_prior_mean(update, gain, prior), [0.4, -0.3, 0.2])


def _server_inputs(noise_var: float):
    from fedrec.server.app import Catalogue, ItemStepSizes

    truth, features, counts, gain, update, _ = _simulated_round(1, noise_var=max(noise_var, 1e-9))
    steps = ItemStepSizes(precond=(gain / np.maximum(counts, 1e-12)).astype(np.float32), counts=counts,
                          noise_var=noise_var, count_noise_var=0.0)
    catalogue = Catalogue(n_items=len(counts), institution_names={}, features=features.astype(np.float32))
    return {"item_bias": update.astype(np.float32)}, steps, catalogue, truth


def test_server_applies_the_metadata_prior_only_under_dp():
    from fedrec.common.config import RunConfig
    from fedrec.server.app import prior_mean_update

    cfg = RunConfig()
    update, steps, catalogue, truth = _server_inputs(40.0)
    out = prior_mean_update(update, steps, catalogue, cfg)
    assert np.mean((out["item_bias"] - truth) ** 2) < 0.5 * np.mean((update["item_bias"] - truth) ** 2)
    # switched off, or no DP noise (the non-private model must equal the centralized one): unchanged
    for c, nv in ((cfg.override(**{"item-prior-mean": "zero"}), 40.0), (cfg, 0.0)):
        update, steps, catalogue, _ = _server_inputs(nv)
        assert prior_mean_update(update, steps, catalogue, c)["item_bias"] is update["item_bias"]
