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
    s = sub.add_parser("summarize")
    s.add_argument("paths", nargs="+")
    s.add_argument("--command", default="", help="the commands that produced the files (recorded in meta)")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
        return 0
    print(json.dumps(summarize_files(args.paths, args.command or " ".join(sys.argv)), indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
