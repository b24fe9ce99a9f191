"""fedrec-client: what institution IT runs.

Sub-commands: ``check-data`` (validate a folder in the data contract), ``budget`` (what the
privacy ledger says was spent and remains), ``start`` (join a federation: SuperNode with TLS
and node authentication).
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
    help="fedrec institution client: validate data, inspect the privacy budget, join a federation.",
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


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
