"""The noise and the clipping that the privacy accounting assumes, measured on the real functions.

Each release of :func:`gaussian_mechanism` on a fixed value is drawn many times; the noise's
sum of squares over N draws, divided by the accounted variance, is chi-square with N degrees
of freedom (the mean is known), so the bands below are exact: a false alarm has probability
~6e-7 per check, and at N = 120,000 they admit a std off by about ±1.5 % — σ/10, or dividing
by n_min instead of √n_min, are far outside. Clipping: rows far above the bound come out with
norm at most the bound (to rounding), in the direction they had.
tests/mutation/mutants.toml breaks each of these and expects these tests to fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chi2, norm

from fedrec.common.privacy import gaussian as g

RELEASES, DIM = 4000, 30  # 120,000 noise draws per check
P_TAIL = float(norm.sf(5.0))  # "5 SE", each side


def assert_std(noise: np.ndarray, std: float, what: str) -> None:
    """The draws have mean 0 and standard deviation ``std`` (exact chi-square band)."""
    k = noise.size
    ratio = float((noise**2).sum()) / std**2
    lo, hi = chi2.ppf(P_TAIL, k), chi2.isf(P_TAIL, k)
    assert lo < ratio < hi, (f"{what}: empirical std {math.sqrt(ratio / k) * std:.4g} vs accounted {std:.4g} "
                             f"(band {math.sqrt(lo / k) * std:.4g}..{math.sqrt(hi / k) * std:.4g})")
    assert abs(noise.mean()) < 5 * std / math.sqrt(k), f"{what}: noise not centred"


def releases(value: np.ndarray, *, generator: np.random.Generator | None = None, **kw) -> np.ndarray:
    """RELEASES releases of ``value`` minus the value: the noise the mechanism added."""
    return np.stack([g.gaussian_mechanism(value, generator=generator, **kw) - value for _ in range(RELEASES)])


@pytest.mark.parametrize("sigma,sens", [(1.0, 1.0), (2.5, 0.4), (0.7, 3.0)])
def test_local_release_carries_sigma_times_sensitivity(sigma: float, sens: float) -> None:
    value = np.linspace(-5.0, 5.0, DIM)
    std = sigma * sens
    assert g.noise_std(sensitivity=sens, noise_multiplier=sigma) == pytest.approx(std, rel=1e-12)
    assert_std(releases(value, sensitivity=sens, noise_multiplier=sigma, generator=np.random.default_rng(5)),
               std, "local, explicit generator")
    # the production path: the secure generator (no generator passed)
    assert_std(releases(value, sensitivity=sens, noise_multiplier=sigma), std, "local, secure generator")


@pytest.mark.parametrize("n_min", [4, 9, 25])
def test_distributed_release_carries_sigma_sensitivity_over_root_n_min(n_min: int) -> None:
    sigma, sens = 1.5, 2.0
    value = np.full(DIM, 3.0)
    std = sigma * sens / math.sqrt(n_min)
    assert g.noise_std(sensitivity=sens, noise_multiplier=sigma, noise_mode="distributed",
                       n_min=n_min) == pytest.approx(std, rel=1e-12)
    noise = releases(value, sensitivity=sens, noise_multiplier=sigma, noise_mode="distributed", n_min=n_min,
                     generator=np.random.default_rng(n_min))
    assert_std(noise, std, f"distributed, n_min={n_min}")
    # n_min such releases sum to the accounted σ·Δ (what the ledger charged for)
    summed = noise[: RELEASES - RELEASES % n_min].reshape(-1, n_min, DIM).sum(axis=1)
    assert_std(summed, sigma * sens, f"sum of {n_min} distributed releases")


def test_summed_noise_variance_is_what_a_sum_of_releases_carries() -> None:
    """The server's public noise variance (it enters every DP standard error) matches the
    empirical variance of a sum of ``contributors`` releases, in both modes."""
    for mode, n_min, contributors in (("local", 1, 6), ("distributed", 8, 10)):
        kw = dict(sensitivity=0.8, noise_multiplier=1.2, noise_mode=mode, n_min=n_min)
        var = g.summed_noise_var(contributors=contributors, **kw)
        rng = np.random.default_rng(contributors)
        total = sum(np.stack([g.gaussian_mechanism(np.zeros(DIM), generator=rng, **kw) for _ in range(RELEASES)])
                    for _ in range(contributors))
        assert_std(total, math.sqrt(var), f"sum of {contributors} {mode} releases")


def test_clip_rows_brings_far_rows_to_the_bound_and_leaves_small_ones() -> None:
    rng = np.random.default_rng(3)
    bound = 0.75
    big = rng.normal(size=(50, 7)) * np.logspace(1, 6, 50)[:, None]  # norms ~ 10 .. 1e6 x the bound
    small = rng.normal(size=(20, 7))
    small *= (bound * rng.uniform(0.01, 0.99, 20) / np.linalg.norm(small, axis=1))[:, None]
    out = g.clip_rows(np.vstack([big, small]), bound)
    norms = np.linalg.norm(out, axis=1)
    assert np.all(norms <= bound * (1 + 1e-12))
    assert np.allclose(norms[:50], bound, rtol=1e-12)
    # clipping scales, it does not turn: same direction
    cos = (out[:50] * big).sum(axis=1) / (norms[:50] * np.linalg.norm(big, axis=1))
    assert np.allclose(cos, 1.0, rtol=1e-12)
    assert np.array_equal(out[50:], small)
    # a person with many records is clipped on their sum: one heavy person adds at most the bound
    person = np.repeat(np.arange(10), 30)
    values = rng.normal(0.0, 50.0, (300, 4))
    full = g.clip_per_person(values, person, bound)
    without = g.clip_per_person(values[person != 0], person[person != 0], bound)
    assert np.linalg.norm(full - without) == pytest.approx(bound, rel=1e-12)


def test_clipped_sum_backward_bounds_each_persons_gradient() -> None:
    """One backward gives Σ_u min(1, C/‖g_u‖) g_u, with each person's gradient (per-person
    norms from autograd here, independently) scaled to at most C."""
    import torch  # here, not at module level: the noise mutants' runs need not import torch

    from fedrec.common.privacy.person_clipping import clipped_sum_backward

    torch.manual_seed(0)
    C = 0.5
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    scales = torch.logspace(-2, 4, 12, dtype=torch.float64)  # 0.01 .. 1e4 x
    a = torch.randn(12, 6, dtype=torch.float64) * scales[:, None]
    c = torch.randn(12, 3, dtype=torch.float64) * scales[:, None]

    def losses() -> torch.Tensor:
        return (a * w).sum(dim=1) + 0.5 * ((c * b).sum(dim=1)) ** 2

    per = []
    for u in range(12):
        gw, gb = torch.autograd.grad(losses()[u], (w, b))
        per.append(torch.cat([gw, gb]))
    grads = torch.stack(per)
    norms = grads.norm(dim=1)
    assert float(norms.max()) > 100 * C and float(norms.min()) < C  # both regimes present

    clipped_sum_backward(losses(), norms, C)
    got = torch.cat([w.grad, b.grad])
    want = (grads * torch.clamp(C / norms, max=1.0)[:, None]).sum(dim=0)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    # each person alone: at most C, exactly C when above it
    for u in range(12):
        w.grad, b.grad = None, None
        mask = torch.zeros(12, dtype=torch.float64)
        mask[u] = 1.0
        clipped_sum_backward(losses() * mask, norms, C)
        gn = float(torch.cat([w.grad, b.grad]).norm())
        assert gn <= C * (1 + 1e-9)
        if float(norms[u]) > C:
            assert gn == pytest.approx(C, rel=1e-9)
