"""fedrec-server: what the coordinator runs.

Sub-commands: ``audit`` (privacy audit report of a run folder); deployment (docs/deploy.md):
``dev-certs`` (a test CA and server certificate), ``start`` (SuperLink on loopback with TLS, node
authentication and a state database, behind a proxy that exposes only the Fleet API),
``register`` (allow-list an institution's public key), ``run train|causal|strategies`` (a run on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from fedrec.common.errors import FedrecInputError, run_cli

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="fedrec coordinator: run the federation server (SuperLink + Fleet API proxy), register "
         "institutions, launch runs, audit them.",
)
console = Console()


@app.callback()
def _root() -> None:
    """fedrec coordinator: run the federation server (SuperLink + Fleet API proxy), register
    institutions, launch runs, audit them. Runbook: docs/deploy.md."""


@app.command("audit")
def audit_cmd(
    run_dir: Path = typer.Argument(..., help="A results folder written by `fedrec-sim run`."),
    quick: bool = typer.Option(False, "--quick", help="Fewer canaries (smoke test); weaker bounds."),
) -> None:
    """Write audit.md, audit.json and audit.png into RUN_DIR: re-derived ε per institution,
    an empirical one-run audit (lower bound on ε), a power check, protocol settings."""
    from fedrec.server.audit import run_audit

    raise typer.Exit(run_audit(run_dir, quick=quick, console=console))


STATE_HELP = "The coordinator's state folder: SuperLink database, FLWR_HOME, runs, logs."


@app.command("dev-certs")
def dev_certs_cmd(
    out: Path = typer.Argument(..., help="Folder to write ca.crt, ca.key, server.crt, server.key into."),
    host: List[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                   help="Name or IP the server certificate is for (repeatable)."),
    days: int = typer.Option(30, "--days", min=1, help="Validity in days."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files."),
) -> None:
    """FOR TESTING ONLY: a throw-away CA and a server certificate (EC P-384) for --host.

    Give ca.crt to each institution (its --root-cert); `fedrec-server start --certs OUT` uses
    server.crt/server.key. A real federation uses certificates from the site's PKI (docs/deploy.md):
    the CA key here lies next to the certificates and can sign anything.
    """
    from fedrec.server.deploy import write_dev_certs

    paths = write_dev_certs(out, hosts=tuple(host), days=days, overwrite=overwrite)
    console.print(f"wrote a TESTING-ONLY CA and server certificate for {', '.join(host)} into {out} "
                  f"({', '.join(p.name for p in paths.values())}); do not use them in a real federation")


@app.command("start")
def start_cmd(
    certs: Path = typer.Option(..., "--certs", help="Folder with ca.crt, server.crt, server.key (PEM)."),
    listen: str = typer.Option("0.0.0.0:9092", "--listen", help="Public HOST:PORT of the Fleet API (TLS); "
                               "the only port to open in the firewall."),
    superlink_port: int = typer.Option(9093, "--superlink-port", help="Loopback port of the SuperLink itself "
                                       "(Fleet + Control + Runtime APIs); never exposed."),
    state_dir: Path = typer.Option(Path("fedrec-coordinator"), "--state-dir", help=STATE_HELP),
    pull_hold: float = typer.Option(10.0, "--pull-hold", help="Seconds the proxy holds a SuperNode's empty "
                                    "message pull while it asks the SuperLink again (long poll: a node hears of "
                                    "a message in ~0.1 s instead of after Flower's 3 s idle sleep); 0: off."),
) -> None:
    """Run the federation server in the foreground until Ctrl-C / SIGTERM.

    Flower's SuperLink with TLS, SuperNode authentication (only registered keys connect), a
    persistent state database (registrations and runs survive a restart) and no runtime
    dependency installation, bound to 127.0.0.1; in front of it a TLS proxy on --listen that
    forwards only the Fleet API (POST /v1/fleet/*): the Control API, which can register nodes
    and start runs without authentication in open-source Flower, stays on loopback. Telemetry
    and update checks are off.
    """
    from fedrec.server.deploy import Coordinator, start

    raise typer.Exit(start(Coordinator(state_dir), certs=certs, listen=listen, superlink_port=superlink_port,
                           echo=console.print, pull_hold=pull_hold))


@app.command("register")
def register_cmd(
    public_key: Path = typer.Argument(..., help="The institution's public key (OpenSSH .pub from "
                                      "`fedrec-client keygen`), received over a channel you trust."),
    name: str = typer.Option(..., "--name", help="The institution's name in the federation."),
    state_dir: Path = typer.Option(Path("fedrec-coordinator"), "--state-dir", help=STATE_HELP),
) -> None:
    """Allow-list an institution's key on the running SuperLink and add it to the roster.

    Runs `flwr supernode register` with the connection `fedrec-server start` wrote, and adds the
    key to STATE/roster.toml (send that to every institution once all are registered). Check the
    printed fingerprint with the institution by phone or in person: register only their key."""
    from fedrec.server.deploy import Coordinator, check_public_key, fingerprint, register, roster_path

    coord = Coordinator(state_dir)
    answer = register(coord, public_key, name=name)

    console.print(f"registered {name}: {answer}; key fingerprint {fingerprint(check_public_key(public_key))}; "
                  f"roster {roster_path(coord)} (send it to every institution)", highlight=False)


@app.command("nodes")
def nodes_cmd(
    state_dir: Path = typer.Option(Path("fedrec-coordinator"), "--state-dir", help=STATE_HELP),
) -> None:
    """List the registered SuperNodes: node id, status (online/offline), since when."""
    from fedrec.server.deploy import Coordinator, list_nodes

    for n in list_nodes(Coordinator(state_dir)):
        console.print(f"{n.get('node-id')}  {n.get('status')}  created {n.get('created-at')}  "
                      f"online {n.get('online-at')}  offline {n.get('offline-at')}", highlight=False)


@app.command("unregister")
def unregister_cmd(
    node_id: str = typer.Argument(..., help="The node id (`fedrec-server nodes`)."),
    state_dir: Path = typer.Option(Path("fedrec-coordinator"), "--state-dir", help=STATE_HELP),
) -> None:
    """Remove an institution's SuperNode from the federation (its key can no longer connect).

    Also remove its line from STATE/roster.toml and send the new roster to the others."""
    from fedrec.server.deploy import Coordinator, unregister

    unregister(Coordinator(state_dir), node_id)
    console.print(f"unregistered node {node_id}; remove it from the roster and send the roster again",
                  highlight=False)


@app.command("run")
def run_cmd(
    kind: str = typer.Argument(..., help="train (federated MF training), causal (causal estimation) or "
                                "strategies (causal estimation, then strategy evaluation: docs/strategies.md)."),
    institutions: int = typer.Option(..., "--institutions", "-k", min=2, help="How many institutions take part "
                                     "(the run waits for that many connected SuperNodes)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", min=1, help="Training rounds (train)."),
    epsilon: Optional[float] = typer.Option(None, "--epsilon", help="ε this run asks each institution for; each "
                                            "institution's policy may refuse it."),
    settings: List[str] = typer.Option([], "--set", help="Any run knob KEY=VALUE (repeatable)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Results folder (default: STATE/runs/KIND-TIME)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up after this many seconds."),
    state_dir: Path = typer.Option(Path("fedrec-coordinator"), "--state-dir", help=STATE_HELP),
    refute: List[str] = typer.Option([], "--refute", help="causal: after the estimation, run this refutation "
                                     "(placebo or random-common-cause; repeatable), each one more charged causal "
                                     "run at every institution; the verdicts go into causal.json (docs/causal.md)."),
) -> None:
    """Launch a training, causal or strategy-evaluation run on the running federation and wait for it.

    `flwr run` on an app folder generated under STATE/apps (the project's pyproject.toml is never
    touched), with the federation's connection in STATE/flwr-home. Prints where the results are
    (metrics.json, causal.json or strategies.json); exit code 4 with the reason if the run failed
    (e.g. an institution refused the run's whole privacy plan before any charge). A strategy
    run's settings (strategies.names, strategies.estimators, ...) are checked before anything is
    launched."""
    from fedrec.server.deploy import RUN_KINDS, Coordinator, defaults, parse_settings, run

    if kind not in RUN_KINDS:
        raise FedrecInputError(f"run {kind!r}: unknown kind; fix: `fedrec-server run train`, `run causal` "
                               "or `run strategies`")
    known = defaults(kind)
    chosen = parse_settings(list(settings), known)
    if rounds is not None:
        chosen["rounds"] = rounds
    if epsilon is not None:
        chosen["causal.epsilon" if kind != "train" and "causal.epsilon" in known else "privacy.epsilon"] = epsilon
    if refute or chosen.get("causal.refute"):  # checked here, before anything is launched
        from fedrec.common.causal.config import CausalConfig
        from fedrec.common.config import ConfigError

        if kind != "causal":
            raise FedrecInputError(f"--refute: refutations run after `run causal` only, not `run {kind}`; "
                                   "fix: drop --refute or use `fedrec-server run causal`")
        names = [n for n in str(chosen.get("causal.refute", "")).split(",") if n.strip()] + [str(r) for r in refute]
        try:
            chosen["causal.refute"] = ",".join(CausalConfig.from_flat({"causal.refute": ",".join(names)}).refute)
        except ConfigError as err:
            raise FedrecInputError(f"--refute: {err}") from None
    out, _ = run(Coordinator(state_dir), kind, institutions=institutions, settings=chosen, results=results,
                 timeout=timeout, echo=console.print)
    console.print(f"run finished: {out}", highlight=False)


def main() -> None:
    import os

    # a privacy product does not call home: set before anything imports Flower (it reads these at import)
    for var, off in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, off)
    run_cli(app)


if __name__ == "__main__":
    main()
