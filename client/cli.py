"""fedrec-client: what institution IT runs.

Sub-commands: ``check-data`` (validate a folder in the data contract), ``budget`` (what the
privacy ledger says was spent and remains), ``recommend`` (rank items for this institution's
people by the benefit a causal run's released CATE models estimate).
"""

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
    help="fedrec institution client: validate data, inspect the privacy budget, recommend by estimated benefit.",
)
console = Console()


@app.command("check-data")
def check_data_cmd(
    folder: Path = typer.Argument(..., help="Institution folder: people, items, interactions files + study.toml."),
) -> None:
    """Validate an institution folder against the data contract; print a summary.

    Every problem is printed on one line naming file, row, column and the fix. Exit code 0
    when the folder is valid, 2 otherwise. Nothing is modified.
    """
    from fedrec.client.check_data import run_check

    raise typer.Exit(run_check(folder, console=console, err_console=Console(stderr=True)))


@app.command("budget")
def budget_cmd(
    ledger: Optional[Path] = typer.Option(None, "--ledger", help="SQLite ledger file (default: ./fedrec-ledger.db)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="δ at which to report ε (default: the cap's δ)."),
) -> None:
    """Show privacy budget spent and remaining, per run, model and task."""
    from fedrec.client.budget import show_budget

    raise typer.Exit(show_budget(ledger or Path("fedrec-ledger.db"), delta=delta, console=console))


@app.command("recommend")
def recommend_cmd(
    causal_json: Path = typer.Argument(..., help="causal.json written by `fedrec-sim causal` (or the causal ServerApp)."),
    folder: Path = typer.Argument(..., help="This institution's folder in the data contract (people + study.toml)."),
    k: int = typer.Option(3, "--k", min=1, help="Items per person, best first."),
    items: Optional[str] = typer.Option(None, "--items", help="Comma-separated items to rank (default: every item "
                                        "with a CATE model in causal.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="CSV to write (default: ./recommendations-<folder>.csv)."),
) -> None:
    """Rank items for each person by estimated benefit (CATE), not by engagement.

    Applies the CATE models a causal run released to this institution's own covariates:
    post-processing, so no privacy budget is spent and nothing leaves the institution. Writes
    person_id, rank, item_id, estimated_effect (outcome units) and estimated_benefit (oriented
    so larger is better, by the study's `better`). Exit code 2 with one line on bad input.
    """
    from fedrec.client.recommend import run_recommend

    chosen = [s.strip() for s in items.split(",") if s.strip()] if items else None
    raise typer.Exit(run_recommend(causal_json, folder, k=k, items=chosen, out=out, console=console))


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
