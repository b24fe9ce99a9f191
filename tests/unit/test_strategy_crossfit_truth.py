"""The cross-fitted benefit ranking's SE (common/causal/ope.py ``OPEResult``, issue 32).

A person of fold k is ranked by a policy learned on the other fold, so each fold's terms are
i.i.d. given the other fold's data, but the two folds' errors are correlated: fold A's noise
chose the policy fold B is evaluated with and vice versa. The i.i.d. variance misses that
covariance. Textbook bound used here (Cauchy–Schwarz): with fold shares ``w_k`` and fold-mean
errors ``e_k``, ``Var(Σ w_k e_k) ≤ (Σ w_k sd_k)² ≤ K Σ w_k² sd_k² ≤ K x`` the i.i.d. variance.

The checks: the SE equals that bound computed here in numpy from the per-person terms (never
from the function under test); on a world with two tied items (every learned ranking is noise,
the true value of every policy is 0) the i.i.d. SE under-covers (about 0.91, the health figure)
and the bounded one covers; and the server's ``run_strategies`` (what the Flower app and the
simulations call) passes the specs' partitions through.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.common.causal.ope import (OPEConfig, Layout, component_bounds, crossfit_partitions, evaluate_sums,
                                      normalized_release_rows, person_components, terms_of)

SQ_OFF = 1e4  # a square clip that never binds
CLIP_OFF = 1e6  # a weight clip that never binds
Z95 = 1.959963984540054


def _tied_world(rng: np.random.Generator, n: int):
    """n people each considered for two items with logging propensity 0.5 and no effect of
    either item (the outcome is noise): every policy's true value is 0 and a learned top-1
    ranking is decided by the noise alone."""
    person = np.repeat(np.arange(n), 2)
    item = np.tile([0, 1], n)
    e = np.full(2 * n, 0.5)
    t = (rng.random(2 * n) < 0.5).astype(float)
    y = np.repeat(np.clip(rng.normal(0.0, 0.3, n), -1, 1), 2)
    zeros = np.zeros(2 * n)
    return person, item, t, y, e, zeros, zeros


def _crossfit_p(person, item, t, y, e, fold):
    """Top-1 item of each person chosen by the other fold's mean IPS contrast per item."""
    contrast = y * (t / e - (1 - t) / (1 - e))
    rows_fold = fold[person]
    best = [int(np.argmax([contrast[(rows_fold == k) & (item == j)].mean() for j in (0, 1)])) for k in (0, 1)]
    chosen = np.where(rows_fold == 0, best[1], best[0])  # fold 0 ranked by fold 1's policy, and back
    return (item == chosen).astype(float)


def _release(comps, layout=Layout(("dr",))):
    bounds = [component_bounds(CLIP_OFF, 1.0)] * len(comps)
    rows = normalized_release_rows(comps, bounds, square_clip=SQ_OFF, second_moment_weight=0.5, layout=layout)
    return rows.sum(axis=0), bounds


def test_the_crossfit_se_is_the_cauchy_schwarz_bound_and_other_strategies_keep_the_iid_one():
    rng = np.random.default_rng(3)
    n = 600
    person, item, t, y, e, m1, m0 = _tied_world(rng, n)
    fold = rng.integers(0, 2, n)
    p_cf = _crossfit_p(person, item, t, y, e, fold)
    p_other = (item == 0).astype(float)
    comps = [person_components(person, n, t, y, e, m1, m0, p, clip=CLIP_OFF, switch_tau=10.0) for p in (p_cf, p_other)]
    total, bounds = _release(comps)
    spec = {"name": "cf", "kind": "crossfit", "salt": "s", "coef": [{}, {}]}
    res = evaluate_sums(total, ["cf", "other"], bounds, noise_var=0.0, scale=2.0, square_clip=SQ_OFF,
                        layout=Layout(("dr",)), crossfit=crossfit_partitions([spec, {"name": "other", "kind": "rank"}]))
    phi_cf, phi_o = terms_of(comps[0])["dr"], terms_of(comps[1])["dr"]
    iid = np.var(phi_cf) / n  # textbook i.i.d. variance of a mean
    assert res.estimate("cf").se == pytest.approx(2.0 * math.sqrt(2 * iid), rel=1e-9)
    assert res.estimate("other").se == pytest.approx(2.0 * math.sqrt(np.var(phi_o) / n), rel=1e-9)
    d = phi_cf - phi_o
    assert res.difference("cf", "other").se == pytest.approx(2.0 * math.sqrt(2 * np.var(d) / n), rel=1e-9)
    # the bound is at least the per-fold Cauchy–Schwarz sum (Σ w_k sd_k)², computed per fold here
    w = np.array([np.mean(fold == k) for k in (0, 1)])
    sd = np.array([np.std(phi_cf[fold == k]) / math.sqrt(np.sum(fold == k)) for k in (0, 1)])
    assert (res.estimate("cf").se / 2.0) ** 2 >= (w @ sd) ** 2 * (1 - 1e-12)
    # without the partition the i.i.d. SE (the old behaviour) is what comes out
    plain = evaluate_sums(total, ["cf", "other"], bounds, noise_var=0.0, scale=2.0, square_clip=SQ_OFF,
                          layout=Layout(("dr",)))
    assert plain.estimate("cf").se == pytest.approx(2.0 * math.sqrt(iid), rel=1e-9)
    with pytest.raises(ValueError, match="crossfit 'nope'"):
        evaluate_sums(total, ["cf", "other"], bounds, noise_var=0.0, scale=2.0, square_clip=SQ_OFF,
                      layout=Layout(("dr",)), crossfit={"nope": ("s", 2)})


def test_tied_items_the_iid_se_under_covers_a_crossfitted_ranking_and_the_bound_covers():
    rng = np.random.default_rng(20261205)
    reps, n = 1500, 300
    errs, se_iid, se_cf = [], [], []
    parts = {"cf": ("s", 2)}
    for _ in range(reps):
        person, item, t, y, e, m1, m0 = _tied_world(rng, n)
        fold = np.arange(n) % 2
        p = _crossfit_p(person, item, t, y, e, fold)
        comp = person_components(person, n, t, y, e, m1, m0, p, clip=CLIP_OFF, switch_tau=10.0)
        total, bounds = _release([comp])
        plain = evaluate_sums(total, ["cf"], bounds, noise_var=0.0, scale=1.0, square_clip=SQ_OFF,
                              layout=Layout(("dr",)))
        fitted = evaluate_sums(total, ["cf"], bounds, noise_var=0.0, scale=1.0, square_clip=SQ_OFF,
                               layout=Layout(("dr",)), crossfit=parts)
        errs.append(plain.estimate("cf").value)  # the truth is 0
        se_iid.append(plain.estimate("cf").se)
        se_cf.append(fitted.estimate("cf").se)
    errs, se_iid, se_cf = map(np.asarray, (errs, se_iid, se_cf))
    # the error's SD exceeds the i.i.d. SE (theory for two tied items: sqrt(1 + 1/π) = 1.15)
    assert np.std(errs) / np.mean(se_iid) > 1.08
    assert np.mean(np.abs(errs) <= Z95 * se_iid) < 0.93  # the old SE: about 0.91
    assert np.mean(np.abs(errs) <= Z95 * se_cf) >= 0.95  # the bound: about 0.98


def test_run_strategies_passes_the_crossfit_partition_to_the_se():
    from fedrec.server.strategies import STEP, effective_clip, run_strategies
    from fedrec.common.causal.ope import strategy_bounds

    rng = np.random.default_rng(5)
    n = 400
    person, item, t, y, e, m1, m0 = _tied_world(rng, n)
    fold = rng.integers(0, 2, n)
    p_cf = _crossfit_p(person, item, t, y, e, fold)
    specs = [{"name": "benefit-cf", "kind": "crossfit", "salt": "s", "better": "higher", "coef": [{}, {}]},
             {"name": "random", "kind": "random"}]
    cfg = OPEConfig(epsilon=math.inf, n_min=1)
    clip = effective_clip(cfg)
    ps = [p_cf, np.full(2 * n, 0.5)]
    comps = [person_components(person, n, t, y, e, m1, m0, p, clip=clip, switch_tau=cfg.switch_tau) for p in ps]
    bounds = [strategy_bounds(s, clip, 2) for s in specs]
    rows = normalized_release_rows(comps, bounds, square_clip=cfg.square_clip,
                                   second_moment_weight=cfg.second_moment_weight, layout=cfg.layout)

    def send(step, arrays, config):
        return {step: rows.sum(axis=0)}, 1, {}

    res, _ = run_strategies(send, items=["a", "b"], columns=[], specs=specs, nuisances={}, cfg=cfg, scale=1.0)
    assert STEP == "strategies"
    phi = [terms_of(c)["dr"] for c in comps]
    assert res.estimate("benefit-cf").se == pytest.approx(math.sqrt(2 * np.var(phi[0]) / n), rel=1e-9)
    assert res.estimate("random").se == pytest.approx(math.sqrt(np.var(phi[1]) / n), rel=1e-9)


def test_the_crossfit_reference_is_each_fresh_person_ranked_by_the_other_folds_model():
    """The yardstick's truth for ``benefit-cf`` (simulations/strategies.reference_values) is the
    estimand's: each fresh person of fold k ranked by model k (fitted without fold k), not one
    policy for everyone. Computed here independently: SHA-256 folds, argmax over the person's
    considered items, the simulator's true CATE."""
    import hashlib

    from fedrec.client.statistics import design_columns, people_design
    from fedrec.simulations.domains import domain_federation
    from fedrec.simulations.strategies import reference_values

    insts, truth = domain_federation("health", institutions=1, people=600, seed=4, skew=0.0)
    pop = insts[0]
    items = sorted(pop.items["item_id"].astype(str))
    names = ["intercept"] + [c[0] for c in design_columns(pop)]
    rng = np.random.default_rng(9)
    models = [{it: dict(zip(names, rng.normal(size=len(names)).tolist())) for it in items} for _ in range(2)]
    salt = "crossfit-test"
    specs = [{"name": "cf", "kind": "crossfit", "better": "higher", "salt": salt, "coef": models},
             {"name": "m0", "kind": "rank", "better": "higher", "coef": models[0]},
             {"name": "m1", "kind": "rank", "better": "higher", "coef": models[1]}]
    p = len(names)
    nuis = {f"{k}/{it}": np.zeros(p) for it in items for k in ("beta", "mu1", "mu0")}
    got = reference_values(pop, truth, specs, nuis, items, names[1:])

    x = people_design(pop)
    ids = pop.people["person_id"].astype(str).to_list()
    fold = [int.from_bytes(hashlib.sha256(f"{salt}\x1f{pid}".encode()).digest()[:8], "big") % 2 for pid in ids]
    row_of = {pid: i for i, pid in enumerate(truth.person_ids.astype(str))}
    col_of = {it: j for j, it in enumerate(truth.item_ids)}
    considered = pop.interactions.groupby("person_id")["item_id"].apply(lambda s: sorted(s.astype(str)))
    want = {"cf": 0.0, "m0": 0.0, "m1": 0.0}
    for i, pid in enumerate(ids):
        its = considered.get(pid, [])
        if not its:
            continue
        for name, model in (("cf", models[fold[i]]), ("m0", models[0]), ("m1", models[1])):
            best = max(its, key=lambda it: float(x[i] @ np.array([model[it][c] for c in names])))
            want[name] += truth.cate[row_of[pid], col_of[best]]
    for name in want:
        assert got[name] == pytest.approx(want[name] / len(ids), rel=1e-9, abs=1e-12), name
    # the mixture is not either policy alone (the two random models disagree on these people)
    assert abs(got["cf"] - got["m0"]) > 1e-6 and abs(got["cf"] - got["m1"]) > 1e-6
    assert min(fold) == 0 and max(fold) == 1
