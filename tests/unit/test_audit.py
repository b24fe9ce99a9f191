"""The privacy audit: the one-run bound, canary audits of the real mechanisms, the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy.stats import binom

from fedrec.client.guard import ReleaseGuard
from fedrec.common.config import RunConfig
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy import ledger as ledger_mod
from fedrec.common.privacy.accountant import (
    DPSGDEvent,
    NonPrivateEvent,
    calibrate_noise_multiplier,
    epsilon_for,
    gaussian_epsilon,
)
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.server.audit import (
    audit_ceiling,
    audit_mechanism,
    dpsgd_canary_scores,
    epsilon_lower_bound,
    gaussian_canary_scores,
    p_value_dp_audit,
    run_audit,
)

DELTA = 1e-5


# ------------------------------------------------------------------------- the bound
def test_bound_known_answers():
    # δ = 0 and every guess right: P[Bin(r, q) >= r] = q^r = 0.05  ->  ε = log(q / (1 - q))
    for r in (100, 1000):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    # δ = 0: the p-value is exactly the binomial tail
    q = 1 / (1 + math.exp(-1.0))
    assert p_value_dp_audit(m=500, r=200, v=150, epsilon=1.0, delta=0.0) == pytest.approx(binom.sf(149, 200, q))
    # the δ term only adds; a weaker null (larger ε) explains more: p grows with ε; chance-level
    # guessing proves nothing
    assert p_value_dp_audit(m=500, r=200, v=150, epsilon=1.0, delta=1e-3) > binom.sf(149, 200, q)
    ps = [p_value_dp_audit(m=1000, r=400, v=300, epsilon=e, delta=DELTA) for e in (0.0, 0.5, 1.0, 2.0)]
    assert ps == sorted(ps) and ps[0] < 0.05 < ps[-1]
    assert epsilon_lower_bound(m=1000, r=400, v=200, delta=DELTA) == 0.0
    # more correct guesses, more canaries -> a higher bound; the 2mδ term caps it
    assert epsilon_lower_bound(m=10_000, r=5000, v=5000, delta=DELTA) > epsilon_lower_bound(
        m=1000, r=500, v=500, delta=DELTA
    )
    assert audit_ceiling(m=2_000_000, delta=1e-5, detect_fraction=1.0) < 8.0  # log(1/δ)-ish ceiling


def test_bound_is_sound_for_pure_dp_randomized_response():
    """ε-DP randomized response: the 95 % lower bound exceeds ε in at most ~5 % of runs."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 400, 200
    keep = math.exp(eps) / (1 + math.exp(eps))
    over, bounds = 0, []
    for _ in range(trials):
        s = rng.random(m) < 0.5
        out = np.where(rng.random(m) < keep, s, ~s)  # guess = the mechanism's output
        v = int((out == s).sum())
        lb = epsilon_lower_bound(m=m, r=m, v=v, delta=0.0)
        bounds.append(lb)
        over += lb > eps
    assert over <= 0.05 * trials + 3 * math.sqrt(0.05 * 0.95 * trials)
    assert np.median(bounds) > 0.3  # and it has power


def test_bound_is_sound_for_the_gaussian_mechanism():
    """(ε(δ), δ)-DP Gaussian release audited with canaries: the bound stays below ε(δ)."""
    sigma = 1.0
    claimed = gaussian_epsilon(noise_multiplier=sigma, delta=DELTA)  # ≈ 4.38
    bounds = []
    for seed in range(12):
        res, _, _ = audit_mechanism(
            lambda m, s: gaussian_canary_scores(m=m, releases=[(sigma, 1)], sensitivity=1.0, seed=s),
            m=4000, delta=DELTA, seed=seed,
        )
        bounds.append(res.empirical_epsilon_lower_bound)
    assert sum(b > claimed for b in bounds) <= 2
    assert np.median(bounds) > 0.5


# ------------------------------------------------------- audits of the real mechanisms
def test_dpsgd_audit_passes_correct_and_flags_broken():
    q, steps, sigma = 0.5, 10, 3.0
    claimed = epsilon_for([DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=DELTA)

    def run(**broken):
        return audit_mechanism(
            lambda m, s: dpsgd_canary_scores(m=m, schedule=[(sigma, q, steps)], clip_norm=1.0, seed=s, **broken),
            m=6000, delta=DELTA, seed=7,
        )[0]

    assert 1.5 < claimed < 4.0
    ok = run()
    assert ok.empirical_epsilon_lower_bound <= claimed
    for broken in ({"noise_scale": 0.0}, {"clipping": False}, {"noise_scale": 0.05}):
        assert run(**broken).empirical_epsilon_lower_bound > claimed, broken


def test_distributed_noise_is_audited_as_a_sum():
    # n clients each adding σ/√n: the sum is the σ mechanism; with one client only it would not be
    sigma, n = 1.0, 4
    scores, inc = dpsgd_canary_scores(m=2000, schedule=[(sigma, 1.0, 4)], clip_norm=1.0, n_clients=n, seed=3)
    out = scores[~inc]
    assert np.std(out) == pytest.approx(sigma * math.sqrt(4), rel=0.1)  # σ per step (units of C), 4 steps
    assert np.mean(scores[inc]) == pytest.approx(4.0, abs=0.3)  # 1 per step (q = 1)
    single, inc1 = dpsgd_canary_scores(m=2000, schedule=[(sigma, 1.0, 4)], clip_norm=1.0, n_clients=1, seed=3)
    assert np.std(single[~inc1]) == pytest.approx(np.std(out), rel=0.1)


# -------------------------------------------------------------------- a run folder
RUN_ID = "777"


def build_run_folder(run_dir: Path, *, epsilon: float = 3.0, rounds: int = 5, persons=(400, 800), sample_rate=0.2,
                     by_node: bool = False, run_id: str = RUN_ID, cap: float = 20.0) -> Path:
    """A results folder as the ServerApp writes it: config.json (with the run id), metrics.json
    with per-round ε per institution (as claimed by each guard) and the releases the server
    accepted, and real ledgers under ledgers/ (initialised by the institution step, then only
    opened, as the handlers do)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig().override(**{
        "privacy.epsilon": epsilon, "rounds": rounds, "sample-rate": sample_rate,
        "institutions": len(persons),
    })
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_flat(), "run-id": run_id}))
    guards = []
    for i, n in enumerate(persons):
        q = sample_rate  # public: the same at every institution, whatever its size
        sigma = calibrate_noise_multiplier(target_epsilon=epsilon, delta=cfg.privacy.delta, sample_rate=q, steps=rounds,
                                           accountant="rdp")  # fast; the claims below are PRV
        name = f"institution_{i:02d}"
        path = run_dir / "ledgers" / f"{name}.db"
        PrivacyLedger.initialize(path, institution=name, epsilon_cap=cap, delta_cap=cfg.privacy.delta)
        guard = ReleaseGuard(PrivacyLedger(path), institution=name)
        guards.append((name, 100 + i, guard, DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=1)))
    history: dict = {"rounds": [], "config": cfg.to_flat(),
                     "releases": {name: {"count": 0, "ledger_head": None} for name, *_ in guards}}
    claims: dict[str, float] = {}
    for r in range(1, rounds + 1):
        for name, node, guard, ev in guards:
            guard.released(guard.charge(ev, run_id=run_id, round=r, task="train", model="mf"))
            claims[str(node) if by_node else name] = guard.spent(delta=cfg.privacy.delta)[0]
            history["releases"][name]["count"] += 1
        history["rounds"].append({"round": r, "epsilon": dict(claims)})
    (run_dir / "metrics.json").write_text(json.dumps(history))
    return run_dir


def _server_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fedrec-server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.server.cli"]
    env = dict(os.environ, COLUMNS="160")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def _audit(run_dir: Path) -> tuple[int, dict]:
    code = run_audit(run_dir, quick=True, console=Console(file=open(os.devnull, "w")))
    return code, json.loads((run_dir / "audit.json").read_text())


def test_audit_cli_on_a_run_folder(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", by_node=True)
    res = _server_cli("audit", str(run_dir), "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("audit.md", "audit.json", "audit.png"):
        assert (run_dir / name).stat().st_size > 0
    report = json.loads((run_dir / "audit.json").read_text())
    assert report["power_check"]["broken_mechanism_flagged"] is True
    assert report["power_check"]["correct_mechanism_flagged"] is False
    assert report["run_id"] == RUN_ID and report["non_private"] is False
    assert set(report["institutions"]) == {"institution_00", "institution_01"}
    for name, inst in report["institutions"].items():
        assert inst["accounting"]["consistent"] and not inst["accounting"]["under_claimed"]
        assert inst["chain_ok"] and inst["chain_problems"] == []
        assert inst["ledger"] == f"ledgers/{name}.db"  # relative to the run folder
        assert inst["events_run"] == inst["releases_recorded"] == 5
        assert set(inst["releases"]) == {"mf_dpsgd", "gaussian_release"}
        for rel in inst["releases"].values():
            for key in ("claimed_epsilon", "empirical_epsilon_lower_bound", "confidence"):
                assert key in rel
            assert rel["confidence"] == 0.95
            assert rel["empirical_epsilon_lower_bound"] <= rel["claimed_epsilon"]
            assert "release.py" in rel["mechanism"]["kind"]  # the handlers' release functions
    assert report["protocol"]["secagg_enabled"] is True
    assert "Power check" in (run_dir / "audit.md").read_text()


def test_audit_catches_an_under_claimed_run(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", rounds=3)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["rounds"][-1]["epsilon"]["institution_01"] *= 0.8  # the run reported less than it spent
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, report = _audit(run_dir)
    assert code == 1
    assert report["institutions"]["institution_01"]["accounting"]["under_claimed"] is True
    assert report["institutions"]["institution_00"]["accounting"]["consistent"] is True
    assert any("institution_01" in f and "below" in f for f in report["failures"])


def test_audit_rejects_a_folder_without_ledgers(tmp_path):
    (tmp_path / "config.json").write_text('{"run-id": "1"}')
    (tmp_path / "metrics.json").write_text('{"rounds": []}')
    with pytest.raises(FedrecInputError, match="no institution ledgers"):
        run_audit(tmp_path, quick=True, console=Console(file=open(os.devnull, "w")))


def test_audit_needs_the_recorded_run_id(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", rounds=2)
    cfg = json.loads((run_dir / "config.json").read_text())
    del cfg["run-id"]
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FedrecInputError, match="run-id") as info:
        run_audit(run_dir, quick=True, console=Console(file=open(os.devnull, "w")))
    assert "\n" not in str(info.value)


def _drop_triggers(con: sqlite3.Connection) -> None:
    for name in ledger_mod._TRIGGERS:
        con.execute(f"DROP TRIGGER IF EXISTS {name}")


def test_audit_names_deleted_edited_and_foreign_rows(tmp_path):
    """One folder, three tampered ledgers: each failure (exit code 1) names its institution and row."""
    run_dir = build_run_folder(tmp_path / "run", rounds=3, persons=(400, 400, 400))
    other = build_run_folder(tmp_path / "elsewhere", rounds=3, persons=(400, 400, 400))  # same names, other ledgers
    led = {k: run_dir / "ledgers" / f"institution_{k:02d}.db" for k in range(3)}
    con = sqlite3.connect(led[0], isolation_level=None)
    _drop_triggers(con)
    con.execute("DELETE FROM events WHERE id = 2")  # a release erased
    con.close()
    con = sqlite3.connect(led[1], isolation_level=None)
    _drop_triggers(con)
    con.execute("UPDATE events SET noise_multiplier = noise_multiplier * 10 WHERE id = 3")  # made to look cheaper
    con.close()
    cols = ("id, seq, institution, kind, noise_multiplier, sample_rate, steps, sensitivity, run_id, round, task, "
            "model, status, charged_at, released_at, pid, prev_hash, row_hash")
    foreign = sqlite3.connect(other / "ledgers" / "institution_02.db").execute(
        f"SELECT {cols} FROM events WHERE id = 2").fetchone()
    con = sqlite3.connect(led[2], isolation_level=None)
    _drop_triggers(con)
    con.execute("DELETE FROM events WHERE id = 2")
    con.execute(f"INSERT INTO events ({cols}) VALUES ({', '.join('?' * 18)})", foreign)  # swapped in
    con.close()
    code, report = _audit(run_dir)
    assert code == 1
    fails = report["failures"]

    def named(inst: str, row: str) -> bool:
        return any(f.startswith(f"{inst}: ") and row in f for f in fails)

    assert named("institution_00", "events row 2 is missing (deleted)"), fails
    assert named("institution_01", "events row 3 ") and named("institution_01", "do not match its hash"), fails
    assert named("institution_02", "events row 2 ") and named("institution_02", "another ledger"), fails
    for k in range(3):
        assert report["institutions"][f"institution_{k:02d}"]["chain_ok"] is False
    assert "BROKEN" in (run_dir / "audit.md").read_text()


def test_a_copied_run_folder_audits_its_own_ledgers(tmp_path):
    original = build_run_folder(tmp_path / "original", rounds=3)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["privacy.ledger-dir"] = str(original / "ledgers")  # an absolute path, as older runs wrote
    (copy / "config.json").write_text(json.dumps(cfg))
    # the original's ledgers are tampered with afterwards: reading them would fail the audit
    con = sqlite3.connect(original / "ledgers" / "institution_00.db", isolation_level=None)
    _drop_triggers(con)
    con.execute("UPDATE events SET steps = 1000 WHERE id = 1")
    con.close()
    code, report = _audit(copy)
    assert code == 0, report["failures"]
    assert all(i["chain_ok"] for i in report["institutions"].values())
    assert any("privacy.ledger-dir" in w for w in report["warnings"])
    assert _audit(original)[0] == 1  # and the original is caught


def test_a_run_still_passes_after_a_later_run_reuses_its_ledgers(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", rounds=3)
    assert _audit(run_dir)[0] == 0
    # a later run (another run id, more rounds, another σ) charges the same ledgers
    later = DPSGDEvent(noise_multiplier=1.5, sample_rate=0.25, steps=2)
    for name in ("institution_00", "institution_01"):
        led = PrivacyLedger(run_dir / "ledgers" / f"{name}.db")
        for r in range(1, 6):
            led.mark_released(led.charge(later, run_id="888", round=r, task="train", model="mf"))
    code, report = _audit(run_dir)
    assert code == 0, report["failures"]
    for inst in report["institutions"].values():
        assert inst["run_id"] == RUN_ID and inst["events_run"] == 3 and inst["events_total"] == 8
        assert inst["accounting"]["consistent"]


def test_fewer_ledger_rows_than_accepted_releases_fails(tmp_path):
    run_dir = build_run_folder(tmp_path / "run", rounds=3)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["releases"]["institution_01"]["count"] = 4  # the server accepted a reply never charged
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, report = _audit(run_dir)
    assert code == 1
    (fail,) = [f for f in report["failures"] if "never charged" in f]
    assert fail.startswith("institution_01: ") and "4 release(s)" in fail and "3 row(s)" in fail
    # a recorded head the ledger does not extend (swapped or rolled back) fails too
    metrics["releases"]["institution_01"]["count"] = 3
    metrics["releases"]["institution_00"]["ledger_head"] = [4, "0" * 64]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, report = _audit(run_dir)
    assert code == 1 and any(f.startswith("institution_00: ") and "recorded" in f for f in report["failures"])


def test_non_private_rows_are_infinite_never_zero(tmp_path):
    """A declared non-private simulation passes and says ε = ∞; an undeclared one fails."""
    run_dir = tmp_path / "np"
    cfg = RunConfig().override(**{"privacy.epsilon": math.inf, "rounds": 2, "institutions": 2})
    (run_dir / "ledgers").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_flat(), "privacy.epsilon": "inf", "run-id": "5"}))
    metrics: dict = {"rounds": [], "releases": {}}
    for name in ("institution_00", "institution_01"):
        led = PrivacyLedger.initialize(run_dir / "ledgers" / f"{name}.db", institution=name, epsilon_cap=1.0,
                                       delta_cap=1e-5)
        for r in (1, 2):
            led.mark_released(led.charge(NonPrivateEvent(), run_id="5", round=r, task="train", model="mf",
                                         allow_non_private=True))
        metrics["releases"][name] = {"count": 2, "ledger_head": list(led.head())}
    metrics["rounds"] = [{"round": r, "epsilon": {"institution_00": "inf", "institution_01": "inf"}} for r in (1, 2)]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, report = _audit(run_dir)
    assert code == 0, report["failures"]
    assert report["non_private"] is True
    for inst in report["institutions"].values():
        assert inst["accounting"]["derived_epsilon_at_claim"] == "inf"  # JSON's ∞, never 0
        assert inst["accounting"]["run_epsilon_prv"] == "inf" and inst["non_private_run_rows"] == 2
    md = (run_dir / "audit.md").read_text()
    assert "NON-PRIVATE RUN" in md and "∞ (non-private)" in md
    # the same ledgers under a config that claims DP: a failure naming each institution
    cfg_dp = json.loads((run_dir / "config.json").read_text())
    cfg_dp["privacy.epsilon"] = 3.0
    (run_dir / "config.json").write_text(json.dumps(cfg_dp))
    code, report = _audit(run_dir)
    assert code == 1
    assert any(f.startswith("institution_01: ") and "non-private" in f for f in report["failures"])
