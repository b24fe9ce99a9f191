"""``fedrec-sim demo`` (``make demo``): the whole mission on a simulated health federation.

1. generate 8 health institutions (NHEFS covariates, known causal ground truth) -> ``data/``;
2. train the MF recommender under person-level DP over SecAgg+ (a real Flower simulation;
   each institution's policy and ledger provisioned first) -> ``mf/``; the same federation
   without DP (``mf-nonprivate/``, the upper reference) and each institution alone (nothing
   released, the lower reference) beside it;
3. estimate every programme's effect (ATE with 95% CIs, CATE models) from DP, securely
   aggregated statistics (Flower simulation) -> ``causal/causal.json``, and rank programmes per
   patient by estimated benefit -> ``causal/recommendations-institution_00.csv``;
4. audit the MF run from its folder alone (ledger chain, ε re-derived, one-run empirical audit)
   -> ``mf/audit.md``;
5. ``report.html`` / ``report.md`` (simulations/report.py) and one printed summary naming the
   files and what the numbers mean.

Seeded end to end (federation, splits and — simulation only — every release's noise), so the
numbers repeat. About 60 CPU seconds in all (three Flower runs, each one ClientApp actor);
4.5-5 minutes of wall time on the shared 2-core machine at load 10-17 (docs/simulate.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from fedrec.common.errors import FedrecInputError

__all__ = ["demo_command"]

DOMAIN = "health"


def _step(console, text: str) -> float:
    console.print(f"[bold cyan]>[/] {text}", highlight=False)
    return time.monotonic()


def demo_command(*, out: Path, institutions: int, people: int, rounds: int, epsilon: float, seed: int, console) -> int:
    from fedrec.common.config import RunConfig

    import warnings

    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0"), ("PYTHONWARNINGS", "ignore")):
        os.environ.setdefault(var, val)  # Ray's workers inherit these
    warnings.filterwarnings("ignore")  # accountant/Ray chatter would bury the summary
    if institutions < 3:
        raise FedrecInputError("--institutions must be >= 3 (secure aggregation tolerates dropouts among several)")
    if not math.isfinite(epsilon):
        raise FedrecInputError("--epsilon must be finite: the demo shows DP (its non-private reference runs anyway)")
    out = Path(out)
    if out.exists():
        if not (out / "demo.json").exists() and any(out.iterdir()):
            raise FedrecInputError(f"--out {out}: holds something that is not a demo; fix: give a new or empty folder")
        shutil.rmtree(out)  # a fresh federation: its institutions' ledgers start empty
    out.mkdir(parents=True)
    t_start = time.monotonic()

    _step(console, f"1/5 generating {institutions} simulated health institutions ({people} patients, seed {seed})")
    from fedrec.simulations.generate import generate

    data = out / "data"
    generate(DOMAIN, institutions=institutions, people=people, seed=seed, skew=0.5, out=data, console=console)

    base = RunConfig().override(**{"dataset": DOMAIN, "institutions": institutions, "rounds": rounds, "seed": seed,
                                   "sim.noise-seed": seed, "data-dir": str(data.resolve()),
                                   "privacy.epsilon": epsilon})
    mf, mf_np, alone, causal = _flower_phases(console, base, data, out, rounds=rounds, epsilon=epsilon, seed=seed,
                                              institutions=institutions, people=people)
    from fedrec.client.recommend import recommendations

    recs_path = out / "causal" / "recommendations-institution_00.csv"
    try:  # what institution_00 does with the released CATE models: post-processing, no budget
        recs = recommendations(out / "causal" / "causal.json", data / "institution_00", k=3)
        recs.to_csv(recs_path, index=False)
    except FedrecInputError as err:
        console.print(f"[yellow]no recommendations[/]: {err}", highlight=False)
        recs = []
    from rich.console import Console

    quiet_console = Console(file=open(os.devnull, "w"))  # the summary below reports what matters
    _step(console, "4/5 auditing the MF run from its folder (ledgers, ε re-derived, empirical audit)")
    from fedrec.server.audit import run_audit

    audit_rc = run_audit(out / "mf", quick=True, console=quiet_console)

    _step(console, "5/5 report")
    rows = _rows(mf, mf_np, alone, causal, base)
    meta = {"command": "fedrec-sim demo" if out == Path("results/demo") else f"fedrec-sim demo --out {out}",
            "commit": _commit(), "fixed": {"institutions": institutions, "people": people, "rounds": rounds,
                                           "skew": 0.5},
            "grid": {"domains": [DOMAIN], "epsilons": [epsilon, "inf"], "noise_modes": ["local"],
                     "tasks": ["rec", "causal"], "models": ["mf"], "seeds": 1},
            "notes": ["the demo: one seed, one ε; `fedrec-sim sweep` draws the whole ε grid"]}
    from fedrec.simulations.report import write_report

    write_report(out, rows, meta)
    (out / "demo.json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1, default=str))
    _summary(console, out, mf, mf_np, alone, causal, recs, audit_rc, epsilon, time.monotonic() - t_start)
    return 0 if audit_rc == 0 else 1


def _flower_phases(console, base, data: Path, out: Path, *, rounds: int, epsilon: float, seed: int,
                   institutions: int, people: int) -> tuple[dict, dict, dict, dict]:
    """Steps 2-3: MF under DP over SecAgg+, its non-private and stay-alone references, and the
    causal run (each a Flower simulation, except the stay-alone reference: nothing released)."""
    from rich.console import Console

    from fedrec.common.errors import RunFailed
    from fedrec.simulations.causal_cli import causal_command
    from fedrec.simulations.run import one_actor_cpus, run_simulation
    from fedrec.simulations.sweep import alone_metrics

    cpus = one_actor_cpus()  # one ClientApp actor per run: the client work is small, its imports are not

    _step(console, f"2/5 MF under DP (ε = {epsilon:g} per institution, local noise) over SecAgg+: "
                   f"{rounds} rounds, Flower simulation")
    mf = run_simulation(base, out / "mf", quiet=True, num_cpus_per_client=cpus)
    _step(console, "    the same federation without DP (upper reference), and each institution alone (lower)")
    mf_np = run_simulation(base.override(**{"privacy.epsilon": math.inf}), out / "mf-nonprivate", quiet=True,
                           allow_non_private=True, num_cpus_per_client=cpus)
    alone = alone_metrics(data, base)

    _step(console, f"3/5 causal effects of every programme (ε = {epsilon:g}, AIPW over SecAgg+, Flower simulation)")
    quiet_console = Console(file=open(os.devnull, "w"))  # the summary reports what matters
    try:
        causal_command(data, None, epsilon, "aipw", False, out / "causal", seed, quiet_console,
                       num_cpus_per_client=cpus)
        causal = json.loads((out / "causal" / "causal.json").read_text())
    except RunFailed as err:
        console.print(f"[yellow]the Flower causal run failed[/] ({str(err)[:160]}); estimating in-process instead "
                      "(the same client statistics and server code, sums added in numpy, no ledgers)", highlight=False)
        causal = _causal_inprocess(data, epsilon, seed, institutions, people)
        (out / "causal").mkdir(exist_ok=True)
        (out / "causal" / "causal.json").write_text(json.dumps(causal, indent=1, default=_plain))
    return mf, mf_np, alone, causal


def _causal_inprocess(data: Path, epsilon: float, seed: int, institutions: int, people: int) -> dict:
    """Fallback when the Flower causal run fails: the same estimate, in-process (seeded)."""
    import numpy as np

    from fedrec.common.causal.config import plan_budget
    from fedrec.common.config import derive_seed
    from fedrec.common.datasets import GROUND_TRUTH_DIR, load_federation, read_ground_truth
    from fedrec.server.causal_recommend import policy_values
    from fedrec.simulations.causal_cli import estimate_inprocess, resolve_config

    insts = load_federation(data)
    truth = read_ground_truth(data / GROUND_TRUTH_DIR)
    cfg, _ = resolve_config(insts, epsilon=epsilon)
    res = estimate_inprocess(insts, cfg, rng=np.random.default_rng(derive_seed(seed, "demo-causal")),
                             plan=plan_budget(cfg))
    items = {it: {**{k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in r.items()},
                  "true_ate": float(truth.ate[it])} for it, r in res.items.items()}
    out = {"items": items, "epsilon_requested": epsilon, "transport": "in-process (Flower run failed)",
           "epsilon_per_institution": {},
           "nuisance_design": {"covariates": None if cfg.covariates is None else list(cfg.covariates),
                               "derived": list(cfg.derived), "source": "study.toml [causal]"}}
    if all("cate_coef" in r for r in items.values()):
        out["recommendations"] = policy_values(insts, truth, res.items, cfg.covariates, cfg.derived)
    return out


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else float(v)


def _commit() -> str:
    from fedrec.simulations.sweep import git_commit

    return git_commit()


def _rows(mf: dict, mf_np: dict, alone: dict, causal: dict, cfg) -> list[dict]:
    def rec_row(model, mode, eps, m):
        last = m["rounds"][-1] if "rounds" in m else m
        spent = [float(v) for v in (last.get("epsilon") or {}).values() if math.isfinite(float(v))]
        return {"task": "rec", "domain": DOMAIN, "model": model, "noise_mode": mode, "epsilon": eps, "seed": 0,
                "rmse": last.get("rmse"), "mae": last.get("mae"), "ndcg10": last.get("ndcg10"),
                "epsilon_spent_max": max(spent) if spent else "", "status": "ok"}

    eps = cfg.privacy.epsilon
    rows = [rec_row("mf", "local", eps, mf), rec_row("mf", "none", math.inf, mf_np),
            {**rec_row("alone", "none", 0.0, alone), "epsilon_spent_max": 0.0}]
    items = causal.get("items", {})
    if items and all("true_ate" in r for r in items.values()):
        errs = [abs(r["ate"] - r["true_ate"]) for r in items.values()]
        row = {"task": "causal", "domain": DOMAIN, "model": "aipw", "noise_mode": "local", "epsilon": eps, "seed": 0,
               "ate_abs_error": sum(errs) / len(errs),
               "ci_width": sum(r["ci_high"] - r["ci_low"] for r in items.values()) / len(items),
               "coverage": sum(r["ci_low"] <= r["true_ate"] <= r["ci_high"] for r in items.values()) / len(items),
               "status": "ok"}
        rec = causal.get("recommendations", {})
        for name in ("causal", "engagement", "oracle", "random"):
            if name in rec:
                row[f"policy_value_{name}"] = rec[name]["policy_value"]
        rows.append(row)
    return rows


def _summary(console, out: Path, mf: dict, mf_np: dict, alone: dict, causal: dict, recs, audit_rc: int,
             epsilon: float, seconds: float) -> None:
    from rich.table import Table

    last, ref = mf["rounds"][-1], mf_np["rounds"][-1]
    tab = Table(title=f"Recommendation quality (held-out engagement, health, {len(mf['institutions'])} institutions)")
    for col in ("", "RMSE (lower is better)", "NDCG@10 (higher is better)", "ε spent per institution"):
        tab.add_column(col)
    spent = [float(v) for v in last.get("epsilon", {}).values()]
    tab.add_row(f"federated MF, DP ε = {epsilon:g} (SecAgg+)", f"{last['rmse']:.4f}", f"{last['ndcg10']:.4f}",
                f"{max(spent):.3f} (cap {epsilon:g})" if spent else "-")
    tab.add_row("federated MF, no DP (reference)", f"{ref['rmse']:.4f}", f"{ref['ndcg10']:.4f}", "∞ (simulation only)")
    tab.add_row("each institution alone (nothing released)", f"{alone['rmse']:.4f}", f"{alone['ndcg10']:.4f}", "0")
    console.print(tab)
    items = causal.get("items", {})
    ctab = Table(title=f"Effect of each programme on weight change (kg; lower is better), ε = {epsilon:g}")
    for col in ("programme", "ATE (95% CI)", "true ATE", "CI covers truth"):
        ctab.add_column(col)
    for it, r in items.items():
        true = r.get("true_ate")
        ctab.add_row(it, f"{r['ate']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
                     "-" if true is None else f"{true:+.2f}",
                     "-" if true is None else ("yes" if r["ci_low"] <= true <= r["ci_high"] else "no"))
    console.print(ctab)
    rec = causal.get("recommendations", {})
    if rec:
        console.print("policy value (mean true benefit of each patient's top-1 programme, kg avoided): "
                      + ", ".join(f"{n} {rec[n]['policy_value']:.3f}" for n in ("causal", "engagement", "oracle", "random")
                                  if n in rec), highlight=False)
    abst = _abstentions(recs)
    if abst is not None:
        given, none = abst
        console.print(f"recommendations for institution_00's {given + none} patients: {given} get up to 3 programmes "
                      f"ranked by estimated benefit; {none} get none — no programme's 95% benefit interval excludes "
                      "'no better than no programme', so the system abstains rather than guess", highlight=False)
    eps_c = causal.get("epsilon_per_institution", {})
    finite = [float(v) for v in eps_c.values() if isinstance(v, (int, float))]
    console.print("\n[bold]What the numbers mean[/]", highlight=False)
    console.print(
        f"- RMSE/NDCG: the DP federation ({last['rmse']:.3f}) against the same federation without privacy "
        f"({ref['rmse']:.3f}) is the price of ε = {epsilon:g}; against an institution alone ({alone['rmse']:.3f}) it is "
        "what joining buys. Alone an institution cannot rank programmes it has not seen its patients take "
        f"(NDCG@10 {alone['ndcg10']:.3f}). HR@10 is not shown: with 8 programmes it is always 1.\n"
        "- ATE: the average effect of a programme on weight change; the 95% CI includes the DP noise. The "
        "causal recommendation ranks programmes by each patient's estimated benefit; the engagement one by what "
        "patients engage with — here the policy values show how much more real benefit the causal ranking buys.\n"
        f"- ε: each institution spent at most {max(spent):.3f} on MF and "
        + (f"{max(finite):.3f} on the causal run" if finite else "nothing on a ledger for the causal estimate "
           "(the in-process fallback keeps none)")
        + f" (each run's cap {epsilon:g}); every Flower release was charged to its ledger before it left. "
        f"The audit {'passed' if audit_rc == 0 else 'FOUND A PROBLEM'} (mf/audit.md).", highlight=False)
    console.print("\n[bold]Files[/]", highlight=False)
    files = [
        ("report.html", "the report: setup, figures inline, tables (report.md beside it)"),
        ("mf/metrics.json, mf/metrics.png", "MF per round: RMSE, NDCG@10, ε per institution"),
        ("mf/ledgers/*.db", "each institution's hash-chained privacy ledger (fedrec-client budget --ledger PATH)"),
        ("mf/policies/*/privacy.toml", "each institution's privacy policy"),
        ("mf/audit.md", "the audit: ledger chains, ε re-derived, empirical lower bound"),
        ("mf-nonprivate/", "the non-private reference run"),
        ("causal/causal.json", "ATE/CATE per programme with CIs, ε per institution, policy values"),
        ("causal/ledgers/*.db", "the causal run's ledgers"),
        (recs_name(out), f"top-3 programmes per patient of institution_00 ({len(recs)} rows)"),
        ("data/", "the simulated institutions (and ground_truth/)"),
    ]
    for f, what in files:
        console.print(f"  {out / f}  —  {what}", highlight=False)
    console.print(f"[bold green]demo done[/] in {seconds:.0f} s", highlight=False)


def _abstentions(recs) -> tuple[int, int] | None:
    """(patients with a recommendation, patients the recommender abstains for), or None."""
    if not hasattr(recs, "columns") or "item_id" not in recs.columns:
        return None
    has_item = recs["item_id"].notna() & (recs["item_id"].astype(str).str.len() > 0)
    per_person = has_item.groupby(recs["person_id"]).any()
    return int(per_person.sum()), int((~per_person).sum())


def recs_name(out: Path) -> str:
    return "causal/recommendations-institution_00.csv"
