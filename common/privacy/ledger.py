"""The institution's privacy ledger: one SQLite file, events not ε, charge before release.

Every release that leaves an institution — a DP-SGD round of any model, a Gaussian
statistics release of any causal step, in any run — is one row of this ledger. The ledger
stores the **mechanism event** (DP-SGD: noise multiplier, sample rate, steps; Gaussian:
noise multiplier, count, sensitivity) with its context (institution, run id, round, model,
task, time), never an ε value: ε(δ) is derived on demand by composing *all* rows with the
accountant (``common/privacy/accountant.py``; PRV primary, RDP cross-check). A new
accountant or a tighter analysis therefore re-prices the whole history.

Write-ahead protocol (used by ``client/guard.py``):

1. :meth:`PrivacyLedger.charge` — in **one** ``BEGIN IMMEDIATE`` transaction (the write lock
   is held from the budget check to the commit, so two tasks sharing the ledger cannot both
   squeeze under the cap): compose all existing rows plus the new event, refuse with
   :class:`~fedrec.common.errors.BudgetExceeded` if ε(δ_cap) would exceed ε_cap, else insert
   the row with status ``charged`` and commit. Only then may the caller touch the data.
2. :meth:`PrivacyLedger.mark_released` — after the release left: status ``charged`` ->
   ``released`` (the only update the ledger allows).

A process that dies between 1 and 2 leaves a ``charged`` row. It counts as spent, forever:
the ledger cannot know whether the release left, so it assumes it did. Spent budget never
decreases: SQLite triggers abort every ``DELETE`` on events and every ``UPDATE`` other
than ``charged -> released`` (the cap table is append-only too; the current cap is the latest
row). The file runs in WAL mode with ``synchronous=FULL``: a committed charge survives a
crash of the process and of the machine.

The cap ``(ε, δ)`` is the institution's: :meth:`PrivacyLedger.create` stores it and
:meth:`PrivacyLedger.set_cap` appends a new one (history kept). A run config can only
*initialise* the cap of a new ledger (see ``client/guard.py``), never change it.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fedrec.common.errors import BudgetExceeded, FedrecInputError
from fedrec.common.privacy.accountant import DPSGDEvent, Event, GaussianEvent, epsilon_for

__all__ = [
    "LEDGER_FORMAT",
    "SCHEMA_VERSION",
    "Cap",
    "LedgerRow",
    "PrivacyLedger",
    "event_to_columns",
    "describe_event",
]

LEDGER_FORMAT = "fedrec-privacy-ledger"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS caps (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta   REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    set_at  TEXT NOT NULL,
    note    TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    institution      TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('dpsgd', 'gaussian')),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate      REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps            INTEGER NOT NULL CHECK (steps >= 1),
    sensitivity      REAL,
    run_id           TEXT NOT NULL,
    round            INTEGER NOT NULL,
    task             TEXT NOT NULL,
    model            TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('charged', 'released')),
    charged_at       TEXT NOT NULL,
    released_at      TEXT,
    pid              INTEGER
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, model, task);
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: events cannot be deleted (spent budget never decreases)');
END;
CREATE TRIGGER IF NOT EXISTS events_only_release BEFORE UPDATE ON events
WHEN NOT (
    OLD.status = 'charged' AND NEW.status = 'released'
    AND NEW.id IS OLD.id AND NEW.institution IS OLD.institution AND NEW.kind IS OLD.kind
    AND NEW.noise_multiplier IS OLD.noise_multiplier AND NEW.sample_rate IS OLD.sample_rate
    AND NEW.steps IS OLD.steps AND NEW.sensitivity IS OLD.sensitivity
    AND NEW.run_id IS OLD.run_id AND NEW.round IS OLD.round AND NEW.task IS OLD.task
    AND NEW.model IS OLD.model AND NEW.charged_at IS OLD.charged_at AND NEW.pid IS OLD.pid
)
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: the only allowed update is status charged -> released');
END;
CREATE TRIGGER IF NOT EXISTS caps_append_only_delete BEFORE DELETE ON caps
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: cap history cannot be deleted; append a new cap');
END;
CREATE TRIGGER IF NOT EXISTS caps_append_only_update BEFORE UPDATE ON caps
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: cap history cannot be changed; append a new cap');
END;
"""


@dataclass(frozen=True)
class Cap:
    epsilon: float
    delta: float
    set_at: str


@dataclass(frozen=True)
class LedgerRow:
    id: int
    institution: str
    event: Event
    run_id: str
    round: int
    task: str
    model: str
    status: str
    charged_at: str
    released_at: str | None

    @property
    def kind(self) -> str:
        return "dpsgd" if isinstance(self.event, DPSGDEvent) else "gaussian"


def event_to_columns(event: Event) -> dict[str, object]:
    """The ledger columns of one mechanism event (refuses what cannot be accounted)."""
    if isinstance(event, DPSGDEvent):
        return {
            "kind": "dpsgd",
            "noise_multiplier": float(event.noise_multiplier),
            "sample_rate": float(event.sample_rate),
            "steps": int(event.steps),
            "sensitivity": None,
        }
    if isinstance(event, GaussianEvent):
        return {
            "kind": "gaussian",
            "noise_multiplier": float(event.noise_multiplier),
            "sample_rate": 1.0,
            "steps": int(event.count),
            "sensitivity": float(event.sensitivity),
        }
    raise TypeError(f"the ledger cannot account for a {type(event).__name__}; use DPSGDEvent or GaussianEvent")


def _event_from_row(kind: str, sigma: float, q: float, steps: int, sensitivity: float | None) -> Event:
    if kind == "dpsgd":
        return DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return GaussianEvent(noise_multiplier=sigma, count=steps, sensitivity=1.0 if sensitivity is None else sensitivity)


def describe_event(event: Event) -> str:
    if isinstance(event, DPSGDEvent):
        return f"DP-SGD σ={event.noise_multiplier:.4g}, q={event.sample_rate:.4g}, {event.steps} step(s)"
    return f"Gaussian σ={event.noise_multiplier:.4g} x sensitivity {event.sensitivity:.4g}, {event.count} release(s)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class PrivacyLedger:
    """One institution's ledger file. Every method opens its own short-lived connection, so a
    ledger object can be shared by threads and survives forks; each write is one transaction.
    """

    def __init__(self, path: str | os.PathLike[str]):
        """Open an existing ledger; :class:`FedrecInputError` if it is missing or not a ledger."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FedrecInputError(f"{self.path}: no privacy ledger here (file does not exist)")
        self._check_format()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        institution: str,
        epsilon_cap: float,
        delta_cap: float,
    ) -> PrivacyLedger:
        """Create a new ledger with its cap, or open an existing one of the same institution
        (its stored cap wins; the arguments only initialise a new file)."""
        path = Path(path)
        if path.exists():
            led = cls(path)
            if led.institution != institution:
                raise FedrecInputError(
                    f"{path}: ledger belongs to institution {led.institution!r}, not {institution!r}"
                )
            if led.cap() is None:
                led.set_cap(epsilon=epsilon_cap, delta=delta_cap, note="initial")
            return led
        _check_cap(epsilon_cap, delta_cap)
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, isolation_level=None, timeout=60.0)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("BEGIN IMMEDIATE")
            for stmt in _split_sql(_SCHEMA):
                con.execute(stmt)
            existing = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if not existing:  # a concurrent creator may have won the race
                con.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("format", LEDGER_FORMAT),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("institution", institution),
                        ("created_at", _now()),
                    ],
                )
                con.execute(
                    "INSERT INTO caps (epsilon, delta, set_at, note) VALUES (?, ?, ?, 'initial')",
                    (float(epsilon_cap), float(delta_cap), _now()),
                )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return cls.create(path, institution=institution, epsilon_cap=epsilon_cap, delta_cap=delta_cap)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            con.execute("PRAGMA synchronous=FULL")
            yield con
        finally:
            con.close()

    def _check_format(self) -> None:
        try:
            with self._connect() as con:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:  # not SQLite, or no meta table
            raise FedrecInputError(f"{self.path}: not a fedrec privacy ledger ({err})") from None
        if meta.get("format") != LEDGER_FORMAT:
            raise FedrecInputError(f"{self.path}: not a fedrec privacy ledger (no '{LEDGER_FORMAT}' marker)")
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise FedrecInputError(
                f"{self.path}: ledger schema {version} is newer than this fedrec ({SCHEMA_VERSION}); upgrade fedrec"
            )
        self.institution: str = meta["institution"]
        self.created_at: str = meta.get("created_at", "")

    # --------------------------------------------------------------------- cap
    def cap(self) -> Cap | None:
        with self._connect() as con:
            row = con.execute("SELECT epsilon, delta, set_at FROM caps ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else Cap(float(row[0]), float(row[1]), str(row[2]))

    def cap_history(self) -> list[Cap]:
        with self._connect() as con:
            rows = con.execute("SELECT epsilon, delta, set_at FROM caps ORDER BY id").fetchall()
        return [Cap(float(e), float(d), str(t)) for e, d, t in rows]

    def set_cap(self, *, epsilon: float, delta: float, note: str = "") -> Cap:
        """Append a new cap (the institution's decision; the history is kept)."""
        _check_cap(epsilon, delta)
        with self._connect() as con:
            con.execute(
                "INSERT INTO caps (epsilon, delta, set_at, note) VALUES (?, ?, ?, ?)",
                (float(epsilon), float(delta), _now(), note),
            )
        cap = self.cap()
        assert cap is not None
        return cap

    # ----------------------------------------------------------------- charges
    def charge(
        self,
        event: Event,
        *,
        run_id: str,
        round: int,
        task: str,
        model: str,
        accountant: str = "prv",
    ) -> int:
        """Check the cap and write the event as ``charged`` in one committed transaction.

        Returns the row id. Raises :class:`BudgetExceeded` (nothing written) if composing
        every recorded event with this one would exceed the cap at the cap's δ.
        """
        cols = event_to_columns(event)
        con = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute("BEGIN IMMEDIATE")  # write lock held from the check to the commit
            cap_row = con.execute("SELECT epsilon, delta FROM caps ORDER BY id DESC LIMIT 1").fetchone()
            if cap_row is None:
                raise BudgetExceeded(
                    f"institution {self.institution!r}: the ledger {self.path} has no privacy cap; "
                    "set one before releasing anything"
                )
            eps_cap, delta_cap = float(cap_row[0]), float(cap_row[1])
            history = [_event_from_row(*r) for r in con.execute(
                "SELECT kind, noise_multiplier, sample_rate, steps, sensitivity FROM events ORDER BY id"
            )]
            before = epsilon_for(history, delta=delta_cap, accountant=accountant)
            after = epsilon_for(history + [event], delta=delta_cap, accountant=accountant)
            if not (after <= eps_cap):
                raise BudgetExceeded(
                    f"institution {self.institution!r}: refused {task}/{model} run {run_id} round {round} "
                    f"({describe_event(event)}): it would raise spent ε from {before:.3f} to {after:.3f} "
                    f"at δ={delta_cap:g}, above the cap ε={eps_cap:g}; nothing was computed "
                    f"(remaining ε {max(0.0, eps_cap - before):.3f}; ledger {self.path})"
                )
            cur = con.execute(
                "INSERT INTO events (institution, kind, noise_multiplier, sample_rate, steps, sensitivity,"
                " run_id, round, task, model, status, charged_at, pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'charged', ?, ?)",
                (
                    self.institution,
                    cols["kind"],
                    cols["noise_multiplier"],
                    cols["sample_rate"],
                    cols["steps"],
                    cols["sensitivity"],
                    str(run_id),
                    int(round),
                    str(task),
                    str(model),
                    _now(),
                    os.getpid(),
                ),
            )
            con.execute("COMMIT")
            return int(cur.lastrowid)  # type: ignore[arg-type]
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def mark_released(self, event_id: int) -> None:
        """``charged`` -> ``released`` (idempotent); unknown ids are an error."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT status FROM events WHERE id = ?", (int(event_id),)).fetchone()
            if row is None:
                con.execute("ROLLBACK")
                raise KeyError(f"ledger {self.path}: no event with id {event_id}")
            if row[0] == "charged":
                con.execute(
                    "UPDATE events SET status = 'released', released_at = ? WHERE id = ?",
                    (_now(), int(event_id)),
                )
            con.execute("COMMIT")

    # ------------------------------------------------------------------ queries
    def rows(self, *, run_id: str | None = None, status: str | None = None) -> list[LedgerRow]:
        sql = (
            "SELECT id, institution, kind, noise_multiplier, sample_rate, steps, sensitivity, run_id, round,"
            " task, model, status, charged_at, released_at FROM events"
        )
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?")
            args.append(str(run_id))
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        with self._connect() as con:
            out = con.execute(sql, args).fetchall()
        return [
            LedgerRow(
                id=int(r[0]),
                institution=str(r[1]),
                event=_event_from_row(r[2], float(r[3]), float(r[4]), int(r[5]), r[6]),
                run_id=str(r[7]),
                round=int(r[8]),
                task=str(r[9]),
                model=str(r[10]),
                status=str(r[11]),
                charged_at=str(r[12]),
                released_at=None if r[13] is None else str(r[13]),
            )
            for r in out
        ]

    def events(self, *, run_id: str | None = None) -> list[Event]:
        """Every recorded event (charged or released: both count as spent)."""
        return [r.event for r in self.rows(run_id=run_id)]

    def spent(self, *, delta: float | None = None, accountant: str = "prv") -> float:
        """ε(δ) of everything this institution ever charged (δ defaults to the cap's δ)."""
        return epsilon_for(self.events(), delta=self._delta(delta), accountant=accountant)

    def _delta(self, delta: float | None) -> float:
        if delta is not None:
            return float(delta)
        cap = self.cap()
        if cap is None:
            raise FedrecInputError(f"{self.path}: no cap set, so give δ explicitly")
        return cap.delta

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r}, institution={self.institution!r})"


def _check_cap(epsilon: float, delta: float) -> None:
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise FedrecInputError(f"privacy cap ε must be a positive finite number, got {epsilon!r}")
    if not (0 < delta < 1):
        raise FedrecInputError(f"privacy cap δ must lie in (0, 1), got {delta!r}")


def _split_sql(script: str) -> list[str]:
    """Statements of the schema (triggers contain ';' inside BEGIN ... END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")):
            out.append(text)
            buf = []
    return out
