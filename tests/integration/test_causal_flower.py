"""The causal protocol end to end on the real Flower simulation engine (Ray), via the CLI."""

from __future__ import annotations

import json
import math

import pytest

from fedrec.common.datasets import write_ground_truth, write_institution
from fedrec.simulations.causal_cli import causal_command
from fedrec.simulations.domains import domain_federation

pytestmark = pytest.mark.slow


class _Console:
    def __init__(self):
        self.lines = []

    def print(self, *a, **k):
        self.lines.append(a)


def test_causal_command_three_institutions(tmp_path):
    insts, truth = domain_federation("health", institutions=3, people=1500, seed=7, skew=0.4)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    write_ground_truth(data / "ground_truth", truth)
    out = tmp_path / "out"
    eps = 2.0
    console = _Console()
    rc = causal_command(data, None, eps, "aipw", True, out, 0, console, force=True)  # forecast: wide
    assert rc == 0
    report = json.loads((out / "causal.json").read_text())
    for key in ("items", "budget", "epsilon_per_institution", "pooled", "recommendations", "institutions"):
        assert key in report, key
    assert set(report["items"]) == set(truth.item_ids)
    for it, row in report["items"].items():
        for k in ("ate", "se", "ci_low", "ci_high", "true_ate", "cate_coef", "noise_se", "sampling_se",
                  "sampling_var_noise_sd",
                  "cate_cov", "cate_shrinkage"):
            assert k in row
        assert row["ci_low"] < row["ate"] < row["ci_high"]
    # 8 items at ε = 2 on 3 x 1,500 people: the DP ridge/floor shrink the CATE models heavily,
    # and the table says their per-person intervals are not to be trusted there
    from fedrec.common.causal.recommend import CATE_SHRINKAGE_CAVEAT

    flagged = any(row["cate_shrinkage"] >= CATE_SHRINKAGE_CAVEAT for row in report["items"].values())
    printed = any("caveat" in str(part) for line in console.lines for part in line)
    assert flagged and printed
    assert any("items shared this run's ε" in str(part) for line in console.lines for part in line)
    eps_inst = report["epsilon_per_institution"]
    assert sorted(eps_inst) == [d.name for d in insts]
    for v in eps_inst.values():  # the ledgers say the whole run cost ε (PRV), not more
        assert 0.97 * eps <= v <= eps + 1e-6
    steps = report["budget"]["steps"]
    assert math.isclose(sum(s["share"] for s in steps.values()), 1.0)
    # the outcome-range histogram ran as its own Flower round, charged within the ε above, and
    # every item's outcome models fit an interval inside the declared bounds
    assert "outcome-range" in steps and report["contributors"]["outcome-range"] == len(insts)
    lo_b, hi_b = insts[0].study.outcome_bounds
    for row in report["items"].values():
        lo, hi = row["outcome_range"]
        assert lo_b <= lo < hi <= hi_b
    rec = report["recommendations"]
    assert rec["oracle"]["policy_value"] >= rec["causal"]["policy_value"] - 1e-9
    # each institution ranks its own people from this causal.json (fedrec-client recommend);
    # following everyone's top-1 gives the policy value the run reported
    from fedrec.client.recommend import recommendations

    row = {p: i for i, p in enumerate(truth.person_ids.astype(str))}
    items = list(truth.item_ids)
    taken = []
    for d in insts:
        top = recommendations(out / "causal.json", data / d.name, k=1, rank_all=True)  # the unguarded ranking
        taken += [truth.benefit[row[p], items.index(it)] for p, it in zip(top["person_id"], top["item_id"])]
    assert sum(taken) / len(taken) == pytest.approx(rec["causal"]["policy_value"], rel=1e-9)


def test_distributed_noise_over_flower_passes_every_nodes_rounding_check(tmp_path):
    """Distributed noise through `fedrec-sim causal` over Flower and SecAgg+: each node's share
    carries σ²/n_min of the noise, declares its std, and checks the coordinator's quantization
    step against it before masking (common/secagg/_quantize.check_share_step; the lying side is
    tests/unit/test_lying_coordinator_machinery.py). The honest run passes that check at every
    node and step: the run completes and each item's estimate has a finite CI."""
    insts, _ = domain_federation("health", institutions=3, people=400, seed=13, skew=0.4)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    out = tmp_path / "out"
    rc = causal_command(data, "exercise_coaching", 4.0, "aipw", False, out, 0, _Console(), force=True,
                        causal_overrides={"noise_mode": "distributed"})
    assert rc == 0
    report = json.loads((out / "causal.json").read_text())
    assert report["config"]["causal.noise-mode"] == "distributed" and report["config"]["causal.expert.n-min"] == 3
    assert report["contributors"] and all(n == 3 for n in report["contributors"].values()), report["contributors"]
    row = report["items"]["exercise_coaching"]
    assert all(math.isfinite(row[k]) for k in ("ate", "se", "ci_low", "ci_high")) and row["se"] > 0


def test_epsilon_inf_through_flower_with_secagg_equals_pooled_and_inprocess(tmp_path):
    """Issue 29: at ε = ∞, through `fedrec-sim causal` with SecAgg+ on, every item's ATE and SE
    equal the non-private pooled AIPW (statsmodels) and the in-process run to 1e-6 relative, on
    an outcome in dollars (finance: ±100,000 USD). Before the exact grid they differed by up to
    1.5% (ATE) and 34% (SE)."""
    insts, truth = domain_federation("finance", institutions=3, people=700, seed=11, skew=0.4)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    out = tmp_path / "out"
    rc = causal_command(data, None, math.inf, "aipw", True, out, 0, _Console(), non_private=True)
    assert rc == 0
    report = json.loads((out / "causal.json").read_text())
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config

    cfg, _ = resolve_config(insts, epsilon=math.inf)
    inproc = estimate_inprocess(insts, cfg).items
    for it, row in report["items"].items():
        pooled = report["pooled"][it]
        assert row["ate"] == pytest.approx(pooled["ate"], rel=1e-6), it
        assert row["se"] == pytest.approx(pooled["se"], rel=1e-6), it
        assert row["ate"] == pytest.approx(inproc[it]["ate"], rel=1e-6), it
        assert row["se"] == pytest.approx(inproc[it]["se"], rel=1e-6), it


def test_refutations_over_flower_with_secagg_equal_the_inprocess_ones(tmp_path):
    """Issue 32, deliverable 5 over Flower: ``causal.refute = "placebo,random-common-cause"``
    makes the causal ServerApp run one more causal run per refutation through SecAgg+, whose
    study query and step messages carry the refutation; each ClientApp transforms its own data
    (common/causal/refute.refute_data; random common cause: one more declared covariate). At
    ε = ∞ each per-item refuted estimate and SE equal the in-process refutation's
    (simulations/refute.py, numpy sums of the same client functions, its own guards and ledgers)
    to 1e-6 relative with the same seed, the verdicts agree, and every institution's ledger
    holds each refutation's rows (task ``causal-refute-<kind>-<step>``) beside the causal run's."""
    import shutil
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from fedrec.common.config import RunConfig
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.simulations.causal_cli import resolve_config
    from fedrec.simulations.provision import provision_institutions
    from fedrec.simulations.refute import refute_after_causal
    from fedrec.simulations.run import launch_flower

    seed = 23
    insts, _ = domain_federation("health", institutions=2, people=300, seed=5, skew=0.4)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    names = [d.name for d in insts]
    out = tmp_path / "out"
    policy_dir = provision_institutions(names, out, epsilon=math.inf, delta=1e-5, allow_non_private=True, runs=3)
    ccfg, _ = resolve_config(insts, epsilon=math.inf)
    kinds = ("placebo", "random-common-cause")
    flat = replace(ccfg, refute=kinds).to_flat()
    assert flat["causal.refute"] == "placebo,random-common-cause"
    cfg = RunConfig().override(**{"institutions": len(insts), "seed": seed, "sim.noise-seed": seed,
                                  "data-dir": str(data.resolve()), "results-dir": str(out.resolve()),
                                  "sim.policy-dir": str(policy_dir), "privacy.delta": ccfg.delta,
                                  "secagg.enabled": True})
    work = Path(tempfile.mkdtemp(prefix="fedrec-refute-"))
    try:
        launch_flower({**cfg.to_flat(), **flat}, work, num_supernodes=len(insts), server_app="fedrec.server.causal:app",
                      client_app="fedrec.client.causal_app:app", extra_config=flat, quiet=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not (out / "failure.json").exists(), (out / "failure.json").read_text()
    raw = json.loads((out / "causal_raw.json").read_text())
    inproc = refute_after_causal(insts, ccfg, kinds, policy_dir=provision_institutions(
        names, tmp_path / "inproc", epsilon=math.inf, delta=1e-5, allow_non_private=True, runs=2),
        seed=seed, original=raw["items"])
    assert set(raw["refutations"]) == set(kinds)
    for kind in kinds:
        flower = raw["refutations"][kind]
        assert set(flower["items"]) == set(raw["items"]) == set(inproc[kind]["items"])
        for it, row in flower["items"].items():
            want = inproc[kind]["items"][it]
            assert row["estimate"] == pytest.approx(want["estimate"], rel=1e-6, abs=1e-9), (kind, it)
            assert row["se"] == pytest.approx(want["se"], rel=1e-6), (kind, it)
        assert flower["flagged"] == inproc[kind]["flagged"]
    # the placebo is a different run: its estimates are not the causal run's
    assert max(abs(r["estimate"] - raw["items"][it]["ate"]) / raw["items"][it]["se"]
               for it, r in raw["refutations"]["placebo"]["items"].items()) > 0.5
    # the random common cause moved the estimates (a different design), if only a little
    rcc = raw["refutations"]["random-common-cause"]["items"]
    assert any(r["estimate"] != raw["items"][it]["ate"] for it, r in rcc.items())
    for name in names:
        rows = list(PrivacyLedger(out / "ledgers" / f"{name}.db").rows())
        main = {r.task[len("causal-"):] for r in rows if r.task.startswith("causal-") and "refute" not in r.task}
        assert main, name
        for kind in kinds:
            mine = [r.task[len(f"causal-refute-{kind}-"):] for r in rows if r.task.startswith(f"causal-refute-{kind}-")]
            assert sorted(mine) == sorted(main), (name, kind, sorted({r.task for r in rows}))
        assert all(r.status == "released" for r in rows)
