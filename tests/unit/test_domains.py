"""Simulated domains: determinism, ground truth, confounding, case-mix, and the contract.

Statistical checks use fixed seeds (deterministic) and family-wise 99% intervals across a
domain's items (Bonferroni): over 20 seeds the IPW z-scores of every item had mean ~0 and sd ~1,
so a failure here means bias, not an unlucky draw.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy.stats import norm
from typer.testing import CliRunner

from fedrec.client.cli import app as client_app
from fedrec.common.datasets import GROUND_TRUTH_DIR, GroundTruth, load_federation, read_ground_truth
from fedrec.common.errors import FedrecInputError
from fedrec.simulations.domains import DOMAINS, domain_federation, get_domain
from fedrec.simulations.generate import generate

PEOPLE = 6000


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stacked(insts) -> pd.DataFrame:
    return pd.concat([i.interactions for i in insts], ignore_index=True)


def row_index(inter: pd.DataFrame, gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    pidx = pd.Index(gt.person_ids).get_indexer(inter["person_id"])
    jidx = pd.Index(gt.item_ids).get_indexer(inter["item_id"])
    assert (pidx >= 0).all() and (jidx >= 0).all()
    return pidx, jidx


def per_item_estimates(inter: pd.DataFrame, gt: GroundTruth) -> pd.DataFrame:
    """Per item: naive difference in means and Hajek IPW with the true propensities, each with SE."""
    pi, ji = row_index(inter, gt)
    a_all, y_all = inter["exposed"].to_numpy(), inter["outcome"].to_numpy()
    e_all = gt.propensity[pi, ji]
    rows = []
    for j, item in enumerate(gt.item_ids):
        m = ji == j
        a, y, e = a_all[m], y_all[m], e_all[m]
        dim = y[a == 1].mean() - y[a == 0].mean()
        se_dim = np.sqrt(y[a == 1].var(ddof=1) / a.sum() + y[a == 0].var(ddof=1) / (1 - a).sum())
        w1, w0 = a / e, (1 - a) / (1 - e)
        mu1, mu0 = (w1 * y).sum() / w1.sum(), (w0 * y).sum() / w0.sum()
        psi = w1 * (y - mu1) / w1.mean() - w0 * (y - mu0) / w0.mean()
        rows.append({"item_id": item, "ate": gt.ate[item], "dim": dim, "se_dim": se_dim, "ipw": mu1 - mu0,
                     "se_ipw": psi.std(ddof=1) / np.sqrt(len(y))})
    return pd.DataFrame(rows).set_index("item_id")


def familywise_z(k: int, level: float = 0.99) -> float:
    return float(norm.ppf(1 - (1 - level) / (2 * k)))


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_different_seed_different_data(tmp_path: Path) -> None:
    kw = dict(institutions=3, people=1500, skew=0.5, console=quiet())
    a = files(generate("health", seed=7, out=tmp_path / "a", **kw))
    b = files(generate("health", seed=7, out=tmp_path / "b", **kw))
    c = files(generate("health", seed=8, out=tmp_path / "c", **kw))
    assert a == b
    assert set(a) == set(c)
    assert a["institution_00/people.csv"] != c["institution_00/people.csv"]
    assert a["institution_00/interactions.csv"] != c["institution_00/interactions.csv"]
    assert a["institution_00/items.csv"] == c["institution_00/items.csv"]  # the catalogue is public and fixed
    expected = {f"institution_0{k}/{n}" for k in range(3)
                for n in ("study.toml", "people.csv", "items.csv", "interactions.csv")}
    expected |= {f"{GROUND_TRUTH_DIR}/{n}" for n in ("truth.json", "ate.csv", "best_item.csv", "cate.parquet")}
    assert set(a) == expected


def test_written_folders_load_back_exactly_and_pass_check_data(tmp_path: Path) -> None:
    out = generate("education", institutions=3, people=1500, seed=2, skew=0.8, out=tmp_path / "edu",
                   console=quiet())
    insts, gt = domain_federation("education", institutions=3, people=1500, seed=2, skew=0.8)
    loaded = load_federation(out)
    assert [i.name for i in loaded] == [i.name for i in insts] == ["institution_00", "institution_01", "institution_02"]
    for got, want in zip(loaded, insts):
        assert got.study == want.study
        for t in ("people", "items", "interactions"):
            pd.testing.assert_frame_equal(getattr(got, t), getattr(want, t), check_exact=True)
    back = read_ground_truth(out / GROUND_TRUTH_DIR)
    assert np.array_equal(back.cate, gt.cate) and np.array_equal(back.propensity, gt.propensity)
    assert (back.best_item == gt.best_item).all()
    runner = CliRunner()
    for inst in loaded:
        res = runner.invoke(client_app, ["check-data", str(out / inst.name)])
        assert res.exit_code == 0, res.stderr
    # once through the real console script, in a subprocess
    exe = Path(sys.executable).with_name("fedrec-client")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.client.cli"]
    proc = subprocess.run([*cmd, "check-data", str(out / "institution_00")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, COLUMNS="200"))
    assert proc.returncode == 0, proc.stderr
    assert "exposure rate" in proc.stdout and "score_gain" in proc.stdout


def test_generate_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FedrecInputError, match="holds other files"):
        generate("health", institutions=2, people=100, seed=1, skew=0.0, out=tmp_path, console=quiet())
    with pytest.raises(FedrecInputError, match="unknown domain"):
        generate("space", institutions=2, people=100, seed=1, skew=0.0, out=tmp_path / "x", console=quiet())
    with pytest.raises(FedrecInputError, match="skew"):
        domain_federation("health", institutions=2, people=100, seed=1, skew=1.5)


# ----------------------------------------------------------------------------- causal ground truth


@pytest.mark.parametrize("domain", DOMAINS)
def test_randomized_policy_difference_in_means_recovers_ate(domain: str) -> None:
    insts, gt = domain_federation(domain, institutions=4, people=PEOPLE, seed=11, skew=0.5, policy="randomized")
    est = per_item_estimates(stacked(insts), gt)
    z = familywise_z(len(est))
    err = (est["dim"] - est["ate"]).abs()
    assert (err <= z * est["se_dim"]).all(), est
    assert np.allclose(gt.propensity, gt.propensity[0, 0])  # exposure independent of covariates


@pytest.mark.parametrize("domain", DOMAINS)
def test_confounded_policy_biases_naive_estimate_and_ipw_removes_it(domain: str) -> None:
    insts, gt = domain_federation(domain, institutions=4, people=PEOPLE, seed=12, skew=0.5)
    est = per_item_estimates(stacked(insts), gt)
    naive_z = ((est["dim"] - est["ate"]) / est["se_dim"]).abs()
    assert (naive_z > 2).sum() >= len(est) // 2 + 1, naive_z  # a majority of items is biased by > 2 SE
    assert naive_z.max() > 6, naive_z
    ipw_z = ((est["ipw"] - est["ate"]) / est["se_ipw"]).abs()
    assert (ipw_z <= familywise_z(len(est))).all(), ipw_z  # adjusting with the true propensities removes it
    # the logging policy depends on covariates
    assert gt.propensity.std(axis=0).min() > 0.02


@pytest.mark.parametrize("domain", DOMAINS)
def test_effects_are_heterogeneous_and_differ_from_engagement(domain: str) -> None:
    insts, gt = domain_federation(domain, institutions=3, people=3000, seed=4, skew=0.5)
    assert gt.cate.shape == (3000, len(gt.item_ids))
    assert (gt.cate.std(axis=0) > 0).sum() >= len(gt.item_ids) - 1  # CATE varies across people
    assert len(set(gt.best_item)) >= 2  # the best item is not the same for everyone
    popular = gt.item_ids[int(gt.expected_engagement.mean(axis=0).argmax())]
    assert popular != gt.ate.idxmax() if gt.better == "higher" else popular != gt.ate.idxmin()
    assert (gt.best_item != gt.most_engaging_item).mean() > 0.5  # popular is not beneficial
    inter = stacked(insts)
    observed = inter[inter["exposed"] == 1].groupby("item_id")["engagement"].mean()
    rho = np.corrcoef(observed[list(gt.item_ids)], gt.expected_engagement.mean(axis=0))[0, 1]
    assert rho > 0.8  # the engagement model is what the data show


# ----------------------------------------------------------------------------- institutions and people


@pytest.mark.parametrize("domain,column", [("health", "age"), ("education", "free_lunch"),
                                           ("finance", "earnings_1y_ago")])
def test_skew_makes_institutions_differ(domain: str, column: str) -> None:
    skewed, _ = domain_federation(domain, institutions=6, people=PEOPLE, seed=5, skew=1.0)
    iid, _ = domain_federation(domain, institutions=6, people=PEOPLE, seed=5, skew=0.0)

    def spread(insts) -> float:
        """Range of institution means in units of the pooled standard error of one mean."""
        means = np.array([i.people[column].mean() for i in insts])
        sds = np.array([i.people[column].std() for i in insts])
        ns = np.array([len(i.people) for i in insts])
        return float((means.max() - means.min()) / np.sqrt((sds ** 2 / ns).mean()))

    sizes = [len(i.people) for i in skewed]
    assert sum(sizes) == PEOPLE and max(sizes) > 1.5 * min(sizes)
    assert len({len(i.people) for i in iid}) == 1  # skew 0: equal sizes
    assert spread(skewed) > 10 and spread(iid) < 6, (spread(skewed), spread(iid))


@pytest.mark.parametrize("domain", DOMAINS)
def test_people_are_resampled_with_jitter_not_copied(domain: str) -> None:
    spec = get_domain(domain)
    insts, gt = domain_federation(domain, institutions=2, people=4000, seed=6, skew=0.5)
    people = pd.concat([i.people for i in insts], ignore_index=True)
    cols = [c.name for c in spec.covariates]
    src = spec.load_source()[cols].drop_duplicates()
    copies = people[cols].merge(src, on=cols, how="inner")
    exact = len(copies) / len(people)
    assert exact == 0, exact
    for c in spec.covariates:  # every value within its public bounds
        v = people[c.name].to_numpy(float)
        assert (v >= c.lower).all() and (v <= c.upper).all(), c.name
    assert len(set(people["person_id"])) == len(people) == len(gt.person_ids)


@pytest.mark.parametrize("domain", DOMAINS)
def test_interaction_rows_follow_the_contract(domain: str) -> None:
    insts, gt = domain_federation(domain, institutions=2, people=2000, seed=8, skew=0.5)
    study = insts[0].study
    inter = stacked(insts)
    per_person = inter.groupby("person_id").size()
    assert per_person.min() >= 3  # several rows per person
    exposed = inter["exposed"].to_numpy() == 1
    eng = inter["engagement"].to_numpy()
    assert np.isnan(eng[~exposed]).all() and not np.isnan(eng[exposed]).any()
    assert set(np.unique(eng[exposed])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert inter.groupby("person_id")["exposed"].sum().max() >= 2  # a person can be exposed to several items
    lo, hi = study.outcome_bounds
    assert inter["outcome"].between(lo, hi).all()
    assert 0.15 < exposed.mean() < 0.7
    assert list(insts[0].items["item_id"]) == list(gt.item_ids)
    assert insts[0].items["description"].str.len().min() > 30


def test_twenty_thousand_people_in_a_few_seconds() -> None:
    start = time.perf_counter()
    insts, gt = domain_federation("health", institutions=8, people=20000, seed=1, skew=0.5)
    elapsed = time.perf_counter() - start
    assert sum(len(i.people) for i in insts) == 20000 and len(gt.person_ids) == 20000
    assert elapsed < 10, elapsed
