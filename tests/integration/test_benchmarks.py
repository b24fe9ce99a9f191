"""Benchmarks run in their --quick form and print the agreed JSON shape (not timed tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(name: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--quick", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"meta", "rows"} and out["rows"]
    for row in out["rows"]:
        assert all(isinstance(v, (str, int, float, bool)) or v is None for v in row.values())
    return out


def test_dp_overhead_quick():
    rows = {r["mode"]: r for r in _run("dp_overhead.py")["rows"]}
    assert {"nonprivate", "fedrec", "opacus_ghost"} <= set(rows)
    assert all(r["samples_per_s"] > 0 for r in rows.values())


def test_rec_quality_quick():
    rows = _run("rec_quality.py")["rows"]
    systems = {r["system"] for r in rows}
    assert {"popularity", "local_only", "mf_central", "mf_federated", "mf_federated_dp"} <= systems
    dp = next(r for r in rows if r["system"] == "mf_federated_dp")
    assert dp["epsilon"] == 8.0 and dp["secagg"] is True and dp["epsilon_spent_max"] <= 8.0


def test_causal_accuracy_quick():
    out = _run("causal_accuracy.py", "--runs", "2", "--domains", "health,finance", "--workers", "1")
    # the nuisance design is the one the simulated studies declare (study.toml [causal])
    assert out["meta"]["nuisance_design"]["health"]["derived"] == ["ratio(weight_kg,height_cm,2)[12e-4,60e-4]"]
    rows = out["rows"]
    assert {(r["domain"], r["noise_mode"]) for r in rows} == {(d, m) for d in ("health", "finance")
                                                              for m in ("local", "distributed")}
    for r in rows:
        if r["epsilon"] == "inf":  # no DP: the federated CI is the pooled one
            assert abs(r["ci_width_ratio"] - 1.0) < 1e-4  # Newton vs statsmodels convergence
        else:
            assert r["ci_width_ratio"] > 1.0 and 0.0 <= r["coverage"] <= 1.0


def test_causal_accuracy_takes_tuning_knobs():
    out = _run("causal_accuracy.py", "--runs", "1", "--domains", "finance", "--noise-modes", "distributed",
               "--workers", "1", "--set", "expert.psi-noise-ratio=0.3", "--epsilons", "1.5")
    assert out["meta"]["settings"] == {"causal.expert.psi-noise-ratio": 0.3}
    assert [r["epsilon"] for r in out["rows"]] == [1.5]  # only the ε asked for
    for arg in ("1,x", "0"):
        bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "causal_accuracy.py"), "--quick",
                              "--epsilons", arg], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert bad.returncode == 2 and "--epsilons" in bad.stderr and not bad.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "causal_accuracy.py"), "--quick",
                          "--set", "expert.psi-noise-ratoi=0.3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "psi-noise-ratio" in bad.stderr and not bad.stdout


def test_causal_policy_quick():
    rows = _run("causal_policy.py", "--runs", "1", "--domains", "health", "--noise-modes", "distributed",
                "--workers", "1")["rows"]
    assert rows and all(r["domain"] == "health" for r in rows)
    value = {(r["epsilon"], r["recommender"]): r["policy_value"] for r in rows}
    for eps in {r["epsilon"] for r in rows}:  # benefit-oriented: the oracle is the best ranking
        assert value[(eps, "oracle")] >= value[(eps, "causal")] - 1e-9
        assert value[(eps, "oracle")] >= value[(eps, "engagement")] - 1e-9


def test_cate_coverage_quick():
    from fedrec.common.causal.recommend import CATE_SHRINKAGE_CAVEAT

    # every item in one run (the CLI's default); the headline item alone is the same code path
    out = _run("cate_coverage.py", "--domains", "health", "--workers", "1", "--all-items")
    rows = out["rows"]
    assert out["meta"]["script"] == "cate_coverage.py" and out["meta"]["all_items"] is True and rows
    keys = {"domain", "item", "noise_mode", "epsilon", "runs", "coverage", "coverage_mc_se",
            "coverage_without_gram_noise", "noise_var_ratio", "noise_var_ratio_without_gram_noise",
            "bias_sd", "width_ratio", "cate_shrinkage"}
    for r in rows:
        assert keys <= set(r) and r["domain"] == "health"
        assert 0.0 <= r["coverage_without_gram_noise"] <= r["coverage"] <= 1.0  # the Gram term only widens
        assert r["noise_var_ratio"] < r["noise_var_ratio_without_gram_noise"]
        assert r["width_ratio"] > 0.0 and 0.0 < r["cate_shrinkage"] < 1.5
        if r["coverage"] < 0.5:  # 8 items on 2 x 600 people: the floor swamps the Gram, and the flag says so
            assert r["cate_shrinkage"] >= CATE_SHRINKAGE_CAVEAT, r


def test_adapter_quick():
    """LLM adapter benchmark (issue 30): every model row on both splits, DP and non-private, and
    the throughput row; the DP adapter's σ is the calibrated one (finite, positive). With
    ``--via-flower 8`` the real Flower hybrid (Ray, SecAgg+, ledgers) runs on the same split."""
    out = _run("adapter.py", "--via-flower", "8")
    _check_via_flower(out)
    rows = [r for r in out["rows"] if r.get("kind") != "throughput" and r.get("via") != "flower"]
    models = {(r["model"], r["split"]) for r in rows}
    for model in ("random", "popularity", "category_knn", "text_knn", "mf", "text_prior", "adapter", "hybrid"):
        assert {(model, "warm"), (model, "cold")} <= models, model
    for r in rows:
        assert 0.0 <= r["ndcg10"] <= r["hr10"] <= 1.0
        assert r["dataset"] == "movielens"
    assert {r["epsilon"] for r in rows if r["model"] == "adapter"} == {8.0, None}
    dp = next(r for r in rows if r["model"] == "adapter" and r["epsilon"] == 8.0)
    assert dp["sigma"] > 0
    # cold items have no interactions: popularity cannot rank them, the text prior can
    cold = {r["model"]: r for r in rows if r["split"] == "cold" and r["epsilon"] is None}
    assert cold["popularity"]["ndcg10"] == 0.0 and cold["text_prior"]["ndcg10"] > cold["random"]["ndcg10"]
    tput = [r for r in out["rows"] if r.get("kind") == "throughput"]
    assert len(tput) == 1 and tput[0]["ratio_dp_to_nonprivate"] > 0 and tput[0]["device"] in ("cpu", "cuda")
    assert out["meta"]["adapter_trainable_params"] == 6529


def _check_via_flower(out: dict) -> None:
    """The Flower hybrid's rows: warm and cold on the benchmark's own tasks, and its own reported
    metric recomputed in-process from what the server sent — equal, so the benchmark's scoring is
    the Flower clients' scoring; ε spent within the budget in both institutions' ledgers."""
    via = [r for r in out["rows"] if r.get("via") == "flower"]
    hyb = {r["split"]: r for r in via if r["model"] == "hybrid"}
    pop = {r["split"]: r for r in via if r["model"] == "popularity"}
    assert set(hyb) == set(pop) == {"warm", "cold", "flower_eval"}
    assert all(r["epsilon"] == 8.0 and r["secagg"] is True and r["popularity"] == "pooled" for r in hyb.values())
    assert hyb["flower_eval"]["recompute_abs_diff"] < 1e-9, hyb["flower_eval"]
    assert hyb["warm"]["positives"] == hyb["warm"]["positives_in_split"] > 0  # every warm person has a history
    bench_pop = next(r for r in out["rows"] if r["model"] == "popularity" and r["split"] == "warm" and "via" not in r)
    assert pop["warm"]["ndcg10"] == bench_pop["ndcg10"]  # the same positives and candidates as the benchmark's
    for r in via:
        assert 0.0 <= r["ndcg10"] <= r["hr10"] <= 1.0
    meta = out["meta"]["flower"]["8"]
    assert meta["flower_institutions_reporting"] == 2 and 0 < meta["flower_epsilon_spent_max"] <= 8.0 + 1e-9
