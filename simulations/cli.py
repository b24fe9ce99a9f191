"""fedrec-sim: what analysts run — simulations, data generation, causal studies."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedrec.common.errors import run_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="fedrec simulations: federated training runs, synthetic institutions, causal studies.",
)
console = Console()


def _epsilon(value: str) -> float:
    try:
        eps = float(value)
    except ValueError:
        raise typer.BadParameter(f"--epsilon {value!r}: give a number or 'inf'") from None
    if not eps > 0:
        raise typer.BadParameter("--epsilon must be > 0 ('inf' turns DP off)")
    return eps


RAY_ADDRESS_HELP = ("Attach the simulations to an existing Ray cluster, HOST:PORT (what `ray start --head` prints); "
                    "default 'local': Flower starts a Ray on this machine. Checked before anything runs.")


def _ray_address(value: str) -> None:
    """Check --ray-address and make it the cluster every simulation of this command attaches to."""
    from fedrec.simulations.ray_cluster import use_ray_address

    use_ray_address(value)


@app.command("run")
def run_cmd(
    dataset: str = typer.Option("movielens", "--dataset", help="movielens, or a domain: health | education | finance."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Same as --dataset for a simulated domain."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of institution folders in the data contract (instead of generating)."),
    institutions: int = typer.Option(10, "--institutions", "-k", help="Number of institutions (Flower SuperNodes)."),
    rounds: int = typer.Option(20, "--rounds", "-r", help="Federated rounds."),
    epsilon: str = typer.Option("8", "--epsilon", help="Total ε per institution for the whole run; 'inf' turns DP off."),
    seed: int = typer.Option(0, "--seed", help="Seed for partitioning, splits and the DP noise: the same command gives the same numbers. Simulation only: a deployed institution ignores it and draws its noise from the OS CSPRNG."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: results/<dataset>-eps<ε>-<time>)."),
    set_: list[str] = typer.Option([], "--set", help="Any run-config knob, KEY=VALUE (e.g. --set mf.dim=8). Repeatable."),
    plain: bool = typer.Option(False, "--plain-aggregation", help="Sum updates in the clear (tests/benchmarks only: the server sees each update)."),
    non_private: bool = typer.Option(False, "--non-private", help="Required with --epsilon inf: a run without differential privacy (simulations only; its ledgers record ε = ∞)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    ray_address: str = typer.Option("local", "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Run one federated training simulation on Flower's simulation engine.

    Writes metrics.json (per round: rmse, mae, ndcg10, hr10, epsilon per institution),
    config.json and metrics.png into the results folder.
    """
    from fedrec.simulations.run import run_from_cli

    _ray_address(ray_address)
    raise typer.Exit(
        run_from_cli(
            dataset=domain or dataset,
            data=data,
            institutions=institutions,
            rounds=rounds,
            epsilon=_epsilon(epsilon),
            seed=seed,
            out=out,
            overrides=set_,
            plain=plain,
            non_private=non_private,
            quiet=quiet,
            console=console,
        )
    )


@app.command("generate")
def generate_cmd(
    domain: str = typer.Option(..., "--domain", help="health | education | finance"),
    institutions: int = typer.Option(8, "--institutions", "-k"),
    people: int = typer.Option(20000, "--people", help="People across all institutions."),
    seed: int = typer.Option(1, "--seed"),
    skew: float = typer.Option(0.5, "--skew", help="Case-mix skew across institutions, 0 (IID) to 1."),
    out: Path = typer.Option(..., "--out", help="Output folder: one folder per institution + ground_truth/."),
) -> None:
    """Generate simulated institutions in the data contract, with ground truth beside them."""
    from fedrec.simulations.generate import generate

    generate(domain, institutions=institutions, people=people, seed=seed, skew=skew, out=out, console=console)


@app.command("causal")
def causal_cmd(
    data: Path = typer.Option(..., "--data", help="Folder of institution folders in the data contract."),
    item: Optional[str] = typer.Option(None, "--item", help="Treatment = exposed to this item (default: every item)."),
    epsilon: str = typer.Option("1", "--epsilon", help="ε per institution for the whole estimation; 'inf' = no DP."),
    estimator: str = typer.Option("aipw", "--estimator", help="aipw | ipw | ra"),
    compare_pooled: bool = typer.Option(False, "--compare-pooled", help="Also compute the non-private pooled estimate (statsmodels)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder for causal.json."),
    seed: int = typer.Option(0, "--seed", help="Seed for every release's DP noise: the same command gives the same "
                             "numbers. Simulation only: a deployed institution ignores it and draws its noise from "
                             "the OS CSPRNG."),
    derive: Optional[list[str]] = typer.Option(
        None, "--derive",
        help="Extra nuisance-model feature op(covariate), op one of log1p, log, square, at_min, at_max, "
             "or ratio(a, b[, k]) = a/b^k (repeatable), e.g. --derive 'at_min(earnings_1y_ago)' or "
             "--derive 'ratio(weight_kg,height_cm,2)' (body-mass index). Bounds follow from the declared ones, "
             "or give tighter public ones after it: 'ratio(weight_kg,height_cm,2)[12e-4,60e-4]' (BMI 12-60)."),
    covariates: Optional[str] = typer.Option(
        None, "--covariates",
        help="Comma-separated declared covariates the nuisance models use (default: the study's \\[causal] "
             "design, else all), e.g. to replace weight_kg,height_cm by --derive 'ratio(weight_kg,height_cm,2)'. "
             "--covariates or --derive replaces the study's declared design."),
    set_: list[str] = typer.Option(
        [], "--set",
        help="An expert knob, KEY=VALUE (repeatable), e.g. --set causal.expert.psi-noise-ratio=0.3 or "
             "--set expert.share-influence=0.35; the knobs and their defaults are in docs/causal.md (Expert knobs)."),
    noise_mode: str = typer.Option(
        "local", "--noise-mode",
        help="local: each institution adds the full noise (holds even if secure aggregation broke); "
             "distributed: each adds σ²/n_min, valid behind SecAgg+ with n_min survivors (narrower CIs; "
             "n_min defaults to the institutions minus the dropouts secure aggregation tolerates)."),
    non_private: bool = typer.Option(False, "--non-private", help="Required with --epsilon inf: no differential "
                                     "privacy (simulations only; the ledgers record ε = ∞)."),
    force: bool = typer.Option(False, "--force", help="Spend the run's budget even when the forecast CI (printed "
                               "after a charged pilot of 5% of the budget, before the rest is spent) says the run "
                               "cannot answer."),
    status_quo: str = typer.Option("none", "--status-quo", help="What recommendations must beat: none (no item) "
                                   "or current (what each person takes now)."),
    refute: Optional[list[str]] = typer.Option(
        None, "--refute",
        help="After the causal run, refute it: placebo (exposure permuted within each institution, propensity "
             "refit) or random-common-cause (a random covariate added); repeatable. Each is one more charged "
             "causal run at --epsilon per institution (the ledgers show it; the policies are provisioned for the "
             "causal run plus these); verdicts go into causal.json under refutations (docs/strategies.md)."),
    ray_address: str = typer.Option("local", "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Estimate ATE/CATE with 95% CIs from DP, securely aggregated statistics (Flower simulation)."""
    from fedrec.simulations.causal_cli import causal_command

    if noise_mode not in ("local", "distributed"):
        raise typer.BadParameter("use local or distributed", param_hint="--noise-mode")
    _ray_address(ray_address)
    overrides: dict = {"noise_mode": noise_mode}
    if derive is not None:
        overrides["derived"] = tuple(derive)
    if covariates is not None:
        overrides["covariates"] = tuple(c.strip() for c in covariates.split(",") if c.strip())
    raise typer.Exit(causal_command(data, item, _epsilon(epsilon), estimator, compare_pooled, out, seed, console,
                                    causal_overrides=overrides, settings=set_, non_private=non_private,
                                    force=force, status_quo=status_quo, refute=tuple(refute or ())))


@app.command("sweep")
def sweep_cmd(
    domains: str = typer.Option("health,education,finance", "--domains", help="Comma-separated: health, education, finance."),
    epsilon: str = typer.Option("0.5,1,2,4,8,inf", "--epsilon", help="ε per institution for the whole run, comma-separated; 'inf' adds the non-private reference."),
    seeds: int = typer.Option(5, "--seeds", help="Seeds 0..N-1; seed s fixes the federation, the splits and the DP noise (simulation only)."),
    models: str = typer.Option("mf", "--models", help="mf, hybrid (hybrid: DP popularity + DP MF + the zero-budget text prior, docs/adapter.md)."),
    tasks: str = typer.Option("rec,causal", "--tasks", help="rec (MF over Flower + SecAgg+), causal (AIPW protocol in-process)."),
    noise_modes: str = typer.Option("local,distributed", "--noise-modes", help="local, distributed."),
    institutions: int = typer.Option(8, "--institutions", "-k", help="Simulated institutions per federation."),
    rounds: int = typer.Option(5, "--rounds", "-r", help="Federated MF rounds per rec cell."),
    people: int = typer.Option(20000, "--people", help="People across all institutions of one federation."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Cells run in parallel (default: the CPU cores); each rec cell is its own Flower simulation."),
    out: Path = typer.Option(..., "--out", help="Results folder; re-running the same command into it skips finished cells."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ray_address: str = typer.Option("local", "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """Privacy-budget sweep: the grid of domains x ε x noise modes x seeds, as a report.

    Writes results.csv (one row per cell and seed), plots/*.png, a self-contained report.html
    (figures inline) and report.md. Resumable: finished cells are skipped, Ctrl-C loses nothing
    finished. Reproducible: the same command gives the same numbers (seeded DP noise, simulations
    only; a deployed institution's noise always comes from the OS CSPRNG). Run time: a rec cell
    is one Flower simulation (~10 s of Ray start-up plus the rounds), a causal cell 1-15 s.
    """
    import shlex

    from fedrec.simulations.sweep import sweep_command

    _ray_address(ray_address)
    command = (f"fedrec-sim sweep --domains {domains} --epsilon {epsilon} --seeds {seeds} --models {models} "
               f"--tasks {tasks} --noise-modes {noise_modes} --institutions {institutions} --rounds {rounds} "
               f"--people {people} --out {shlex.quote(str(out))}")
    raise typer.Exit(sweep_command(domains=domains, epsilons=epsilon, seeds=seeds, models=models, tasks=tasks,
                                   noise_modes=noise_modes, institutions=institutions, rounds=rounds, people=people,
                                   jobs=jobs, out=out, console=console, quiet=quiet, command=command))


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("results/demo"), "--out", help="Results folder (replaced if it holds an earlier demo)."),
    institutions: int = typer.Option(8, "--institutions", "-k", help="Simulated health institutions."),
    people: int = typer.Option(8000, "--people", help="Patients across all institutions."),
    rounds: int = typer.Option(5, "--rounds", "-r", help="Federated MF rounds."),
    epsilon: str = typer.Option("4", "--epsilon", help="ε per institution for each of the two runs (MF, causal)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the federation, splits and DP noise (simulation only)."),
    ray_address: str = typer.Option("local", "--ray-address", help=RAY_ADDRESS_HELP),
) -> None:
    """The whole mission on a simulated health federation, in a few minutes.

    MF trained under person-level DP over SecAgg+ (with the non-private and stay-alone references),
    causal effects with 95% CIs and benefit-ranked recommendations, each institution's ledger, the
    audit — and a summary naming every file.
    """
    from fedrec.simulations.demo import demo_command

    _ray_address(ray_address)
    raise typer.Exit(demo_command(out=out, institutions=institutions, people=people, rounds=rounds,
                                  epsilon=_epsilon(epsilon), seed=seed, console=console))


@app.command("evaluate-strategies")
def evaluate_strategies_cmd(
    domains: str = typer.Option("health,education,finance", "--domains", help="Comma-separated: health, education, finance."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Federations per (domain, ε, noise mode); seeds 100, 101, ..."),
    first_seed: int = typer.Option(100, "--first-seed", help="The first seed (report on seeds never used to tune)."),
    epsilons: str = typer.Option("inf,4", "--epsilons", help="Comma-separated ε per release ('inf' = no DP)."),
    noise_modes: str = typer.Option("distributed", "--noise-modes", help="Comma-separated: local, distributed."),
    institutions: int = typer.Option(8, "--institutions", min=2, help="Institutions per federation (each its own logger)."),
    people: int = typer.Option(20_000, "--people", min=100, help="People per federation."),
    clip: float = typer.Option(8.0, "--clip", help="Weight clip λ: caps each person's total importance weight and "
                               "sets the release's noise scale."),
    logger_shift: float = typer.Option(1.0, "--logger-shift", help="How far apart the institutions' logging "
                                       "policies are (logit shift of the outermost ones)."),
    estimators: str = typer.Option("dr", "--estimators", help="Estimators the release carries: dr (the default: the "
                                   "main estimator alone) or all (ips, snips, dm, dr, switch-dr) / a comma-separated "
                                   "subset, for comparison — an opt-in that costs budget: at the same ε every "
                                   "estimator released roughly doubles the noise on DR (docs/strategies.md)."),
    crossfit: bool = typer.Option(True, "--crossfit/--no-crossfit", help="Also the cross-fitted benefit ranking "
                                  "(benefit-cf: two more causal runs, one per half of the people; docs/strategies.md)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON to write ({meta, runs, rows}); default: print rows."),
) -> None:
    """Off-policy values of recommendation strategies (benefit-ranked, cross-fitted benefit-ranked,
    engagement-ranked, random, the logging policy) by doubly robust estimation (IPS, SNIPS, DM and
    switch-DR for comparison with --estimators all) with CIs that include the DP noise,
    graded against a simulated randomized A/B reference: bias and 95% CI coverage per estimator
    (docs/strategies.md). Each run spends ε on the causal run and ε on the strategy release."""
    import json as _json
    import math as _math

    from fedrec.common.causal.ope import OPEConfig
    from fedrec.common.errors import FedrecInputError
    from fedrec.simulations.domains import DOMAINS
    from fedrec.simulations.strategies import evaluate_strategies

    doms = [d.strip() for d in domains.split(",") if d.strip()]
    bad = [d for d in doms if d not in DOMAINS]
    if bad or not doms:
        raise FedrecInputError(f"--domains {domains!r}: fix: use {', '.join(DOMAINS)}")
    eps = [_epsilon(e.strip()) for e in epsilons.split(",") if e.strip()]
    modes = [m.strip() for m in noise_modes.split(",") if m.strip()]
    if not modes or any(m not in ("local", "distributed") for m in modes):
        raise FedrecInputError(f"--noise-modes {noise_modes!r}: fix: use local and/or distributed")
    from fedrec.common.causal.ope import ESTIMATORS

    chosen = ESTIMATORS if estimators.strip() == "all" else tuple(e.strip() for e in estimators.split(",") if e.strip())
    try:
        ope = OPEConfig(clip=clip, estimators=chosen)
    except ValueError as err:
        raise FedrecInputError(f"--clip {clip} / --estimators {estimators!r}: {err}; fix: a positive finite weight "
                               "clip (e.g. 8) and estimators from ips, snips, dm, dr, switch-dr") from None
    res = evaluate_strategies(doms, seeds=list(range(first_seed, first_seed + seeds)), epsilons=eps,
                              noise_modes=modes, institutions=institutions, people=people,
                              logger_shift=logger_shift, ope=ope, crossfit=crossfit,
                              progress=lambda m: console.print(m, markup=False))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(_json.dumps(res, indent=1, default=str))
        console.print(f"-> {out}")
    from rich.table import Table

    tab = Table(title="strategy values vs the simulated A/B reference")
    for col in ("domain", "ε", "mode", "strategy", "estimator", "truth", "bias", "coverage", "sign ok", "CI width"):
        tab.add_column(col, no_wrap=col in ("strategy", "coverage"))
    for r in res["rows"]:
        tab.add_row(r["domain"], str(r["epsilon"]), r["noise_mode"], r["strategy"], r["estimator"], f"{r['truth']:.3g}",
                    f"{r['bias']:+.3g}",
                    f"{r['coverage']:.2f}" if not r.get("in_sample") else f"no CI* ({r['naive_coverage']:.2f})",
                    f"{r['sign_correct']:.2f}",
                    f"{r['ci_width']:.3g}" if _math.isfinite(r["ci_width"]) else "-")
    console.print(tab)
    if any(r.get("in_sample") for r in res["rows"]):
        console.print("* in-sample benefit ranking (its models were fitted on the people it is evaluated on): a value "
                      "and an SE but no valid CI; in brackets how often value ± z·SE covered the reference. Use "
                      "benefit-cf (cross-fitted) for a CI (docs/strategies.md).", markup=False)
    raise typer.Exit(0)


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
