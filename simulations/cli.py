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


@app.command("run")
def run_cmd(
    dataset: str = typer.Option("movielens", "--dataset", help="movielens, or a domain: health | education | finance."),
    domain: Optional[str] = typer.Option(None, "--domain", help="Same as --dataset for a simulated domain."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of institution folders in the data contract (instead of generating)."),
    institutions: int = typer.Option(10, "--institutions", "-k", help="Number of institutions (Flower SuperNodes)."),
    rounds: int = typer.Option(20, "--rounds", "-r", help="Federated rounds."),
    epsilon: str = typer.Option("8", "--epsilon", help="Total ε per institution for the whole run; 'inf' turns DP off."),
    seed: int = typer.Option(0, "--seed", help="Seed for partitioning, splits and noise."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: results/<dataset>-eps<ε>-<time>)."),
    set_: list[str] = typer.Option([], "--set", help="Any run-config knob, KEY=VALUE (e.g. --set mf.dim=8). Repeatable."),
    plain: bool = typer.Option(False, "--plain-aggregation", help="Sum updates in the clear (tests/benchmarks only: the server sees each update)."),
    non_private: bool = typer.Option(False, "--non-private", help="Required with --epsilon inf: a run without differential privacy (simulations only; its ledgers record ε = ∞)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
) -> None:
    """Run one federated training simulation on Flower's simulation engine.

    Writes metrics.json (per round: rmse, mae, ndcg10, hr10, epsilon per institution),
    config.json and metrics.png into the results folder.
    """
    from fedrec.simulations.run import run_from_cli

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
    seed: int = typer.Option(0, "--seed"),
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
        help="A tuning knob, KEY=VALUE (repeatable), e.g. --set causal.psi-noise-ratio=0.3 or "
             "--set share-influence=0.35; the knobs and their defaults are in docs/causal.md (Tuning knobs)."),
    noise_mode: str = typer.Option(
        "local", "--noise-mode",
        help="local: each institution adds the full noise (holds even if secure aggregation broke); "
             "distributed: each adds σ²/n_min, valid behind SecAgg+ with n_min survivors (narrower CIs; "
             "n_min defaults to the institutions minus the dropouts secure aggregation tolerates)."),
    non_private: bool = typer.Option(False, "--non-private", help="Required with --epsilon inf: no differential "
                                     "privacy (simulations only; the ledgers record ε = ∞)."),
) -> None:
    """Estimate ATE/CATE with 95% CIs from DP, securely aggregated statistics (Flower simulation)."""
    from fedrec.simulations.causal_cli import causal_command

    if noise_mode not in ("local", "distributed"):
        raise typer.BadParameter("use local or distributed", param_hint="--noise-mode")
    overrides: dict = {"noise_mode": noise_mode}
    if derive is not None:
        overrides["derived"] = tuple(derive)
    if covariates is not None:
        overrides["covariates"] = tuple(c.strip() for c in covariates.split(",") if c.strip())
    raise typer.Exit(causal_command(data, item, _epsilon(epsilon), estimator, compare_pooled, out, seed, console,
                                    causal_overrides=overrides, settings=set_, non_private=non_private))


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
