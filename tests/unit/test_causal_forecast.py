"""Know before spending (issue 29): the forecast's charged pilot and the forecast's accuracy.

The pilot is privacy code: it is tested by breaking it (tests/mutation/mutants.toml,
``forecast-pilot-*``). The forecast is tested against widths measured by the real protocol on
fresh seeds, never against itself; the stand-in without the pilot (outcome SD = range/12) is the
peer the same test shows off.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

Z95 = 1.959963984540054


def _federation(domain: str, k: int, n: int, seed: int):
    from fedrec.simulations.domains import domain_federation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        insts, truth = domain_federation(domain, institutions=k, people=n * k, seed=seed, skew=0.4)
    return insts, list(truth.item_ids)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_the_pilot_is_charged_before_its_release_and_carries_the_charged_noise(tmp_path, monkeypatch, mode):
    """Through the CLI's pilot (real policies and ledgers): when each institution's pilot is
    released its ledger already holds the charged row, GaussianEvent(σ_pilot, sqrt(3 J)); the
    release's noise (release minus the exact sums) has the charged std σ·Δ·sqrt(share) (within
    20% over the J x 6 x k coordinates); afterwards every ledger holds that one released row, and the
    pilot plus the main run's plan compose to the run's ε."""
    import fedrec.common.causal.pilot as fmod
    from fedrec.common.causal.config import plan_budget
    from fedrec.common.causal.sensitivity import pilot_bound
    from fedrec.common.privacy.accountant import GaussianEvent, epsilon_for
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.simulations.causal_cli import pilot_forecast_charged, resolve_config
    from fedrec.simulations.provision import provision_institutions

    insts, items = _federation("health", 3, 300, 9801)
    names = [d.name for d in insts]
    policy_dir = provision_institutions(names, tmp_path, epsilon=1.0, delta=1e-5)
    cfg, _ = resolve_config(insts, epsilon=1.0, overrides={"noise_mode": mode})
    cfg = cfg.resolved(3)
    real = fmod.pilot_release
    seen: list[tuple[str, float, np.ndarray]] = []

    def spy(data, its, *, event, noise_share=1.0, generator=None):
        rows = PrivacyLedger(tmp_path / "ledgers" / f"{data.name}.db").rows()
        assert len(rows) == 1 and rows[0].status == "charged" and rows[0].task == "causal-pilot", \
            f"{data.name}: the pilot is released without its charge"
        assert event == rows[0].event
        out = real(data, its, event=event, noise_share=noise_share, generator=generator)
        seen.append((data.name, event.noise_multiplier * event.sensitivity * math.sqrt(noise_share),
                     (out - real(data, its, event=None)).ravel()))
        return out

    monkeypatch.setattr(fmod, "pilot_release", spy)
    fc, plan = pilot_forecast_charged(insts, cfg, items, policy_dir, seed=1)
    assert [s[0] for s in seen] == names
    charged_std = seen[0][1]
    assert charged_std == pytest.approx(plan.noise_multiplier * pilot_bound(len(items))
                                        * math.sqrt(1.0 if mode == "local" else 1 / 3))
    residual = np.concatenate([s[2] for s in seen])
    assert float(np.std(residual)) == pytest.approx(charged_std, rel=0.2)
    for name in names:
        rows = PrivacyLedger(tmp_path / "ledgers" / f"{name}.db").rows()
        assert [(r.task, r.status) for r in rows] == [("causal-pilot", "released")]
        assert rows[0].event == GaussianEvent(noise_multiplier=plan.noise_multiplier, sensitivity=math.sqrt(3 * len(items)))
    from dataclasses import replace

    main = plan_budget(replace(cfg, epsilon=plan.main_epsilon))
    events = [rows[0].event] + [GaussianEvent(noise_multiplier=s) for s in main.sigma.values()]
    assert epsilon_for(events, delta=cfg.delta) <= 1.0 * 1.003
    assert plan.main_epsilon < 1.0 and set(fc.half_width) == set(items)


def test_the_pilot_bound_covers_a_person_at_the_outcome_bounds_in_every_item():
    """A person at the declared outcome bound in every item, treated: their pilot rows' joint
    norm reaches sqrt(3 J), the bound the release is charged with (a smaller bound would
    under-noise: mutant ``forecast-pilot-bound-too-small``)."""
    from fedrec.common.causal.pilot import pilot_terms
    from fedrec.common.causal.sensitivity import pilot_bound

    insts, items = _federation("health", 2, 60, 9802)
    d = insts[0]
    inter = d.interactions.copy()
    pid = inter["person_id"].iloc[0]
    mine = inter["person_id"] == pid
    inter.loc[mine, "outcome"] = d.study.outcome_bounds[1]
    inter.loc[mine, "exposed"] = 1
    from dataclasses import replace

    d2 = replace(d, interactions=inter)
    its = sorted(inter.loc[mine, "item_id"].astype(str))
    terms = pilot_terms(d2, its)
    rows = [terms[it][np.flatnonzero(inter.loc[inter["item_id"].astype(str) == it, "person_id"].to_numpy() == pid)[0]]
            for it in its]
    joint = float(np.linalg.norm(np.concatenate(rows)))
    assert joint == pytest.approx(pilot_bound(len(its)))
    assert joint <= pilot_bound(len(its)) * (1 + 1e-12)


def test_a_pilot_release_over_its_charged_sensitivity_is_refused():
    from fedrec.common.causal.pilot import pilot_release
    from fedrec.common.privacy.accountant import GaussianEvent

    insts, items = _federation("health", 2, 60, 9803)
    with pytest.raises(ValueError, match="exceeds the charged"):
        pilot_release(insts[0], items, event=GaussianEvent(noise_multiplier=5.0, sensitivity=math.sqrt(3.0)))


def test_the_pilot_forecast_is_within_25_percent_of_the_measured_width_where_the_spread_guess_is_not():
    """education, 4 x 1,000, ε = ∞ (sampling decides the width), two fresh seeds: per item, the pilot
    forecast against the measured 95% half-width (medians over the seeds) is within 25% on every
    item (measured 0.98x-1.24x: the stand-in's outcome has no part its covariates explain, so it
    runs high); the stand-in without the pilot (outcome SD = 1/12 of the declared ±200 points, the
    real one ~25) is more than 25% off on every item (1.40x-1.63x)."""
    from fedrec.simulations.forecast import declared_people_per_item, forecast_half_widths, pilot_forecast
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config

    meas, fcs = [], []
    for seed in (9811, 9812):
        insts, items = _federation("education", 4, 1000, seed)
        cfg, _ = resolve_config(insts, epsilon=math.inf)
        fc, _plan = pilot_forecast(insts, cfg.resolved(4), items, rng=np.random.default_rng(seed))
        res = estimate_inprocess(insts, cfg, rng=np.random.default_rng(seed))
        meas.append([Z95 * res.items[it]["se"] for it in items])
        fcs.append([fc.half_width[it] for it in items])
    measured = np.median(meas, axis=0)
    ratio = np.median(fcs, axis=0) / measured
    assert np.all((ratio > 0.75) & (ratio < 1.25)), ratio
    old = forecast_half_widths(insts[0].study, cfg.resolved(4), items, declared_people_per_item(insts, items))
    old_ratio = np.array([old.half_width[it] for it in items]) / measured
    assert np.all(old_ratio > 1.25), old_ratio


def _noisy_pilots(domain: str, k: int, n: int, eps: float, mode: str, seed: int, draws: int):
    """The federation, each item's true per-arm outcome SD (numpy, from the data), and ``draws``
    pilot shape sets, each from the federation's pilot noised as the plan charges it."""
    from fedrec.common.causal import pilot as P
    from fedrec.common.causal.sensitivity import pilot_bound
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.release import noise_share
    from fedrec.simulations.causal_cli import resolve_config
    from fedrec.simulations.forecast import pilot_shapes

    insts, items = _federation(domain, k, n, seed)
    truth = {}
    for it in items:
        rows = [d.interactions[d.interactions["item_id"].astype(str) == it] for d in insts]
        y = np.concatenate([r["outcome"].to_numpy(float) for r in rows])
        t = np.concatenate([r["exposed"].to_numpy(int) for r in rows])
        truth[it] = (float(np.std(y[t == 0])), float(np.std(y[t == 1])))
    cfg, _ = resolve_config(insts, epsilon=eps, overrides={"noise_mode": mode})
    cfg = cfg.resolved(k)
    plan = P.pilot_plan(cfg)
    event = GaussianEvent(noise_multiplier=plan.noise_multiplier, sensitivity=pilot_bound(len(items)))
    share = noise_share(mode, k)
    tau = P.pilot_noise_std(plan, len(items), k, mode, k)
    exact = [P.pilot_release(d, items, event=None) for d in insts]
    rng = np.random.default_rng(seed)
    shapes = []
    for _ in range(draws):  # the noise alone, as pilot_release draws it (its std is tested above)
        total = sum(e + rng.normal(0.0, event.noise_multiplier * event.sensitivity * math.sqrt(share), e.shape)
                    for e in exact)
        shapes.append(pilot_shapes(total, items, insts[0].study.outcome_bounds, noise_std=tau))
    return insts, items, truth, shapes


def test_the_pilot_sd_of_an_outcome_spreading_far_less_than_its_range_follows_the_data_not_the_default():
    """finance, 8 x 2,500, distributed ε = 4: the outcome's SD (~5,600 USD) is 3% of its declared
    ±100,000 range, and one arm's pilot variance is as noisy as the variance itself, so each arm
    used to keep the default SD (range/12 = 16,667 USD, 3x the real one; forecast 2.7-4.0x the
    measured width). Pooled over the items and arms the pilot resolves it (the pooled variance's
    noise std is ~28% of it: 88% of draws within 25% in 200 draws): over 40 pilot noise draws the
    median arm's SD is within 25% of the data's own (numpy) in at least 75% of the draws, and no
    arm's is ever off by 2x (the default is 3x)."""
    from fedrec.simulations.forecast import SPREAD

    insts, items, truth, shapes = _noisy_pilots("finance", 8, 2500, 4.0, "distributed", 9821, 40)
    ratios = np.array([[sh[it].sd[a] / truth[it][a] for it in items for a in (0, 1)] for sh in shapes])
    assert SPREAD * 200000.0 / np.median(list(truth.values())) > 2.5  # the default is far off here
    assert np.mean(np.abs(np.median(ratios, axis=1) - 1.0) <= 0.25) >= 0.75, np.round(np.median(ratios, axis=1), 2)
    assert 0.5 <= ratios.min() and ratios.max() <= 2.0, (ratios.min(), ratios.max())


def test_no_arm_sd_is_chosen_because_its_own_noise_inflated_it():
    """education, 8 x 2,500, local ε = 1 (the regression issue 29 saw: forecast 1.13-2.14x the
    measured width where the stand-in without the pilot gave 0.89-1.49x): one arm's pilot variance
    carries noise twice the variance itself, so taking it only where it looks resolved keeps it only
    where the noise inflated it (arms at 50-72 points against the data's ~24; mutant
    ``forecast-pilot-sd-winners-curse``). Over 20 pilot noise draws no arm's SD exceeds 1.6x the
    data's own (numpy), and the median arm is within 25% of it."""
    insts, items, truth, shapes = _noisy_pilots("education", 8, 2500, 1.0, "local", 9822, 20)
    ratios = np.array([[sh[it].sd[a] / truth[it][a] for it in items for a in (0, 1)] for sh in shapes])
    assert ratios.max() <= 1.6, np.round(ratios.max(axis=1), 2)
    assert abs(float(np.median(ratios)) - 1.0) <= 0.25, float(np.median(ratios))


def test_an_unresolved_pilot_sd_is_an_upper_bound_never_above_the_default():
    """Synthetic pilot sums (numpy draws, 8 items x 2 arms of 200 people, outcome SD 2% of its
    range): where the pilot's noise exceeds even the pooled variance, each arm's SD is at least the
    data's pooled within-arm SD in >= 75% of 400 noise draws (an upper bound at about one noise std)
    and never above the default (SPREAD x range); without noise each arm's SD is its own (numpy std)."""
    from fedrec.simulations.forecast import SPREAD, pilot_shapes

    rng = np.random.default_rng(9823)
    items = [f"i{j}" for j in range(8)]
    lo, hi = -50.0, 50.0
    ys = [[rng.normal(rng.uniform(-10, 10), 2.0, 200) for _ in (0, 1)] for _ in items]
    scaled = [[y / 50.0 for y in arms] for arms in ys]
    sums = np.array([[len(a[0]), len(a[1]), a[0].sum(), a[1].sum(), (a[0] ** 2).sum(), (a[1] ** 2).sum()]
                     for a in scaled])
    exact = pilot_shapes(sums, items, (lo, hi))
    for j, it in enumerate(items):
        assert exact[it].sd == pytest.approx((float(np.std(ys[j][0])), float(np.std(ys[j][1]))), rel=1e-9)
    pooled_sd = math.sqrt(sum(float(((y - y.mean()) ** 2).sum()) for arms in ys for y in arms) / (16 * 200))
    # tau 4: per-arm noise/n = 0.02 against a scaled variance of 0.0016, pooled noise 0.005 (the bound
    # is below the default); tau 40: pooled noise 0.05, the bound is above the default (capped)
    for tau in (4.0, 40.0):
        above = []
        for _ in range(400):
            sh = pilot_shapes(sums + rng.normal(0.0, tau, sums.shape), items, (lo, hi), noise_std=tau)
            sds = np.array([sh[it].sd for it in items])
            assert sds.max() <= SPREAD * (hi - lo) * (1 + 1e-12), (tau, sds.max())
            above.append(float(sds.min()) >= pooled_sd)
        assert np.mean(above) >= 0.75, (tau, np.mean(above))
