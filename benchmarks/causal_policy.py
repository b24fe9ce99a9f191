"""Policy value of causal recommendations on the domain simulators' ground truth.

Prints one JSON object ``{"meta": {...}, "rows": [...]}``. Every seed draws one federation (8
institutions, ~2,500 people each) and estimates all of its items' CATE models with the
federated DP protocol (in-process: the same client statistics and server combination code,
releases added in numpy); each person's items are then ranked by estimated benefit
(``server/causal_recommend.py``) and graded with the simulator's true effects. One row per
(domain, noise mode, ε, recommender):

``domain, noise_mode, epsilon, recommender (causal | engagement | oracle | random), runs,
policy_value`` (mean true benefit of the top-1 item, outcome units, larger is better; mean over
the runs) ``policy_value_sd`` (across runs), ``policy_value_top_k`` (mean total true benefit of
the top-k items), ``agreement_with_oracle`` (top-1), and ``gain_share`` = (value - random) /
(oracle - random): the share of the attainable gain over a random item the recommender reaches.

Peers in the same run: ``engagement`` ranks by the simulator's expected engagement (the best
any engagement-trained recommender, MF included, can do), ``oracle`` by true benefit, ``random``
is the mean over items. ε is per institution for the whole estimation of all items.

    python benchmarks/causal_policy.py            # 20 federations per domain
    python benchmarks/causal_policy.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np

EPSILONS = (1.0, 4.0, math.inf)
RECOMMENDERS = ("causal", "engagement", "oracle", "random")


def one_seed(args):
    domain, seed, institutions, people, epsilons, modes, nuisance, k = args
    warnings.filterwarnings("ignore")
    from fedrec.common.causal.config import CausalConfig, plan_budget
    from fedrec.server.causal_recommend import policy_values
    from fedrec.simulations.causal_cli import estimate_inprocess
    from fedrec.simulations.domains import domain_federation

    insts, truth = domain_federation(domain, institutions=institutions, people=people, seed=seed, skew=0.5)
    cache: dict = {}
    rng = np.random.default_rng([seed, 11])
    out = []
    for mode in modes:
        for eps in epsilons:
            if mode == "distributed" and not math.isfinite(eps):
                continue
            cfg = CausalConfig(epsilon=eps, noise_mode=mode, n_min=institutions, **nuisance)
            res = estimate_inprocess(insts, cfg, rng=rng, plan=plan_budget(cfg), cache=cache)
            pv = policy_values(insts, truth, res.items, cfg.covariates, cfg.derived, k=k)
            out.append({"noise_mode": mode, "epsilon": eps, "k": pv["k"],
                        **{name: pv[name] for name in RECOMMENDERS}})
    return domain, out


#: issue 29's scenarios: (name, domain, institutions, people per institution, ε, noise mode)
SAFE_CELLS = (("new-user: 4 x 1,000, eps 1, local", "health", 4, 1000, 1.0, "local"),
              ("8 x 2,500, eps inf", "health", 8, 2500, math.inf, "local"),
              ("8 x 2,500, eps 4, distributed", "health", 8, 2500, 4.0, "distributed"))
SAFE_FIRST_SEED = 9500  # fresh: never used to choose a default


def safe_seed(args):
    """One federation per cell: the safe recommendations' gain over the status quo (none), the
    forecast half-width (before) and the measured ones (after)."""
    cell, seed = args
    warnings.filterwarnings("ignore")
    from fedrec.simulations.forecast import declared_people_per_item, forecast_half_widths
    from fedrec.server.causal_recommend import policy_values
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config
    from fedrec.simulations.domains import domain_federation

    name, domain, k, n, eps, mode = cell
    insts, truth = domain_federation(domain, institutions=k, people=n * k, seed=seed, skew=0.4)
    cfg, _ = resolve_config(insts, epsilon=eps, overrides={"noise_mode": mode})
    items = list(truth.item_ids)
    fc = forecast_half_widths(insts[0].study, cfg.resolved(k), items, declared_people_per_item(insts, items))
    res = estimate_inprocess(insts, cfg, rng=np.random.default_rng([seed, 29]))
    pv = policy_values(insts, truth, res.items, cfg.covariates, cfg.derived)
    return name, {"seed": seed, "safe": pv["causal_safe"], "rank_all_top1": pv["causal"]["policy_value"],
                  "forecast_half_width": next(iter(fc.half_width.values())),
                  "measured_half_widths": [1.959963984540054 * r["se"] for r in res.items.values()]}


def safe_main(runs: int, workers: int) -> int:
    import subprocess

    import causal_accuracy as acc

    t0 = time.time()
    jobs = [(c, SAFE_FIRST_SEED + s) for c in SAFE_CELLS for s in range(runs)]
    results = acc.run_seeds(safe_seed, jobs, workers)
    rows = []
    for c in SAFE_CELLS:
        rs = [r for name, r in results if name == c[0]]
        gains = np.array([r["safe"]["gain"] for r in rs])
        oracle = np.array([r["safe"]["oracle_gain"] for r in rs])
        med = np.array([np.median(r["measured_half_widths"]) for r in rs])
        rows.append({"cell": c[0], "runs": len(rs), "mean_gain": float(gains.mean()), "min_gain": float(gains.min()),
                     "seeds_with_negative_gain": int((gains < 0).sum()),
                     "mean_oracle_gain": float(oracle.mean()), "share_of_oracle_gain": float(gains.mean() / oracle.mean()),
                     "min_share_of_oracle_gain": float(np.min(gains / oracle)),
                     "mean_share_recommended": float(np.mean([r["safe"]["share_recommended"] for r in rs])),
                     "mean_harmed_share": float(np.mean([r["safe"]["harmed_share"] for r in rs])),
                     "rank_all_top1_value": float(np.mean([r["rank_all_top1"] for r in rs])),
                     "forecast_half_width": float(np.median([r["forecast_half_width"] for r in rs])),
                     "measured_half_width_median": float(np.median(med)),
                     "forecast_over_measured": float(np.median([r["forecast_half_width"] for r in rs]) / np.median(med))})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"script": "causal_policy.py --safe", "command": "python benchmarks/causal_policy.py --safe",
            "commit": commit + " (+ uncommitted issue-29 changes)", "seeds": [SAFE_FIRST_SEED, SAFE_FIRST_SEED + runs - 1],
            "seeds_note": "fresh: never used to choose a default", "status_quo": "none (no item)",
            "rule": "an item only where its 95% pointwise CATE interval lies on the benefit side of 0, never an item "
                    "whose ATE interval shows harm or whose shrunk CATE model its ATE does not back",
            "gain": "mean true benefit over the status quo (0 for no recommendation), outcome units (kg lost)",
            "forecast": "simulations/forecast.py (public stand-in federation), median over seeds; measured: "
                        "median over seeds of each run's median 95% half-width over its items",
            "seconds": round(time.time() - t0, 1)}
    json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 federations per domain")
    ap.add_argument("--runs", type=int, default=None, help="federations per domain (default 20)")
    ap.add_argument("--institutions", type=int, default=8)
    ap.add_argument("--people", type=int, default=20000, help="people in the federation (all institutions)")
    ap.add_argument("--domains", default="health,education,finance")
    ap.add_argument("--noise-modes", default="local,distributed")
    ap.add_argument("--k", type=int, default=3, help="top-k recommendations followed (default 3)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--safe", action="store_true", help="issue 29: the safe recommendations and the CI forecast "
                    "on the new-user scenario, 8 x 2,500 at ε = ∞ and distributed ε = 4 (health)")
    a = ap.parse_args(argv)
    runs = a.runs or (2 if a.quick else 20)
    if a.safe:
        return safe_main(runs, a.workers)
    domains = a.domains.split(",")
    modes = a.noise_modes.split(",")
    import causal_accuracy as acc  # a sibling script (items, designs, seed runner): its folder is on sys.path

    nuisance = {d: acc.study_design(d) for d in domains}
    warnings.filterwarnings("ignore")
    jobs = [(d, 5000 + s, a.institutions, a.people, EPSILONS, modes, nuisance.get(d, {}), a.k)
            for d in domains for s in range(runs)]
    t0 = time.time()
    results = acc.run_seeds(one_seed, jobs, a.workers)
    rows = []
    for d in domains:
        for mode in modes:
            for eps in EPSILONS:
                rs = acc.cell_runs(results, d, mode, eps)
                if not rs:
                    continue
                oracle = np.mean([r["oracle"]["policy_value"] for r in rs])
                rand = np.mean([r["random"]["policy_value"] for r in rs])
                for name in RECOMMENDERS:
                    v = np.array([r[name]["policy_value"] for r in rs])
                    rows.append({
                        "domain": d, "noise_mode": mode, "epsilon": eps if math.isfinite(eps) else "inf",
                        "recommender": name, "runs": len(rs), "k": rs[0]["k"],
                        "policy_value": float(v.mean()), "policy_value_sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                        "policy_value_top_k": float(np.mean([r[name]["policy_value_top_k"] for r in rs])),
                        "agreement_with_oracle": float(np.mean([r[name]["agreement_with_oracle"] for r in rs])),
                        "gain_share": float((v.mean() - rand) / (oracle - rand)) if oracle > rand else None,
                    })
    meta = {"script": "causal_policy.py", "quick": a.quick, "runs_per_cell": runs, "first_seed": 5000,
            "institutions": a.institutions, "people": a.people, "skew": 0.5, "estimator": "aipw (CATE: "
            "difference of the per-arm DP ridge models)", "k": a.k, "noise_modes": modes,
            "epsilon_unit": "per institution, whole estimation of all items (PRV accountant, delta 1e-5)",
            "nuisance_design": nuisance,
            "unit": "policy_value: mean true benefit of the top-1 item; policy_value_top_k: mean total true "
                    "benefit of the top-k items (outcome units, oriented so larger is better)",
            "peers": "engagement: simulator's expected engagement (best any engagement-trained recommender can "
                     "do); oracle: true benefit; random: mean over items",
            "transport": "in-process: same client statistics + server combination code, sums added in numpy",
            "seconds": round(time.time() - t0, 1)}
    json.dump({"meta": meta, "rows": rows}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
