"""The privacy ledger (fail closed, atomic creation, hash chain), the release guard and
``fedrec-client budget``."""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fedrec.client.budget import budget_summary
from fedrec.client.guard import Refusal, ReleaseGuard
from fedrec.common.errors import BudgetExceeded, FedrecInputError
from fedrec.common.privacy import ledger as ledger_mod
from fedrec.common.privacy.accountant import DPSGDEvent, GaussianEvent, NonPrivateEvent, epsilon_for
from fedrec.common.privacy.ledger import PrivacyLedger

ROUND = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5)
REPO = Path(__file__).resolve().parents[2]


def make_guard(tmp_path: Path, *, cap: float = 8.0, name: str = "inst_00") -> ReleaseGuard:
    """The institution step (initialize) once, then what a handler does: open, never create."""
    path = tmp_path / f"{name}.db"
    if not path.exists():
        PrivacyLedger.initialize(path, institution=name, epsilon_cap=cap, delta_cap=1e-5)
    return ReleaseGuard(PrivacyLedger(path), institution=name)


def _charge(led: PrivacyLedger, ev=ROUND, r: int = 1, run: str = "r", release: bool = True) -> int:
    row = led.charge(ev, run_id=run, round=r, task="train", model="mf")
    if release:
        led.mark_released(row)
    return row


def _tamper(path: Path, *sql: str) -> None:
    """What someone with write access to the file does: drop the triggers, then edit."""
    con = sqlite3.connect(path, isolation_level=None)
    for name in ledger_mod._TRIGGERS:
        con.execute(f"DROP TRIGGER IF EXISTS {name}")
    for stmt in sql:
        con.execute(stmt)
    con.close()


# ------------------------------------------------------------------ charge / release / cap
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
    # the released update kept the chain whole (status is not hashed)
    assert guard.ledger.verify_chain() == []
    # the ledger persists: a second guard on the same file sees the same history, and the
    # institution step cannot be repeated over it (that would forget what was spent)
    with pytest.raises(FedrecInputError, match="already exists") as info:
        PrivacyLedger.initialize(guard.ledger.path, institution="inst_00", epsilon_cap=1.0, delta_cap=1e-5)
    assert "\n" not in str(info.value)
    again = make_guard(tmp_path, cap=1.0)
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
        "UPDATE events SET status = 'released', row_hash = 'x' WHERE id = 2",
        "DELETE FROM caps",
        "UPDATE caps SET epsilon = 1000",
        "UPDATE meta SET value = 'other' WHERE key = 'institution'",
        "DELETE FROM meta",
    ]:
        with pytest.raises(sqlite3.DatabaseError, match="fedrec ledger"):
            con.execute(sql)
    con.close()
    assert [r.event.steps for r in guard.ledger.rows()] == [5, 5]
    assert guard.ledger.verify_chain() == []


def test_over_budget_refused_before_data_is_touched(tmp_path):
    guard = make_guard(tmp_path, cap=3.0)
    touched: list[int] = []

    def compute(charge) -> str:  # stands for "read the institution's data and train"
        touched.append(1)
        return "update"

    big = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=50)  # ε ≈ 5.2 > 3
    with pytest.raises(Refusal) as info:
        guard.guarded(big, compute, run_id="r", round=1, task="train", model="mf")
    assert touched == []
    assert guard.ledger.rows() == []  # nothing written for a refused release
    msg = str(info.value)
    assert info.value.code == "budget"
    assert "inst_00" in msg and "cap" in msg and "3" in msg and "\n" not in msg
    # within budget: computed once, released
    assert guard.guarded(ROUND, compute, run_id="r", round=1, task="train", model="mf") == "update"
    assert touched == [1]
    # the cap binds the composition of everything recorded, not each event alone
    refused = 0
    for r in range(2, 8):
        try:
            guard.guarded(ROUND, compute, run_id="r", round=r, task="train", model="mf")
        except Refusal:
            refused += 1
    assert refused >= 1
    assert guard.spent()[0] <= 3.0
    assert len(touched) == len(guard.ledger.rows())


def test_concurrent_tasks_cannot_overshoot_the_cap(tmp_path):
    """Check and insert are one IMMEDIATE transaction: racing tasks stop exactly at the cap."""
    path = tmp_path / "inst.db"
    PrivacyLedger.initialize(path, institution="inst", epsilon_cap=1.0, delta_cap=1e-5)
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
    led = PrivacyLedger(path)
    assert len(led.rows()) == n_fit
    assert led.verify_chain() == []  # racing writers still form one unbroken chain
    assert led.head()[0] == n_fit + 1  # + the initial cap row


_CRASHER = textwrap.dedent(
    """
    import sys, time
    from fedrec.client.guard import Refusal, ReleaseGuard
    from fedrec.common.privacy.accountant import DPSGDEvent
    from fedrec.common.privacy.ledger import PrivacyLedger
    guard = ReleaseGuard(PrivacyLedger(sys.argv[1]), institution="inst_00")
    ev = DPSGDEvent(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    guard.released(guard.charge(ev, run_id="crash", round=1, task="train", model="mf"))
    guard.charge(ev, run_id="crash", round=2, task="train", model="mf")
    print("charged", flush=True)
    time.sleep(60)  # "training": killed here, before released()
    """
)


def test_sigkill_between_charge_and_release_counts_as_spent(tmp_path):
    path = tmp_path / "inst_00.db"
    PrivacyLedger.initialize(path, institution="inst_00", epsilon_cap=8.0, delta_cap=1e-5)
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
    assert guard.ledger.verify_chain() == []
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


# ------------------------------------------------------------------------- fail closed
def test_opening_fails_closed(tmp_path):
    """Open never creates; anything but a complete schema-2 ledger is one clear line."""
    def refused(path: Path, match: str) -> None:
        with pytest.raises(FedrecInputError, match=match) as info:
            PrivacyLedger(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)

    refused(tmp_path / "missing.db", "does not exist")
    assert not (tmp_path / "missing.db").exists()  # opening did not create it
    (tmp_path / "folder.db").mkdir()
    refused(tmp_path / "folder.db", "not a regular file")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"hello, not sqlite" * 300)
    refused(junk, "not a usable fedrec privacy ledger")
    empty = tmp_path / "empty.db"
    empty.touch()
    refused(empty, "no tables")
    assert empty.stat().st_size == 0  # and opening wrote nothing into it
    # what a kill during the old open-or-create left behind: a 4 KiB SQLite file with no tables
    tableless = tmp_path / "tableless.db"
    con = sqlite3.connect(tableless)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE x (a)")
    con.execute("DROP TABLE x")
    con.close()
    assert tableless.stat().st_size >= 4096
    refused(tableless, "no tables")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE meta (key, value)").connection.close()
    refused(other, "no 'fedrec-privacy-ledger' marker")
    # a schema-1 ledger (no hash chain): the institution is told to re-initialise
    v1 = tmp_path / "v1.db"
    con = sqlite3.connect(v1, isolation_level=None)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.executemany("INSERT INTO meta VALUES (?, ?)", [("format", "fedrec-privacy-ledger"), ("schema_version", "1"),
                                                       ("institution", "a"), ("created_at", "2024")])
    con.close()
    refused(v1, "schema 1 has no hash chain.*re-initialise")
    # a ledger whose events table is gone
    good = PrivacyLedger.initialize(tmp_path / "good.db", institution="a", epsilon_cap=1.0, delta_cap=1e-5).path
    _tamper(good, "DROP TABLE events")
    refused(good, "missing events")
    # a ledger of another institution
    make_guard(tmp_path, name="b")
    with pytest.raises(Refusal, match="belongs to institution"):
        ReleaseGuard(PrivacyLedger(tmp_path / "b.db"), institution="c")


def test_initialize_validates_before_writing(tmp_path):
    for eps, delta in [(0.0, 1e-5), (math.inf, 1e-5), (1.0, 0.0), (1.0, 1.0)]:
        with pytest.raises(FedrecInputError, match="privacy cap"):
            PrivacyLedger.initialize(tmp_path / "x.db", institution="a", epsilon_cap=eps, delta_cap=delta)
    with pytest.raises(FedrecInputError, match="institution name"):
        PrivacyLedger.initialize(tmp_path / "x.db", institution=" ", epsilon_cap=1.0, delta_cap=1e-5)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- atomic initialisation
def _usable_or_absent(path: Path) -> str:
    """'absent', or 'usable' after checking the ledger opens, verifies, charges and counts."""
    if not path.exists():
        return "absent"
    led = PrivacyLedger(path)
    assert led.institution == "inst" and led.cap().epsilon == 8.0
    assert led.verify_chain() == []
    led.mark_released(led.charge(ROUND, run_id="after", round=1, task="train", model="mf", accountant="rdp"))
    assert led.verify_chain() == [] and len(led.rows()) == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    return "usable"


def _fork(child) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            child()
        finally:
            os._exit(0)
    return pid


@pytest.mark.parametrize("step", ["built", "linked", "unlinked", "wal"])
def test_crash_at_each_step_of_initialize(tmp_path, step):
    """A process dying right after each step of initialize leaves no file or a usable ledger."""
    path = tmp_path / "inst.db"

    def child() -> None:
        def crash(at: str) -> None:
            if at == step:
                os._exit(9)
        ledger_mod._crash_point = crash
        PrivacyLedger.initialize(path, institution="inst", epsilon_cap=8.0, delta_cap=1e-5)

    _, status = os.waitpid(_fork(child), 0)
    assert os.WEXITSTATUS(status) == 9
    assert _usable_or_absent(path) == ("absent" if step == "built" else "usable")
    if step == "built":  # the institution simply runs the step again
        PrivacyLedger.initialize(path, institution="inst", epsilon_cap=8.0, delta_cap=1e-5)
        assert _usable_or_absent(path) == "usable"


def test_sigkill_at_random_points_of_initialize(tmp_path):
    """SIGKILL a process creating ledgers back to back at random moments (20 trials): every
    path is either absent or a complete, usable ledger — never a table-less file."""
    rng = random.Random(1234)
    outcomes: dict[str, int] = {"absent": 0, "usable": 0}
    for trial in range(20):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()

        def child(folder: Path = folder) -> None:
            for i in range(10_000):
                PrivacyLedger.initialize(folder / f"l{i}.db", institution="inst", epsilon_cap=8.0, delta_cap=1e-5)

        pid = _fork(child)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        created = sorted(folder.glob("l*.db"), key=lambda p: int(p.stem[1:]))
        n = int(created[-1].stem[1:]) + 1 if created else 0
        for i in range(n + 1):  # every ledger the child finished, and the one it was killed in
            outcomes[_usable_or_absent(folder / f"l{i}.db")] += 1
    assert outcomes["usable"] > 0 and outcomes["absent"] > 0


# ------------------------------------------------------------------------- hash chain
def _ledger_with_history(tmp_path: Path, name: str = "a.db", institution: str = "inst") -> PrivacyLedger:
    led = PrivacyLedger.initialize(tmp_path / name, institution=institution, epsilon_cap=50.0, delta_cap=1e-5)
    for r in range(1, 4):
        _charge(led, r=r, release=r != 3)
    led.set_cap(epsilon=40.0, delta=1e-5, note="tighter")
    _charge(led, GaussianEvent(noise_multiplier=5.0, sensitivity=2.0), r=4)
    assert led.verify_chain() == []
    return led


def _refuses_charges(led: PrivacyLedger, row_text: str) -> None:
    n = len(led.rows())
    with pytest.raises(FedrecInputError, match="hash chain is broken") as info:
        led.charge(ROUND, run_id="next", round=9, task="train", model="mf")
    assert row_text in str(info.value) and "\n" not in str(info.value)
    # through the guard: a refusal with the generic code "ledger", nothing computed
    with pytest.raises(Refusal) as refusal:
        ReleaseGuard(led, institution=led.institution).charge(ROUND, run_id="next", round=9, task="train", model="mf")
    assert refusal.value.code == "ledger"
    with pytest.raises(FedrecInputError, match="hash chain is broken"):
        led.set_cap(epsilon=100.0, delta=1e-5)
    assert len(PrivacyLedger(led.path).rows()) <= n


def test_chain_names_an_edited_row(tmp_path):
    led = _ledger_with_history(tmp_path)
    _tamper(led.path, "UPDATE events SET noise_multiplier = 50 WHERE id = 2")  # "spent" made smaller
    problems = PrivacyLedger(led.path).verify_chain()
    assert any(p.startswith("events row 2 ") and "do not match its hash" in p for p in problems), problems
    assert not any("events row 1 " in p or "events row 3 " in p for p in problems)  # only that row
    _refuses_charges(led, "events row 2 ")


def test_chain_names_an_edited_cap(tmp_path):
    led = _ledger_with_history(tmp_path)
    _tamper(led.path, "UPDATE caps SET epsilon = 1000 WHERE id = 2")
    problems = led.verify_chain()
    assert any(p.startswith("caps row 2 ") and "do not match its hash" in p for p in problems), problems
    _refuses_charges(led, "caps row 2 ")


def test_chain_names_a_deleted_row(tmp_path):
    led = _ledger_with_history(tmp_path)
    _tamper(led.path, "DELETE FROM events WHERE id = 2")
    problems = led.verify_chain()
    assert "events row 2 is missing (deleted)" in problems, problems
    assert any(p.startswith("events row 3 ") and "missing" in p for p in problems)  # the gap after it
    _refuses_charges(led, "events row 3 ")


def test_chain_names_a_foreign_row(tmp_path):
    """A row copied from another ledger of the same institution (ids and positions fitted)."""
    led = _ledger_with_history(tmp_path, "a.db")
    other = _ledger_with_history(tmp_path, "b.db")
    cols = "id, seq, institution, kind, noise_multiplier, sample_rate, steps, sensitivity, run_id, round, " \
           "task, model, status, charged_at, released_at, pid, prev_hash, row_hash"
    foreign = sqlite3.connect(other.path).execute(f"SELECT {cols} FROM events WHERE id = 2").fetchone()
    con = sqlite3.connect(led.path, isolation_level=None)
    for name in ledger_mod._TRIGGERS:
        con.execute(f"DROP TRIGGER {name}")
    con.execute("DELETE FROM events WHERE id = 2")  # swap a's row 2 for b's row 2
    con.execute(f"INSERT INTO events ({cols}) VALUES ({', '.join('?' * 18)})", foreign)
    con.close()
    problems = led.verify_chain()
    assert any(p.startswith("events row 2 ") and "another ledger" in p for p in problems), problems
    # appended at the end with a fitted id and position, it does not link either
    led2 = _ledger_with_history(tmp_path, "c.db")
    n_events, (n_rows, _) = len(led2.rows()), led2.head()
    row = list(foreign)
    row[0], row[1] = n_events + 1, n_rows + 1
    sqlite3.connect(led2.path, isolation_level=None).execute(
        f"INSERT INTO events ({cols}) VALUES ({', '.join('?' * 18)})", row).connection.close()
    problems = led2.verify_chain()
    assert any(p.startswith(f"events row {n_events + 1} ") for p in problems), problems
    _refuses_charges(led2, f"events row {n_events + 1} ")


def test_chain_names_a_broken_genesis(tmp_path):
    led = _ledger_with_history(tmp_path)
    _tamper(led.path, "UPDATE meta SET value = '2020-01-01T00:00:00+00:00' WHERE key = 'created_at'")
    problems = PrivacyLedger(led.path).verify_chain()
    assert any(p.startswith("caps row 1 (chain position 1)") and "genesis" in p for p in problems), problems


def test_head_pins_the_ledger(tmp_path):
    """A recorded head detects a rolled-back (cut) or swapped (re-initialised) ledger."""
    led = _ledger_with_history(tmp_path)
    n, h = led.head()
    assert n == 6 and led.hash_at(n) == h  # 1 cap + 3 events + 1 cap + 1 event
    _charge(led, r=5)
    assert led.head()[0] == n + 1 and led.hash_at(n) == h  # a grown ledger still extends the head
    # rolled back: the newest rows cut off (no gap is left, so only the head shows it)
    _tamper(led.path, "DELETE FROM events WHERE seq >= 6")
    assert led.hash_at(n) is None
    # swapped: the same history written into a fresh ledger has other hashes
    other = _ledger_with_history(tmp_path, "b.db")
    assert other.head()[0] == n and other.head()[1] != h


# ------------------------------------------------------------------ non-private releases
def test_non_private_release_needs_the_flag_and_is_infinite(tmp_path):
    led = PrivacyLedger.initialize(tmp_path / "sim.db", institution="sim", epsilon_cap=0.5, delta_cap=1e-5)
    with pytest.raises(BudgetExceeded, match="non-private") as info:
        led.charge(NonPrivateEvent(), run_id="r", round=1, task="train", model="mf")
    assert "\n" not in str(info.value)
    assert led.rows() == [] and led.spent() == 0.0
    # allowed by the institution's policy: recorded (cap check skipped), never ε = 0
    row = led.charge(NonPrivateEvent(count=2), run_id="r", round=1, task="train", model="mf",
                     allow_non_private=True)
    led.mark_released(row)
    (rec,) = led.rows()
    assert rec.kind == "nonprivate" and rec.event == NonPrivateEvent(count=2)
    assert math.isinf(led.spent()) and math.isinf(led.spent(accountant="rdp"))
    assert led.verify_chain() == []
    # nothing private can follow an ε = ∞ release
    with pytest.raises(BudgetExceeded, match="already ∞"):
        led.charge(GaussianEvent(noise_multiplier=100.0), run_id="r", round=2, task="causal", model="causal")
    s = budget_summary(led)
    assert math.isinf(s["spent_prv"]) and math.isinf(s["groups"][0]["epsilon_alone"])
    assert s["remaining"] == 0.0 and "non-private" in s["remaining_reason"]


# ----------------------------------------------------------------------- the budget CLI
def _budget_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
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
    assert "∞" not in out
    spent = guard.spent()[0]
    assert f"{spent:.3f}" in out and f"{8.0 - spent:.3f}" in out
    assert "charged but never marked released" in out

    missing = _budget_cli("--ledger", str(tmp_path / "nope.db"))
    assert missing.returncode == 2
    assert missing.stdout == ""
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.db" in lines[0] and "does not exist" in lines[0]


def test_budget_cli_shows_non_private_as_infinite(tmp_path):
    led = PrivacyLedger.initialize(tmp_path / "sim.db", institution="sim", epsilon_cap=4.0, delta_cap=1e-5)
    _charge(led, run="dp-run")
    led.charge(NonPrivateEvent(), run_id="np-run", round=1, task="train", model="mf", allow_non_private=True)
    res = _budget_cli("--ledger", str(led.path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    np_line = next(line for line in out.splitlines() if "np-run" in line)
    assert "∞ (non-private)" in np_line and "none" in np_line
    assert "0.000" not in np_line  # ε = ∞ never prints as 0
    assert "spent ε = ∞ (non-private)" in out and "remaining ε = none" in out
    dp_line = next(line for line in out.splitlines() if "dp-run" in line)
    assert f"{epsilon_for([ROUND], delta=1e-5):.3f}" in dp_line
