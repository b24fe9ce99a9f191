"""Strategy evaluation (common/causal/ope.py, client/ope_statistics.py): the estimators against
the Open Bandit Pipeline's published formulas written out here in plain numpy, the SEs against
the per-person terms' variance and the DP noise's, and the release's privacy bound.

OBP (Saito et al., 2021; obp/ope/estimators.py) cannot be installed here (Python < 3.11). Its
formulas for a logged bandit round (context x, logged action a with propensity π_b(a|x), reward
r, evaluation policy π_e, reward model q̂): w = π_e(a|x)/π_b(a|x);
IPS = mean(w r); DM = mean(Σ_a π_e(a|x) q̂(x, a)); DR = DM + mean(w (r − q̂(x, a)));
SwitchDR = DM + mean(w 1{w ≤ τ} (r − q̂(x, a))). Each (person, item) row is a round with the
binary action "exposed"; a strategy's value is the contrast of the row policy π_p = [1 − p, p]
against π_0 = [1, 0] (never expose), summed over the person's rows and averaged over persons.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.common.causal.ope import (COMPONENTS, ESTIMATORS, OPEConfig, component_bounds, evaluate_sums,
                                      normalized_release_rows, person_components, release_bound, terms_of)
from fedrec.common.privacy.accountant import GaussianEvent
from fedrec.common.privacy.release import gaussian_release

CLIP_OFF = 1e6  # a weight clip that never binds: the estimators are OBP's exactly
SQ_OFF = 1e4  # a square clip that never binds


def _world(seed: int = 0, n: int = 400, m: int = 3):
    """n persons with m rows each: propensity, exposure, outcome and outcome models in range."""
    rng = np.random.default_rng(seed)
    person = np.repeat(np.arange(n), m)
    e = rng.uniform(0.1, 0.9, n * m)
    t = (rng.random(n * m) < e).astype(float)
    y = np.repeat(rng.uniform(-0.8, 0.8, n), m)
    m1 = np.clip(y + rng.normal(0, 0.2, n * m), -1, 1)
    m0 = np.clip(y - 0.1 + rng.normal(0, 0.2, n * m), -1, 1)
    return person, n, t, y, e, m1, m0, rng


def _top1(person, n, rng):
    """A deterministic strategy: one random row per person gets p = 1."""
    p = np.zeros(len(person))
    for i in range(n):
        rows = np.flatnonzero(person == i)
        p[rng.choice(rows)] = 1.0
    return p


def obp_reference(person, n, t, y, e, m1, m0, p, tau=np.inf) -> dict[str, float]:
    """OBP's formulas per row (binary action), contrast π_p − π_0, summed per person, averaged."""
    a = t.astype(int)
    pscore = np.where(a == 1, e, 1 - e)
    pi_p = np.column_stack([1 - p, p])
    pi_0 = np.column_stack([np.ones_like(p), np.zeros_like(p)])
    q = np.column_stack([m0, m1])
    q_a = np.where(a == 1, m1, m0)
    out = {}
    for name in ("ips", "dm", "dr", "switch-dr"):
        vals = []
        for pi in (pi_p, pi_0):
            w = pi[np.arange(len(a)), a] / pscore
            dm = (pi * q).sum(axis=1)
            if name == "ips":
                vals.append(w * y)
            elif name == "dm":
                vals.append(dm)
            elif name == "dr":
                vals.append(dm + w * (y - q_a))
            else:
                vals.append(dm + w * (w <= tau) * (y - q_a))
        out[name] = float(np.bincount(person, weights=vals[0] - vals[1], minlength=n).sum() / n)
    # SNIPS (Hájek): P̄ (Σ p T y/e / Σ p T/e − Σ p (1−T) y/(1−e) / Σ p (1−T)/(1−e))
    w1, w0 = p * t / e, p * (1 - t) / (1 - e)
    out["snips"] = float(p.sum() / n * ((w1 * y).sum() / w1.sum() - (w0 * y).sum() / w0.sum()))
    return out


def _release(components, bounds, *, square_clip=SQ_OFF, k=0.5):
    rows = normalized_release_rows(components, bounds, square_clip=square_clip, second_moment_weight=k)
    return rows, rows.sum(axis=0)


@pytest.mark.parametrize("kind", ["top1", "random"])
def test_estimators_match_the_open_bandit_pipeline_formulas(kind):
    person, n, t, y, e, m1, m0, rng = _world()
    p = _top1(person, n, rng) if kind == "top1" else np.full(len(person), 1 / 3)
    tau = 4.0
    comp = person_components(person, n, t, y, e, m1, m0, p, clip=CLIP_OFF, switch_tau=tau)
    bounds = [component_bounds(CLIP_OFF, 1.0)]
    _, total = _release([comp], bounds)
    res = evaluate_sums(total, ["s"], bounds, noise_var=0.0, scale=1.0, square_clip=SQ_OFF)
    ref = obp_reference(person, n, t, y, e, m1, m0, p, tau=tau if kind == "top1" else np.inf)
    for est in ESTIMATORS:
        if kind == "random" and est == "switch-dr":
            continue  # stochastic p: our switch is on the contrast weight (module doc), not OBP's
        assert res.estimate("s", est).value == pytest.approx(ref[est], rel=1e-9, abs=1e-12), est
    # switch-DR with a threshold below every weight is DM, above every weight DR
    lo = person_components(person, n, t, y, e, m1, m0, p, clip=CLIP_OFF, switch_tau=1e-9)
    assert terms_of(lo)["switch-dr"] == pytest.approx(terms_of(lo)["dm"])


def test_the_sampling_se_is_the_per_person_terms_variance_and_differences_carry_the_covariance():
    person, n, t, y, e, m1, m0, rng = _world(1)
    pa, pb = _top1(person, n, rng), _top1(person, n, rng)
    comps = [person_components(person, n, t, y, e, m1, m0, p, clip=CLIP_OFF, switch_tau=5.0) for p in (pa, pb)]
    bounds = [component_bounds(CLIP_OFF, 1.0)] * 2
    _, total = _release(comps, bounds)
    res = evaluate_sums(total, ["a", "b"], bounds, noise_var=0.0, scale=2.5, square_clip=SQ_OFF)
    ta, tb = terms_of(comps[0]), terms_of(comps[1])
    for est in ("ips", "dm", "dr", "switch-dr"):
        assert res.estimate("a", est).se == pytest.approx(2.5 * math.sqrt(np.var(ta[est]) / n), rel=1e-6)
    d = ta["dr"] - tb["dr"]
    diff = res.difference("a", "b")
    assert diff.value == pytest.approx(2.5 * d.mean(), rel=1e-9)
    assert diff.se == pytest.approx(2.5 * math.sqrt(np.var(d) / n), rel=1e-6)
    # the paired SE is below the unpaired one (the strategies share people and rows)
    unpaired = math.hypot(res.estimate("a").se, res.estimate("b").se)
    assert diff.se < unpaired
    assert res.difference("b", "a").value == pytest.approx(-diff.value)


def test_an_in_sample_strategy_has_a_value_and_an_se_but_no_ci_nor_do_its_differences():
    """The in-sample benefit ranking (models fitted on the evaluated people) is optimistic: its
    value ± z·SE covered the A/B truth in 0.76-0.88 of simulated runs at ε = ∞. It is reported
    without a CI (NaN, None in JSON, with the reason), and so is every difference involving it;
    the other strategies' estimates are unchanged."""
    from fedrec.common.causal.ope import IN_SAMPLE_NOTE, in_sample_strategies

    person, n, t, y, e, m1, m0, rng = _world(1)
    pa, pb = _top1(person, n, rng), _top1(person, n, rng)
    comps = [person_components(person, n, t, y, e, m1, m0, p, clip=CLIP_OFF, switch_tau=5.0) for p in (pa, pb)]
    bounds = [component_bounds(CLIP_OFF, 1.0)] * 2
    _, total = _release(comps, bounds)
    specs = [{"name": "a", "kind": "rank", "in_sample": True}, {"name": "b", "kind": "random"}]
    assert in_sample_strategies(specs) == {"a"}
    plain = evaluate_sums(total, ["a", "b"], bounds, noise_var=0.0, scale=2.5, square_clip=SQ_OFF)
    res = evaluate_sums(total, ["a", "b"], bounds, noise_var=0.0, scale=2.5, square_clip=SQ_OFF,
                        in_sample=in_sample_strategies(specs))
    z = 1.959963984540054
    for est in ("ips", "dr"):
        a, b = res.estimate("a", est), res.estimate("b", est)
        assert a.in_sample and all(math.isnan(v) for v in a.ci)
        assert (a.value, a.se) == (plain.estimate("a", est).value, plain.estimate("a", est).se)
        assert a.naive_ci == pytest.approx((a.value - z * a.se, a.value + z * a.se), rel=1e-12)
        assert not b.in_sample and b.ci == plain.estimate("b", est).ci
        j = a.to_json()
        assert j["ci_low"] is None and j["ci_high"] is None and j["in_sample"] and j["note"] == IN_SAMPLE_NOTE
        assert b.to_json()["ci_low"] == pytest.approx(b.ci[0]) and "in_sample" not in b.to_json()
    for diff in (res.difference("a", "b"), res.difference("b", "a")):
        assert diff.in_sample and all(math.isnan(v) for v in diff.ci)
    with pytest.raises(ValueError, match="in_sample 'c'"):
        evaluate_sums(total, ["a", "b"], bounds, noise_var=0.0, scale=2.5, square_clip=SQ_OFF, in_sample=["c"])


def test_the_ci_carries_the_dp_noise_its_sd_matches_repeated_releases():
    person, n, t, y, e, m1, m0, rng = _world(2, n=300)
    p = _top1(person, n, rng)
    clip = 12.0
    comp = person_components(person, n, t, y, e, m1, m0, p, clip=clip, switch_tau=5.0)
    bounds = [component_bounds(clip, 1.0)]
    rows, total = _release([comp], bounds, square_clip=3.0)
    sens = release_bound(1, 0.5)
    event = GaussianEvent(noise_multiplier=0.8, sensitivity=sens)
    nv = (0.8 * sens) ** 2
    gen = np.random.default_rng(5)
    draws = {est: [] for est in ("ips", "dr", "snips")}
    noise_se = {}
    for _ in range(600):
        noisy = gaussian_release(total, event=event, noise_share=1.0, generator=gen)
        res = evaluate_sums(noisy, ["s"], bounds, noise_var=nv, scale=1.0, square_clip=3.0)
        for est in draws:
            r = res.estimate("s", est)
            draws[est].append(r.value)
            noise_se.setdefault(est, r.noise_se)
    for est, vals in draws.items():
        assert np.std(vals) == pytest.approx(noise_se[est], rel=0.12), est


def test_a_worst_case_person_stays_within_every_component_bound_and_the_release_bound():
    # one person on every item, propensities at the trim edge, outcomes and models at opposite ends
    m, clip = 8, 6.0
    person = np.zeros(2 * m, dtype=np.int64)
    person[m:] = 1
    t = np.tile([1.0, 0.0], m)
    e = np.where(t > 0, 0.05, 0.95)  # weight 1/e_T = 20 on every row
    y = np.ones(2 * m)
    m1 = -np.ones(2 * m)
    m0 = np.ones(2 * m) * -1.0
    for p, pmax in ((np.ones(2 * m), float(m)), (np.r_[1.0, np.zeros(m - 1), 1.0, np.zeros(m - 1)], 1.0)):
        comp = person_components(person, 2, t, -y * (t == 0) + y * (t > 0), e, m1, m0, p, clip=clip, switch_tau=100.0)
        bnd = component_bounds(clip, pmax)
        assert np.all(np.abs(comp) <= bnd * (1 + 1e-12)), dict(zip(COMPONENTS, np.abs(comp).max(axis=0)))
        rows = normalized_release_rows([comp, comp], [bnd, bnd], square_clip=0.1, second_moment_weight=1.0)
        assert np.linalg.norm(rows, axis=1).max() <= release_bound(2, 1.0) * (1 + 1e-12)
    # the bound is tight: all-ones normalized rows reach it
    d = 1 + 8 * 2
    q = rows.shape[1] - d
    assert release_bound(2, 1.0) == pytest.approx(math.sqrt(d + q))


def test_a_smaller_weight_clip_means_less_noise_for_the_same_epsilon():
    bounds_small, bounds_big = component_bounds(5.0, 1.0), component_bounds(20.0, 1.0)
    assert np.all(bounds_small <= bounds_big) and bounds_small[6] * 4 == bounds_big[6]


@pytest.mark.parametrize(("kwargs", "expect"), [
    ({"clip": 0.0}, "weight clip"),
    ({"clip": math.inf}, "weight clip"),
    ({"switch_tau": -1.0}, "threshold"),
    ({"noise_mode": "central"}, "noise mode"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"square_clip": 0.0}, "square clip"),
])
def test_bad_configuration_is_one_clear_line(kwargs, expect):
    with pytest.raises(ValueError, match=expect):
        OPEConfig(**kwargs)


def test_a_strategy_request_key_the_client_would_not_read_is_refused():
    """OPEConfig.from_flat reads the release request's four keys; any other ``strategies.*``
    key in a strategy message is refused (not ignored), and the estimator choice parses
    ``dr`` / ``all`` / a comma list with one line naming the key for a bad one."""
    from fedrec.common.causal.ope import parse_estimators

    req = {"strategies.epsilon": -1.0, "strategies.delta": 1e-6, "strategies.noise-mode": "distributed",
           "strategies.n-min": 3, "strategies": "[]", "clip": 8.0}  # non-prefixed keys are the release's own
    cfg = OPEConfig.from_flat(req)
    assert (cfg.epsilon, cfg.delta, cfg.noise_mode, cfg.n_min) == (math.inf, 1e-6, "distributed", 3)
    with pytest.raises(ValueError, match=r"unknown strategy release key\(s\) \['strategies.clip'\]"):
        OPEConfig.from_flat({**req, "strategies.clip": 4.0})
    assert parse_estimators("dr") == ("dr",) and parse_estimators("all") == ESTIMATORS
    assert parse_estimators(" ips, dr ") == ("ips", "dr")
    for bad, why in (("dr,ipz", r"unknown estimator\(s\) \['ipz'\]"), ("", "no estimator"), ("dr,dr", "an estimator repeated")):
        with pytest.raises(ValueError, match=f"^k {bad!r}: {why}; fix: dr"):
            parse_estimators(bad, key="k")


def test_client_contribution_from_public_nuisances_and_strategies():
    """client/ope_statistics.py on a small simulated federation: top-1 strategies expose one
    considered item each, random sums to 1, the logged propensity replaces the model."""
    from fedrec.client.ope_statistics import check_strategies, exposure_probabilities, ope_contribution, strategy_rows
    from fedrec.client.statistics import design_columns
    from fedrec.simulations.domains import domain_federation

    insts, truth = domain_federation("education", institutions=1, people=300, seed=4, skew=0.0)
    d = insts[0]
    cols = [c[0] for c in design_columns(d)]
    items = sorted(d.items["item_id"].astype(str))
    p = len(cols) + 1
    arrays = {}
    for it in items:
        arrays[f"beta/{it}"] = np.zeros(p)
        arrays[f"mu1/{it}"] = np.zeros(p)
        arrays[f"mu0/{it}"] = np.zeros(p)
    coef = {it: {c: float(j == 0) * (k + 1) for j, c in enumerate(["intercept", *cols])} for k, it in enumerate(items)}
    specs = [{"name": "rank", "kind": "rank", "coef": coef, "better": "higher"}, {"name": "random", "kind": "random"},
             {"name": "logging", "kind": "logging"}]
    check_strategies(specs, items, cols)
    rows = strategy_rows(d, items, arrays)
    assert np.allclose(rows["e"], 0.5)  # zero logistic coefficients, no logged propensity
    top = exposure_probabilities(specs[0], rows, items, cols)
    assert np.all(np.bincount(rows["person"], weights=top) == 1)
    # the intercepts rank the last item of each person's considered ones first
    best = rows["item"][top == 1]
    last = np.array([rows["item"][rows["person"] == i].max() for i in np.unique(rows["person"])])
    assert np.array_equal(np.sort(best), np.sort(last))
    rnd = exposure_probabilities(specs[1], rows, items, cols)
    assert np.allclose(np.bincount(rows["person"], weights=rnd), 1.0)
    c = ope_contribution(d, specs, items, arrays, columns=cols, clip=8.0, switch_tau=5.0)
    assert c.terms.shape[0] == len(d.people) and c.bound == pytest.approx(release_bound(3, 0.5))
    assert np.linalg.norm(c.terms, axis=1).max() <= c.bound
    logged = d.interactions.assign(propensity=0.2)
    from dataclasses import replace
    rows2 = strategy_rows(replace(d, interactions=logged), items, arrays)
    assert np.allclose(rows2["e"], 0.2)
    with pytest.raises(ValueError, match="no score model for item"):
        check_strategies([{"name": "x", "kind": "rank", "coef": {}}], items, cols)
    with pytest.raises(ValueError, match="unknown kind"):
        check_strategies([{"name": "x", "kind": "oracle"}], items, cols)


def test_a_dr_only_release_gives_the_same_dr_with_a_smaller_sensitivity():
    from fedrec.common.causal.ope import Layout

    person, n, t, y, e, m1, m0, rng = _world(3)
    comps = [person_components(person, n, t, y, e, m1, m0, _top1(person, n, rng), clip=CLIP_OFF, switch_tau=5.0)
             for _ in range(2)]
    bounds = [component_bounds(CLIP_OFF, 1.0)] * 2
    full = evaluate_sums(_release(comps, bounds)[1], ["a", "b"], bounds, noise_var=0.0, scale=1.0, square_clip=SQ_OFF)
    dr = Layout(("dr",))
    rows = normalized_release_rows(comps, bounds, square_clip=SQ_OFF, second_moment_weight=0.5, layout=dr)
    assert rows.shape[1] == 1 + 2 * 2 + 2 + 1  # [1, (D, G) x 2] + 2 squares + 1 pair square
    only = evaluate_sums(rows.sum(axis=0), ["a", "b"], bounds, noise_var=0.0, scale=1.0, square_clip=SQ_OFF, layout=dr)
    for s in ("a", "b"):
        assert only.estimate(s).value == pytest.approx(full.estimate(s).value, rel=1e-12)
        assert only.estimate(s).se == pytest.approx(full.estimate(s).se, rel=1e-9)
    assert only.difference("a", "b").se == pytest.approx(full.difference("a", "b").se, rel=1e-9)
    assert release_bound(4, 0.5, dr) ** 2 == pytest.approx(9 + 0.25 * 10)  # against 41.5 for every estimator
    assert release_bound(4, 0.5) ** 2 == pytest.approx(33 + 0.25 * 34)
    with pytest.raises(ValueError, match="not 'snips'"):
        only.estimate("a", "snips")
    with pytest.raises(ValueError, match="subset of"):
        Layout(("oracle",))


def test_person_folds_are_seeded_balanced_and_independent_of_the_process():
    from fedrec.common.causal.ope import person_fold

    ids = [f"P{i:06d}" for i in range(4000)]
    a = person_fold(ids, "crossfit-1")
    assert np.array_equal(a, person_fold(ids, "crossfit-1"))  # same salt, same split (SHA-256, not hash())
    assert abs(a.mean() - 0.5) < 0.03
    b = person_fold(ids, "crossfit-2")
    assert 0.4 < (a == b).mean() < 0.6  # another salt, another split
    # a fixed value: the split must not change between Python processes or versions
    assert person_fold(["P000000", "P000001", "P000002"], "s").tolist() == [
        int.from_bytes(__import__("hashlib").sha256(f"s\x1f{p}".encode()).digest()[:8], "big") % 2
        for p in ("P000000", "P000001", "P000002")]
    with pytest.raises(ValueError, match="at least 2 folds"):
        person_fold(ids, "s", 1)


def test_a_crossfit_strategy_ranks_each_person_by_the_model_fitted_without_their_fold():
    """Cross-fitting (issue 32): fold k's people are ranked by the model of the other fold."""
    from fedrec.client.ope_statistics import check_strategies, exposure_probabilities, strategy_rows
    from fedrec.client.statistics import design_columns
    from fedrec.common.causal.ope import person_fold
    from fedrec.server.strategies import crossfit_benefit_strategy
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("education", institutions=1, people=300, seed=4, skew=0.0)
    d = insts[0]
    cols = [c[0] for c in design_columns(d)]
    items = sorted(d.items["item_id"].astype(str))
    p = len(cols) + 1
    arrays = {f"{k}/{it}": np.zeros(p) for it in items for k in ("beta", "mu1", "mu0")}
    # fold 0's causal run prefers the first item, fold 1's the last one (by their intercepts)
    first = {it: {"cate_coef": {c: float(j == 0) * -k for j, c in enumerate(["intercept", *cols])}}
             for k, it in enumerate(items)}
    last = {it: {"cate_coef": {c: float(j == 0) * k for j, c in enumerate(["intercept", *cols])}}
            for k, it in enumerate(items)}
    spec = crossfit_benefit_strategy([first, last], "higher", "salt-7")
    check_strategies([spec], items, cols)
    rows = strategy_rows(d, items, arrays)
    top = exposure_probabilities(spec, rows, items, cols, d)
    assert np.all(np.bincount(rows["person"], weights=top) == 1)
    fold = person_fold(d.people["person_id"].astype(str).to_numpy(), "salt-7")
    chosen = np.zeros(len(d.people), dtype=np.int64)
    chosen[rows["person"][top == 1]] = rows["item"][top == 1]
    for i in range(len(d.people)):
        mine = rows["item"][rows["person"] == i]
        # fold 0 is ranked by fold 1's model (prefers the last item) and vice versa
        assert chosen[i] == (mine.max() if fold[i] == 0 else mine.min())
    with pytest.raises(ValueError, match="crossfit strategy needs"):
        check_strategies([{**spec, "coef": spec["coef"][:1]}], items, cols)
