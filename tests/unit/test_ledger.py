"""The privacy ledger, the release guard and ``fedrec-client budget``."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fedrec.client.guard import ReleaseGuard, open_guard
from fedrec.common.errors import BudgetExceeded, FedrecInputError
from fedrec.common.privacy.accountant import DPSGDEvent, GaussianEvent, epsilon_for
from fedrec.common.privacy.ledger import PrivacyLedger

ROUND = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5)
REPO = Path(__file__).resolve().parents[2]


def make_guard(tmp_path: Path, *, cap: float = 8.0, name: str = "inst_00") -> ReleaseGuard:
    return open_guard(tmp_path / f"{name}.db", institution=name, epsilon_cap=cap, delta_cap=1e-5)


def test_charge_release_spent_matches_accountant(tmp_path):
    guard = make_guard(tmp_path)
    events = [ROUND, ROUND, GaussianEvent(noise_multiplier=4.0, count=2, sensitivity=2.0)]
    for r, ev in enumerate(events, start=1):
        ch = guard.charge(ev, run_id="run-1", round=r, task="train" if r < 3 else "causal-ate", model="mf")
        guard.released(ch)
    rows = guard.ledger.rows()
    assert [r.status for r in rows] == ["released"] * 3
    assert [r.event for r in rows] == events  # events are stored, not ε; sensitivity survives
    eps_prv, eps_rdp = guard.spent()
    assert eps_prv == pytest.approx(epsilon_for(events, delta=1e-5, accountant="prv"))
    assert eps_rdp == pytest.approx(epsilon_for(events, delta=1e-5, accountant="rdp"))
    assert 0 < eps_prv <= eps_rdp
    # the ledger persists: a second guard on the same file sees the same history
    again = make_guard(tmp_path, cap=1.0)  # a run config cannot change an existing cap
    assert again.cap.epsilon == 8.0
    assert again.spent() == (eps_prv, eps_rdp)


def test_ledger_is_append_only(tmp_path):
    guard = make_guard(tmp_path)
    guard.released(guard.charge(ROUND, run_id="r", round=1, task="train", model="mf"))
    guard.charge(ROUND, run_id="r", round=2, task="train", model="mf")
    con = sqlite3.connect(guard.ledger.path, isolation_level=None)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for sql in [
        "DELETE FROM events",
        "UPDATE events SET steps = 1",
        "UPDATE events SET noise_multiplier = 100 WHERE status = 'charged'",
        "UPDATE events SET status = 'charged' WHERE id = 1",
        "UPDATE events SET status = 'released', steps = 1 WHERE id = 2",
        "DELETE FROM caps",
        "UPDATE caps SET epsilon = 1000",
    ]:
        with pytest.raises(sqlite3.DatabaseError, match="fedrec ledger"):
            con.execute(sql)
    con.close()
    assert [r.event.steps for r in guard.ledger.rows()] == [5, 5]


def test_over_budget_refused_before_data_is_touched(tmp_path):
    guard = make_guard(tmp_path, cap=3.0)
    touched: list[int] = []

    def compute() -> str:  # stands for "read the institution's data and train"
        touched.append(1)
        return "update"

    big = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=50)  # ε ≈ 5.2 > 3
    with pytest.raises(BudgetExceeded) as info:
        guard.guarded(big, compute, run_id="r", round=1, task="train", model="mf")
    assert touched == []
    assert guard.ledger.rows() == []  # nothing written for a refused release
    msg = str(info.value)
    assert "inst_00" in msg and "cap" in msg and "3" in msg and "\n" not in msg
    # within budget: computed once, released
    assert guard.guarded(ROUND, compute, run_id="r", round=1, task="train", model="mf") == "update"
    assert touched == [1]
    # the cap binds the composition of everything recorded, not each event alone
    refused = 0
    for r in range(2, 8):
        try:
            guard.guarded(ROUND, compute, run_id="r", round=r, task="train", model="mf")
        except BudgetExceeded:
            refused += 1
    assert refused >= 1
    assert guard.spent()[0] <= 3.0
    assert len(touched) == len(guard.ledger.rows())


def test_concurrent_tasks_cannot_overshoot_the_cap(tmp_path):
    """Check and insert are one IMMEDIATE transaction: racing tasks stop exactly at the cap."""
    path = tmp_path / "inst.db"
    PrivacyLedger.create(path, institution="inst", epsilon_cap=1.0, delta_cap=1e-5)
    ev = GaussianEvent(noise_multiplier=10.0)
    n_fit = 0
    while epsilon_for([ev] * (n_fit + 1), delta=1e-5, accountant="rdp") <= 1.0:
        n_fit += 1
    results: list[bool] = []

    def worker(k: int) -> None:
        led = PrivacyLedger(path)
        for j in range(n_fit):
            try:
                led.charge(ev, run_id=f"t{k}", round=j, task="causal", model="causal", accountant="rdp")
                results.append(True)
            except BudgetExceeded:
                results.append(False)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == n_fit
    assert len(PrivacyLedger(path).rows()) == n_fit


_CRASHER = textwrap.dedent(
    """
    import sys, time
    from fedrec.client.guard import open_guard
    from fedrec.common.privacy.accountant import DPSGDEvent
    guard = open_guard(sys.argv[1], institution="inst_00", epsilon_cap=8.0, delta_cap=1e-5)
    ev = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    guard.released(guard.charge(ev, run_id="crash", round=1, task="train", model="mf"))
    guard.charge(ev, run_id="crash", round=2, task="train", model="mf")
    print("charged", flush=True)
    time.sleep(60)  # "training": killed here, before released()
    """
)


def test_sigkill_between_charge_and_release_counts_as_spent(tmp_path):
    path = tmp_path / "inst_00.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(path)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "charged"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # the ledger opens cleanly (WAL recovery) and the charged row is there, counted
    guard = make_guard(tmp_path)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = guard.ledger.rows()
    assert [(r.round, r.status) for r in rows] == [(1, "released"), (2, "charged")]
    after_crash = guard.spent()[0]
    assert after_crash == pytest.approx(epsilon_for([ROUND, ROUND], delta=1e-5))
    # spent never decreases: each further charge (released or not) raises it
    history = [after_crash]
    for r in range(3, 6):
        ch = guard.charge(ROUND, run_id="after", round=r, task="train", model="mf")
        if r % 2:
            guard.released(ch)
        history.append(guard.spent()[0])
    assert history == sorted(history) and history[-1] > history[0]
    assert [r.status for r in guard.ledger.rows()][:2] == ["released", "charged"]  # the crash row stays


def test_not_a_ledger(tmp_path):
    with pytest.raises(FedrecInputError, match="does not exist"):
        PrivacyLedger(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_text("hello")
    with pytest.raises(FedrecInputError, match="not a fedrec privacy ledger"):
        PrivacyLedger(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(FedrecInputError, match="not a fedrec privacy ledger"):
        PrivacyLedger(other)
    make_guard(tmp_path, name="a")
    with pytest.raises(FedrecInputError, match="belongs to institution"):
        open_guard(tmp_path / "a.db", institution="b", epsilon_cap=1.0, delta_cap=1e-5)


def _budget_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="160")
    exe = Path(sys.executable).with_name("fedrec-client")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fedrec.client.cli"]
    return subprocess.run([*cmd, "budget", *args], capture_output=True, text=True, env=env, timeout=120)


def test_budget_cli(tmp_path):
    guard = make_guard(tmp_path)
    for r in (1, 2):
        guard.released(guard.charge(ROUND, run_id="run-a", round=r, task="train", model="mf"))
    guard.charge(GaussianEvent(noise_multiplier=5.0), run_id="run-b", round=1, task="causal-ate", model="causal")
    res = _budget_cli("--ledger", str(guard.ledger.path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for text in ("inst_00", "run-a", "run-b", "mf", "causal-ate", "remaining", "RDP"):
        assert text in out
    spent = guard.spent()[0]
    assert f"{spent:.3f}" in out and f"{8.0 - spent:.3f}" in out
    assert "charged but never marked released" in out

    missing = _budget_cli("--ledger", str(tmp_path / "nope.db"))
    assert missing.returncode == 2
    assert missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.db" in lines[0] and "does not exist" in lines[0]
