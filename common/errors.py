"""Errors that end a command with one clear line (file, row, field, fix) and exit code 2."""

from __future__ import annotations


class FedrecInputError(ValueError):
    """Bad input from a user file or flag. ``str(err)`` is the one-line message shown."""

    exit_code = 2


class BudgetExceeded(RuntimeError):
    """A release would exceed the institution's (ε, δ) cap; nothing was computed."""

    exit_code = 3


class RunCeilingExceeded(BudgetExceeded):
    """A release would take one run past the institution's per-run ceiling (max-run-epsilon)."""


class RunFailed(RuntimeError):
    """A federated run could not complete (too few institutions took part, a refused plan);
    ``str(err)`` says which and why in one line."""

    exit_code = 4


def run_cli(app) -> None:
    """Run a Typer app; a FedrecInputError or BudgetExceeded ends it with one line on stderr
    and the error's exit code (2 for bad input, 3 for an exhausted budget, 4 for a failed run)."""
    import sys

    from rich.console import Console

    try:
        app()
    except (FedrecInputError, BudgetExceeded, RunFailed) as err:
        from rich.markup import escape

        # escaped: a message may quote "[privacy]" or "[members]", which rich would eat as markup
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
