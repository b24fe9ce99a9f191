"""The federated AIPW ATE and its SE against an independent pooled implementation.

The pooled "peer" in ``simulations/causal_cli.pooled_estimate`` hands its influence terms to
fedrec's own ``ate_from_sums``, so a bug there (say, a doubled sampling SE) moves both sides
and the existing equality test still passes. Here nothing of fedrec's estimator is reused:
the data are simulated in this file (raw covariates, a known logistic propensity, a linear
outcome), the nuisances are statsmodels ``Logit`` and per-arm ``OLS`` on the raw design, and
the ATE and its influence-function (sandwich) SE are the textbook formulas in numpy, with a
second SE from statsmodels' HC0 sandwich of the mean of psi.

Why the two sides agree to ~1e-13 (tested to 1e-9): at ε = ∞ fedrec's propensity is Newton's method on the
exact summed gradient/Hessian (no ridge: ``newton_update(ridge=0)``, run to convergence) and
its arm models are ridge fits with ridge 0, i.e. the logistic MLE and OLS. Both are invariant
to an invertible affine map of the covariates (fedrec scales them to [-1, 1] by the public
bounds, this file does not), so the fitted propensities and outcome predictions are the same
functions of the data. The estimand's definitions are shared and stated here explicitly:
propensities trimmed to [0.05, 0.95] and outcome predictions clipped to the outcome's public
bounds. The SE is the plug-in influence-function SE ``sqrt(sum (psi - ate)^2) / n`` (divisor
n, as HC0; the n - 1 version differs by 1/(2n) relative, ~3e-4 here, far above the 1e-9
tolerance, so the divisor is pinned too).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from fedrec.common.causal.config import CausalConfig
from fedrec.common.datasets import InstitutionData
from fedrec.common.schema import Covariate, Study
from fedrec.simulations.causal_cli import estimate_inprocess

OUTCOME_BOUNDS = (0.0, 100.0)
TRUE_ATE = 4.0
TRIM_LO, TRIM_HI = 0.05, 0.95


def _study() -> Study:
    return Study(
        domain="breakage-test",
        covariates=(
            Covariate(name="age", kind="number", lower=18.0, upper=90.0),
            Covariate(name="score", kind="number", lower=0.0, upper=10.0),
            Covariate(name="smoker", kind="binary", lower=0.0, upper=1.0),
        ),
        outcome_name="wellbeing",
        outcome_unit="points",
        outcome_bounds=OUTCOME_BOUNDS,
    )


def simulate(seed: int = 7, people: tuple[int, ...] = (500, 700, 600)) -> tuple[list[InstitutionData], dict]:
    """Three institutions, one item ``coach``; exposure ~ Bernoulli(known logistic propensity)."""
    rng = np.random.default_rng(seed)
    n = sum(people)
    age = rng.uniform(20.0, 85.0, n)
    score = rng.uniform(0.5, 9.5, n)
    smoker = (rng.random(n) < 0.3).astype(np.int64)
    lin = -0.3 + 0.025 * (age - 50.0) - 0.15 * (score - 5.0) + 0.6 * smoker
    prop = 1.0 / (1.0 + np.exp(-lin))  # in about [0.2, 0.8]: inside the trimming band
    t = (rng.random(n) < prop).astype(np.int64)
    y = 40.0 + 0.2 * age + 2.0 * score - 6.0 * smoker + TRUE_ATE * t + 0.05 * t * age + rng.normal(0, 8.0, n)
    y = np.round(np.clip(y, *OUTCOME_BOUNDS), 3)
    pid = np.array([f"P{i:05d}" for i in range(n)], dtype=object)
    study = _study()
    items = pd.DataFrame({"item_id": ["coach"], "name": ["Coaching"], "description": ["weekly coaching"],
                          "category": ["support"]})
    stamps = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 365, n), unit="D")
    people_all = pd.DataFrame({"person_id": pd.Series(pid, dtype="str"), "age": age, "score": score,
                               "smoker": smoker})
    inter_all = pd.DataFrame({
        "person_id": pd.Series(pid, dtype="str"), "item_id": pd.Series(["coach"] * n, dtype="str"),
        "exposed": t, "engagement": np.where(t == 1, 4.0, np.nan), "outcome": y, "timestamp": stamps,
    })
    insts, start = [], 0
    for k, m in enumerate(people):
        sl = slice(start, start + m)
        insts.append(InstitutionData(name=f"inst_{k}", people=people_all.iloc[sl].reset_index(drop=True),
                                     items=items.copy(), interactions=inter_all.iloc[sl].reset_index(drop=True),
                                     study=study))
        start += m
    return insts, {"x": np.column_stack([age, score, smoker]).astype(np.float64), "t": t.astype(np.float64),
                   "y": y, "prop": prop}


def textbook_aipw(x: np.ndarray, t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(ATE, influence-function SE in numpy, HC0 sandwich SE from statsmodels), raw units."""
    X = sm.add_constant(x, has_constant="add")
    e = sm.Logit(t, X).fit(disp=0, method="newton", maxiter=100, tol=1e-12).predict(X)
    e = np.clip(e, TRIM_LO, TRIM_HI)
    mu1 = np.clip(sm.OLS(y[t == 1], X[t == 1]).fit().predict(X), *OUTCOME_BOUNDS)
    mu0 = np.clip(sm.OLS(y[t == 0], X[t == 0]).fit().predict(X), *OUTCOME_BOUNDS)
    psi = mu1 - mu0 + t * (y - mu1) / e - (1 - t) * (y - mu0) / (1 - e)
    n = psi.size
    ate = float(psi.mean())
    se = float(math.sqrt(np.sum((psi - ate) ** 2)) / n)
    hc0 = float(sm.OLS(psi, np.ones(n)).fit(cov_type="HC0").bse[0])
    return ate, se, hc0


@pytest.fixture(scope="module")
def run() -> tuple[dict, dict, tuple[float, float, float]]:
    """(fedrec's ε = ∞ result for ``coach``, the raw data, the textbook (ATE, SE, HC0 SE))."""
    insts, raw = simulate()
    cfg = CausalConfig(epsilon=float("inf"), items=("coach",), newton_steps=12)
    fed = estimate_inprocess(insts, cfg).items["coach"]
    return fed, raw, textbook_aipw(raw["x"], raw["t"], raw["y"])


def test_federated_aipw_ate_and_se_match_an_independent_pooled_estimator(run) -> None:
    fed, raw, (ate, se, hc0) = run
    assert se == pytest.approx(hc0, rel=1e-10)  # the two independent SEs agree with each other
    assert fed["n"] == pytest.approx(raw["t"].size, rel=1e-12)
    assert fed["ate"] == pytest.approx(ate, rel=1e-9)
    assert fed["se"] == pytest.approx(se, rel=1e-9)
    assert fed["noise_se"] == 0.0
    # and the design is informative: the estimate is about the truth, the SE a plausible size
    assert abs(fed["ate"] - (TRUE_ATE + 0.05 * raw["x"][:, 0].mean())) < 4 * fed["se"]
    assert 0.2 < fed["se"] < 1.0


def test_the_ci_is_ate_plus_minus_z_se(run) -> None:
    """The reported interval is the normal one built from that SE (a CI that ignored the SE, or
    used another one, would fail)."""
    fed, _, (ate, se, _) = run
    z = 1.959963984540054
    assert fed["ci_low"] == pytest.approx(ate - z * se, rel=1e-9)
    assert fed["ci_high"] == pytest.approx(ate + z * se, rel=1e-9)


# ------------------------------------------------------------------ exact at ε = ∞ through SecAgg+
def _rescaled(kind: str) -> tuple[list[InstitutionData], dict, tuple[float, float]]:
    """The simulated data with a large-scale outcome (earnings-like dollars, ±100,000) or a 0/1
    outcome, its declared bounds changed to match."""
    import dataclasses

    insts, raw = simulate()
    if kind == "dollars":
        bounds, f = (-100_000.0, 100_000.0), (lambda y: np.round((y - 50.0) * 1_000.0, 2))
    else:
        bounds, f = (0.0, 1.0), (lambda y: (y > 60.0).astype(np.float64))
    out = []
    for d in insts:
        inter = d.interactions.copy()
        inter["outcome"] = f(inter["outcome"].to_numpy())
        out.append(dataclasses.replace(d, interactions=inter,
                                       study=dataclasses.replace(d.study, outcome_bounds=bounds)))
    return out, {**raw, "y": f(raw["y"])}, bounds


def _textbook(raw: dict, bounds: tuple[float, float]) -> tuple[float, float]:
    X = sm.add_constant(raw["x"], has_constant="add")
    t, y = raw["t"], raw["y"]
    e = np.clip(sm.Logit(t, X).fit(disp=0, method="newton", maxiter=100, tol=1e-12).predict(X), TRIM_LO, TRIM_HI)
    mu1 = np.clip(sm.OLS(y[t == 1], X[t == 1]).fit().predict(X), *bounds)
    mu0 = np.clip(sm.OLS(y[t == 0], X[t == 0]).fit().predict(X), *bounds)
    psi = mu1 - mu0 + t * (y - mu1) / e - (1 - t) * (y - mu0) / (1 - e)
    return float(psi.mean()), float(psi.std() / math.sqrt(psi.size))


@pytest.mark.parametrize("kind", ["dollars", "binary"])
def test_secagg_quantisation_is_exact_at_epsilon_inf(kind, monkeypatch) -> None:
    """Issue 29: at ε = ∞ the sums go through SecAgg+'s quantiser on the grid the Flower run asks
    for (server/causal.py secagg_sizing) and the ATE and SE still equal the pooled textbook AIPW to
    1e-6 relative, on an outcome in dollars and on a 0/1 outcome. The quantiser's own no-noise grid
    (32-bit, sized for a million people) misses that: the check has the power to fail."""
    insts, raw, bounds = _rescaled(kind)
    ate, se = _textbook(raw, bounds)
    cfg = CausalConfig(epsilon=float("inf"), items=("coach",))
    fed = estimate_inprocess(insts, cfg, secagg=True).items["coach"]
    assert fed["ate"] == pytest.approx(ate, rel=1e-6)
    assert fed["se"] == pytest.approx(se, rel=1e-6)
    import fedrec.server.causal as server

    sizing = server.secagg_sizing
    monkeypatch.setattr(server, "secagg_sizing",  # the grid before issue 29: no resolution request
                        lambda *a: {"secagg.clip-range": sizing(*a)["secagg.clip-range"], "secagg.noise-std": None})
    old = estimate_inprocess(insts, cfg, secagg=True).items["coach"]
    assert max(abs(old["ate"] / ate - 1), abs(old["se"] / se - 1)) > 1e-6
