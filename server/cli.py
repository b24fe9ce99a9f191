"""fedrec-server: what the coordinator runs.

Sub-commands: ``audit`` (privacy audit report of a run folder), ``start`` (SuperLink with
TLS, node authentication and a state database).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedrec.common.errors import run_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="fedrec coordinator: audit runs, start the federation server.",
)
console = Console()


@app.callback()
def _root() -> None:
    """fedrec coordinator: audit runs, start the federation server."""


@app.command("audit")
def audit_cmd(
    run_dir: Path = typer.Argument(..., help="A results folder written by `fedrec-sim run`."),
    quick: bool = typer.Option(False, "--quick", help="Fewer canaries (smoke test); weaker bounds."),
) -> None:
    """Write audit.md, audit.json and audit.png into RUN_DIR: re-derived ε per institution,
    an empirical one-run audit (lower bound on ε), a power check, protocol settings."""
    from fedrec.server.audit import run_audit

    raise typer.Exit(run_audit(run_dir, quick=quick, console=console))


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
