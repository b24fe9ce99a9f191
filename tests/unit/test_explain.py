"""Explanations (common/causal/explain.py, `fedrec-client explain`): contributions sum exactly to
the person's estimated benefit minus the average, and their SEs are statsmodels' for the same
linear contrasts of a fitted linear model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedrec.common.causal.explain import explain, explain_rows


def _fit(seed: int = 0, n: int = 500, p: int = 5):
    import statsmodels.api as sm

    rng = np.random.default_rng(seed)
    x = np.column_stack([np.ones(n), rng.uniform(-1, 1, (n, p - 1))])
    y = x @ rng.normal(0, 1, p) + rng.normal(0, 0.5, n)
    res = sm.OLS(y, x).fit()
    names = ["intercept"] + [f"c{k}" for k in range(1, p)]
    return x, names, res


@pytest.mark.parametrize("better", ["higher", "lower"])
def test_contributions_sum_exactly_to_benefit_minus_average_with_statsmodels_ses(better):
    x, names, res = _fit()
    coef = dict(zip(names, res.params))
    cov = res.cov_params()
    exps = explain_rows(x[:20], names, coef, cov, better=better, item="a", x_mean=x.mean(axis=0))
    s = 1.0 if better == "higher" else -1.0
    xbar = x.mean(axis=0)
    for row, ex in zip(x[:20], exps):
        total = sum(c.contribution for c in ex.contributions)
        assert total == pytest.approx(ex.benefit - ex.average_benefit, abs=1e-12)
        assert ex.difference == pytest.approx(total, abs=1e-12)
        assert ex.benefit == pytest.approx(s * res.predict(row[None, :])[0], rel=1e-12)
        assert ex.average_benefit == pytest.approx(s * np.mean(res.predict(x)), rel=1e-9)
        # SEs of the linear contrasts, from statsmodels
        assert ex.benefit_se == pytest.approx(float(res.t_test(row[None, :]).sd[0, 0]), rel=1e-9)
        d = row - xbar
        d[0] = 0.0
        assert ex.difference_se == pytest.approx(float(res.t_test(d[None, :]).sd[0, 0]), rel=1e-9)
        for k, c in enumerate(ex.contributions, start=1):
            r = np.zeros(len(names))
            r[k] = d[k]
            assert c.se == pytest.approx(float(res.t_test(r[None, :]).sd[0, 0]), rel=1e-9, abs=1e-15)
            lo, hi = c.ci
            assert lo <= c.contribution <= hi
    top = exps[0].top(2)
    assert abs(top[0].contribution) >= abs(top[1].contribution) >= max(abs(c.contribution) for c in exps[0].contributions
                                                                        if c not in top)


def test_a_model_that_does_not_match_the_design_is_one_clear_line():
    x, names, res = _fit()
    coef = dict(zip(names[:-1], res.params[:-1]))
    with pytest.raises(ValueError, match="no coefficient for 'c4'"):
        explain(x[0], x.mean(axis=0), names, coef, None)
    with pytest.raises(ValueError, match="better must be"):
        explain(x[0], x.mean(axis=0), names, dict(zip(names, res.params)), None, better="up")


def test_the_cli_explains_a_person_and_refuses_an_unknown_one(tmp_path):
    from fedrec.client.cli import app as client_cli
    from fedrec.client.statistics import design_columns
    from fedrec.common.datasets import write_institution
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("finance", institutions=1, people=60, seed=1, skew=0.0)
    folder = write_institution(tmp_path / insts[0].name, insts[0])
    names = ["intercept"] + [c[0] for c in design_columns(insts[0])]
    rng = np.random.default_rng(3)
    items = {}
    for it in insts[0].items["item_id"].astype(str)[:2]:
        a = rng.normal(0, 0.1, (len(names), len(names)))
        items[it] = {"ate": 1.0, "ci_low": 0.5, "ci_high": 1.5, "n": 60,
                     "cate_coef": dict(zip(names, rng.normal(0, 500, len(names)).tolist())),
                     "cate_cov": (a @ a.T).tolist()}
    cj = tmp_path / "causal.json"
    cj.write_text(json.dumps({"items": items, "nuisance_design": {"covariates": None, "derived": []},
                              "institutions": [insts[0].name], "epsilon_per_institution": {insts[0].name: 1.0}}))
    pid = str(insts[0].people["person_id"].iloc[0])
    res = CliRunner().invoke(client_cli, ["explain", str(cj), str(folder), "--person", pid, "--json", "--top", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert len(out["contributions"]) == 3 and out["evidence"]["people"] == 60
    assert out["benefit_ci_low"] <= out["estimated_benefit"] <= out["benefit_ci_high"]
    res = CliRunner().invoke(client_cli, ["explain", str(cj), str(folder), "--person", "nobody"])
    assert res.exit_code == 2 and "--person 'nobody'" in res.output
