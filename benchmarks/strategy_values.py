"""Strategy values (off-policy evaluation) against the simulated A/B reference: rows
``kind=policy_value`` (issue 32).

Each seed draws one federation with several loggers (simulations/strategies.several_loggers: 8
institutions x 2,500 people), runs the causal protocol (nuisances, CATE models), two more
causal runs on the halves of the people (cross-fitted benefit ranking ``benefit-cf``), and one
strategy release (``--estimators``: DR alone, the default release, or ``all`` for IPS, SNIPS,
DM and switch-DR beside it); each estimate is graded against the
strategy's mean true effect over 100,000 fresh people (the expected result of a randomized A/B
test; the logging strategy on the federation's own people). Peers in the same run: the A/B
reference (bias, coverage) and the non-private estimate of the same federation
(``ci_width_ratio``: CI width at ε over the width at ε = ∞, where both were run).

Rows (:func:`fedrec.simulations.strategies.summarize`): ``kind=policy_value, domain, epsilon,
noise_mode, strategy, estimator, runs, truth, bias, bias_se_units, rmse, coverage, ci_width,
ci_width_ratio, sign_correct`` (coverage and sign with binomial SEs: ``coverage_se``,
``sign_correct_se``); ``benefit-engagement`` / ``benefit-cf-engagement`` are the
paired differences (sign_correct: the share of runs with the truth's sign).

    python benchmarks/strategy_values.py run --first-seed 500 --seeds 10 --epsilon 4 \\
        --noise-mode distributed --jsonl runs.jsonl      # appends one line per federation
    python benchmarks/strategy_values.py summarize runs.jsonl ...   # prints the JSON

``run`` appends each finished federation at once (a long measurement can be stopped and
summarized at any point); ``summarize`` prints ``{"meta", "rows"}``.

    python benchmarks/strategy_values.py halves --first-seed 8000 --seeds 10 --jsonl h.jsonl

``halves`` (the cross-fitted SE diagnostic, ε = inf, in process): per federation the DR
estimate of ``benefit-cf`` split by fold (fold k's people under the policy fitted on the other
fold) with each fold's truth on the reference's people of that fold, the per-person squares
(i.i.d. SE) and the squares of the per-person difference of the two policies' DR terms; across
seeds the correlation of the two folds' errors is the covariance the i.i.d. SE lacks
(common/causal/ope.py ``OPEResult``). ``--clip`` (default: the ε = inf release's, 20).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings

DOMAINS = ("health", "education", "finance")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args) -> None:
    from fedrec.simulations.strategies import one_run, reference_population

    from fedrec.common.causal.ope import ESTIMATORS, OPEConfig

    eps = float(args.epsilon)
    ope = OPEConfig(estimators=ESTIMATORS if args.estimators == "all" else
                    tuple(e.strip() for e in args.estimators.split(",") if e.strip()))
    mode = args.noise_mode if math.isfinite(eps) else "local"
    refs = {d: reference_population(d) for d in args.domains}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for dom in args.domains:
            t0 = time.time()
            r = one_run(dom, seed=seed, epsilon=eps, noise_mode=mode, reference=refs[dom],
                        crossfit=not args.no_crossfit, ope=ope)
            r["estimators"] = list(ope.estimators)
            r["seconds"] = round(time.time() - t0, 1)
            with open(args.jsonl, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(r, default=float) + "\n")
            print(f"{dom} eps={args.epsilon} {mode} seed {seed}: {r['seconds']} s", file=sys.stderr, flush=True)


def halves(args) -> None:
    """The per-fold diagnostic of ``benefit-cf`` (module doc), one JSON line per federation."""
    import numpy as np

    from fedrec.client.ope_statistics import exposure_probabilities, strategy_rows
    from fedrec.client.statistics import design_columns
    from fedrec.common.causal.ope import OPEConfig, person_components, person_fold, terms_of
    from fedrec.common.causal.scaling import half_range
    from fedrec.server.strategies import crossfit_benefit_strategy, effective_clip, nuisance_arrays
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config
    from fedrec.simulations.strategies import crossfit_runs, reference_population, several_loggers

    cfg = OPEConfig(epsilon=math.inf)
    clip = float(args.clip) if args.clip else effective_clip(cfg)
    ref_people, ref_truth = reference_population(args.domain)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.time()
        insts, _ = several_loggers(args.domain, institutions=8, people=20_000, seed=seed)
        ccfg, _ = resolve_config(insts, epsilon=math.inf)
        causal = estimate_inprocess(insts, ccfg, rng=np.random.default_rng([seed, 77]))
        salt = f"crossfit-{seed}"
        folds = crossfit_runs(insts, ccfg, salt=salt, rng=np.random.default_rng([seed, 78]))
        better = insts[0].study.outcome_better
        cf = crossfit_benefit_strategy(folds, better, salt)
        pol = [{"name": f"pi{k}", "kind": "rank", "better": better, "coef": cf["coef"][k]} for k in range(2)]
        nuis = nuisance_arrays(causal)
        items = sorted(k[len("beta/"):] for k in nuis if k.startswith("beta/"))
        cov, der = ccfg.covariates, ccfg.derived
        columns = [c[0] for c in design_columns(insts[0], cov, der)]
        scale = half_range(insts[0].study.outcome_bounds)
        phi, fold = [], []
        for d in insts:
            rows = strategy_rows(d, items, nuis, covariates=cov, derived=der, trim=cfg.trim)
            n = len(rows["x"])
            phi.append(np.column_stack([terms_of(person_components(
                rows["person"], n, rows["t"], rows["y"], rows["e"], rows["m1"], rows["m0"],
                exposure_probabilities(s, rows, items, columns, d), clip=clip, switch_tau=cfg.switch_tau))["dr"]
                for s in [cf] + pol]))
            fold.append(person_fold(d.people["person_id"].astype(str).to_numpy(), salt, 2))
        phi, fold = np.vstack(phi) * scale, np.concatenate(fold)
        rrows = strategy_rows(ref_people, items, nuis, covariates=cov, derived=der, trim=cfg.trim)
        pos = {p: i for i, p in enumerate(ref_truth.person_ids.astype(str))}
        ppl = ref_people.people["person_id"].astype(str).to_numpy()
        tau = ref_truth.cate[np.array([pos[p] for p in ppl])[rrows["person"]],
                             np.array([list(ref_truth.item_ids).index(it) for it in items])[rrows["item"]]]
        rfold = person_fold(ppl, salt, 2)

        def true_effect(spec):
            w = exposure_probabilities(spec, rrows, items, columns, ref_people) * tau
            return np.bincount(rrows["person"], weights=w, minlength=len(ppl))

        rec = {"domain": args.domain, "seed": seed, "clip": clip, "n": len(phi),
               "n_fold": [int((fold == k).sum()) for k in range(2)], "est_cf": float(phi[:, 0].mean()),
               "truth_cf": float(true_effect(cf).mean()), "sumsq_cf": float(np.sum(phi[:, 0] ** 2)),
               "fold_mean": [float(phi[fold == k, 0].mean()) for k in range(2)],
               "fold_sumsq": [float(np.sum(phi[fold == k, 0] ** 2)) for k in range(2)],
               "truth_pi_reffold": [float(true_effect(pol[k])[rfold == k].mean()) for k in range(2)],
               "sumsq_pidiff": float(np.sum((phi[:, 1] - phi[:, 2]) ** 2)), "seconds": round(time.time() - t0, 1)}
        with open(args.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"halves {args.domain} seed {seed}: {rec['seconds']} s", file=sys.stderr, flush=True)


def summarize_files(paths, command: str) -> dict:
    from fedrec.simulations.strategies import summarize

    runs = []
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            runs += [json.loads(line) for line in fh if line.strip()]
    seeds = sorted({r["seed"] for r in runs})
    cells = sorted({(r["domain"], str(r["epsilon"]), r["noise_mode"]) for r in runs})
    meta = {"commit": _commit(), "command": command, "seeds": seeds,
            "runs_per_cell": {f"{d} eps={e} {m}": sum(1 for r in runs if (r["domain"], str(r["epsilon"]),
                                                                            r["noise_mode"]) == (d, e, m))
                              for d, e, m in cells},
            "estimators": sorted({",".join(r.get("estimators", ["all (before the DR-only default)"])) for r in runs}),
            "federation": "8 institutions x 2,500 people, loggers shifted evenly in [-1, 1] (several loggers)",
            "reference": "mean true effect of the strategy over 100,000 fresh people (simulated A/B test); logging: "
                         "the federation's own people with their institutions' true propensities",
            "epsilon_note": "ε per institution is spent by the causal run and again by the strategy release; "
                            "benefit-cf adds one causal run per person (each person is in one of the two halves)"}
    return {"meta": meta, "rows": summarize(runs)}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--first-seed", type=int, required=True)
    r.add_argument("--seeds", type=int, default=10)
    r.add_argument("--epsilon", default="4")
    r.add_argument("--noise-mode", default="distributed", choices=("local", "distributed"))
    r.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    r.add_argument("--no-crossfit", action="store_true")
    r.add_argument("--estimators", default="dr",
                   help="estimators the strategy release carries: dr (the default release) or all / a comma list")
    r.add_argument("--jsonl", required=True)
    h = sub.add_parser("halves", help="per-fold diagnostic of benefit-cf's SE (eps = inf, module doc)")
    h.add_argument("--first-seed", type=int, required=True)
    h.add_argument("--seeds", type=int, default=10)
    h.add_argument("--domain", default="health", choices=DOMAINS)
    h.add_argument("--clip", type=float, default=0.0, help="the weight clip (default: the eps = inf release's)")
    h.add_argument("--jsonl", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("paths", nargs="+")
    s.add_argument("--command", default="", help="the commands that produced the files (recorded in meta)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
        return 0
    if args.cmd == "halves":
        if args.seeds < 1 or args.clip < 0:
            print("halves: --seeds must be >= 1 and --clip >= 0 (0: the default); fix: e.g. --seeds 10", file=sys.stderr)
            return 2
        halves(args)
        return 0
    print(json.dumps(summarize_files(args.paths, args.command or " ".join(sys.argv)), indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
