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
    from fedrec.common.causal.estimators import CausalConfig, plan_budget
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
    a = ap.parse_args(argv)
    runs = a.runs or (2 if a.quick else 20)
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
