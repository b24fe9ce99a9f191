"""Causal estimation on privatized aggregates: exactness, coverage, sensitivity, boundaries."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fedrec.client.statistics import (
    ItemRows,
    clipped_sum,
    encode_item,
    influence_sum_terms,
    outcome_gram_terms,
    propensity_newton_terms,
    release_bound,
)
from fedrec.common.causal.config import CausalConfig, plan_budget
from fedrec.common.causal.estimator import FederatedCausalEstimator
from fedrec.common.causal.sensitivity import influence_bound, outcome_bound, propensity_bound
from fedrec.common.datasets import write_ground_truth, write_institution
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.accountant import GaussianEvent, epsilon_for
from fedrec.simulations.causal_cli import causal_command, estimate_inprocess, pooled_estimate
from fedrec.simulations.domains import domain_federation

warnings.filterwarnings("ignore", category=UserWarning)
INF = float("inf")


@pytest.fixture(scope="module")
def health():
    return domain_federation("health", institutions=3, people=3000, seed=11, skew=0.5)


def test_federated_equals_pooled_at_epsilon_inf(health):
    insts, truth = health
    item = "diet_counselling"
    cfg = CausalConfig(epsilon=INF, items=(item,), newton_steps=10)
    fed = estimate_inprocess(insts, cfg).items[item]
    pooled = pooled_estimate(insts, item, cfg)  # statsmodels Logit + OLS on the union
    assert fed["ate"] == pytest.approx(pooled["ate"], rel=1e-7, abs=1e-9)
    assert fed["se"] == pytest.approx(pooled["se"], rel=1e-6)
    assert fed["noise_se"] == 0.0
    # and the estimate is about the truth (known effect)
    assert abs(fed["ate"] - truth.ate[item]) < 4 * fed["se"]


def test_estimator_api_names(health):
    insts, _ = health
    cfg = CausalConfig(epsilon=INF, items=("walking_group",), newton_steps=8)
    est: FederatedCausalEstimator = estimate_inprocess(insts, cfg).estimators["walking_group"]
    lo, hi = est.ate_interval()
    assert lo < est.ate() < hi and est.ate_stderr() > 0
    x = insts[0].covariate_matrix()[:5]
    tau = est.effect(x)
    elo, ehi = est.effect_interval(x)
    assert tau.shape == (5,) and np.all(elo <= tau) and np.all(tau <= ehi)


def test_budget_plan_composes_to_the_target():
    for eps in (0.5, 2.0):
        cfg = CausalConfig(epsilon=eps)
        plan = plan_budget(cfg)
        spent = epsilon_for(plan.events(), delta=cfg.delta, accountant="prv")
        assert 0.97 * eps <= spent <= eps + 1e-9
        assert set(plan.sigma) == set(cfg.steps()) and sum(plan.shares.values()) == pytest.approx(1.0)
    assert all(s == 0 for s in plan_budget(CausalConfig(epsilon=INF)).sigma.values())


def test_newton_schedule_puts_the_named_fraction_on_the_last_step():
    """``newton_last``: the last Newton step gets that fraction of the propensity share (the one
    whose noise the fitted beta carries), the others split the rest; the plan still composes."""
    cfg = CausalConfig(epsilon=1.0, newton_steps=3, newton_last=0.6)
    sh = cfg.step_shares()
    prop = [sh[f"propensity:{k}"] for k in (1, 2, 3)]
    assert prop[2] == pytest.approx(0.6 * sum(prop)) and prop[0] == pytest.approx(prop[1])
    assert sum(sh.values()) == pytest.approx(1.0)
    even = CausalConfig(epsilon=1.0, newton_steps=3, newton_last=0.0).step_shares()
    assert even["propensity:1"] == pytest.approx(even["propensity:3"])
    assert CausalConfig.from_flat(cfg.to_flat()) == cfg
    assert CausalConfig().newton_last == 0.65 and CausalConfig.from_flat(CausalConfig().to_flat()) == CausalConfig()
    plan = plan_budget(cfg)
    spent = epsilon_for(plan.events(), delta=cfg.delta, accountant="prv")
    assert 0.97 <= spent <= 1.0 + 1e-9
    with pytest.raises(ValueError):
        CausalConfig(newton_last=1.0)


def _coverage(insts, truth_ate, cfg, seeds, rng_seed=0):
    hits = 0
    plan = plan_budget(cfg)
    rng = np.random.default_rng(rng_seed)
    for s in seeds:
        d, t = insts(s)
        r = estimate_inprocess(d, cfg, rng=rng, plan=plan).items[cfg.items[0]]
        hits += r["ci_low"] <= t.ate[cfg.items[0]] <= r["ci_high"]
    return hits / len(seeds)


def test_coverage_over_seeds_non_private():
    item = "exercise_coaching"
    cov = _coverage(lambda s: domain_federation("health", institutions=3, people=2000, seed=s, skew=0.3),
                    None, CausalConfig(epsilon=INF, items=(item,), newton_steps=6), range(24))
    assert cov >= 20 / 24, cov


def test_coverage_over_seeds_at_fixed_epsilon():
    """24 seeded federations (3 x 1,000 people), ε = 4 per institution, local noise: the 95%
    CI (sampling + DP noise variance) covers the true ATE in >= 20 of 24."""
    item = "exercise_coaching"
    cov = _coverage(lambda s: domain_federation("health", institutions=3, people=3000, seed=s, skew=0.3),
                    None, CausalConfig(epsilon=4.0, items=(item,)), range(24))
    assert cov >= 20 / 24, cov


def test_se_includes_the_nuisance_noise_variance(health):
    """On one fixed data set, re-drawing only the DP noise: the spread of the ATE over draws is
    what the SE's DP parts (influence-sum noise + nuisance noise, delta method) predict. Without
    the nuisance term the prediction is ~25% short (the test then fails)."""
    insts, _ = health
    item = "diet_counselling"
    cfg = CausalConfig(epsilon=1.0, items=(item,), noise_mode="distributed", n_min=3)
    plan, rng, cache = plan_budget(cfg), np.random.default_rng(3), {}
    ates, var = [], []
    for _ in range(60):
        row = estimate_inprocess(insts, cfg, rng=rng, plan=plan, cache=cache).items[item]
        ates.append(row["ate"])
        var.append(row["noise_se"] ** 2 + row["nuisance_se"] ** 2)
        assert row["nuisance_se"] > 0
    ratio = float(np.std(ates) / math.sqrt(np.mean(var)))
    assert 0.75 <= ratio <= 1.2, ratio
    assert estimate_inprocess(insts, CausalConfig(epsilon=INF, items=(item,))).items[item]["nuisance_se"] == 0.0


def test_removed_and_expert_knobs_are_refused_in_one_line_never_ignored() -> None:
    """The Jacobian release and the pooled outcome anchor are gone: a run config that still sets
    one is refused with one line naming the key (not silently run without it). Expert knobs
    travel as ``causal.expert.*``; the old spelling is refused with the fix; a lying
    coordinator's ``jacobian`` step is refused by the sensitivity before any charge."""
    from fedrec.common.causal.config import ANALYST_KNOBS, EXPERT_KNOBS
    from fedrec.common.causal.sensitivity import release_sensitivity
    from fedrec.common.config import ConfigError

    for key, value in (("causal.share-jacobian", 0.05), ("causal.jacobian-k", 4.0),
                       ("causal.outcome-anchor", "pooled"), ("causal.expert.outcome-anchor", "pooled")):
        with pytest.raises(ConfigError, match=f"^{key}: .*removed.*fix: delete the key$"):
            CausalConfig.from_flat({key: value})
    with pytest.raises(ConfigError, match=r"^causal.psi-noise-ratio: an expert knob; fix: write "
                                          r"causal.expert.psi-noise-ratio"):
        CausalConfig.from_flat({"causal.psi-noise-ratio": 0.3})
    with pytest.raises(ConfigError, match=r"^causal.expert.psi-noise-ratoi: unknown expert knob"):
        CausalConfig.from_flat({"causal.expert.psi-noise-ratoi": 0.3})
    with pytest.raises(ConfigError, match=r"^causal.epsilonn: unknown causal knob; fix: one of causal.\{estimator"):
        CausalConfig.from_flat({"causal.epsilonn": 2.0})  # a mistyped analyst knob is never silently ignored
    # the analyst's table is short; every other key is expert, and both round-trip
    flat = CausalConfig().to_flat()
    assert {k for k in flat if not k.startswith("causal.expert.")} == {f"causal.{k}" for k in ANALYST_KNOBS}
    assert len(ANALYST_KNOBS) <= 8 and all(f"causal.expert.{k}" in flat for k in EXPERT_KNOBS)
    cfg = CausalConfig(epsilon=2.0, items=("a",), psi_noise_ratio=0.3, trim=(0.1, 0.9), n_min=3)
    assert CausalConfig.from_flat(cfg.to_flat()) == cfg
    assert CausalConfig.from_flat({"causal.expert.psi-noise-ratio": 0.3}).psi_noise_ratio == 0.3
    assert "jacobian" not in CausalConfig(epsilon=2.0).steps()
    with pytest.raises(ValueError, match="unknown causal step 'jacobian'"):
        release_sensitivity("jacobian", 4, {"jacobian-k": np.array([4.0])}, 1)


def _extreme(rows: ItemRows, scale: float) -> ItemRows:
    """rows plus one person whose values ignore the declared bounds (a broken encoder)."""
    x = np.vstack([rows.x, np.full(rows.p, scale)])
    return ItemRows(rows.item, x, np.append(rows.t, 1.0), np.append(rows.y, scale))


@pytest.mark.parametrize("which", ["propensity", "outcome", "influence"])
def test_one_person_moves_a_release_by_at_most_the_declared_bound(health, which):
    insts, _ = health
    rows = encode_item(insts[0], "diet_counselling")
    p = rows.p
    beta = np.zeros(p)
    coef = np.zeros(p)

    def contrib(r):
        if which == "propensity":
            return propensity_newton_terms(r, beta)
        if which == "outcome":
            return outcome_gram_terms(r)
        return influence_sum_terms(r, estimator="aipw", clip=0.5, prop_coef=beta, coef1=coef, coef0=coef)

    bound = {"propensity": propensity_bound(p), "outcome": outcome_bound(p), "influence": influence_bound()}[which]
    # the bound the client clips to is the one the server and the ledger charge for
    from fedrec.common.causal.sensitivity import step_bound

    assert step_bound(which, p, r2=p) == pytest.approx(bound)
    base, plus = contrib(rows), contrib(_extreme(rows, 50.0))
    assert base.bound == pytest.approx(bound)
    # every honest person (encoded within the declared bounds) is within the bound already
    assert np.linalg.norm(base.terms, axis=1).max() <= bound + 1e-9
    # the released (clipped) sum moves by at most the bound ...
    assert np.linalg.norm(clipped_sum(plus) - clipped_sum(base)) <= bound + 1e-9
    # ... while without clipping the extreme person would move it by far more (the test bites)
    if which == "influence":
        from fedrec.common.causal.influence import influence_terms

        big = _extreme(rows, 50.0)
        raw = influence_terms(big.x[-1:], big.t[-1:], big.y[-1:], estimator="aipw", prop_coef=beta,
                              coef1=coef, coef0=coef)
        assert abs(raw[0]) / 0.5 > 2 * bound  # the release carries psi / clip
    else:
        assert np.linalg.norm(plus.terms.sum(0) - base.terms.sum(0)) > 2 * bound


def test_moments_with_arm_sums_obey_a_tight_bound(health):
    """The moments release with the LDA start's per-item arm sums: the client clips each person
    to ``sqrt((p^2+p)/2 + J p)``, the same number the ledger charges and SecAgg+ is sized with;
    the bound is attained (a person at the corner of the bounds, considered for every item), so
    a sensitivity that forgot the arm sums would be exceeded."""
    from fedrec.client.statistics import covariate_moments_terms, item_arms, people_design
    from fedrec.common.causal.sensitivity import moments_bound, release_sensitivity

    data = health[0][0]
    x = people_design(data)
    p = x.shape[1]
    items = ["diet_counselling", "walking_group", "smoking_cessation"]
    arms = [item_arms(data, it) for it in items]
    c = covariate_moments_terms(x, arms)
    bound = math.sqrt((p * p + p) / 2 + len(items) * p)
    assert c.bound == pytest.approx(bound) == moments_bound(p, len(items))
    assert release_sensitivity("moments", p, {"moments/arms": np.array([1.0])}, len(items)) == pytest.approx(bound)
    assert release_sensitivity("moments", p, {}, len(items)) == pytest.approx(moments_bound(p))  # zero start
    assert np.linalg.norm(c.terms, axis=1).max() <= bound + 1e-9
    # each arm block sums to the arm's count (entry 0) and covariate sums
    k = (p * p + p) // 2
    idx, t = arms[0]
    total = c.terms.sum(0)
    assert total[k] == pytest.approx(t.sum()) and total[k + p] == pytest.approx((1 - t).sum())
    assert np.allclose(total[k + 1:k + p], (x[idx] * t[:, None]).sum(0)[1:])
    # the corner person: x = 1 everywhere, exposed for every item -> norm exactly the bound
    corner = covariate_moments_terms(np.ones((1, p)), [(np.array([0]), np.array([1.0]))] * len(items))
    assert np.linalg.norm(corner.terms) == pytest.approx(bound)
    assert np.linalg.norm(corner.terms) > moments_bound(p) * 1.2  # what the zero start's bound would miss


def test_lda_start_is_close_to_the_logistic_fit_and_saves_newton_steps(health):
    """From the DP-free moments release, the LDA start is near the logistic MLE on the whitened
    design: two Newton steps from it land closer than four from zero do."""
    from fedrec.client.statistics import covariate_moments_terms, item_arms, people_design, whiten_rows
    from fedrec.common.causal.linalg import vech_len
    from fedrec.common.causal.nuisance import lda_start, newton_update
    from fedrec.common.causal.whitening import whitening_from_moments

    insts, _ = health
    item = "diet_counselling"
    xs = [people_design(d) for d in insts]
    p = xs[0].shape[1]
    tot = sum(covariate_moments_terms(x, [item_arms(d, item)]).terms.sum(0) for x, d in zip(xs, insts))
    wh = whitening_from_moments(tot[:vech_len(p)], p, radius_factor=None)
    rows = [whiten_rows(encode_item(d, item), wh) for d in insts]
    w = np.vstack([r.x for r in rows])
    t = np.concatenate([r.t for r in rows])

    def step(b):
        e = 1 / (1 + np.exp(-w @ b))
        from fedrec.common.causal.linalg import vech
        h = vech((w * (e * (1 - e))[:, None]).T @ w)
        return newton_update(b, w.T @ (t - e), h)

    mle = np.zeros(p)
    for _ in range(25):
        mle = step(mle)
    start = lda_start(tot[:vech_len(p)], tot[vech_len(p):], p, wh)
    assert np.linalg.norm(start - mle) < 0.25 * np.linalg.norm(mle)
    two, four = step(step(start)), np.zeros(p)
    for _ in range(4):
        four = step(four)
    assert np.linalg.norm(two - mle) < np.linalg.norm(four - mle)
    assert np.linalg.norm(two - mle) < 1e-4 * np.linalg.norm(mle)
    # a noisy arm count below 2 falls back to zero; the slope is capped
    bad = tot[vech_len(p):].copy()
    bad[0] = 1.0
    assert not lda_start(tot[:vech_len(p)], bad, p, wh).any()
    assert np.linalg.norm(lda_start(tot[:vech_len(p)], tot[vech_len(p):], p, wh, max_slope=0.01)[1:]) \
        == pytest.approx(0.01)


def test_newton_steps_without_dp_run_to_convergence():
    assert CausalConfig(epsilon=1.0).newton_count == 2
    assert CausalConfig(epsilon=INF).newton_count >= 8
    assert [s for s in CausalConfig(epsilon=INF).steps() if s.startswith("propensity")][-1] == "propensity:8"
    with pytest.raises(ValueError, match="propensity_start"):
        CausalConfig(propensity_start="mle")


def test_encoder_applies_the_declared_bounds(health):
    insts, _ = health
    rows = encode_item(insts[1], "walking_group")
    assert np.abs(rows.x).max() <= 1.0 and np.abs(rows.y).max() <= 1.0
    assert np.all(np.linalg.norm(rows.x, axis=1) <= math.sqrt(rows.p) + 1e-12)


# --------------------------------------------------------------------------- bad declarations
@pytest.fixture()
def federation_dir(tmp_path):
    insts, truth = domain_federation("health", institutions=2, people=600, seed=5, skew=0.3)
    for d in insts:
        write_institution(tmp_path / d.name, d)
    write_ground_truth(tmp_path / "ground_truth", truth)
    return tmp_path


class _Console:
    def print(self, *a, **k):
        pass


def _assert_nothing_spent(out):
    ledgers = out / "ledgers"
    assert not ledgers.exists() or not any(ledgers.iterdir())


def test_unknown_covariate_is_one_line_before_any_budget(federation_dir, tmp_path):
    out = tmp_path / "out1"
    with pytest.raises(FedrecInputError, match="covariate 'blood_type' is not declared") as err:
        causal_command(federation_dir, "diet_counselling", 1.0, "aipw", False, out, 0, _Console(),
                       causal_overrides={"covariates": ("age", "blood_type")})
    assert "\n" not in str(err.value)
    _assert_nothing_spent(out)


def test_one_arm_treatment_is_refused_before_any_budget(federation_dir, tmp_path):
    import pandas as pd

    for inst in sorted(p for p in federation_dir.iterdir() if p.name.startswith("institution")):
        f = inst / "interactions.csv"
        df = pd.read_csv(f, dtype=str, keep_default_na=False)
        m = df["item_id"] == "walking_group"
        df.loc[m, "exposed"] = "0"
        df.loc[m, "engagement"] = ""
        df.to_csv(f, index=False)
    out = tmp_path / "out2"
    with pytest.raises(FedrecInputError, match="one arm only at every institution"):
        causal_command(federation_dir, "walking_group", 1.0, "aipw", False, out, 0, _Console())
    _assert_nothing_spent(out)


def test_missing_bounds_is_one_line_before_any_budget(federation_dir, tmp_path):
    for inst in sorted(p for p in federation_dir.iterdir() if p.name.startswith("institution")):
        st = inst / "study.toml"
        text = st.read_text().splitlines()
        # drop the outcome's max
        i = text.index("[outcome]")
        text = [ln for j, ln in enumerate(text) if not (i < j < i + 6 and ln.startswith("max = "))]
        st.write_text("\n".join(text) + "\n")
    out = tmp_path / "out3"
    with pytest.raises(FedrecInputError, match="outcome.max"):
        causal_command(federation_dir, None, 1.0, "aipw", False, out, 0, _Console())
    _assert_nothing_spent(out)


def test_client_handler_refuses_bad_study_before_charging_and_charges_a_good_step(tmp_path, monkeypatch, caplog):
    import json as _json
    import logging

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client import causal_app
    from fedrec.common.config import RunConfig
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.privacy.policy import InstitutionPolicy, write_policy
    from fedrec.server.aggregation import numpy_to_arrays

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)
    insts, _ = domain_federation("health", institutions=1, people=400, seed=2, skew=0.0)
    folder = write_institution(tmp_path / insts[0].name, insts[0])
    ledger = tmp_path / "ledger.db"
    PrivacyLedger.initialize(ledger, institution=insts[0].name, epsilon_cap=5.0, delta_cap=1e-5)
    write_policy(folder / "privacy.toml", InstitutionPolicy(ledger=ledger, epsilon_cap=5.0, max_run_epsilon=5.0))

    def run(covariates, extra=None, step="propensity"):
        ccfg = CausalConfig(epsilon=1.0, items=("walking_group",), covariates=covariates)
        flat = {**RunConfig().to_flat(), **ccfg.to_flat()}
        ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(), run_config=flat)
        conf = ConfigRecord({"server-round": 1, "step": f"{step}:1", "items": _json.dumps(["walking_group"]),
                             "noise-multiplier": 5.0})
        p = 11
        arrays: ArrayRecord = numpy_to_arrays({"beta/walking_group": np.zeros(p), **(extra or {})})
        msg = Message(RecordDict({"config": conf, "arrays": arrays}), dst_node_id=7,
                      message_type=f"query.causal_{step}")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedrec.client"):
            return getattr(causal_app, f"causal_{step}")(msg, ctx)

    def refused(reply, detail):  # a code to the server; the detail in the institution's log
        assert set(reply.content.config_records["refusal"].keys()) == {"code"}
        assert detail in caplog.text
        assert PrivacyLedger(ledger).events() == []

    refused(run(("age", "blood_type")), "blood_type")
    # a Hessian weight that gives no usable bound is refused before any charge
    refused(run(None, {"hessian-weight": np.array([0.0])}), "hessian-weight")
    # so is an influence step without a usable psi clip for an item (it does not enter the bound)
    for extra in ({}, {"clip/walking_group": np.array([-1.0])}):
        refused(run(None, extra, step="influence"), "clip/walking_group")
    good = run(None)
    assert "arrays" in good.content.array_records
    events = PrivacyLedger(ledger).events()
    assert len(events) == 1 and events[0].noise_multiplier == 5.0
    assert good.content.metric_records["metrics"]["epsilon"] > 0


# --------------------------------------------------------------------------- weighted whitening
def test_weighted_fit_rows_obey_the_row_bound(health):
    """Whitening with weights (``whiten_weighted``): people keep their whitened features and
    the nuisance fits' terms are multiplied by omega^2 = min(1, r^2/|z|^2). Every person's
    weighted propensity and outcome rows, even far outside the radius, are within the bounds
    the ledger charges for rows of norm^2 <= 1 + r^2 (before any clipping), and the bound the
    client uses is step_bound's."""
    from fedrec.client.statistics import whiten_rows
    from fedrec.common.causal.sensitivity import step_bound
    from fedrec.common.causal.whitening import Whitening

    insts, _ = health
    rows = encode_item(insts[0], "diet_counselling")
    p = rows.p
    rng = np.random.default_rng(0)
    wh = Whitening(a=np.diag(rng.uniform(2.0, 20.0, p - 1)), b=rng.normal(0, 3, p - 1),
                   radius=math.sqrt(p - 1), weighted=True)
    w = whiten_rows(rows, wh)
    assert w.wt is not None and (w.wt < 1).mean() > 0.5  # most people are outside the radius
    assert np.linalg.norm(w.x, axis=1).max() > 3 * math.sqrt(wh.r2)  # features are not clipped
    for beta in (np.zeros(p), rng.normal(0, 2, p)):
        c = propensity_newton_terms(w, beta)
        assert c.bound == pytest.approx(step_bound("propensity:1", p, r2=wh.r2))
        assert np.linalg.norm(c.terms, axis=1).max() <= c.bound + 1e-9
    c = outcome_gram_terms(w)
    assert c.bound == pytest.approx(step_bound("outcome", p, r2=wh.r2))
    assert np.linalg.norm(c.terms, axis=1).max() <= c.bound + 1e-9
    # the unweighted, clipped-feature variant obeys the same bound
    c = outcome_gram_terms(whiten_rows(rows, Whitening(wh.a, wh.b, wh.radius, weighted=False)))
    assert np.linalg.norm(c.terms, axis=1).max() <= c.bound + 1e-9


# --------------------------------------------------------------------------- derived features
@pytest.fixture(scope="module")
def finance():
    return domain_federation("finance", institutions=3, people=3000, seed=4, skew=0.5)


DERIVED = ("at_min(earnings_1y_ago)", "log1p(earnings_2y_ago)", "square(age)")


def test_derived_features_keep_the_public_scaling_and_pooled_equality(finance):
    """Derived nuisance features (``causal.derived``): bounds derived from the declared ones,
    so the scaled design still lies in [-1, 1]; at ε = inf the federation still equals the
    pooled AIPW on the same features."""
    from fedrec.client.statistics import design_columns

    insts, _ = finance
    item = "job_training"
    cols = design_columns(insts[0], None, DERIVED)
    assert [c[0] for c in cols[-3:]] == list(DERIVED)
    assert cols[-3][1:] == (0.0, 1.0) and cols[-1][1:] == (16.0**2, 70.0**2)
    assert design_columns(insts[0], None, ("log(age)",))[-1][1:] == (math.log(16.0), math.log(70.0))
    with pytest.raises(FedrecInputError, match="lower bound is > 0"):
        design_columns(insts[0], None, ("log(earnings_1y_ago)",))  # declared lower bound 0
    rows = encode_item(insts[0], item, None, DERIVED)
    assert rows.p == len(cols) + 1 and np.abs(rows.x).max() <= 1.0
    unemployed = insts[0].people["earnings_1y_ago"].to_numpy(float) == 0
    assert 0 < unemployed.mean() < 1
    cfg = CausalConfig(epsilon=INF, items=(item,), newton_steps=10, derived=DERIVED)
    fed = estimate_inprocess(insts, cfg).items[item]
    pooled = pooled_estimate(insts, item, cfg)
    assert fed["ate"] == pytest.approx(pooled["ate"], rel=1e-7, abs=1e-9)
    assert set(DERIVED) <= set(fed["cate_coef"])
    # a DP run with derived features runs end to end
    dp = estimate_inprocess(insts, CausalConfig(epsilon=2.0, items=(item,), derived=DERIVED),
                            rng=np.random.default_rng(1)).items[item]
    assert math.isfinite(dp["se"]) and dp["se"] > 0


BMI = "ratio(weight_kg, height_cm, 2)"
NO_WEIGHT_HEIGHT = ("age", "female", "nonwhite", "education", "cigs_per_day", "smoking_years", "exercise",
                    "inactivity")


def test_ratio_feature_bounds_values_and_pooled_equality(health):
    """``ratio(a, b, k)`` = a / b^k: bounds from the declared corners (so the scaled column stays
    in [-1, 1] whatever the data), values from the clipped covariates, and federated == pooled
    at ε = inf with it replacing the raw columns it is made of."""
    from fedrec.client.statistics import design_columns, raw_design

    insts, _ = health
    d = insts[0]
    cols = design_columns(d, NO_WEIGHT_HEIGHT, (BMI,))
    assert [c[0] for c in cols][-1] == "ratio(weight_kg,height_cm,2)"
    assert "weight_kg" not in [c[0] for c in cols]
    assert cols[-1][1:] == pytest.approx((30.0 / 210.0**2, 200.0 / 130.0**2))  # declared bounds' corners
    raw, _ = raw_design(d, NO_WEIGHT_HEIGHT, (BMI,))
    bmi = d.people["weight_kg"].to_numpy(float) / d.people["height_cm"].to_numpy(float) ** 2
    np.testing.assert_allclose(raw[:, -1], bmi)
    assert design_columns(d, None, ("ratio(weight_kg,height_cm)",))[-1][1:] == pytest.approx((30 / 210, 200 / 130))
    # explicit public bounds replace the implied ones and clip the values (BMI 20-30 here)
    tight = "ratio(weight_kg, height_cm, 2)[20e-4, 30e-4]"
    assert design_columns(d, NO_WEIGHT_HEIGHT, (tight,))[-1] == ("ratio(weight_kg,height_cm,2)", 20e-4, 30e-4)
    raw_tight, _ = raw_design(d, NO_WEIGHT_HEIGHT, (tight,))
    np.testing.assert_allclose(raw_tight[:, -1], np.clip(bmi, 20e-4, 30e-4))
    assert (bmi < 20e-4).any() and (bmi > 30e-4).any()  # the clip bites on both sides
    for bad, msg in [("square(age)[5, 1]", "lower < upper"), ("square(age)[a, b]", "bounds must be"),("ratio(weight_kg,height_cm,4)", "power must be 1, 2 or 3"),
                     ("ratio(weight_kg)", "ratio\\(a, b\\[, k\\]\\)"),
                     ("ratio(height_cm,cigs_per_day)", "denominator whose declared lower bound is > 0")]:
        with pytest.raises((FedrecInputError, ValueError), match=msg):
            design_columns(d, None, (bad,))
    item = "diet_counselling"
    cfg = CausalConfig(epsilon=INF, items=(item,), newton_steps=10, covariates=NO_WEIGHT_HEIGHT, derived=(BMI,))
    fed = estimate_inprocess(insts, cfg).items[item]
    pooled = pooled_estimate(insts, item, cfg)
    assert fed["ate"] == pytest.approx(pooled["ate"], rel=1e-7, abs=1e-9)
    assert fed["se"] == pytest.approx(pooled["se"], rel=1e-6)
    assert "ratio(weight_kg,height_cm,2)" in fed["cate_coef"]


def test_config_round_trip_of_the_tuning_knobs():
    cfg = CausalConfig(epsilon=2.0, derived=DERIVED, whiten_weighted=False, floor_k=1.5, outcome_ridge_k=0.5)
    assert CausalConfig.from_flat(cfg.to_flat()) == cfg
    cfg = CausalConfig(gram_weight=0.4, hessian_weight=0.7, psi_grid_factor=1.5, gram_floor_ratio=0.5)
    assert CausalConfig.from_flat(cfg.to_flat()) == cfg
    assert CausalConfig.from_flat(CausalConfig().to_flat()).gram_weight is None  # automatic
    with pytest.raises(ValueError, match="gram_weight"):
        CausalConfig(gram_weight=0.0)
    with pytest.raises(ValueError, match="op\\(covariate\\)"):
        CausalConfig(derived=("cube(age)",))


def test_derived_feature_of_an_undeclared_covariate_is_one_line_before_any_budget(federation_dir, tmp_path):
    out = tmp_path / "out4"
    with pytest.raises(FedrecInputError, match="'blood_type', which study.toml does not declare") as err:
        causal_command(federation_dir, "diet_counselling", 1.0, "aipw", False, out, 0, _Console(),
                       causal_overrides={"derived": ("log1p(blood_type)",)})
    assert "\n" not in str(err.value)
    _assert_nothing_spent(out)


# --------------------------------------------------------------------------- coordinate weights
@pytest.mark.parametrize("weight", [0.3, 0.5])
def test_weighted_coordinates_obey_the_charged_bound_and_are_divided_out(health, weight):
    """A Gram/Hessian weight g < 1 scales exactly those coordinates before clipping and noise.
    Every person's row is within the bound the client charges, that bound is what
    release_sensitivity (ledger charge and SecAgg+ sizing) reads from the step's public arrays,
    and an honest worst-case person (every covariate at its bound) would break it if the weight
    were not applied (the test bites)."""
    from fedrec.common.causal.linalg import vech_len
    from fedrec.common.causal.sensitivity import release_sensitivity

    insts, _ = health
    rows = encode_item(insts[0], "diet_counselling")
    p = rows.p
    beta = np.random.default_rng(1).normal(0, 0.5, p)
    cases = [("propensity:1", "hessian-weight", lambda r, g: propensity_newton_terms(r, beta, g)),
             ("outcome", "gram-weight", lambda r, g: outcome_gram_terms(r, g))]
    for step, key, make in cases:
        c, plain = make(rows, weight), make(rows, 1.0)
        sens = release_sensitivity(step, p, {key: np.array([weight])}, 1)
        assert c.bound == pytest.approx(sens)
        assert sens < release_sensitivity(step, p, {}, 1)
        assert np.linalg.norm(c.terms, axis=1).max() <= c.bound + 1e-9
        # exactly the Gram/Hessian coordinates carry the weight
        if step == "outcome":
            m = vech_len(p) + p + 1
            gram = np.zeros(2 * m, dtype=bool)
            gram[:vech_len(p)] = gram[m:m + vech_len(p)] = True
        else:
            gram = np.arange(plain.terms.shape[1]) >= p
        np.testing.assert_allclose(c.terms[:, gram], weight * plain.terms[:, gram])
        np.testing.assert_allclose(c.terms[:, ~gram], plain.terms[:, ~gram])
    top = ItemRows(rows.item, np.ones((1, p)), np.ones(1), np.ones(1))  # honest, at every bound
    assert np.linalg.norm(outcome_gram_terms(top, 1.0).terms) > outcome_gram_terms(top, weight).bound
    # the server divides the weight out: the fits equal the unweighted ones at ε = inf
    item = "diet_counselling"
    a = estimate_inprocess(insts, CausalConfig(epsilon=INF, items=(item,))).items[item]
    b = estimate_inprocess(insts, CausalConfig(epsilon=INF, items=(item,), gram_weight=weight,
                                               hessian_weight=weight)).items[item]
    assert b["ate"] == pytest.approx(a["ate"], rel=1e-9)
    assert b["cate_coef"] == pytest.approx(a["cate_coef"], rel=1e-9)


def test_automatic_gram_weight_respects_the_floor_ratio():
    """auto_gram_weight: the lowest weight when the noise is small against the arm scale, 1 when
    even g = 1 breaks the floor ratio, and in between the chosen g keeps floor <= ratio x scale."""
    from fedrec.common.causal.clipping import auto_gram_weight
    from fedrec.common.causal.sensitivity import outcome_bound
    from fedrec.common.privacy.gaussian import noise_std

    kw = dict(r2=11.0, p=11, n_items=1, contributors=8, noise_mode="local", n_min=1, floor_k=2.0)
    assert auto_gram_weight(arm_scale=1e9, noise_multiplier=8.0, **kw) == pytest.approx(0.3)
    assert auto_gram_weight(arm_scale=10.0, noise_multiplier=8.0, **kw) == 1.0
    assert auto_gram_weight(arm_scale=10.0, noise_multiplier=0.0, **kw) == 1.0  # DP off
    g = auto_gram_weight(arm_scale=2000.0, noise_multiplier=8.0, **kw)
    assert 0.3 < g < 1.0

    def floor(g):
        std = noise_std(sensitivity=outcome_bound(11.0, g), noise_multiplier=8.0, noise_mode="local")
        return 2.0 * math.sqrt(8 * (std / g) ** 2 * 11)

    assert floor(g) <= 2000.0 < floor(g / 1.05)


# --------------------------------------------------------------------------- causal recommendations
def test_policy_values_rank_by_estimated_benefit_and_grade_with_the_truth(health):
    """Top-1 and top-k policy values: a CATE model that orders items like the truth reaches the
    oracle; one that orders them backwards gets the worst items; random is the mean benefit."""
    from fedrec.client.statistics import design_columns
    from fedrec.common.causal.recommend import top_k
    from fedrec.server.causal_recommend import policy_values

    assert top_k(np.array([[0.1, 3.0, 2.0], [5.0, -1.0, 0.0]]), 2).tolist() == [[1, 2], [0, 2]]
    insts, truth = health
    items = list(truth.item_ids)
    names = ["intercept"] + [c[0] for c in design_columns(insts[0])]
    # constant CATE per item = its true ATE (oriented): everyone gets the same ranking
    sign = 1.0 if truth.better == "higher" else -1.0
    ate = {it: float(truth.benefit[:, j].mean()) for j, it in enumerate(items)}
    const = {it: {"cate_coef": {n: (sign * ate[it] if n == "intercept" else 0.0) for n in names}} for it in items}
    backwards = {it: {"cate_coef": {n: (-sign * ate[it] if n == "intercept" else 0.0) for n in names}}
                 for it in items}
    pv, bad = policy_values(insts, truth, const, k=3), policy_values(insts, truth, backwards, k=3)
    ben = truth.benefit[np.concatenate([[list(truth.person_ids).index(p) for p in d.people["person_id"]]
                                        for d in insts])]
    order = sorted(items, key=lambda it: -ate[it])
    cols = [items.index(it) for it in order]
    assert pv["causal"]["policy_value"] == pytest.approx(ben[:, cols[0]].mean())
    assert pv["causal"]["policy_value_top_k"] == pytest.approx(ben[:, cols[:3]].sum(axis=1).mean())
    assert bad["causal"]["policy_value"] == pytest.approx(ben[:, cols[-1]].mean())
    assert pv["random"]["policy_value"] == pytest.approx(ben.mean())
    assert pv["oracle"]["policy_value"] == pytest.approx(ben.max(axis=1).mean())
    for name in ("causal", "engagement", "random"):
        assert pv["oracle"]["policy_value"] >= pv[name]["policy_value"] - 1e-12
        assert pv["oracle"]["policy_value_top_k"] >= pv[name]["policy_value_top_k"] - 1e-12
    assert bad["causal"]["policy_value"] < pv["random"]["policy_value"] < pv["causal"]["policy_value"]


def test_noise_limited_clip_reads_the_histogram_below_the_tail_edge():
    """The clip floor at large ε: ratio x sqrt(sum psi^2) / noise per unit clip, with sum psi^2
    from the bins below the tail edge only (noisy counts on empty high bins must not count)."""
    from fedrec.common.causal.clipping import clip_from_histogram, histogram_sum_squares, noise_limited_clip, psi_grid

    edges = psi_grid("aipw")  # ratio 2
    rng = np.random.default_rng(3)
    psi = np.abs(rng.normal(0, 0.3, size=20000))
    counts = np.bincount(np.searchsorted(edges, psi, side="right"), minlength=len(edges) + 1).astype(float)
    edge = clip_from_histogram(counts, edges, tail=0.01)
    ssq = histogram_sum_squares(counts, edges, upto=edge)
    got = noise_limited_clip(ssq, noise_sd_per_clip=50.0, ratio=0.5)
    want = 0.5 * math.sqrt((psi[psi < edge] ** 2).sum()) / 50.0
    assert got == pytest.approx(want, rel=0.15)  # bins at their geometric middles
    noisy = counts.copy()
    noisy[-3:] += 30.0  # DP noise on empty bins near the worst case
    assert histogram_sum_squares(noisy, edges, upto=edge) == pytest.approx(ssq)
    assert noise_limited_clip(ssq, noise_sd_per_clip=100.0, ratio=0.5) == pytest.approx(got / 2)
    assert noise_limited_clip(ssq, noise_sd_per_clip=0.0, ratio=0.5) == 0.0
    assert noise_limited_clip(ssq, noise_sd_per_clip=50.0, ratio=0.0) == 0.0
    with pytest.raises(ValueError, match="psi_noise_ratio"):
        CausalConfig(psi_noise_ratio=-1.0)
    assert CausalConfig.from_flat(CausalConfig(psi_noise_ratio=0.2).to_flat()).psi_noise_ratio == 0.2


# --------------------------------------------------------------------------- influence weights
def test_influence_weights_set_the_charged_bound_and_are_divided_out(health):
    """The weights the server sends with the influence step: every person's row
    ``[a, psi / C, k (psi / C)^2]`` is within ``sqrt(a^2 + 1 + k^2)`` whatever the item's clip C,
    which is what release_sensitivity charges; the person at |psi| = C attains it, so a
    sensitivity that kept the default weights (a larger k here), forgot the square, or a row
    that forgot to divide by a clip above 1 would be exceeded; and the server divides the
    weights out (equal estimates at ε = inf whatever the weights)."""
    from fedrec.common.causal.sensitivity import INFLUENCE_WEIGHTS, release_sensitivity

    insts, _ = health
    item = "diet_counselling"
    rows = encode_item(insts[0], item)
    p = rows.p
    beta, coef = np.zeros(p), np.zeros(p)
    for clip in (0.5, 3.0):
        for rel in [(0.05, 0.2), (0.25, 1.5)]:
            arrays = {f"clip/{item}": np.array([clip]), "influence-weights": np.array(rel)}
            c = influence_sum_terms(rows, estimator="aipw", clip=clip, prop_coef=beta, coef1=coef, coef0=coef,
                                    rel=rel)
            bound = math.sqrt(rel[0] ** 2 + 1 + rel[1] ** 2)
            assert c.bound == pytest.approx(bound) == release_sensitivity("influence", p, arrays, 1, [item])
            assert release_sensitivity("influence", p, arrays, 4) == pytest.approx(2 * bound)
            assert np.linalg.norm(c.terms, axis=1).max() <= bound + 1e-9
            np.testing.assert_allclose(c.terms[:, 0], rel[0])
            assert np.abs(c.terms[:, 1]).max() <= 1.0 + 1e-12
            if clip == 0.5:  # here someone's |psi| reaches the clip; at 3 the largest is 1.9
                assert np.abs(c.terms[:, 1]).max() == pytest.approx(1.0)
            np.testing.assert_allclose(c.terms[:, 2], rel[1] * c.terms[:, 1] ** 2)
    assert release_sensitivity("influence", p, {}, 1) == pytest.approx(influence_bound(INFLUENCE_WEIGHTS))
    assert influence_bound((0.25, 1.5)) > influence_bound() * 1.3  # the default would undercharge
    for bad in ([0.1, -1.0], [0.1]):
        with pytest.raises(ValueError, match="influence-weights"):
            release_sensitivity("influence", p, {"influence-weights": np.array(bad)}, 1)
    # each item's clip is checked before any charge, although it does not enter the bound
    for bad in ({}, {f"clip/{item}": np.array([0.0])}, {f"clip/{item}": np.array([np.nan])},
                {f"clip/{item}": np.array([1.0, 2.0])}):
        with pytest.raises(ValueError, match=f"clip/{item}"):
            release_sensitivity("influence", p, bad, 1, [item])
    a = estimate_inprocess(insts, CausalConfig(epsilon=INF, items=(item,))).items[item]
    b = estimate_inprocess(insts, CausalConfig(epsilon=INF, items=(item,), influence_count_weight=0.05)).items[item]
    assert b["ate"] == pytest.approx(a["ate"], rel=1e-9) and b["se"] == pytest.approx(a["se"], rel=1e-9)


def test_each_item_gets_its_own_psi_clip_and_noise_in_proportion_to_it(health):
    """Two items in one influence release with clips 10x apart: one person moves the whole
    release by at most sqrt(2) x the per-item bound (what is charged), yet each item's psi sum,
    after the server divides its weights out, carries noise in proportion to its own clip; a
    shared clip (the larger) would give the narrow item 10x the noise SD."""
    from fedrec.client.statistics import release, step_contributions
    from fedrec.common.causal.sensitivity import influence_weights, release_sensitivity
    from fedrec.server.causal import _noise_var

    insts, _ = health
    items = ["diet_counselling", "walking_group"]
    p = encode_item(insts[0], items[0]).p
    clips = {items[0]: 0.2, items[1]: 2.0}
    rel = (0.05, 0.5)
    arrays = {**{f"beta/{it}": np.zeros(p) for it in items}, **{f"mu1/{it}": np.zeros(p) for it in items},
              **{f"mu0/{it}": np.zeros(p) for it in items},
              **{f"clip/{it}": np.array([c]) for it, c in clips.items()}, "influence-weights": np.array(rel)}
    sens = release_sensitivity("influence", p, arrays, 2, items)
    assert sens == pytest.approx(math.sqrt(2) * influence_bound(rel))
    blocks = step_contributions("influence", insts[0], items, arrays, estimator="aipw")
    # every row of either item is within the per-item bound, so one person (in both items at
    # most) moves the release by at most the charged sensitivity, whatever the clips
    for it in items:
        assert np.linalg.norm(blocks[it].terms, axis=1).max() <= influence_bound(rel) + 1e-9
    rng = np.random.default_rng(3)
    sigma = 2.0
    draws = {it: [] for it in items}
    for _ in range(400):
        assert release_bound(blocks) == pytest.approx(sens)
        sums = release(blocks, event=GaussianEvent(noise_multiplier=sigma, sensitivity=sens), generator=rng)
        for it in items:
            draws[it].append(sums[it][1] / influence_weights(clips[it], rel)[1])  # psi sum, psi units
    nv = _noise_var(CausalConfig(epsilon=1.0, noise_mode="local"), sigma, sens, 1)
    for it in items:
        sd = float(np.std(draws[it]))
        assert sd == pytest.approx(math.sqrt(nv) * clips[it], rel=0.12)
    assert np.std(draws[items[1]]) / np.std(draws[items[0]]) == pytest.approx(10.0, rel=0.2)


@pytest.mark.parametrize("noise_mode", ["local", "distributed"])
def test_noise_limited_clip_uses_the_weights_the_influence_release_will_carry(noise_mode):
    """Where the noise-limited rule sets an item's clip, that item's psi-sum noise at the chosen
    clip and weights (the release's real sensitivity, psi units) is ratio x sqrt(its sum psi^2):
    the rule must not assume the default weights (1.146) when the psi^2 weight it picks differs;
    each item's clip is its own (the narrow item's is not raised to the wide one's); and the
    weight is enough for every item at its clip (the pair is a fixed point)."""
    from fedrec.common.causal.clipping import clip_from_histogram, histogram_sum_squares, psi_grid, psi_square_weight
    from fedrec.common.causal.sensitivity import influence_weights, release_sensitivity
    from fedrec.server.causal import _clip_and_weights, _noise_var

    cfg = CausalConfig(epsilon=8.0, items=("a", "b"), noise_mode=noise_mode, n_min=8, psi_noise_ratio=0.5)
    plan = plan_budget(cfg)
    edges = psi_grid("aipw") * 0.3
    rng = np.random.default_rng(5)
    counts = {it: np.bincount(np.searchsorted(edges, np.abs(rng.normal(0, s, 40000)), side="right"),
                              minlength=len(edges) + 1).astype(float) for it, s in (("a", 0.05), ("b", 0.2))}
    clips, rel = _clip_and_weights(cfg, plan, counts, edges, ["a", "b"], contributors=8)
    for it in ("a", "b"):
        assert clips[it] > cfg.clip_margin * clip_from_histogram(counts[it], edges, tail=cfg.clip_tail)
    assert clips["b"] > 2.5 * clips["a"]  # per item: psi's spread differs 4x
    # the weights it picks differ from the default by more than this test's tolerance
    assert abs(influence_bound(rel) / influence_bound() - 1.0) > 0.03
    arrays = {"clip/a": np.array([clips["a"]]), "clip/b": np.array([clips["b"]]), "influence-weights": np.array(rel)}
    coord_nv = _noise_var(cfg, plan.sigma["influence"], release_sensitivity("influence", 5, arrays, 2, ["a", "b"]), 8)
    for it in ("a", "b"):
        ssq = histogram_sum_squares(counts[it], edges, upto=clip_from_histogram(counts[it], edges, tail=cfg.psi_tail))
        psi_sd = math.sqrt(coord_nv) / influence_weights(clips[it], rel)[1]
        assert psi_sd == pytest.approx(cfg.psi_noise_ratio * math.sqrt(ssq), rel=0.01)
        unit_nv = _noise_var(cfg, plan.sigma["influence"], clips[it] * math.sqrt(2), 8)
        assert psi_square_weight(ssq, unit_nv, clips[it], count_weight=rel[0], target=cfg.psi_square_error) <= rel[1]


def test_psi_square_weight_is_the_smallest_meeting_the_target():
    """The chosen k meets ``sd(noise on sum psi^2) <= target x (sum psi^2 + noise var)`` and the
    next smaller grid point does not; a larger clip (its noise goes as clip^2) needs a larger k,
    more budget (smaller noise) a smaller one; no noise keeps the default."""
    from fedrec.common.causal.clipping import psi_square_weight
    from fedrec.common.causal.sensitivity import INFLUENCE_WEIGHTS

    grid = np.geomspace(0.02, 2.0, 101)

    def err(k, s2, unv, clip):
        nv = unv * (1 + 0.25**2 + k * k)
        return math.sqrt(nv) * clip / k / (s2 + nv)

    s2, unv, clip = 1800.0, 30.0**2, 5.0
    k = psi_square_weight(s2, unv, clip, count_weight=0.25, target=0.3, grid=grid)
    i = int(np.flatnonzero(np.isclose(grid, k))[0])
    assert i > 0 and err(k, s2, unv, clip) <= 0.3 < err(grid[i - 1], s2, unv, clip)
    assert psi_square_weight(s2, unv, 4 * clip, count_weight=0.25, target=0.3) > k
    assert psi_square_weight(s2, unv / 16, clip, count_weight=0.25, target=0.3) < k
    assert psi_square_weight(s2, 0.0, clip, count_weight=0.25, target=0.3) == INFLUENCE_WEIGHTS[1]
    assert psi_square_weight(s2, unv, 1e6, count_weight=0.25, target=0.3, grid=grid) == grid[-1]  # unreachable
    with pytest.raises(ValueError, match="psi_square_error"):
        CausalConfig(psi_square_error=-0.1)
    with pytest.raises(ValueError, match="influence_count_weight"):
        CausalConfig(influence_count_weight=0.0)
    cfg = CausalConfig(psi_square_error=0.2, influence_count_weight=0.1)
    assert CausalConfig.from_flat(cfg.to_flat()) == cfg


def test_the_server_chooses_the_psi_square_weight_under_dp(health):
    """Under DP the server picks the psi^2 weight from the scale histogram (reported per item);
    ``psi_square_error = 0`` keeps the fixed default."""
    insts, _ = health
    item = "diet_counselling"
    cfg = CausalConfig(epsilon=1.0, items=(item,), noise_mode="distributed", n_min=8)
    r = estimate_inprocess(insts, cfg, rng=np.random.default_rng(0)).items[item]
    assert 0.02 <= r["psi_square_weight"] <= 2.0
    assert r["psi_square_weight"] != 0.5  # chosen on the grid, not the fixed default
    fixed = estimate_inprocess(insts, CausalConfig(epsilon=1.0, items=(item,), noise_mode="distributed", n_min=8,
                                                   psi_square_error=0.0), rng=np.random.default_rng(0)).items[item]
    from fedrec.common.causal.sensitivity import INFLUENCE_WEIGHTS

    assert fixed["psi_square_weight"] == INFLUENCE_WEIGHTS[1]


# --------------------------------------------------------------------------- outcome range
def test_outcome_range_from_a_histogram_holds_all_but_the_tails():
    """On a noiseless histogram the interval leaves at most ``tail`` of the people out on each
    side, is widened by the margin about its middle and never leaves [-1, 1]; a degenerate
    histogram keeps its bin's width; positive noise in empty outer bins can only widen it."""
    from fedrec.common.causal.clipping import outcome_grid, outcome_range_from_histogram

    edges = outcome_grid(2 ** 0.5)
    assert np.all(np.diff(edges) > 0) and edges[0] == -1.0 and edges[-1] == 1.0
    y = np.random.default_rng(0).normal(0.25, 0.05, 20_000)  # education-like: off-centre, narrow
    counts = np.bincount(np.searchsorted(edges, y, side="right"), minlength=len(edges) + 1).astype(float)
    c, h = outcome_range_from_histogram(counts, edges, tail=0.005, margin=1.0)
    lo, hi = c - h, c + h
    assert np.mean(y < lo) <= 0.005 and np.mean(y > hi) <= 0.005
    assert h < 0.25  # far narrower than the declared [-1, 1]
    c2, h2 = outcome_range_from_histogram(counts, edges, tail=0.005, margin=1.5)
    assert c2 == pytest.approx(c) and h2 == pytest.approx(1.5 * h)
    _, hw = outcome_range_from_histogram(counts, edges, tail=0.005, margin=100.0)
    assert hw <= 1.0
    one = np.zeros(len(edges) + 1)
    one[np.searchsorted(edges, 0.3, side="right")] = 500.0
    c1, h1 = outcome_range_from_histogram(one, edges, tail=0.005, margin=1.0)
    assert c1 - h1 <= 0.3 <= c1 + h1 and h1 > 0
    noisy = counts + np.where(counts == 0, 200.0, 0.0)  # noise in the empty bins only
    cn, hn = outcome_range_from_histogram(noisy, edges, tail=0.005, margin=1.0)
    assert cn - hn <= lo and cn + hn >= hi


def test_outcome_map_keeps_the_bound_and_maps_the_fit_back_exactly(health):
    """The outcome release on a re-centred, narrower interval: rows stay within the same
    charged bound (y' is clipped to [-1, 1] whatever the map: an extreme person attains at most
    it), and a fit on the mapped outcome, mapped back, equals the fit on the scaled outcome
    where nobody is clipped (ridge 0)."""
    from fedrec.common.causal.linalg import vech_len
    from fedrec.common.causal.nuisance import arm_from_mapped, ridge_fit
    from fedrec.common.causal.sensitivity import outcome_map, release_sensitivity

    insts, _ = health
    rows = encode_item(insts[0], "diet_counselling")
    p = rows.p
    centre, half = float(np.median(rows.y)), float(np.abs(rows.y - np.median(rows.y)).max()) * 1.01
    plain = outcome_gram_terms(rows)
    mapped = outcome_gram_terms(rows, 1.0, (centre, half))
    assert mapped.bound == plain.bound == pytest.approx(outcome_bound(p))
    assert np.linalg.norm(mapped.terms, axis=1).max() <= mapped.bound + 1e-9
    edge = ItemRows(rows.item, np.ones((1, p)), np.ones(1), np.ones(1))  # y at the top of the bounds
    far = outcome_gram_terms(edge, 1.0, (-0.9, 0.05))  # (1 + 0.9) / 0.05 = 38 before clipping
    np.testing.assert_allclose(far.terms, outcome_gram_terms(edge).terms)  # y' clipped to 1, not 38
    assert np.linalg.norm(far.terms) <= outcome_bound(p) + 1e-9
    m = vech_len(p) + p + 1

    def fit(c):
        s = c.terms.sum(axis=0)[m:]  # arm 1
        return ridge_fit(s[:vech_len(p)], s[vech_len(p):vech_len(p) + p], float(s[-1]))

    direct, back = fit(plain), arm_from_mapped(fit(mapped), centre, half)
    np.testing.assert_allclose(back.coef, direct.coef, rtol=1e-8, atol=1e-10)
    assert back.resid_var == pytest.approx(direct.resid_var, rel=1e-8)
    # the map travels as a public array; a map outside [-1, 1] or with half <= 0 is refused
    arrays = {"outcome-map/diet_counselling": np.array([centre, half])}
    assert outcome_map(arrays, "diet_counselling") == (centre, half)
    assert outcome_map({}, "diet_counselling") == (0.0, 1.0)
    assert release_sensitivity("outcome", p, arrays, 1) == pytest.approx(outcome_bound(p))
    for bad in ([0.0, 0.0], [2.0, 0.5], [0.0, np.nan], [0.1]):
        with pytest.raises(ValueError, match="outcome-map"):
            release_sensitivity("outcome", p, {"outcome-map/diet_counselling": np.array(bad)}, 1)
    for bad in ({}, {"outcome-edges": np.array([0.5, 0.1])}):
        with pytest.raises(ValueError, match="outcome-edges"):
            release_sensitivity("outcome-range", p, bad, 1)


def test_outcome_range_step_is_planned_charged_and_reported(health):
    """Under DP (aipw, ra) the outcome-range histogram is one more planned, noised release of
    bound 1 per item, the run still composes to ε, and each item reports the interval its
    outcome models fit (inside the declared bounds, around the outcomes); not without DP, not
    for ipw (no outcome models), not with share 0."""
    from fedrec.client.statistics import outcome_range_terms
    from fedrec.common.causal.clipping import outcome_grid
    from fedrec.common.causal.sensitivity import step_bound

    insts, _ = health
    item = "diet_counselling"
    cfg = CausalConfig(epsilon=1.0, items=(item,), noise_mode="distributed", n_min=8)
    assert cfg.steps().index("outcome-range") == cfg.steps().index("outcome") - 1
    assert "outcome-range" in CausalConfig(epsilon=1.0, estimator="ra").steps()
    for off in (CausalConfig(epsilon=INF), CausalConfig(epsilon=1.0, estimator="ipw"),
                CausalConfig(epsilon=1.0, share_outcome_range=0.0)):
        assert "outcome-range" not in off.steps()
    plan = plan_budget(cfg)
    spent = epsilon_for(plan.events(), delta=cfg.delta, accountant="prv")
    assert 0.97 <= spent <= 1.0 + 1e-9 and plan.sigma["outcome-range"] > 0
    rows = encode_item(insts[0], item)
    c = outcome_range_terms(rows, outcome_grid())
    assert c.bound == 1.0 == step_bound("outcome-range", rows.p)
    np.testing.assert_allclose(c.terms.sum(axis=1), 1.0)  # one count per person
    res = estimate_inprocess(insts, cfg, rng=np.random.default_rng(0))
    assert res.contributors["outcome-range"] == len(insts)
    lo, hi = res.items[item]["outcome_range"]
    y = np.concatenate([d.interactions.loc[d.interactions["item_id"] == item, "outcome"] for d in insts])
    b = insts[0].study.outcome_bounds
    assert b[0] <= lo < np.quantile(y, 0.01) and np.quantile(y, 0.99) < hi <= b[1]
    assert hi - lo < 0.8 * (b[1] - b[0])
    cfg2 = CausalConfig(share_outcome_range=0.05, outcome_range_tail=0.01, outcome_range_margin=1.5,
                        outcome_grid_factor=2.0)
    assert CausalConfig.from_flat(cfg2.to_flat()) == cfg2
    for bad in ({"outcome_range_tail": 0.0}, {"outcome_range_margin": 0.5}, {"outcome_grid_factor": 1.0}):
        with pytest.raises(ValueError):
            CausalConfig(**bad)


def _arm_sums(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from fedrec.common.causal.linalg import vech

    return vech(x.T @ x), x.T @ y, float(y @ y)


def test_ridge_fit_reports_the_grams_noise_apart_and_the_cate_intervals_carry_it(health) -> None:
    """The noise on the released Gram moves the outcome coefficients by ``-A^-1 E coef``: with
    large coefficients it is most of their DP spread. ``gram_noise_cov`` must hold that part,
    ``total_cov`` must add it to ``cov`` (sampling + X'y noise), and the CATE's intervals must use
    ``total_cov``: leaving it out (the release before this one) is caught here by a clear margin."""
    from fedrec.common.causal.linalg import vech_len
    from fedrec.common.causal.nuisance import ridge_fit

    rng = np.random.default_rng(11)
    p, n = 4, 800
    x = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    y = x @ np.array([0.5, 1.0, -0.8, 0.6]) + 0.3 * rng.normal(size=n)
    gram_vech, xy, yy = _arm_sums(x, y)
    v, vg, m = 5.0, 40.0, vech_len(p)
    fit = ridge_fit(gram_vech, xy, yy, noise_var=v, gram_noise_var=vg, floor=1.0)
    assert fit.gram_noise_cov is not None and fit.noise_cov is not None and fit.ainv is not None
    np.testing.assert_allclose(fit.total_cov - fit.cov, fit.gram_noise_cov, atol=1e-15)
    # the X'y noise is the rest of the noise covariance: v A^-1 A^-1
    np.testing.assert_allclose(fit.noise_cov - fit.gram_noise_cov, v * fit.ainv @ fit.ainv, rtol=1e-9, atol=1e-15)

    draws = np.array([ridge_fit(gram_vech + rng.normal(scale=math.sqrt(vg), size=m),
                                xy + rng.normal(scale=math.sqrt(v), size=p),
                                yy + rng.normal(scale=math.sqrt(v)), noise_var=v, gram_noise_var=vg,
                                floor=1.0).coef for _ in range(2000)])
    emp = np.cov(draws.T)
    contrasts = [np.eye(p)[j] for j in range(p)] + [np.array([1.0, 1.0, -1.0, 0.5])]
    for c in contrasts:
        observed = float(c @ emp @ c)
        assert 0.85 < observed / float(c @ fit.noise_cov @ c) < 1.15, c
    # without the Gram's part the noise would be well under half of what it is
    assert np.trace(emp) / np.trace(fit.noise_cov - fit.gram_noise_cov) > 2.5

    # the estimator's CATE intervals and cate_cov carry it (both arms' Gram noise)
    insts, _ = health
    cfg = CausalConfig(epsilon=1.0, items=("walking_group",))
    est = estimate_inprocess(insts, cfg, rng=np.random.default_rng(3)).estimators["walking_group"]
    assert est.arm1 is not None and est.arm0 is not None
    rows = insts[0].covariate_matrix()[:20]
    lo, hi = est.effect_interval(rows)
    design = est._rows(rows)
    with_gram = est.arm1.total_cov + est.arm0.total_cov
    without = est.arm1.cov + est.arm0.cov
    se = (hi - lo) / (2 * 1.959963984540054)
    np.testing.assert_allclose(se, est.scale * np.sqrt(np.einsum("ij,jk,ik->i", design, with_gram, design)), rtol=1e-9)
    assert np.all(np.einsum("ij,jk,ik->i", design, with_gram - without, design) > 0)


def test_cate_shrinkage_grows_with_the_noise(health) -> None:
    """``cate_shrinkage`` (the share of the arm models the ridge and the eigenvalue floor take) is
    0 without DP and grows as ε falls on the same data; causal.json reports it per item."""
    insts, _ = health
    shrink = {}
    for eps in (INF, 8.0, 0.5):
        res = estimate_inprocess(insts, CausalConfig(epsilon=eps, items=("walking_group",)),
                                 rng=np.random.default_rng(5))
        shrink[eps] = res.estimators["walking_group"].cate_shrinkage()
        assert res.items["walking_group"]["cate_shrinkage"] == shrink[eps]
    assert abs(shrink[INF]) < 1e-6 and 0.0 < shrink[8.0] < shrink[0.5] <= 1.5, shrink


def test_sampling_variance_reports_the_noise_its_psi_square_sum_carries() -> None:
    """causal.json's ``sampling_var_noise_sd`` is the SD the DP noise on sum(psi^2) puts on
    ``sampling_var``: checked against the spread of ``sampling_var`` over noise draws (a wrong
    power of N or a missing scale would be off by orders of magnitude)."""
    from fedrec.common.causal.influence import ate_from_sums

    rng = np.random.default_rng(3)
    psi = rng.normal(0.2, 1.5, size=4000)
    s_n, s_psi, s_psi2 = float(len(psi)), float(psi.sum()), float((psi**2).sum())
    v_psi2, scale = 400.0**2, 7.0
    draws = [ate_from_sums(s_n, s_psi, s_psi2 + rng.normal(0, math.sqrt(v_psi2)), v_psi2=v_psi2, scale=scale)
             for _ in range(4000)]
    observed = float(np.std([d.sampling_var for d in draws]))
    reported = draws[0].sampling_var_noise_sd
    assert reported == pytest.approx(observed, rel=0.05)
    assert ate_from_sums(s_n, s_psi, s_psi2, scale=scale).sampling_var_noise_sd == 0.0  # no DP, no noise


def test_the_clip_rule_follows_the_noise_mode_and_the_knobs_override_it() -> None:
    """Distributed noise clips at 2 x the 1% edge of the |psi| histogram, local noise at 5 x the
    5% edge (its 1% edge is mostly count noise at ε <= 1); ``psi_clip_tail`` / ``psi_clip_margin``
    override either, and sum(psi^2) for the noise-limited rule comes from the ``psi_tail`` edge in
    both modes (so where that rule binds, ε >= 2, the modes size the clip the same way)."""
    from fedrec.common.causal.clipping import clip_from_histogram, psi_grid
    from fedrec.server.causal import _clip_and_weights

    edges = psi_grid("aipw") * 0.3
    rng = np.random.default_rng(11)
    psi = np.abs(rng.standard_t(3, 15000)) * 0.05  # a heavy tail: the 1% and 5% edges differ
    counts = {"a": np.bincount(np.searchsorted(edges, psi, side="right"), minlength=len(edges) + 1).astype(float)}
    e1, e5 = (clip_from_histogram(counts["a"], edges, tail=t) for t in (0.01, 0.05))
    assert e5 < e1
    for mode, want in (("distributed", 2.0 * e1), ("local", 5.0 * e5)):
        cfg = CausalConfig(epsilon=0.5, items=("a",), noise_mode=mode, n_min=8, psi_noise_ratio=0.0)
        clips, _ = _clip_and_weights(cfg, plan_budget(cfg), counts, edges, ["a"], contributors=8)
        assert clips["a"] == pytest.approx(want), mode
    cfg = CausalConfig(epsilon=0.5, items=("a",), noise_mode="local", psi_clip_tail=0.01, psi_clip_margin=3.0,
                       psi_noise_ratio=0.0)
    assert _clip_and_weights(cfg, plan_budget(cfg), counts, edges, ["a"], contributors=8)[0]["a"] == pytest.approx(3 * e1)
    flat = CausalConfig.from_flat({"causal.expert.psi-clip-tail": "0.02", "causal.expert.psi-clip-margin": "-1"})
    assert (flat.psi_clip_tail, flat.psi_clip_margin, flat.clip_margin) == (0.02, None, 5.0)
    assert CausalConfig.from_flat(CausalConfig().to_flat()) == CausalConfig()


# ------------------------------------------------------------------ issue 29: acting on the answers
def test_distributed_noise_alone_narrows_the_ci_through_the_automatic_n_min():
    """`--noise-mode distributed` with nothing else: n_min resolves to the federation's size, so
    each institution adds σ²/8 and the ATE's noise SD drops about sqrt(8)-fold against local noise
    (with n_min = 1, the old default, it would not drop at all)."""
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("health", institutions=8, people=600, seed=31, skew=0.4)
    item = "smoking_cessation"
    assert CausalConfig(noise_mode="distributed").n_min == 0 and CausalConfig().resolved(8).n_min == 8
    se = {}
    for mode in ("local", "distributed"):
        cfg = CausalConfig(epsilon=2.0, items=(item,), noise_mode=mode)
        se[mode] = estimate_inprocess(insts, cfg, rng=np.random.default_rng(5)).items[item]["noise_se"]
    assert se["distributed"] < se["local"] / 2.0


def test_following_the_safe_recommendations_is_never_worse_than_the_status_quo():
    """The new-user scenario of issue 29 (health, 4 x 1,000, ε = 1, local noise, every item) on
    fresh seeds: following the output never loses against taking no item, by the ground truth;
    and at ε = ∞ on 8 x 2,500 it keeps >= 75% of the oracle's gain (20 fresh seeds, with ε = 4
    distributed too: benchmarks/causal_policy.py --safe, docs/measured/causal_policy_safe.json)."""
    from fedrec.server.causal_recommend import safe_policy_value
    from fedrec.simulations.causal_cli import resolve_config
    from fedrec.simulations.domains import domain_federation

    for seed in (9101, 9102, 9103):
        insts, truth = domain_federation("health", institutions=4, people=4000, seed=seed, skew=0.4)
        cfg, _ = resolve_config(insts, epsilon=1.0)
        res = estimate_inprocess(insts, cfg, rng=np.random.default_rng(seed))
        v = safe_policy_value(insts, truth, res.items, cfg.covariates, cfg.derived)
        assert v["gain"] >= 0.0, (seed, v)
    insts, truth = domain_federation("health", institutions=8, people=20000, seed=9201, skew=0.4)
    cfg, _ = resolve_config(insts, epsilon=math.inf)
    res = estimate_inprocess(insts, cfg)
    v = safe_policy_value(insts, truth, res.items, cfg.covariates, cfg.derived)
    assert v["share_of_oracle_gain"] >= 0.75 and v["harmed_share"] < 0.01, v
    cur = safe_policy_value(insts, truth, res.items, cfg.covariates, cfg.derived, status_quo="current")
    assert cur["gain"] > 0.0 and cur["status_quo"] == "current"


def test_ate_and_interval_are_cut_to_what_the_outcome_bounds_allow():
    """At ε = 1, local noise, every item on 4 x 250 people the raw estimates reach far outside
    ±(max - min); the reported ATE and CI never do, and the row says it was cut."""
    from fedrec.simulations.causal_cli import resolve_config
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("health", institutions=4, people=1000, seed=9301, skew=0.4)  # 4 x 250
    cfg, _ = resolve_config(insts, epsilon=1.0)
    res = estimate_inprocess(insts, cfg, rng=np.random.default_rng(1))
    lo_b, hi_b = insts[0].study.outcome_bounds
    limit = hi_b - lo_b
    for it, row in res.items.items():
        assert -limit <= row["ci_low"] <= row["ate"] <= row["ci_high"] <= limit, it
    assert any(row["cut_to_possible_range"] for row in res.items.values())
    assert all(row["uninformative"] == (row["ci_high"] - row["ci_low"] >= limit) for row in res.items.values())
