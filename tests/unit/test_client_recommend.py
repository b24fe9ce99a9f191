"""fedrec-client recommend: an institution ranks items for its people by the released CATE models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrec.client.cli import app as client_app
from fedrec.client.recommend import recommendations
from fedrec.client.statistics import raw_design
from fedrec.common.causal.config import CausalConfig
from fedrec.common.datasets import write_ground_truth, write_institution
from fedrec.common.errors import FedrecInputError
from fedrec.common.jsonio import write_json
from fedrec.server.causal_recommend import policy_values
from fedrec.simulations.causal_cli import estimate_inprocess
from fedrec.simulations.domains import domain_federation


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A simulated federation on disk and the causal.json of an ε = inf run on it (the same
    run_protocol code a Flower run uses; the report sections `fedrec-sim causal` writes)."""
    root = tmp_path_factory.mktemp("rec")
    insts, truth = domain_federation("health", institutions=2, people=2000, seed=21, skew=0.5)
    for d in insts:
        write_institution(root / "data" / d.name, d)
    write_ground_truth(root / "data" / "ground_truth", truth)
    res = estimate_inprocess(insts, CausalConfig(epsilon=math.inf))
    report = {"items": res.items, "nuisance_design": {"covariates": None, "derived": [], "source": "all"}}
    write_json(root / "causal.json", report)
    return root, insts, truth, res


def test_recommend_ranks_each_person_by_the_released_cate(study, tmp_path):
    """The plain ranking (``rank_all``: no abstention) is each estimator's own CATE argmax."""
    from rich.console import Console

    from fedrec.client.recommend import run_recommend

    root, insts, truth, res = study
    out = tmp_path / "recs.csv"
    console = Console(record=True, width=200)
    assert run_recommend(root / "causal.json", root / "data" / insts[0].name, k=2, items=None, out=out,
                         console=console, rank_all=True) == 0
    recs = pd.read_csv(out, dtype={"person_id": str})
    people = insts[0].people["person_id"].astype(str).to_numpy()
    assert len(recs) == 2 * len(people) and list(recs["rank"][:2]) == [1, 2]
    wide = recs.pivot(index="person_id", columns="rank", values="estimated_benefit").loc[people]
    assert (wide[1] >= wide[2]).all()  # best first
    # independent path: each estimator's own effect(X) (whitened design) on the raw covariates
    x_raw, _ = raw_design(insts[0])
    tau = np.column_stack([res.estimators[it].effect(x_raw) for it in truth.item_ids])
    sign = 1.0 if insts[0].study.outcome_better == "higher" else -1.0
    top = recs[recs["rank"] == 1].set_index("person_id").loc[people]
    best = np.asarray(truth.item_ids)[(sign * tau).argmax(axis=1)]
    assert (top["item_id"].to_numpy() == best).all()
    pick = (sign * tau).argmax(axis=1)
    assert np.allclose(top["estimated_effect"], tau[np.arange(len(people)), pick], rtol=1e-9)
    # the CI from causal.json's cate_cov equals each estimator's own effect_interval
    lo = np.column_stack([res.estimators[it].effect_interval(x_raw)[0] for it in truth.item_ids])
    hi = np.column_stack([res.estimators[it].effect_interval(x_raw)[1] for it in truth.item_ids])
    rows = np.arange(len(people))
    assert np.allclose(top["effect_ci_low"], lo[rows, pick], rtol=1e-9, atol=1e-9)
    assert np.allclose(top["effect_ci_high"], hi[rows, pick], rtol=1e-9, atol=1e-9)
    assert (top["effect_ci_high"] - top["effect_ci_low"] > 0).all()
    assert "post-processing" in console.export_text()


def test_recommendations_agree_with_the_policy_value_grading(study):
    """Following every institution's CLI top-1 gives the policy value the simulation reports."""
    root, insts, truth, res = study
    row = {p: i for i, p in enumerate(truth.person_ids.astype(str))}
    items = list(truth.item_ids)
    taken = []
    for d in insts:
        top = recommendations(root / "causal.json", root / "data" / d.name, k=1, rank_all=True)
        taken += [truth.benefit[row[p], items.index(it)] for p, it in zip(top["person_id"], top["item_id"])]
    pv = policy_values(insts, truth, res.items)
    assert np.mean(taken) == pytest.approx(pv["causal"]["policy_value"], rel=1e-12)


def _rewrite(root: Path, path: Path, change) -> Path:
    report = json.loads((root / "causal.json").read_text())
    change(report)
    path.write_text(json.dumps(report))
    return path


def test_recommend_bad_input_one_line_and_nothing_written(study, tmp_path):
    root, insts, truth, _ = study
    folder = root / "data" / insts[0].name
    item = truth.item_ids[0]
    cases = [
        (tmp_path / "missing.json", "no such file"),
        (tmp_path / "bad.json", "not valid JSON"),
        (_rewrite(root, tmp_path / "ipw.json", lambda r: [row.pop("cate_coef") for row in r["items"].values()]),
         "no item has a CATE model"),
        (_rewrite(root, tmp_path / "short.json", lambda r: r["items"][item]["cate_coef"].pop("age")),
         "has no coefficient for 'age'"),
        (_rewrite(root, tmp_path / "nan.json", lambda r: r["items"][item]["cate_coef"].update(age="nan")),
         f"items.{item}.cate_coef.age is not a finite number"),
        (_rewrite(root, tmp_path / "old.json", lambda r: r.pop("nuisance_design")),
         "no 'items' / 'nuisance_design' section"),
        (_rewrite(root, tmp_path / "cov.json", lambda r: r["items"][item]["cate_cov"].pop()),
         f"items.{item}.cate_cov is not a finite"),
    ]
    (tmp_path / "bad.json").write_text("{not json")
    out = tmp_path / "recs.csv"
    for path, message in cases:
        with pytest.raises(FedrecInputError, match="fix:") as err:
            recommendations(path, folder)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FedrecInputError, match="no item 'nope'"):
        recommendations(root / "causal.json", folder, items=["nope"])
    # through the console script: exit 2, one line on stderr, no file written
    exe = Path(sys.executable).with_name("fedrec-client")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.client.cli"]
    proc = subprocess.run([*cmd, "recommend", str(cases[3][0]), str(folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="400"))
    assert proc.returncode == 2, proc.stderr
    assert "has no coefficient for 'age'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_recommend_flags_heavily_shrunk_cate_models(study, tmp_path):
    """A causal.json whose CATE model the DP ridge/floor shrank past CATE_SHRINKAGE_CAVEAT gets a
    caveat naming the item (its intervals under-cover there); an unshrunk one (ε = inf) none."""
    from fedrec.common.causal.recommend import CATE_SHRINKAGE_CAVEAT

    root, insts, truth, res = study
    folder = str(root / "data" / insts[0].name)
    assert all(abs(row["cate_shrinkage"]) < 1e-6 for row in res.items.values())  # no DP: nothing shrunk
    plain = CliRunner().invoke(client_app, ["recommend", str(root / "causal.json"), folder,
                                            "--out", str(tmp_path / "a.csv")])
    assert plain.exit_code == 0 and "caveat" not in plain.output
    item = truth.item_ids[1]
    shrunk = _rewrite(root, tmp_path / "shrunk.json",
                      lambda r: r["items"][item].update(cate_shrinkage=CATE_SHRINKAGE_CAVEAT + 0.05))
    got = CliRunner().invoke(client_app, ["recommend", str(shrunk), folder, "--out", str(tmp_path / "b.csv")],
                             env={"COLUMNS": "400"})
    assert got.exit_code == 0, got.output
    assert "caveat" in got.output and item in got.output and truth.item_ids[0] not in got.output.split("caveat")[1]
    recs = pd.read_csv(tmp_path / "b.csv").dropna(subset=["item_id"])  # people with a recommendation
    expected = recs["item_id"].map(lambda it: CATE_SHRINKAGE_CAVEAT + 0.05 if it == item else res.items[it]["cate_shrinkage"])
    np.testing.assert_allclose(recs["cate_shrinkage"], expected, atol=1e-12)


# ------------------------------------------------------------------ safe by default (issue 29)
def _qualifying(res, d, items, sign):
    """(people, items) True where the estimator's own effect_interval lies on the benefit side."""
    x_raw, _ = raw_design(d)
    lo = np.column_stack([res.estimators[it].effect_interval(x_raw)[0] for it in items])
    hi = np.column_stack([res.estimators[it].effect_interval(x_raw)[1] for it in items])
    return (lo > 0) if sign > 0 else (hi < 0)


def test_recommend_abstains_where_the_interval_includes_no_benefit(study):
    """Default output: an item only where its 95% effect interval (each estimator's own
    effect_interval, an independent path) excludes 'no better than no item'; everyone else gets
    one row with no item and the reason; never an item whose ATE interval shows harm."""
    from fedrec.common.causal.recommend import NO_BENEFIT, ate_verdict

    root, insts, truth, res = study
    d = insts[0]
    items = list(truth.item_ids)
    sign = 1.0 if d.study.outcome_better == "higher" else -1.0
    ok = _qualifying(res, d, items, sign)
    harmful = [it for it in items if ate_verdict(res.items[it]["ci_low"], res.items[it]["ci_high"],
                                                 d.study.outcome_better) == "harm"]
    for j, it in enumerate(items):
        if it in harmful:
            ok[:, j] = False
    recs = recommendations(root / "causal.json", root / "data" / d.name, k=1)
    people = d.people["person_id"].astype(str).to_numpy()
    top = recs.set_index("person_id").loc[people]
    has = ok.any(axis=1)
    assert 0 < has.mean() < 1  # both outcomes occur on this data
    assert (top["item_id"].fillna("").to_numpy() != "").tolist() == has.tolist()
    picked = top[has]
    cols = [items.index(it) for it in picked["item_id"]]
    assert ok[np.flatnonzero(has), cols].all()
    assert not set(picked["item_id"]) & set(harmful)
    assert (top[~has]["reason"] == NO_BENEFIT).all()
    # the interval printed beside the item is on the benefit side of 0
    side = picked["effect_ci_low"] if sign > 0 else -picked["effect_ci_high"]
    assert (side > 0).all()


def test_recommend_status_quo_current_never_recommends_what_a_person_takes(study):
    root, insts, truth, _ = study
    d = insts[0]
    recs = recommendations(root / "causal.json", root / "data" / d.name, k=3, status_quo="current")
    exposed = d.interactions[d.interactions["exposed"] == 1]
    taken = set(zip(exposed["person_id"].astype(str), exposed["item_id"].astype(str)))
    got = recs[recs["item_id"].fillna("") != ""]
    assert len(got) > 0 and not taken & set(zip(got["person_id"].astype(str), got["item_id"]))
    with pytest.raises(FedrecInputError, match="--status-quo 'later'"):
        recommendations(root / "causal.json", root / "data" / d.name, status_quo="later")


def test_an_item_whose_ate_shows_harm_is_recommended_to_no_one(study, tmp_path):
    """The ATE table and the CATE ranking cannot contradict silently: make one item's ATE
    interval show harm in causal.json and it disappears from the output, with the reason."""
    root, insts, truth, res = study
    d = insts[0]
    sign = 1.0 if d.study.outcome_better == "higher" else -1.0
    recs = recommendations(root / "causal.json", root / "data" / d.name, k=1)
    favourite = recs["item_id"].replace("", np.nan).dropna().value_counts().index[0]
    harm = (-3.0, -1.0) if sign > 0 else (1.0, 3.0)
    path = _rewrite(root, tmp_path / "harm.json",
                    lambda r: r["items"][favourite].update(ci_low=harm[0], ci_high=harm[1]))
    again = recommendations(path, root / "data" / d.name, k=1)
    assert favourite not in set(again["item_id"])
    assert favourite not in recs.attrs["blocks"]
    assert again.attrs["blocks"][favourite] == "its ATE interval shows harm"
    assert set(again.attrs["blocks"]) - {favourite} == set(recs.attrs["blocks"])
