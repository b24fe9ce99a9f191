"""Coverage of the CATE's pointwise 95% intervals on the domain simulators.

Prints one JSON object ``{"meta": {...}, "rows": [...]}``; one row per (domain, noise mode,
ε) for the CATE model the federated DP protocol releases (``cate_coef`` / ``cate_cov`` in
causal.json, the difference of the two arms' ridge models on the bound-scaled design).

What an interval should cover. The CATE model is linear, the simulators' effects are not, so
its target is the linear CATE the same protocol fits without noise on a very large federation
(``--truth-people`` per institution, ε = inf): the best linear summary of the true effect under
the protocol's own design and weights. The evaluation points are the people of that large
federation (``--points`` of them, the same for every run and ε).

Columns, each a mean over runs and evaluation points:

* ``coverage``: share of points whose interval ``tau(x) +- 1.96 sqrt(x' C x)`` (C =
  ``cate_cov``: sampling, X'y noise and the Gram's noise) holds the target;
  ``coverage_without_gram_noise``: the same with the Gram's noise left out of C (the intervals
  before this benchmark existed);
* ``noise_var_ratio``: observed variance of the DP estimate around the noiseless fit on the
  *same data* (the same seed at ε = inf), over the variance C's noise part predicts (1 when
  the noise is accounted for; > 1 when it is under-counted);
  ``noise_var_ratio_without_gram_noise`` likewise with only the X'y noise;
* ``bias_sd``: mean error against the target, over the mean predicted SD (the ridge's shrinkage
  and the weights' shift show here; the interval does not cover them);
* ``width_ratio``: mean interval width over the ε = inf interval's on the same data;
* ``cate_shrinkage``: mean of the estimator's ``cate_shrinkage()`` (the share of the arm models
  the ridge and the eigenvalue floor take; causal.json reports it per item).

For speed the estimation runs in-process (benchmarks/causal_accuracy.py's protocol and
helpers: the same client statistics and server code, releases summed in numpy).

    python benchmarks/cate_coverage.py            # 200 runs per ε, 8 institutions x 2,500 (--people)
    python benchmarks/cate_coverage.py --quick    # smoke test
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
Z95 = 1.959963984540054


def cate_parts(est) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(coef, total_cov, noise_cov, gram_noise_cov)`` of an estimator's CATE on the
    bound-scaled design, outcome units (each through ``cate_cov``'s map)."""
    return est.cate_coef(), est.cate_cov(), est.cate_cov("noise_cov"), est.cate_cov("gram_noise_cov")


def _quad(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum(np.einsum("ij,jk,ik->i", x, c, x), 0.0)


def truth_model(domain: str, item: str, institutions: int, people: int, points: int, nuisance: dict, knobs, seed: int):
    """The target linear CATE (ε = inf on a large federation of ``institutions`` x ``people``)
    at ``points`` of its people."""
    from dataclasses import replace

    from fedrec.client.statistics import people_design
    from fedrec.common.causal.config import plan_budget
    from fedrec.simulations.causal_cli import estimate_inprocess
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation(domain, institutions=institutions, people=institutions * people, seed=seed, skew=0.5)
    cfg = replace(knobs, epsilon=math.inf, items=(item,), noise_mode="local", n_min=institutions, **nuisance)
    est = estimate_inprocess(insts, cfg, rng=np.random.default_rng(seed), plan=plan_budget(cfg)).estimators[item]
    x = np.vstack([people_design(d, nuisance["covariates"], nuisance["derived"]) for d in insts])
    x = x[np.random.default_rng([seed, 1]).choice(len(x), size=min(points, len(x)), replace=False)]
    return x, x @ est.cate_coef()


def one_seed(args):
    domain, item, seed, institutions, people, epsilons, modes, nuisance, knobs, x_eval, tau_true, all_items = args
    warnings.filterwarnings("ignore")
    from dataclasses import replace

    from fedrec.common.causal.config import plan_budget
    from fedrec.simulations.causal_cli import estimate_inprocess
    from fedrec.simulations.domains import domain_federation

    # ``people`` is per institution; domain_federation takes the federation's total
    insts, truth = domain_federation(domain, institutions=institutions, people=institutions * people, seed=seed, skew=0.5)
    run_items = tuple(truth.item_ids) if all_items else (item,)  # all: the budget is split across them
    cache: dict = {}
    rng = np.random.default_rng([seed, 11])

    def fit(eps: float, mode: str):
        cfg = replace(knobs, epsilon=eps, items=run_items, noise_mode=mode, n_min=institutions, **nuisance)
        return estimate_inprocess(insts, cfg, rng=rng, plan=plan_budget(cfg), cache=cache).estimators[item]

    base_coef, base_cov, _, _ = cate_parts(fit(math.inf, "local"))
    tau_same = x_eval @ base_coef
    base_width = 2 * Z95 * np.sqrt(_quad(x_eval, base_cov)).mean()
    out = []
    for mode in modes:
        for eps in epsilons:
            if mode == "distributed" and not math.isfinite(eps):
                continue  # no noise: one cell (local) is enough
            est = fit(eps, mode)
            coef, total, noise, gram = cate_parts(est)
            tau = x_eval @ coef
            sd = np.sqrt(_quad(x_eval, total))
            sd_old = np.sqrt(_quad(x_eval, total - gram))
            err = tau - tau_true
            out.append({
                "noise_mode": mode, "epsilon": eps,
                "cover": float(np.mean(np.abs(err) <= Z95 * sd)),
                "cover_old": float(np.mean(np.abs(err) <= Z95 * sd_old)),
                "noise_sq": float(np.mean((tau - tau_same) ** 2)),
                "noise_pred": float(np.mean(_quad(x_eval, noise))),
                "noise_pred_old": float(np.mean(_quad(x_eval, noise - gram))),
                "err": float(np.mean(err)), "sd": float(np.mean(sd)),
                "width": float(2 * Z95 * np.mean(sd)), "base_width": float(base_width),
                "shrinkage": est.cate_shrinkage(),
            })
    return domain, out


def _ratio(num: float, den: float) -> float | None:
    """num / den to 3 decimals; None without noise (ε = inf: both 0)."""
    return round(num / den, 3) if den > 0 else None


def summarise(runs: list[dict]) -> dict:
    n = len(runs)
    mean = lambda k: float(np.mean([r[k] for r in runs]))  # noqa: E731
    cover = [r["cover"] for r in runs]
    return {
        "runs": n,
        "coverage": round(mean("cover"), 4),
        "coverage_mc_se": round(float(np.std(cover) / math.sqrt(max(n, 1))), 4),
        "coverage_without_gram_noise": round(mean("cover_old"), 4),
        "noise_var_ratio": _ratio(mean("noise_sq"), mean("noise_pred")),
        "noise_var_ratio_without_gram_noise": _ratio(mean("noise_sq"), mean("noise_pred_old")),
        "bias_sd": round(mean("err") / max(mean("sd"), 1e-300), 3),
        "width_ratio": round(mean("width") / max(mean("base_width"), 1e-300), 3),
        "cate_shrinkage": round(mean("shrinkage"), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200, help="seeded federations per domain (default 200)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 runs, 2 institutions x 600, ε 1 and 8")
    ap.add_argument("--domains", default="health,education,finance")
    ap.add_argument("--modes", default="distributed,local")
    ap.add_argument("--people", type=int, default=2_500, help="people per institution (8 institutions)")
    ap.add_argument("--truth-people", type=int, default=25_000, help="people per institution of the target fit")
    ap.add_argument("--points", type=int, default=2_000, help="evaluation points (people of the target federation)")
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--all-items", action="store_true",
                    help="estimate every item of the domain in each run, as `fedrec-sim causal` does by default "
                         "(the budget split across them), and measure the headline item; default: the headline item alone")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    a = ap.parse_args(argv)
    import causal_accuracy as acc  # a sibling script (items, designs, seed runner): its folder is on sys.path

    from fedrec.common.causal.config import CausalConfig

    runs, inst, people, eps = (3, 2, 600, (1.0, 8.0)) if a.quick else (a.runs, 8, a.people, EPSILONS)
    truth_people = 2_000 if a.quick else a.truth_people
    domains, modes = a.domains.split(","), tuple(a.modes.split(","))
    knobs = CausalConfig()
    t0 = time.time()
    jobs = []
    for dom in domains:
        nuisance = acc.study_design(dom)
        x_eval, tau_true = truth_model(dom, acc.ITEMS[dom], inst, truth_people, a.points, nuisance, knobs, seed=999_000)
        jobs += [(dom, acc.ITEMS[dom], a.first_seed + s, inst, people, eps, modes, nuisance, knobs, x_eval, tau_true,
                  a.all_items) for s in range(runs)]
    results = acc.run_seeds(one_seed, jobs, a.workers)
    rows = []
    for dom in domains:
        for mode in modes:
            for e in eps:
                if mode == "distributed" and not math.isfinite(e):
                    continue
                cell = acc.cell_runs(results, dom, mode, e)
                rows.append({"domain": dom, "item": acc.ITEMS[dom], "noise_mode": mode,
                             "epsilon": e if math.isfinite(e) else "inf", **summarise(cell)})
    meta = {"script": "cate_coverage.py", "quick": a.quick, "runs_per_cell": runs, "first_seed": a.first_seed,
            "institutions": inst, "people_per_institution": people, "truth_people_per_institution": truth_people,
            "points": a.points, "all_items": a.all_items, "seconds": round(time.time() - t0, 1),
            "target": "the ε = inf linear CATE of the same protocol on the large federation"}
    json.dump({"meta": meta, "rows": rows}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
