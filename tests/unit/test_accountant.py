"""Known answers for the accountant, and composition across rounds (no reset, no drift)."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.rdp import RDPAccountant as _RDP
from scipy.stats import norm

from fedrec.common.privacy.accountant import (
    DPSGDEvent,
    GaussianEvent,
    NonPrivateEvent,
    calibrate_noise_multiplier,
    epsilon_for,
    epsilon_pair,
    gaussian_epsilon,
    merged_history,
    opacus_history,
)
from fedrec.common.privacy.ledger import PrivacyLedger

DELTA = 1e-5


def test_rdp_known_answer_dpsgd():
    # the classic DP-SGD setting: σ 1.5, q 0.04, 2250 steps, δ 1e-5 -> ε ≈ 7.33 by RDP
    ev = DPSGDEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    assert epsilon_for([ev], delta=DELTA, accountant="rdp") == pytest.approx(7.33, abs=0.01)
    # PRV is tighter, RDP an upper bound
    eps_prv, eps_rdp = epsilon_pair([ev], delta=DELTA)
    assert 6.0 < eps_prv < eps_rdp


def _rdp_closed_form_gaussian(sigma: float, count: int, delta: float) -> float:
    """Un-subsampled Gaussian: RDP(α) = count·α/(2σ²), converted with the conversion Opacus
    uses (Balle et al. 2020), minimised over Opacus' default orders."""
    alphas = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    best = math.inf
    for a in alphas:
        rdp = count * a / (2 * sigma**2)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


@pytest.mark.parametrize("sigma,count", [(1.0, 1), (2.0, 10), (5.0, 3)])
def test_rdp_known_answer_gaussian_closed_form(sigma, count):
    ev = GaussianEvent(noise_multiplier=sigma, count=count)
    assert epsilon_for([ev], delta=DELTA, accountant="rdp") == pytest.approx(
        _rdp_closed_form_gaussian(sigma, count, DELTA), rel=1e-6
    )


@pytest.mark.parametrize("sigma,count", [(1.0, 1), (2.0, 10), (0.8, 4)])
def test_prv_matches_exact_gaussian(sigma, count):
    exact = gaussian_epsilon(noise_multiplier=sigma, count=count, delta=DELTA)
    # the exact curve: δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) at the returned ε
    mu = math.sqrt(count) / sigma
    assert norm.cdf(-exact / mu + mu / 2) - math.exp(exact) * norm.cdf(-exact / mu - mu / 2) == pytest.approx(
        DELTA, rel=1e-6
    )
    prv = epsilon_for([GaussianEvent(noise_multiplier=sigma, count=count)], delta=DELTA, accountant="prv")
    assert exact - 1e-9 <= prv <= exact + 0.05  # PRV returns its upper estimate
    assert epsilon_for([GaussianEvent(noise_multiplier=sigma, count=count)], delta=DELTA, accountant="rdp") > exact


def test_gaussian_composition_closed_form():
    # k releases at σ compose to one release at σ/√k (μ-GDP adds in quadrature)
    assert gaussian_epsilon(noise_multiplier=3.0, count=9, delta=DELTA) == pytest.approx(
        gaussian_epsilon(noise_multiplier=1.0, count=1, delta=DELTA), rel=1e-9
    )
    assert gaussian_epsilon(noise_multiplier=1e-3, delta=DELTA) > 100  # no overflow for tiny σ


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_rounds_compose_like_one_run(accountant, tmp_path):
    """R per-round events == one accountant over all R·s steps; ±1 event is visible."""
    sigma, q, steps, rounds = 1.1, 0.05, 3, 20
    per_round = DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
    whole = epsilon_for([DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=rounds * steps)],
                        delta=DELTA, accountant=accountant)
    assert epsilon_for([per_round] * rounds, delta=DELTA, accountant=accountant) == pytest.approx(whole, rel=1e-9)
    # ... and equals Opacus' own stateful accountant stepped once per DP-SGD step
    if accountant == "rdp":
        acc = RDPAccountant()
        for _ in range(rounds * steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert acc.get_epsilon(delta=DELTA) == pytest.approx(whole, rel=1e-9)
    # through the ledger: one row per round, no reset between rounds
    ledger = PrivacyLedger.initialize(tmp_path / "inst.db", institution="inst", epsilon_cap=100.0, delta_cap=DELTA)
    for r in range(1, rounds + 1):
        ledger.mark_released(ledger.charge(per_round, run_id="r", round=r, task="train", model="mf",
                                           accountant=accountant))
    assert ledger.spent(accountant=accountant) == pytest.approx(whole, rel=1e-9)
    double = epsilon_for([per_round] * (rounds + 1), delta=DELTA, accountant=accountant)
    dropped = epsilon_for([per_round] * (rounds - 1), delta=DELTA, accountant=accountant)
    assert double - whole > 0.02 and whole - dropped > 0.02


def test_merged_history_is_the_same_mechanism():
    a = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=4)
    b = GaussianEvent(noise_multiplier=2.0, count=2)
    hist = merged_history([a, b, a, a])
    assert hist == ((1.0, 0.1, 12), (2.0, 1.0, 2))
    acc = _RDP()
    acc.history = [(1.0, 0.1, 4), (2.0, 1.0, 2), (1.0, 0.1, 4), (1.0, 0.1, 4)]
    assert epsilon_for([a, b, a, a], delta=DELTA, accountant="rdp") == pytest.approx(acc.get_epsilon(delta=DELTA))
    # more events never lower ε
    assert epsilon_for([a, b, a, a, b], delta=DELTA) > epsilon_for([a, b, a, a], delta=DELTA)
    assert epsilon_for([], delta=DELTA) == 0.0


def test_calibration_round_trip():
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.02, steps=500)
    eps = epsilon_for([DPSGDEvent(noise_multiplier=sigma, sample_rate=0.02, steps=500)], delta=DELTA)
    assert 2.95 <= eps <= 3.0 + 1e-9


def test_refuses_what_cannot_be_accounted():
    with pytest.raises(TypeError):
        epsilon_for([("not", "an", "event")], delta=DELTA)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        epsilon_for([GaussianEvent(noise_multiplier=1.0)], delta=DELTA, accountant="moments")
    with pytest.raises(ValueError):
        DPSGDEvent(noise_multiplier=0.0, sample_rate=0.1, steps=1)


def test_non_private_event_is_infinite_never_zero():
    """ε = ∞ for any composition holding a non-private release, with either accountant."""
    dp = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=4)
    for events in ([NonPrivateEvent()], [dp, NonPrivateEvent(count=3)], [NonPrivateEvent(), dp]):
        assert epsilon_pair(events, delta=DELTA) == (math.inf, math.inf)
    assert epsilon_for([dp], delta=DELTA) < math.inf
    with pytest.raises(TypeError):  # it never slips into an Opacus history as a noisy mechanism
        opacus_history([NonPrivateEvent()])
    with pytest.raises(ValueError):
        NonPrivateEvent(count=0)


def test_gaussian_only_histories_compose_in_closed_form_as_opacus_does():
    """A history of un-subsampled Gaussian releases is one Gaussian mechanism (1/σ² adds): ε by
    closed form lies within eps_error below Opacus PRV's upper estimate and equals Opacus RDP; a
    wrong composition rule (σ's added, the largest σ, a count dropped) falls outside."""
    import random

    from fedrec.common.privacy import accountant as acc_mod

    assert list(acc_mod.RDP_ORDERS) == list(_RDP.DEFAULT_ALPHAS)
    rng = random.Random(7)
    for _ in range(6):
        events = [GaussianEvent(noise_multiplier=rng.uniform(0.7, 12.0), count=rng.randint(1, 3))
                  for _ in range(rng.randint(1, 8))]
        hist = merged_history(events)
        assert acc_mod.gaussian_composition_sigma(hist) is not None
        exact = epsilon_for(events, delta=DELTA)
        # Opacus' PRV on the same history: its upper estimate, within eps_error (0.01) of the truth
        upper = acc_mod.opacus_epsilon(hist, DELTA, "prv")
        assert upper - 0.02 <= exact <= upper + 1e-9, (hist, exact, upper)
        ref = _RDP()
        ref.history = list(hist)
        assert epsilon_for(events, delta=DELTA, accountant="rdp") == pytest.approx(ref.get_epsilon(delta=DELTA),
                                                                                 rel=1e-12)
        # the composition rule itself: the exact ε of the quadrature σ, by the scipy-checked curve
        sigma = 1.0 / math.sqrt(sum(ev.count / ev.noise_multiplier**2 for ev in events))
        assert exact == pytest.approx(gaussian_epsilon(noise_multiplier=sigma, delta=DELTA), rel=1e-12)
        if len(events) > 1:
            assert exact > max(gaussian_epsilon(noise_multiplier=ev.noise_multiplier, count=ev.count, delta=DELTA)
                               for ev in events) + 1e-6
    # any subsampled entry: Opacus, exactly as before
    mixed = [GaussianEvent(noise_multiplier=2.0), DPSGDEvent(noise_multiplier=1.1, sample_rate=0.05, steps=30)]
    assert acc_mod.gaussian_composition_sigma(merged_history(mixed)) is None
    assert epsilon_for(mixed, delta=DELTA) == acc_mod.opacus_epsilon(merged_history(mixed), DELTA, "prv")


def test_gaussian_epsilon_lower_tail_is_stable_without_scipy():
    """The stdlib normal CDF/log-CDF used by gaussian_epsilon against scipy's, far into the tail."""
    from scipy.special import log_ndtr, ndtr

    from fedrec.common.privacy import accountant as acc_mod

    for x in (-200.0, -60.0, -38.5, -30.0001, -29.9, -5.0, 0.0, 3.0, 12.0):
        assert acc_mod._log_ndtr(x) == pytest.approx(float(log_ndtr(x)), rel=1e-10, abs=1e-15)
        assert acc_mod._ndtr(x) == pytest.approx(float(ndtr(x)), rel=1e-10, abs=1e-300)
    for sigma in (0.02, 0.3, 40.0):
        eps = gaussian_epsilon(noise_multiplier=sigma, delta=DELTA)
        mu = 1.0 / sigma
        d = norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))
        assert d == pytest.approx(DELTA, rel=1e-6) or eps == 0.0
