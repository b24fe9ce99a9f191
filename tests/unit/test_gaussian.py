"""common/privacy/gaussian.py: clipping sensitivity, noise std per mode, generators."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.common.privacy import gaussian as g


def test_clip_rows_bounds_each_person():
    rows = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = g.clip_rows(rows, 1.0)
    assert np.allclose(np.linalg.norm(out, axis=1), [1.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        g.clip_rows(rows, 0.0)


def test_clip_per_person_sensitivity_is_the_bound():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 5, (50, 3))
    person = rng.integers(0, 10, 50)
    full = g.clip_per_person(values, person, 1.0)
    keep = person != 3  # neighbouring dataset: one person removed with all their records
    assert np.linalg.norm(full - g.clip_per_person(values[keep], person[keep], 1.0)) <= 1.0 + 1e-12


def test_noise_std_by_mode():
    assert g.noise_std(sensitivity=2.0, noise_multiplier=1.5) == 3.0
    assert g.noise_std(sensitivity=2.0, noise_multiplier=1.5, noise_mode="distributed", n_min=9) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        g.noise_std(sensitivity=1.0, noise_multiplier=1.0, noise_mode="central")


def test_distributed_noise_sums_to_sigma_squared():
    sigma, sens, n_min, d = 2.0, 0.5, 8, 40_000
    rng = np.random.default_rng(1)
    total = sum(g.gaussian_mechanism(np.zeros(d), sensitivity=sens, noise_multiplier=sigma,
                                     noise_mode="distributed", n_min=n_min, generator=rng) for _ in range(n_min))
    target = (sigma * sens) ** 2
    # sample variance of d normals: relative sd sqrt(2/d) ~ 0.7 %
    assert abs(total.var() / target - 1) < 5 * math.sqrt(2 / d)


def test_secure_generator_is_unpredictable_and_explicit_generator_reproducible():
    a = g.gaussian_noise(5, std=1.0)
    b = g.gaussian_noise(5, std=1.0)
    assert not np.array_equal(a, b)
    assert np.array_equal(g.gaussian_noise(5, std=1.0, generator=np.random.default_rng(3)),
                          g.gaussian_noise(5, std=1.0, generator=np.random.default_rng(3)))


def test_summed_noise_var_is_contributors_times_the_per_client_variance():
    from fedrec.common.privacy.gaussian import noise_std, summed_noise_var

    for mode, n_min in (("local", 1), ("distributed", 8)):
        std = noise_std(sensitivity=3.0, noise_multiplier=2.0, noise_mode=mode, n_min=n_min)
        assert summed_noise_var(sensitivity=3.0, noise_multiplier=2.0, noise_mode=mode, n_min=n_min,
                                contributors=8) == 8 * std**2
    # distributed with all n_min present: the sum carries the same variance as one local release
    assert summed_noise_var(sensitivity=3.0, noise_multiplier=2.0, noise_mode="distributed", n_min=8,
                            contributors=8) == pytest.approx(36.0)
    assert summed_noise_var(sensitivity=3.0, noise_multiplier=0.0, noise_mode="local", n_min=1, contributors=8) == 0.0
