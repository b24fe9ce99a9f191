"""fedrec-client: what institution IT runs.

Sub-commands: ``init`` (the institution's privacy policy and ledger), ``check-data`` (validate
a folder in the data contract), ``budget`` (what the
privacy ledger says was spent and remains), ``recommend`` (rank items for this institution's
people by the benefit a causal run's released CATE models estimate); deployment (docs/deploy.md):
``keygen`` (the institution's identity key pair), ``start`` (check everything, then run Flower's
SuperNode with TLS, node authentication and the institution's policy).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedrec.common.errors import run_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="fedrec institution client: validate data, set the privacy policy, join a federation, inspect the "
         "privacy budget, recommend by estimated benefit.",
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
    identity_key: Optional[Path] = typer.Option(None, "--identity-key", help="The institution's private identity key "
                                                "(`fedrec-client keygen`): signs its secure-aggregation key "
                                                "advertisements. Give it with --roster."),
    roster: Optional[Path] = typer.Option(None, "--roster", help="The federation's roster of public keys (from the "
                                          "coordinator, with the CA certificate): what key advertisements are "
                                          "verified against."),
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
                               noise_modes=modes, min_round_size=min_round_size, source=policy_file,
                               identity_key=None if identity_key is None else identity_key.resolve(),
                               roster=None if roster is None else roster.resolve())
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
    status_quo: str = typer.Option("none", "--status-quo", help="What a person gets without a recommendation: "
                                   "none (no item) or current (the items they already take; never re-recommended). "
                                   "An item is recommended only where its benefit interval excludes the status quo."),
    rank_all: bool = typer.Option(False, "--rank-all", help="Rank every item for everyone, even where the interval "
                                  "does not show a benefit (for analysis; not safe to act on)."),
) -> None:
    """Rank items for each person by estimated benefit (CATE), not by engagement.

    Applies the CATE models a causal run released to this institution's own covariates:
    post-processing, so no privacy budget is spent and nothing leaves the institution. Writes
    person_id, rank, item_id, estimated_effect (outcome units) and estimated_benefit (oriented
    so larger is better, by the study's `better`). Exit code 2 with one line on bad input.
    """
    from fedrec.client.recommend import run_recommend

    chosen = [s.strip() for s in items.split(",") if s.strip()] if items else None
    if status_quo not in ("none", "current"):
        raise typer.BadParameter("use none or current", param_hint="--status-quo")
    raise typer.Exit(run_recommend(causal_json, folder, k=k, items=chosen, out=out, console=console,
                                   status_quo=status_quo, rank_all=rank_all))


@app.command("explain")
def explain_cmd(
    causal_json: Path = typer.Argument(..., help="causal.json written by `fedrec-sim causal` (or the causal ServerApp)."),
    folder: Path = typer.Argument(..., help="This institution's folder in the data contract (people + study.toml)."),
    person: str = typer.Option(..., "--person", help="The person_id to explain (a person of this institution)."),
    item: Optional[str] = typer.Option(None, "--item", help="The item to explain (default: the person's top item by "
                                       "estimated benefit)."),
    top: int = typer.Option(5, "--top", min=1, help="How many covariates to show, largest contribution first."),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON instead of a table."),
) -> None:
    """Why an item is recommended to a person: the estimated benefit with its CI, the covariates
    that contribute most to it (coefficient x (value − this institution's mean), with CIs; they
    sum exactly to the benefit minus the average person's), and the evidence behind it.

    Post-processing of the released CATE model on this institution's own data: no budget, and
    the person's data never leaves. Exit code 2 with one line on bad input."""
    import json as _json

    from fedrec.common.errors import FedrecInputError

    def run() -> int:  # noqa: C901 - one command's body
        from fedrec.client.recommend import _checked_covs, read_cate_models
        from fedrec.client.statistics import raw_design
        from fedrec.common.causal.explain import explain
        from fedrec.common.causal.recommend import scaled_design
        from fedrec.common.datasets import load_institution

        models, nuisance, raw_covs, _ = read_cate_models(causal_json, [item] if item else None)
        covs = _checked_covs(causal_json, raw_covs, models) if raw_covs is not None else {}
        data = load_institution(folder)
        ids = data.people["person_id"].astype(str).tolist()
        if person not in ids:
            raise FedrecInputError(f"--person {person!r}: not in {Path(folder).name}/people; fix: give a person_id "
                                   "of this institution")
        x_raw, cols = raw_design(data, nuisance.get("covariates"), tuple(nuisance.get("derived") or ()))
        x, names = scaled_design(x_raw, cols)
        i = ids.index(person)
        better = data.study.outcome_better
        report = _json.loads(Path(causal_json).read_text())
        best, chosen = None, None
        for it, coef in models.items():
            try:
                ex = explain(x[i], x.mean(axis=0), names, coef, covs.get(it), better=better, item=it, raw=x_raw[i],
                             raw_mean=x_raw.mean(axis=0))
            except ValueError as err:
                raise FedrecInputError(f"{causal_json}: item {it!r}: {err}; fix: use the study declaration the "
                                       "estimate was made with") from None
            if best is None or ex.benefit > best:
                best, chosen = ex.benefit, ex
        assert chosen is not None
        row = report["items"][chosen.item]
        eps = report.get("epsilon_per_institution", {})
        from dataclasses import replace as _replace

        chosen = _replace(chosen, evidence={"institutions": len(report.get("institutions", eps)),
                                            "people": round(float(row["n"])) if isinstance(row.get("n"), (int, float))
                                            else None, "epsilon_per_institution": eps,
                                            "item_ate": row.get("ate"),
                                            "item_ate_ci": [row.get("ci_low"), row.get("ci_high")]})
        if as_json:
            console.print_json(_json.dumps(chosen.to_json(top)))
            return 0
        lo, hi = chosen.benefit_ci
        console.print(f"{person}: {chosen.item} — estimated benefit {chosen.benefit:.4g} (95% CI {lo:.4g} to {hi:.4g}); "
                      f"the average person here {chosen.average_benefit:.4g}", markup=False)
        from rich.table import Table

        tab = Table(title="largest contributions to (benefit − average)")
        for col in ("covariate", "value", "mean here", "contribution", "95% CI"):
            tab.add_column(col)
        for c in chosen.top(top):
            clo, chi = c.ci
            tab.add_row(c.name, f"{c.value:.4g}", f"{c.mean:.4g}", f"{c.contribution:+.4g}", f"[{clo:.3g}, {chi:.3g}]")
        console.print(tab)
        ev = chosen.evidence
        console.print(f"evidence: {ev['institutions']} institutions, {ev['people']} people considered for "
                      f"{chosen.item}; ε spent per institution: "
                      + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in eps.items()),
                      markup=False)
        return 0

    raise typer.Exit(_explain_exit(run))


def _explain_exit(run) -> int:
    """Run ``explain``'s body: one line and exit code 2 for bad input."""
    from fedrec.common.errors import FedrecInputError

    try:
        return run()
    except FedrecInputError as err:
        Console(stderr=True).print(f"error: {err}", markup=False, highlight=False)
        return 2


@app.command("keygen")
def keygen_cmd(
    out: Path = typer.Argument(..., help="Folder for identity.key (private, mode 0600) and identity.pub."),
    comment: str = typer.Option("", "--comment", help="Comment on the public key line (e.g. the institution)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing identity (it must then be "
                                   "registered again)."),
) -> None:
    """Create the institution's identity key pair (ECDSA on NIST P-256).

    identity.key: the private key (OpenSSH format) for `fedrec-client start --key`; it never
    leaves the institution. identity.pub: one OpenSSH line to send to the coordinator, who
    registers it (`fedrec-server register`); read the printed fingerprint to them over a
    second channel (phone) so that they register your key and no one else's.
    """
    from fedrec.client.deploy import keygen

    key, pub, fp = keygen(out, comment=comment, overwrite=overwrite)
    console.print(f"wrote {key} (private: keep it here, mode 0600) and {pub} (send it to the coordinator); "
                  f"fingerprint {fp}", highlight=False)


@app.command("start")
def start_cmd(
    data: Path = typer.Option(..., "--data", help="The institution's data folder (with privacy.toml from "
                              "`fedrec-client init`)."),
    server: str = typer.Option(..., "--server", help="The federation's Fleet address HOST:PORT (from the "
                               "coordinator)."),
    root_cert: Path = typer.Option(..., "--root-cert", help="The federation's CA certificate (PEM)."),
    key: Path = typer.Option(..., "--key", help="This institution's private key (identity.key from "
                             "`fedrec-client keygen`), registered with the coordinator."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Privacy policy (default: DATA/privacy.toml)."),
    runtime_port: int = typer.Option(9094, "--runtime-port", help="Loopback port of the SuperNode's own "
                                     "runtime API (change it to run two nodes on one host)."),
    max_retries: Optional[int] = typer.Option(None, "--max-retries", help="Give up after this many failed "
                                              "connection attempts (default: retry forever)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Run the checks, print the SuperNode command, "
                                 "start nothing."),
) -> None:
    """Check everything, then join the federation (Flower's SuperNode, in the foreground).

    Refuses to start, with one line naming the file or flag and the fix, on: data that does
    not meet the contract (check-data), a missing or invalid privacy policy, a missing or
    damaged ledger, an exhausted budget (exit 3), a missing or wrong root certificate, a
    missing or wrong key. Then runs flower-supernode with TLS, node authentication by the key,
    telemetry off, and node config data-dir/policy: every release is checked against the
    policy and charged to the ledger before it leaves (docs/deploy.md).
    """
    import os

    from fedrec.client.deploy import preflight, supernode_command, supernode_env

    pf = preflight(data=data, server=server, root_cert=root_cert, key=key, policy=policy, console=console,
                   err_console=Console(stderr=True))
    cmd = supernode_command(pf, server=server, root_cert=root_cert, key=key, runtime_port=runtime_port,
                            max_retries=max_retries)
    reach = {"verified": "server certificate verified", "unreachable": "server not reachable yet (the node "
             "keeps retrying)"}.get(pf.server_check, pf.server_check)
    console.print(f"{pf.institution}: policy {pf.policy_path}, ledger {pf.ledger}: spent ε={pf.spent:.3f}, "
                  f"remaining ε={pf.remaining:.3f} of {pf.cap:g}; {reach}", highlight=False)
    if dry_run:
        console.print(" ".join(cmd), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, supernode_env())  # the SuperNode replaces this process: signals reach it directly


def main() -> None:
    import os

    # a privacy product does not call home: set before anything imports Flower (it reads these at import)
    for var, off in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, off)
    run_cli(app)


if __name__ == "__main__":
    main()
