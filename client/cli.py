"""fedrec-client: what institution IT runs.

Sub-commands: ``init`` (the institution's privacy policy and ledger), ``check-data`` (validate
a folder in the data contract), ``budget`` (what the
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
    # readable=False: an unreadable folder gets our one-line message, not click's boxed usage error
    folder: Path = typer.Argument(..., readable=False,
                                  help="Institution folder: people, items, interactions files + study.toml."),
) -> None:
    """Validate an institution folder against the data contract; print a summary.

    Every problem is printed on one line naming file, row, column and the fix. Exit code 0
    when the folder is valid, 2 otherwise. Nothing is modified.
    """
    from fedrec.client.check_data import run_check

    raise typer.Exit(run_check(folder, console=console, err_console=Console(stderr=True)))


@app.command("init")
def init_cmd(
    folder: Path = typer.Argument(..., help="The institution's data folder; privacy.toml is written into it."),
    epsilon_cap: float = typer.Option(..., "--epsilon-cap", help="Total ε this institution will ever spend, all runs "
                                      "together (e.g. 10)."),
    max_run_epsilon: Optional[float] = typer.Option(None, "--max-run-epsilon", help="The largest ε one run may spend "
                                                    "(default: the cap)."),
    delta_cap: float = typer.Option(1e-5, "--delta-cap", help="δ of the cap (and the largest δ a run may use)."),
    noise_modes: str = typer.Option("local", "--noise-modes", help="Accepted noise modes: local, or local,distributed "
                                    "(distributed trusts secure aggregation with at least --min-round-size institutions)."),
    min_round_size: int = typer.Option(3, "--min-round-size", help="Distributed noise: the fewest institutions a round "
                                       "(and its survivors) may have."),
    ledger: Path = typer.Option(Path("privacy-ledger.db"), "--ledger", help="Ledger file, relative to FOLDER unless "
                                "absolute."),
    institution: Optional[str] = typer.Option(None, "--institution", help="Name in the ledger (default: the folder's "
                                              "name, which the client reports)."),
) -> None:
    """Create this institution's privacy policy (FOLDER/privacy.toml) and its ledger.

    The explicit set-up step: message handlers never create a ledger, so a node without one
    refuses every release. Both files are created atomically and never overwritten (an
    existing policy or ledger is an error: edit the policy, or remove both to start over,
    which an auditor will see in the ledger's hash chain). Non-private runs cannot be allowed
    here: that exists only in simulations.
    """
    from fedrec.common.errors import FedrecInputError
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.privacy.policy import POLICY_FILE, InstitutionPolicy, write_policy

    folder = Path(folder)
    if not folder.is_dir():
        raise FedrecInputError(f"{folder}: no such folder; fix: give the institution's data folder")
    policy_file = folder / POLICY_FILE
    ledger_file = ledger if ledger.is_absolute() else (folder / ledger)
    for existing in (policy_file, ledger_file):
        if existing.exists():
            raise FedrecInputError(f"{existing}: already exists; nothing was changed; fix: keep it (edit the "
                                   "policy by hand) or remove it first")
    modes = tuple(m.strip() for m in noise_modes.split(",") if m.strip())
    policy = InstitutionPolicy(ledger=ledger_file.resolve(), epsilon_cap=epsilon_cap, delta_cap=delta_cap,
                               max_run_epsilon=epsilon_cap if max_run_epsilon is None else max_run_epsilon,
                               noise_modes=modes, min_round_size=min_round_size, source=policy_file)
    PrivacyLedger.initialize(ledger_file, institution=institution or folder.resolve().name,
                             epsilon_cap=epsilon_cap, delta_cap=delta_cap)
    write_policy(policy_file, policy)
    console.print(f"wrote {policy_file} and created the ledger {ledger_file} (cap ε={epsilon_cap:g}, "
                  f"δ={delta_cap:g}; per run ε <= {policy.max_run_epsilon:g}; noise modes {', '.join(modes)})")


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
