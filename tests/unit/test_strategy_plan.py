"""A causal or strategy run is checked whole at each institution before its first charge.

A run whose plan (every release it will charge, computed from the public run config) does not
fit the institution's remaining budget or its max-run-epsilon is refused at its first message —
``query.causal_study`` (causal run) or ``query.strategy_plan`` (strategy run) — with nothing
charged, and the server stops with one line naming how many institutions refused and the fix.
Real guards over real SQLite ledgers; the Flower tests (marked slow: 19-32 s each on the shared
2-core machine, nearly all of it Flower/Ray start-up) run the real ServerApps on Flower's
simulation engine with one ClientApp actor (plain sums, local noise: the check does not depend on
the sum protocol)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.common.causal.config import CausalConfig
from fedrec.common.config import RunConfig
from fedrec.common.privacy.accountant import GaussianEvent, epsilon_for
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import POLICY_FILE, InstitutionPolicy, load_policy, write_policy

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _federation(tmp_path: Path, n: int = 3, people: int = 200):
    from fedrec.common.datasets import write_institution
    from fedrec.simulations.domains import domain_federation

    insts, _ = domain_federation("health", institutions=n, people=people, seed=4, skew=0.2)
    data = tmp_path / "data"
    for d in insts:
        write_institution(data / d.name, d)
    return insts, data


def _provision(names, out: Path, *, cap: float, max_run: float, spent: float = 0.0) -> Path:
    """Each institution's policy (cap, max-run-epsilon) and ledger; ``spent``: an earlier run's
    release (run id ``earlier``) already charged, of about that ε."""
    from fedrec.client.guard import open_guard

    policy_dir = out / "policies"
    for name in names:
        ledger = out / "ledgers" / f"{name}.db"
        ledger.parent.mkdir(parents=True, exist_ok=True)
        PrivacyLedger.initialize(ledger, institution=name, epsilon_cap=cap, delta_cap=DELTA)
        policy = InstitutionPolicy(ledger=ledger, epsilon_cap=cap, delta_cap=DELTA, max_run_epsilon=max_run,
                                   noise_modes=("local",), min_round_size=2,
                                   source=policy_dir / name / POLICY_FILE)
        write_policy(policy_dir / name / POLICY_FILE, policy)
        if spent > 0:
            guard = open_guard(load_policy(policy_dir / name / POLICY_FILE), institution=name, simulated=True)
            guard.released(guard.charge(_event_of(spent), run_id="earlier", round=0, task="earlier", model="causal"))
    return policy_dir


def _event_of(eps: float) -> GaussianEvent:
    from fedrec.common.privacy.accountant import calibrate_for_events

    sigma = calibrate_for_events(lambda s: [GaussianEvent(noise_multiplier=s)], target_epsilon=eps, delta=DELTA)
    return GaussianEvent(noise_multiplier=sigma)


def _rows(out: Path, name: str, *, run: str | None = None):
    return [r for r in PrivacyLedger(out / "ledgers" / f"{name}.db").rows() if r.run_id != "earlier"
            and (run is None or r.run_id == run)]


def _launch(tmp_path: Path, data: Path, out: Path, policy_dir: Path, n: int, extra: dict, *, server_app: str,
            client_app: str) -> None:
    from fedrec.simulations.run import launch_flower, one_actor_cpus

    cfg = RunConfig().override(**{"institutions": n, "seed": 0, "data-dir": str(data.resolve()),
                                  "results-dir": str(out.resolve()), "sim.policy-dir": str(policy_dir),
                                  "privacy.delta": DELTA, "secagg.enabled": False})
    launch_flower({**cfg.to_flat(), **extra}, tmp_path / "work", num_supernodes=n, server_app=server_app,
                  client_app=client_app, extra_config=extra, quiet=True,
                  num_cpus_per_client=one_actor_cpus())  # one ClientApp actor: one import of the app


def _ccfg(insts, epsilon: float) -> CausalConfig:
    return CausalConfig(epsilon=epsilon, delta=DELTA, noise_mode="local",
                        items=(sorted(insts[0].items["item_id"].astype(str))[0],))


# ------------------------------------------------------------------ the handler (fast: no Flower)
@pytest.fixture()
def deployed(tmp_path) -> tuple[Path, CausalConfig]:
    """One institution folder with its own policy (cap = max-run = 2), as a deployed node."""
    from typer.testing import CliRunner

    from fedrec.client.cli import app as client_cli

    insts, data = _federation(tmp_path, n=1, people=150)
    folder = data / insts[0].name
    res = CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "2", "--max-run-epsilon", "2"])
    assert res.exit_code == 0, res.output
    return folder, _ccfg(insts, 1.5)


def _study(folder: Path, ccfg: CausalConfig, run_id: int = 41):
    from fedrec.client import causal_app

    ctx = Context(run_id=run_id, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config={**RunConfig().to_flat(), **ccfg.to_flat()})
    msg = Message(RecordDict({"config": ConfigRecord({"covariates": json.dumps(None)})}), dst_node_id=7,
                  message_type="query.causal_study")
    reply = causal_app.causal_study(msg, ctx)
    rec = reply.content.config_records.get("refusal")
    return None if rec is None else str(rec["code"])


def _charge_earlier(folder: Path, eps: float) -> None:
    from fedrec.client.guard import open_guard

    guard = open_guard(load_policy(folder / POLICY_FILE), institution=folder.name)
    guard.released(guard.charge(_event_of(eps), run_id="earlier", round=0, task="earlier", model="causal"))


def test_the_study_query_refuses_a_run_whose_plan_passes_the_remaining_budget(deployed):
    """ε = 1.5 under a cap of 2: the plan fits a fresh ledger (the study query answers), but not
    after an earlier release of ε ≈ 1.5 (composed: > 2) — refused ``budget`` at the study query,
    nothing charged; each step alone would still have passed the guard (the old defect: the
    first steps were charged before a later one was refused)."""
    from fedrec.client.causal_app import causal_plan_events

    folder, ccfg = deployed
    assert _study(folder, ccfg, run_id=40) is None
    _charge_earlier(folder, 1.5)
    ledger = PrivacyLedger(load_policy(folder / POLICY_FILE).ledger)
    history = [r.event for r in ledger.rows()]
    plan = causal_plan_events(ccfg)
    # the setting is the one that matters: the first step fits what is left, the whole plan does not
    assert epsilon_for(history + plan[:1], delta=DELTA) < 2.0 < epsilon_for(history + plan, delta=DELTA)
    assert _study(folder, ccfg, run_id=41) == "budget"
    assert ledger.rows(run_id="41") == [] and len(ledger.rows()) == 1


def test_the_plan_is_the_servers_plan_and_counts_once_per_run(deployed):
    """The client's events are plan_budget's σ per step (the server's plan, composing to the run's
    ε), without ``scale`` when a fixed psi clip skips it; a run that already charged rows is not
    checked again (its plan was checked at its first message: the guard would count the spent
    part twice); without DP there is nothing to plan."""
    from dataclasses import replace

    from fedrec.client.causal_app import causal_plan_events
    from fedrec.common.causal.config import plan_budget

    folder, ccfg = deployed
    plan = plan_budget(ccfg)
    events = causal_plan_events(ccfg)
    assert [e.noise_multiplier for e in events] == list(plan.sigma.values())
    assert epsilon_for(events, delta=DELTA) == pytest.approx(ccfg.epsilon, rel=0.01)
    fixed = replace(ccfg, psi_clip=3.0)
    assert len(causal_plan_events(fixed)) == len(plan_budget(fixed).sigma) - 1
    assert causal_plan_events(replace(ccfg, epsilon=math.inf)) == []
    # a run that charged rows already (e.g. a strategy run's fold run): not re-checked
    _charge_earlier(folder, 1.5)
    from fedrec.client.guard import open_guard

    guard = open_guard(load_policy(folder / POLICY_FILE), institution=folder.name)
    guard.released(guard.charge(events[0], run_id="42", round=1, task="causal-moments", model="causal"))
    assert _study(folder, ccfg, run_id=42) is None
    assert _study(folder, ccfg, run_id=43) == "budget"


def test_the_strategy_plan_is_three_causal_runs_and_the_servers_release():
    """The strategy run's plan: the causal plan once (or three times with benefit-cf) and the
    release at the server's σ (server/strategies.noise_multiplier, computed independently there)."""
    from fedrec.client.causal_app import causal_plan_events
    from fedrec.client.strategy_app import strategy_plan_events
    from fedrec.common.causal.ope import OPEConfig, StrategyRun
    from fedrec.server.strategies import noise_multiplier

    ccfg = CausalConfig(epsilon=1.0, delta=DELTA)
    causal = causal_plan_events(ccfg)
    sigma = noise_multiplier(OPEConfig(epsilon=1.0, delta=DELTA))
    one = strategy_plan_events(ccfg, StrategyRun())
    three = strategy_plan_events(ccfg, StrategyRun(names=("benefit", "benefit-cf")))
    assert one == causal + [GaussianEvent(noise_multiplier=sigma)]
    assert three == causal * 3 + [GaussianEvent(noise_multiplier=sigma)]
    assert strategy_plan_events(CausalConfig(epsilon=math.inf), StrategyRun()) == []


# ------------------------------------------------------------------ Flower simulation runs
@pytest.mark.slow
def test_a_causal_run_over_the_remaining_budget_is_refused_before_any_charge_on_flower(tmp_path):
    """fedrec.server.causal:app at ε = 1: every institution already spent ε ≈ 0.9 of a cap of
    1.2 (max-run 1.2), so the run's first steps would fit but the whole run does not: every
    institution refuses at the study query, no ledger gets a row of this run, and the server
    stops with one line naming the count and the fix."""
    insts, data = _federation(tmp_path)
    out = tmp_path / "out"
    policy_dir = _provision([d.name for d in insts], out, cap=1.2, max_run=1.2, spent=0.9)
    ccfg = _ccfg(insts, 1.0)
    _launch(tmp_path, data, out, policy_dir, len(insts), ccfg.to_flat(), server_app="fedrec.server.causal:app",
            client_app="fedrec.client.causal_app:app")
    reason = json.loads((out / "failure.json").read_text())["reason"]
    assert "\n" not in reason
    assert reason.startswith("3 of 3 institution(s) refused the causal run's privacy plan before any charge "
                             "(code budget)"), reason
    assert "fix: lower causal.epsilon" in reason
    assert not (out / "causal_raw.json").exists()
    for d in insts:
        assert _rows(out, d.name) == [], d.name


@pytest.mark.slow
@pytest.mark.parametrize(("cap", "completes"), [(4.2, True), (1.5, False)])
def test_a_dp_strategy_run_is_checked_whole_before_its_first_charge_on_flower(tmp_path, cap, completes):
    """fedrec.server.strategies:app with benefit-cf at ε = 1 (three causal runs and the strategy
    release, one run id). A cap and max-run-epsilon of 4.2 (basic composition of the four
    ε = 1 parts, with the accountant's slack) cover it: it completes and each ledger holds
    exactly the planned releases, composing to the plan's ε. A cap of 1.5 covers the first
    causal run only: refused at the run's first message, no row charged anywhere, one line."""
    from fedrec.client.strategy_app import strategy_plan_events
    from fedrec.common.causal.ope import StrategyRun

    insts, data = _federation(tmp_path)
    out = tmp_path / "out"
    policy_dir = _provision([d.name for d in insts], out, cap=cap, max_run=cap)
    ccfg = _ccfg(insts, 1.0)
    run = StrategyRun(names=("benefit", "benefit-cf", "random"), crossfit_salt="cf-4")
    flat = {**ccfg.to_flat(), **run.to_flat()}
    _launch(tmp_path, data, out, policy_dir, len(insts), flat, server_app="fedrec.server.strategies:app",
            client_app="fedrec.client.strategy_app:app")
    plan = strategy_plan_events(ccfg, run)
    if completes:
        assert not (out / "failure.json").exists(), (out / "failure.json").read_text()
        report = json.loads((out / "strategies.json").read_text())
        assert report["causal_runs"] == 3 and report["strategies"] == ["benefit", "benefit-cf", "random"]
        for d in insts:
            rows = _rows(out, d.name)
            assert len(rows) == len(plan) and rows[-1].task == "strategy-values", d.name
            assert epsilon_for([r.event for r in rows], delta=DELTA) == pytest.approx(epsilon_for(plan, delta=DELTA),
                                                                                       rel=1e-9)
        assert 1.5 < epsilon_for(plan, delta=DELTA) <= 4.2
        return
    reason = json.loads((out / "failure.json").read_text())["reason"]
    assert "\n" not in reason
    assert reason.startswith("3 of 3 institution(s) refused the strategy run's privacy plan before any charge"), reason
    assert "drop benefit-cf" in reason and "fix: lower causal.epsilon" in reason
    assert not (out / "strategies.json").exists()
    for d in insts:
        assert _rows(out, d.name) == [], d.name


# ------------------------------------------------------------------ fedrec-server run strategies
@pytest.mark.parametrize(("setting", "match"), [
    ("strategies.names=benefit,oracle", r"^error: strategies.names 'benefit,oracle': unknown strategy 'oracle'; fix:"),
    ("strategies.estimators=dr,ipz", r"^error: strategies.estimators 'dr,ipz': unknown estimator"),
    ("strategies.names=random,random", r"^error: strategies.names 'random,random': a strategy repeated; fix:"),
    ("strategies.crossfit-salt=s", r"^error: strategies.crossfit-salt 's': set without benefit-cf"),
])
def test_run_strategies_refuses_bad_settings_in_one_line_before_flwr_run(tmp_path, setting, match):
    """`fedrec-server run strategies`: settings the ServerApp would refuse are one line on stderr
    naming the key and the fix, exit code 2, before `flwr run` is started (the real entry point
    in a subprocess; no SuperLink is running, so any launch attempt would fail differently) and
    with no results folder written."""
    import os
    import re
    import subprocess
    import sys

    results = tmp_path / "results"
    res = subprocess.run([sys.executable, "-c", "from fedrec.server.cli import main; main()", "run", "strategies",
                          "--institutions", "2", "--set", setting, "--results", str(results),
                          "--state-dir", str(tmp_path / "state"), "--timeout", "20"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "400", "FLWR_TELEMETRY_ENABLED": "0"})
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(errors) == 1 and re.search(match, errors[0]), res.stderr
    assert not results.exists() and not (tmp_path / "state" / "apps").exists()


def test_run_strategies_launches_the_strategy_apps_with_the_strategy_defaults(tmp_path, monkeypatch):
    """Good settings reach `flwr run` with the strategy ServerApp, the institutions' usual
    ClientApp and every strategies.* default in the app's config; the ServerApp's strategies.json
    is rewritten with the run id (flwr faked: no SuperLink here)."""
    import subprocess

    from fedrec.server import deploy

    seen = {}

    def fake_flwr(coord, args, *, timeout, capture=True):
        app_dir = Path(args[1])
        seen["pyproject"] = (app_dir / "pyproject.toml").read_text()
        seen["overrides"] = (app_dir / "run-config.toml").read_text()
        out = tmp_path / "results"
        (out / "strategies.json").write_text(json.dumps({"strategies": ["benefit-cf"], "causal_runs": 3}))
        (out / "causal_raw.json").write_text("{}")
        return subprocess.CompletedProcess(args, 0, stdout="Successfully started run 77\n", stderr="")

    monkeypatch.setattr(deploy, "_flwr", fake_flwr)
    settings = deploy.parse_settings(["strategies.names=benefit,benefit-cf", "causal.epsilon=2.0"],
                                     deploy.defaults("strategies"))
    out, report = deploy.run(deploy.Coordinator(tmp_path / "state"), "strategies", institutions=3, settings=settings,
                             results=tmp_path / "results", timeout=10, echo=lambda *a: None)
    assert 'serverapp = "fedrec.server.strategies:app"' in seen["pyproject"]
    assert 'clientapp = "fedrec.client.app:app"' in seen["pyproject"]
    assert '"strategies.estimators" = "dr"' in seen["pyproject"]
    assert '"strategies.names" = "benefit,benefit-cf"' in seen["overrides"]
    assert report["run-id"] == "77" and report["causal_runs"] == 3
    assert json.loads((out / "strategies.json").read_text())["run-id"] == "77"
