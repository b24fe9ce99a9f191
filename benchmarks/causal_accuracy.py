"""Accuracy of federated DP causal estimation on the domain simulators.

Prints one JSON object ``{"meta": {...}, "rows": [...]}``; one row per (domain, ε):
``domain, epsilon, runs, bias, bias_se, rmse, coverage, ci_width_ratio`` where bias/rmse are in
the outcome's units against the simulator's true ATE, ``bias_se`` is bias / mean SE,
coverage is that of the nominal 95% CI, and ci_width_ratio = mean CI width / mean width of the
pooled non-private AIPW CI (statsmodels on the union of the same data, same run).

Bias is measured twice, because every cell shares its seeds' data: ``bias_se`` against the
truth (the issue's definition; its Monte-Carlo standard error ``bias_mc_se`` is about 0.07 at
200 runs, as large as the 0.1 target), and ``excess_bias_se`` against an AIPW with the
simulator's true propensity on the same data (:func:`oracle_estimate`, unbiased by
construction; ``oracle_bias_se`` is its own mean error, i.e. the seeds' shared noise), paired,
so its Monte-Carlo error ``excess_bias_mc_se`` is small where the DP noise is.

For speed the estimation runs in-process: the same client statistics functions
(client/statistics.py: clip + Gaussian noise per institution) and the same server combination
code (server/causal.py: run_protocol), with the institutions' releases added in numpy instead
of through Flower/SecAgg+ (which add the same vectors). Each seed draws one federation and
reuses it for every ε.

    python benchmarks/causal_accuracy.py            # 200 runs per ε, 8 institutions x 2,500
    python benchmarks/causal_accuracy.py --quick    # smoke test
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

EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
ITEMS = {"health": "diet_counselling", "education": "tutoring", "finance": "job_training"}
def study_design(domain: str) -> dict:
    """The nuisance design the domain's study.toml declares (``[causal]``: covariates and
    derived features; the pooled peer uses the same). It is what an analyst who knows the field
    would declare: finance's earnings effects switch with unemployment (zero earnings last
    year), which a linear model in raw earnings cannot express; health's confounding runs
    through body-mass index, which a linear model in weight and height cannot express (pooled
    AIPW bias -0.33 SE on the benchmark's seeds with weight/height, +0.10 with BMI, where an
    AIPW with the true propensity shows +0.10: seed noise; docs/causal.md)."""
    from fedrec.simulations.domains import get_domain

    study = get_domain(domain).study()
    return {"covariates": study.causal_covariates, "derived": study.causal_derived}


def oracle_estimate(institutions, truth, item: str) -> float:
    """AIPW with the simulator's **true** propensity (and pooled OLS outcome models on the
    declared covariates), in outcome units: unbiased by construction, so its mean error over the
    seeds is the seed noise every cell of the same seeds shares. The benchmark reports each
    cell's bias against it (paired, same data) beside the bias against the truth."""
    import statsmodels.api as sm

    from fedrec.client.statistics import encode_item
    from fedrec.common.causal.influence import aipw_terms
    from fedrec.common.causal.scaling import half_range

    j = list(truth.item_ids).index(item)
    where = {p: i for i, p in enumerate(truth.person_ids)}
    xs, ts, ys, es = [], [], [], []
    for d in institutions:
        r = encode_item(d, item)
        inter = d.interactions
        pid = inter.loc[inter["item_id"] == item, "person_id"].astype(str)
        xs.append(r.x), ts.append(r.t), ys.append(r.y)
        es.append(truth.propensity[[where[p] for p in pid], j])
    x, t, y, e = np.vstack(xs), np.concatenate(ts), np.concatenate(ys), np.concatenate(es)
    m1 = x @ sm.OLS(y[t == 1], x[t == 1]).fit().params
    m0 = x @ sm.OLS(y[t == 0], x[t == 0]).fit().params
    return float(aipw_terms(t, y, m1, m0, e).mean() * half_range(institutions[0].study.outcome_bounds))


def _import_before_fork() -> None:
    """Import everything the workers use in the parent: forked workers then share these modules
    and never read source files, so editing the tree during a long run cannot break it (a
    1,000-run attempt once died on a half-edited module)."""
    import statsmodels.api  # noqa: F401

    import fedrec.client.statistics  # noqa: F401
    import fedrec.server.causal  # noqa: F401
    import fedrec.server.causal_recommend  # noqa: F401
    import fedrec.simulations.causal_cli  # noqa: F401
    from fedrec.simulations.domains import DOMAINS, get_domain

    for name in DOMAINS:
        get_domain(name)


def run_seeds(one_seed, jobs: list, workers: int) -> list:
    """``one_seed(job)`` for every job, over a fork pool of ``workers`` processes when > 1
    (also used by causal_policy.py and cate_coverage.py). A progress bar goes to stderr when it
    is a terminal (stdout carries the JSON)."""
    from tqdm import tqdm

    def bar(it):
        return tqdm(it, total=len(jobs), desc="seeds", unit="seed", file=sys.stderr, disable=None)

    if workers > 1:
        from multiprocessing import get_context

        _import_before_fork()
        with get_context("fork").Pool(workers) as pool:
            return list(bar(pool.imap(one_seed, jobs, chunksize=1)))
    return [one_seed(j) for j in bar(jobs)]


def cell_runs(results: list, domain: str, mode: str, eps: float) -> list:
    """The per-seed outputs of one (domain, noise mode, ε) cell from ``run_seeds`` results."""
    return [r for dom, out in results if dom == domain for r in out if r["epsilon"] == eps and r["noise_mode"] == mode]


def one_seed(args):
    domain, seed, institutions, people, epsilons, modes, nuisance, knobs, all_items = args
    warnings.filterwarnings("ignore")
    from dataclasses import replace

    from fedrec.common.causal.config import plan_budget
    from fedrec.simulations.causal_cli import estimate_inprocess, pooled_estimate
    from fedrec.simulations.domains import domain_federation

    item = ITEMS[domain]
    insts, truth = domain_federation(domain, institutions=institutions, people=people, seed=seed, skew=0.5)
    true = float(truth.ate[item])
    run_items = tuple(truth.item_ids) if all_items else (item,)  # all: the budget is split across them
    pooled = pooled_estimate(insts, item, replace(knobs, epsilon=math.inf, items=(item,), **nuisance))
    oracle = oracle_estimate(insts, truth, item)
    cache: dict = {}
    rng = np.random.default_rng([seed, 7])
    out = []
    for mode in modes:
      for eps in epsilons:
        if mode == "distributed" and not math.isfinite(eps):
            continue
        cfg = replace(knobs, epsilon=eps, items=run_items, noise_mode=mode, n_min=institutions, **nuisance)
        r = estimate_inprocess(insts, cfg, rng=rng, plan=plan_budget(cfg), cache=cache).items[item]
        out.append({"noise_mode": mode, "epsilon": eps, "ate": r["ate"], "se": r["se"], "lo": r["ci_low"], "hi": r["ci_high"],
                    "true": true, "oracle": oracle, "pooled_width": pooled["ci_high"] - pooled["ci_low"]})
    return domain, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Bias, RMSE, CI coverage and CI width (against the pooled "
                                              "non-private AIPW) of the federated ATE per domain, ε and noise "
                                              "mode, over seeded simulated federations. Prints JSON.")
    ap.add_argument("--quick", action="store_true", help="4 runs per ε (a smoke run; the default is 200)")
    ap.add_argument("--runs", type=int, default=None, help="seeded federations per ε (default 200; seeds 1000, 1001, ...)")
    ap.add_argument("--institutions", type=int, default=8, help="institutions per federation (default 8)")
    ap.add_argument("--people", type=int, default=20000, help="people in the federation (all institutions)")
    ap.add_argument("--domains", default="health,education,finance", help="comma-separated simulated domains")
    ap.add_argument("--noise-modes", default="local,distributed",
                    help="local: each institution adds the full noise (default guarantee); distributed: "
                         "sigma^2/n_min each, valid behind SecAgg+ with all institutions present")
    ap.add_argument("--no-derived", action="store_true",
                    help="every domain on all its declared covariates as they are (ignore the study's [causal] design)")
    ap.add_argument("--all-items", action="store_true",
                    help="estimate every item of the domain in each run, as `fedrec-sim causal` does by default "
                         "(the budget split across them), and measure the headline item; default: the headline item alone")
    ap.add_argument("--epsilons", default=None,
                    help="comma-separated ε per institution to measure, 'inf' allowed (default: "
                         "0.5,1,2,4,8,inf), e.g. --epsilons 2.5,3 to find the ε a target needs")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="processes (default: CPU cores - 1)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a causal tuning knob for every run (repeatable), as in `fedrec-sim causal --set`, "
                         "e.g. --set expert.psi-noise-ratio=0.3; the knobs are in docs/causal.md (Expert knobs)")
    a = ap.parse_args(argv)
    runs = a.runs or (4 if a.quick else 200)
    from fedrec.simulations.sweep import parse_epsilons

    try:
        epsilons = parse_epsilons(a.epsilons, "--epsilons") if a.epsilons else EPSILONS
    except ValueError as exc:
        ap.error(str(exc))
    domains = a.domains.split(",")
    warnings.filterwarnings("ignore")
    from dataclasses import replace

    from fedrec.common.causal.config import CausalConfig, plan_budget
    from fedrec.common.errors import FedrecInputError
    from fedrec.simulations.causal_cli import parse_settings

    try:
        settings = parse_settings(a.settings)
        knobs = CausalConfig.from_flat(settings)
    except (FedrecInputError, ValueError) as exc:
        ap.error(str(exc))
    for eps in epsilons:  # calibrate once in the parent (cached per process anyway)
        plan_budget(replace(knobs, epsilon=eps))
    modes = a.noise_modes.split(",")
    nuisance = {d: {} if a.no_derived else study_design(d) for d in domains}
    jobs = [(d, 1000 + s, a.institutions, a.people, epsilons, modes, nuisance.get(d, {}), knobs, a.all_items)
            for d in domains for s in range(runs)]
    t0 = time.time()
    results = run_seeds(one_seed, jobs, a.workers)
    rows = []
    for d in domains:
      for mode in modes:
        for eps in epsilons:
            rs = cell_runs(results, d, mode, eps)
            if not rs:
                continue
            err = np.array([r["ate"] - r["true"] for r in rs])
            excess = np.array([r["ate"] - r["oracle"] for r in rs])
            se = np.array([r["se"] for r in rs])
            mc = 1.0 / (math.sqrt(len(rs)) * se.mean())
            cover = np.mean([r["lo"] <= r["true"] <= r["hi"] for r in rs])
            width = np.mean([r["hi"] - r["lo"] for r in rs]) / np.mean([r["pooled_width"] for r in rs])
            rows.append({"domain": d, "epsilon": eps if math.isfinite(eps) else "inf", "noise_mode": mode,
                         "item": ITEMS[d],
                         "runs": len(rs), "bias": float(err.mean()), "bias_se": float(err.mean() / se.mean()),
                         "bias_mc_se": float(err.std(ddof=1) * mc),
                         "oracle_bias_se": float(np.mean([r["oracle"] - r["true"] for r in rs]) / se.mean()),
                         "excess_bias_se": float(excess.mean() / se.mean()),
                         "excess_bias_mc_se": float(excess.std(ddof=1) * mc),
                         "rmse": float(np.sqrt((err**2).mean())), "coverage": float(cover),
                         "ci_width_ratio": float(width), "mean_se": float(se.mean())})
    meta = {"script": "causal_accuracy.py", "quick": a.quick, "runs_per_epsilon": runs,
            "epsilons": [e if math.isfinite(e) else "inf" for e in epsilons],
            "institutions": a.institutions, "people": a.people, "skew": 0.5, "estimator": "aipw",
            "epsilon_unit": "per institution, whole run (PRV accountant, delta 1e-5)",
            "noise_modes": modes, "items": ITEMS, "nuisance_design": nuisance,
            "settings": settings or "defaults", "all_items": a.all_items,
            "bias": "bias_se = mean(estimate - truth) / mean SE, bias_mc_se its Monte-Carlo standard error; "
                    "oracle_bias_se: the same for an AIPW with the true propensity on the same seeds (seed "
                    "noise every cell shares); excess_bias_se = mean(estimate - oracle) / mean SE (paired), "
                    "with excess_bias_mc_se",
            "transport": "in-process: same client statistics + server combination code, sums added in numpy "
                         "(not through Flower/SecAgg+)",
            "peer": "pooled non-private AIPW (statsmodels Logit + per-arm OLS on the union)",
            "se": "sampling + DP noise of the influence sums + DP noise of the nuisance fits (delta method, "
                  "common/causal/influence.py cross_fit_variance)",
            "seconds": round(time.time() - t0, 1)}
    json.dump({"meta": meta, "rows": rows}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
