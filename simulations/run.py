"""One Flower simulation -> a results folder.

Runs the real ServerApp (``fedrec.server.app:app``) and ClientApp (``fedrec.client.app:app``)
on Flower's simulation engine (Ray), one SuperNode per institution, with the run config
fused from ``[tool.flwr.app.config]`` defaults and this run's overrides — the same path
``flwr run`` takes, without leaving a detached SuperLink behind.

Flower 1.41 offers this in-process only through ``flwr.simulation.run_simulation`` (deprecated,
takes no run config) or its private ``_run_simulation`` (takes a ``Run`` with
``override_config``). We use the latter in this one module, so a Flower upgrade touches one
place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedrec.common.config import DEFAULTS, ConfigError, RunConfig
from fedrec.common.errors import FedrecInputError, RunFailed

__all__ = ["run_simulation", "run_from_cli", "write_app_dir", "launch_flower"]

DOMAINS = ("health", "education", "finance")


SERVER_APP = "fedrec.server.app:app"
CLIENT_APP = "fedrec.client.app:app"


def write_app_dir(path: Path, *, server_app: str = SERVER_APP, client_app: str = CLIENT_APP,
                  extra_config: dict[str, Any] | None = None) -> Path:
    """A minimal Flower app folder: components + every knob's default (from common/config),
    plus ``extra_config`` (knobs of apps that keep their own, e.g. ``causal.*``)."""
    lines = [
        "[project]", 'name = "fedrec-sim-app"', 'version = "0.1.0"', "",
        "[tool.flwr.app]", 'publisher = "fedrec"', "",
        "[tool.flwr.app.components]",
        f'serverapp = "{server_app}"',
        f'clientapp = "{client_app}"', "",
        "[tool.flwr.app.config]",
    ]
    for key, value in {**DEFAULTS, **(extra_config or {})}.items():
        lines.append(f'"{key}" = {_toml(value)}')
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))


def prepare_data(cfg: RunConfig, workdir: Path) -> Path:
    """Materialise institution folders for the run; return the folder holding them."""
    ds = cfg.data.dataset
    root = workdir / "data"
    if ds == "movielens":
        from fedrec.simulations.movielens import write_movielens_federation

        write_movielens_federation(
            root, institutions=cfg.data.institutions, skew=cfg.data.partition_skew,
            test_fraction=cfg.data.test_fraction, seed=cfg.data.seed,
        )
        return root
    if ds in DOMAINS:
        from fedrec.common.datasets import write_institution
        from fedrec.simulations.domains import domain_federation

        institutions, _truth = domain_federation(
            ds, institutions=cfg.data.institutions, people=cfg.data.people,
            seed=cfg.data.seed, skew=cfg.data.partition_skew,
        )
        for k, data in enumerate(institutions):
            write_institution(root / f"institution_{k:02d}", data, fmt="parquet")
        return root
    raise FedrecInputError(
        f"--dataset {ds!r} is not known; fix: use movielens, health, education or finance"
    )


def launch_flower(overrides: dict[str, Any], work: Path, *, num_supernodes: int,
                  server_app: str = SERVER_APP, client_app: str = CLIENT_APP,
                  extra_config: dict[str, Any] | None = None, num_cpus_per_client: float = 1.0,
                  quiet: bool = False, ray_address: str | None = None) -> None:
    """Run a ServerApp/ClientApp pair on Flower's simulation engine with this run config.

    The one place that touches Flower's private ``_run_simulation``: it builds the same ``Run``
    the deprecated public wrapper builds, plus our ``override_config``. ``ray_address``
    (``HOST:PORT``; default: ``--ray-address`` of this command, else a local Ray) attaches the
    simulation to an existing Ray cluster through the Ray backend's ``init_args``
    (simulations/ray_cluster.py); a bad address is one line before anything starts.
    """
    from fedrec.simulations.ray_cluster import check_ray_address, current_ray_address, ray_init_args

    address = check_ray_address(ray_address) if ray_address is not None else current_ray_address()
    # a privacy product does not call home: Flower's telemetry/update check, Ray's usage stats
    for var, off in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, off)
    import sys as _sys

    _telemetry = _sys.modules.get("flwr.supercore.telemetry")  # read its switch at import, maybe already done
    if _telemetry is not None and os.environ["FLWR_TELEMETRY_ENABLED"] == "0":
        _telemetry.FLWR_TELEMETRY_ENABLED = "0"
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    app_dir = write_app_dir(work / "app", server_app=server_app, client_app=client_app, extra_config=extra_config)
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.override_config = dict(overrides)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    ctx = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                  run_config=get_fused_config_from_dir(app_dir, run.override_config))
    backend = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
        "init_args": ray_init_args(address),
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if quiet:
        os.environ["FEDREC_NO_PROGRESS"] = "1"
    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # Flower's DEBUG chatter hides the progress bar
    import warnings

    # Ray's tip about accelerator env vars (no GPU is asked for here) would open every run's output
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\._private\.worker")
    try:
        _run_simulation(
            num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app_attr=client_app, server_app_attr=server_app, backend_name="ray",
            backend_config=backend, server_app_context=ctx, app_dir=str(app_dir), run=run, is_app=True,
        )
    finally:
        flwr_logger.setLevel(old_level)


def one_actor_cpus() -> float:
    """CPUs per simulated client that make the local Ray run a single ClientApp actor.

    Flower sizes its actor pool to the CPUs Ray has, and each actor is a process that imports the
    ClientApp (torch, Opacus, scipy, pandas) before its first message. The MF and causal client
    work of the domain federations is small (a round of 8 institutions: under a second), so one
    actor costs a quarter less CPU at the same wall time and the same numbers (measured: 8
    institutions, 5 MF rounds: 21.9 vs 28.6 CPU-s, 81 vs 80 s). On a cluster (``--ray-address``)
    one CPU per client, so the cluster's CPUs are used."""
    from fedrec.simulations.ray_cluster import RAY_ADDRESS_ENV

    return 1.0 if os.environ.get(RAY_ADDRESS_ENV) else float(os.cpu_count() or 1)


def run_simulation(cfg: RunConfig, out: Path, *, num_cpus_per_client: float = 1.0, quiet: bool = False,
                   allow_non_private: bool = False) -> dict:
    """Run one federated training simulation; return the metrics history (also in out/).

    The harness first provisions every simulated institution (its privacy policy and ledger,
    ``simulations/provision.py``) — refused, with nothing charged, when ``out`` already holds a
    run, or when the run is non-private (ε = inf) without ``allow_non_private``.
    """
    from fedrec.simulations.provision import check_unused_out, provision_institutions

    out = Path(out)
    check_unused_out(out)
    if not cfg.dp_enabled and not allow_non_private:
        raise FedrecInputError("--epsilon inf is a non-private run; fix: add --non-private to say so explicitly "
                               "(simulations only)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedrec-sim-"))
    try:
        data_root = Path(cfg.data.data_dir) if cfg.data.data_dir else prepare_data(cfg, work)
        names = [f"institution_{k:02d}" for k in range(cfg.data.institutions)]
        policy_dir = provision_institutions(names, out, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta,
                                            allow_non_private=allow_non_private)
        cfg = cfg.override(**{"data-dir": str(data_root.resolve()), "results-dir": str(out.resolve()),
                              "sim.policy-dir": str(policy_dir)})
        launch_flower(cfg.to_flat(), work, num_supernodes=cfg.data.institutions,
                      num_cpus_per_client=num_cpus_per_client, quiet=quiet)
        failure = out / "failure.json"
        if failure.exists():
            raise RunFailed(json.loads(failure.read_text()).get("reason", "the run failed"))
        metrics_file = out / "metrics.json"
        if not metrics_file.exists():
            raise RunFailed(f"the simulation ended without writing {metrics_file} (see the log above)")
        history = json.loads(metrics_file.read_text())
        plot_metrics(history, out / "metrics.png")
        return history
    finally:
        shutil.rmtree(work, ignore_errors=True)


def validate_data_dir(root: Path, institutions: int) -> None:
    """Check every institution folder at the boundary, before any simulation starts."""
    from fedrec.common.ratings import load_institution_ratings

    if not root.is_dir():
        raise FedrecInputError(f"--data {root}: no such folder; fix: give a folder of institution_XX folders")
    for k in range(institutions):
        folder = root / f"institution_{k:02d}"
        if (folder / "study.toml").exists():
            from fedrec.common.datasets import load_institution

            load_institution(folder)
        else:
            load_institution_ratings(folder)


#: what each plotted metric is, with its unit (panel title, y label)
METRIC_LABELS = {
    "rmse": ("RMSE on held-out engagement/ratings", "RMSE (rating units, lower is better)"),
    "mae": ("MAE on held-out engagement/ratings", "MAE (rating units, lower is better)"),
    "ndcg10": ("NDCG@10 (1 held-out item vs sampled negatives)", "NDCG@10 (0-1, higher is better)"),
    "hr10": ("HR@10 (1 held-out item vs sampled negatives)", "HR@10 (0-1, higher is better)"),
}


def plotted_metrics(rounds: list[dict]) -> list[str]:
    """The metrics worth a panel: present in every round and not constant at 1.0 (HR@10 is 1.0
    whenever the catalogue has no more items than k, e.g. the domains' 8 items: meaningless)."""
    keys = [k for k in METRIC_LABELS if rounds and all(k in r for r in rounds)]
    return [k for k in keys if not (k.startswith("hr") and all(abs(r[k] - 1.0) < 1e-12 for r in rounds))]


def epsilon_groups(history: dict) -> list[tuple[str, list[float]]]:
    """Per-institution ε curves, identical curves merged into one labelled line
    (``"all 10 institutions"``, or the names that share it)."""
    rows = history.get("rounds", [])
    names = history.get("institutions", {})
    nodes = sorted({n for r in rows for n in r.get("epsilon", {})}, key=lambda n: names.get(str(n), str(n)))
    curves: dict[tuple, list[str]] = {}
    for node in nodes:
        curve = tuple(round(float(r.get("epsilon", {}).get(node, float("nan"))), 9) for r in rows)
        curves.setdefault(curve, []).append(names.get(str(node), str(node)))
    out = []
    for curve, members in curves.items():
        if len(curves) == 1:
            label = f"all {len(members)} institutions" if len(members) > 1 else members[0]
        elif len(members) > 3:
            label = f"{len(members)} institutions ({members[0]}, ...)"
        else:
            label = ", ".join(members)
        out.append((label, list(curve)))
    return out


def plot_metrics(history: dict, path: Path) -> None:
    """metrics.png (:func:`metrics_figure`)."""
    import matplotlib.pyplot as plt

    fig = metrics_figure(history)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metrics_figure(history: dict):
    """The figure of metrics.png: one panel per meaningful metric against the round, and ε spent
    per institution with the run's budget cap; titles, labelled axes with units, legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = history["rounds"]
    cfg = history.get("config", {})
    rounds = [r["round"] for r in rows]
    keys = plotted_metrics(rows)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.4 * (len(keys) + 1), 3.8), squeeze=False)
    axes = list(axes[0])
    for ax, key in zip(axes, keys):
        title, ylabel = METRIC_LABELS[key]
        ax.plot(rounds, [r[key] for r in rows], marker="o", label="federated model (all institutions)")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("federated round")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[-1]
    eps_target = float(cfg.get("privacy.epsilon", float("nan")))
    delta = cfg.get("privacy.delta", "")
    if math.isfinite(eps_target):
        for label, curve in epsilon_groups(history):
            ax.plot(rounds, curve, marker=".", label=label)
        ax.axhline(eps_target, color="crimson", linestyle="--", label=f"budget cap ε = {eps_target:g} (each institution)")
        ax.set_ylim(0, eps_target * 1.15)
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "non-private run (ε = ∞):\nno privacy budget spent or capped", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title(f"privacy budget spent per institution (δ = {delta})", fontsize=9)
    ax.set_xlabel("federated round")
    ax.set_ylabel("ε spent, cumulative (PRV accountant)", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for a in axes:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    dataset = cfg.get("dataset", "")
    mode = cfg.get("privacy.noise-mode", "") if math.isfinite(eps_target) else "no DP"
    fig.suptitle(f"fedrec simulation: {dataset}, {cfg.get('institutions', '?')} institutions, "
                 f"ε = {eps_target:g}, {mode} noise", fontsize=10)
    fig.tight_layout()
    return fig


def run_from_cli(*, dataset: str, data: Path | None, institutions: int, rounds: int, epsilon: float, seed: int,
                 out: Path | None, overrides: list[str], plain: bool, quiet: bool, console: Console,
                 non_private: bool = False) -> int:
    # simulation: --seed fixes the partitions, the splits AND every release's DP noise (the
    # nodes are simulated, so they honour sim.noise-seed; a deployed node never does)
    flat: dict[str, Any] = {"dataset": dataset, "institutions": institutions, "rounds": rounds,
                            "privacy.epsilon": epsilon, "seed": seed, "sim.noise-seed": seed}
    if data is not None:
        flat["data-dir"] = str(data)
    if plain:
        flat["secagg.enabled"] = False
    for item in overrides:
        if "=" not in item:
            raise FedrecInputError(f"--set {item!r}: expected KEY=VALUE, e.g. --set mf.dim=8")
        k, v = item.split("=", 1)
        flat[k.strip()] = v.strip()
    try:
        cfg = RunConfig().override(**flat)
    except ConfigError as err:
        raise FedrecInputError(str(err)) from None
    if data is not None:
        validate_data_dir(Path(data), cfg.data.institutions)
    if out is None:
        out = Path("results") / f"{dataset}-eps{epsilon:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    history = run_simulation(cfg, out, quiet=quiet, allow_non_private=non_private)
    last = history["rounds"][-1]
    shown = {k: round(last[k], 4) for k in plotted_metrics(history["rounds"])}  # no HR@10 with <= 10 items
    eps = last.get("epsilon", {})
    console.print(f"[bold green]done[/] {len(history['rounds'])} rounds -> {out}")
    console.print(f"final: {shown}")
    if eps:
        console.print(f"ε per institution (δ={cfg.privacy.delta:g}): max {max(eps.values()):.3f}, "
                      f"min {min(eps.values()):.3f}")
    absent = absent_institutions(history)
    for name, why in absent.items():
        console.print(f"[yellow]{name}[/] took no part in {why}", highlight=False)
    return 0


def absent_institutions(history: dict) -> dict[str, str]:
    """Institutions missing from some rounds, and why (the generic codes they sent), e.g.
    ``{"institution_03": "rounds 2-5 (budget)"}``."""
    names = history.get("institutions", {})
    missing: dict[str, list[tuple[int, str]]] = {}
    for row in history.get("rounds", []):
        for node, code in row.get("refusals", {}).items():
            missing.setdefault(names.get(str(node), str(node)), []).append((row["round"], code))
        for node in row.get("dropped", []):
            if str(node) not in row.get("refusals", {}):
                missing.setdefault(names.get(str(node), str(node)), []).append((row["round"], "no reply"))
    out = {}
    for name, entries in missing.items():
        rounds = [r for r, _ in entries]
        codes = sorted({c for _, c in entries})
        span = f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]}-{rounds[-1]} ({len(rounds)} of them)"
        out[name] = f"{span} ({', '.join(codes)})"
    return out
