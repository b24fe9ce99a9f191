"""The institution's privacy ledger: one SQLite file, events not ε, charge before release.

Every release that leaves an institution — a DP-SGD round of any model, a Gaussian
statistics release of any causal step, in any run — is one row of this ledger. The ledger
stores the **mechanism event** (DP-SGD: noise multiplier, sample rate, steps; Gaussian:
noise multiplier, count, sensitivity; non-private: count) with its context (institution, run
id, round, model, task, time), never an ε value: ε(δ) is derived on demand by composing *all*
rows with the accountant (``common/privacy/accountant.py``; PRV primary, RDP cross-check). A
new accountant or a tighter analysis therefore re-prices the whole history.

Privacy contracts
-----------------
* **Fail closed.** ``PrivacyLedger(path)`` only *opens* a complete ledger of this schema; a
  missing, unreadable, non-SQLite, table-less or older-schema file raises
  :class:`~fedrec.common.errors.FedrecInputError` (one line), so a guard built on it refuses
  every release. Creating a ledger is the institution's explicit step,
  :meth:`PrivacyLedger.initialize`, and it is **atomic**: the complete database is built in a
  temporary file beside ``path`` (rollback journal, fsync) and published with ``os.link``,
  which either creates ``path`` with the whole file or fails; a kill at any moment leaves no
  file at ``path`` or a complete, usable ledger (at worst a stray ``.<name>.init-*.tmp``).
* **Write-ahead** (used by ``client/guard.py``):

  1. :meth:`PrivacyLedger.charge` — in **one** ``BEGIN IMMEDIATE`` transaction (the write lock
     is held from the check to the commit, so two tasks sharing the ledger cannot both squeeze
     under the cap): verify the hash chain, compose all existing rows plus the new event,
     refuse with :class:`~fedrec.common.errors.BudgetExceeded` if ε(δ_cap) would exceed ε_cap,
     else insert the row with status ``charged`` and commit. Only then may the caller touch
     the data.
  2. :meth:`PrivacyLedger.mark_released` — after the release left: status ``charged`` ->
     ``released`` (the only update the ledger allows).

  A process that dies between 1 and 2 leaves a ``charged`` row. It counts as spent, forever.
* **Append-only.** SQLite triggers abort every ``DELETE`` and every ``UPDATE`` other than
  ``charged -> released`` (caps and meta are immutable too; the current cap is the latest cap
  row). WAL mode with ``synchronous=FULL``: a committed charge survives a crash, of the process
  or of the machine. A *simulated* institution's ledger (``durable=False``, opened by a guard of a
  simulated node) commits with ``synchronous=OFF``: the charge is still committed before the
  release and survives the process dying, but not the machine losing power — a simulation's
  ledgers are scratch files, and two fsyncs per message were ~75% of a simulated MF handler at
  1,000 institutions (docs/simulate.md).
* **Hash chain** (tamper evidence for what the triggers cannot stop: someone who drops them,
  or edits the file's bytes). Caps and events form **one** chain in insertion order: a shared
  sequence number ``seq`` (1, 2, 3, … over both tables) orders them, and each row stores
  ``prev_hash`` (the previous row's hash; the first row's is the *genesis* hash derived from the
  meta: format, schema version, ``ledger_id``, institution, creation time) and ``row_hash`` =
  SHA-256 of a canonical JSON encoding of the ledger id, the table, the row's **immutable**
  fields and ``prev_hash``. One chain, not two: a cap change is ordered against the charges it
  governed, and one ``head()`` pins both. ``status``/``released_at`` are not hashed, so the
  allowed ``charged -> released`` update keeps the chain intact. :meth:`verify_chain` names
  every row that was deleted (a gap in ``seq``), edited (hash mismatch), copied from another
  ledger (hash or link mismatch: the ledger id is hashed in) or whose genesis does not match
  the meta; :meth:`charge` and :meth:`set_cap` refuse on a broken chain
  (:class:`~fedrec.common.errors.FedrecInputError`: the ledger is unusable, not the budget spent). A chain without a key
  can be recomputed by whoever rewrites the whole file, and the newest rows can be cut off
  without a gap: against that, a run records :meth:`head` ``(rows, last hash)`` and an auditor
  checks that the ledger still extends it (:meth:`hash_at`).
* **Non-private releases** (ε = ∞) are written only when the caller passes
  ``allow_non_private=True`` (the institution's policy allows non-private *simulation* runs),
  as kind ``nonprivate``; from then on :meth:`spent` is ∞ and every DP charge is refused.

The cap ``(ε, δ)`` is the institution's: :meth:`PrivacyLedger.initialize` stores it and
:meth:`PrivacyLedger.set_cap` appends a new one (history kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedrec.common.errors import BudgetExceeded, FedrecInputError, RunCeilingExceeded
from fedrec.common.privacy.accountant import (
    DPSGDEvent,
    Event,
    GaussianEvent,
    NonPrivateEvent,
    epsilon_for,
)

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
SCHEMA_VERSION = 2

_TABLES = ("meta", "caps", "events")

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE caps (
    id        INTEGER PRIMARY KEY,
    seq       INTEGER NOT NULL UNIQUE CHECK (seq >= 1),
    epsilon   REAL NOT NULL CHECK (epsilon > 0),
    delta     REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    set_at    TEXT NOT NULL,
    note      TEXT NOT NULL DEFAULT '',
    prev_hash TEXT NOT NULL,
    row_hash  TEXT NOT NULL
);
CREATE TABLE events (
    id               INTEGER PRIMARY KEY,
    seq              INTEGER NOT NULL UNIQUE CHECK (seq >= 1),
    institution      TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('dpsgd', 'gaussian', 'nonprivate')),
    noise_multiplier REAL NOT NULL CHECK (
        (kind = 'nonprivate' AND noise_multiplier = 0) OR (kind != 'nonprivate' AND noise_multiplier > 0)),
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
    pid              INTEGER,
    prev_hash        TEXT NOT NULL,
    row_hash         TEXT NOT NULL
);
CREATE INDEX events_run ON events (run_id, model, task);
CREATE TRIGGER meta_immutable_update BEFORE UPDATE ON meta
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: meta cannot be changed (it is the hash chain''s genesis)');
END;
CREATE TRIGGER meta_immutable_delete BEFORE DELETE ON meta
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: meta cannot be deleted (it is the hash chain''s genesis)');
END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: events cannot be deleted (spent budget never decreases)');
END;
CREATE TRIGGER events_only_release BEFORE UPDATE ON events
WHEN NOT (
    OLD.status = 'charged' AND NEW.status = 'released'
    AND NEW.id IS OLD.id AND NEW.seq IS OLD.seq AND NEW.institution IS OLD.institution
    AND NEW.kind IS OLD.kind AND NEW.noise_multiplier IS OLD.noise_multiplier
    AND NEW.sample_rate IS OLD.sample_rate AND NEW.steps IS OLD.steps
    AND NEW.sensitivity IS OLD.sensitivity AND NEW.run_id IS OLD.run_id AND NEW.round IS OLD.round
    AND NEW.task IS OLD.task AND NEW.model IS OLD.model AND NEW.charged_at IS OLD.charged_at
    AND NEW.pid IS OLD.pid AND NEW.prev_hash IS OLD.prev_hash AND NEW.row_hash IS OLD.row_hash
)
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: the only allowed update is status charged -> released');
END;
CREATE TRIGGER caps_append_only_delete BEFORE DELETE ON caps
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: cap history cannot be deleted; append a new cap');
END;
CREATE TRIGGER caps_append_only_update BEFORE UPDATE ON caps
BEGIN
    SELECT RAISE(ABORT, 'fedrec ledger: cap history cannot be changed; append a new cap');
END;
"""

_TRIGGERS = (
    "meta_immutable_update",
    "meta_immutable_delete",
    "events_append_only_delete",
    "events_only_release",
    "caps_append_only_delete",
    "caps_append_only_update",
)

#: the immutable, hashed fields of each chained table, with the type each is normalised to
_CAP_FIELDS: tuple[tuple[str, type], ...] = (
    ("id", int), ("seq", int), ("epsilon", float), ("delta", float), ("set_at", str), ("note", str),
)
_EVENT_FIELDS: tuple[tuple[str, type], ...] = (
    ("id", int), ("seq", int), ("institution", str), ("kind", str), ("noise_multiplier", float),
    ("sample_rate", float), ("steps", int), ("sensitivity", float), ("run_id", str), ("round", int),
    ("task", str), ("model", str), ("charged_at", str), ("pid", int),
)
_FIELDS = {"caps": _CAP_FIELDS, "events": _EVENT_FIELDS}


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
    seq: int = 0

    @property
    def kind(self) -> str:
        if isinstance(self.event, DPSGDEvent):
            return "dpsgd"
        if isinstance(self.event, NonPrivateEvent):
            return "nonprivate"
        return "gaussian"


def event_to_columns(event: Event) -> dict[str, object]:
    """The ledger columns of one mechanism event (refuses what cannot be accounted).

    A :class:`NonPrivateEvent` is stored with noise multiplier 0 (no noise), sample rate 1 and
    ``steps`` = its count; it composes to ε = ∞.
    """
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
    if isinstance(event, NonPrivateEvent):
        return {
            "kind": "nonprivate",
            "noise_multiplier": 0.0,
            "sample_rate": 1.0,
            "steps": int(event.count),
            "sensitivity": None,
        }
    raise TypeError(
        f"the ledger cannot account for a {type(event).__name__}; use DPSGDEvent, GaussianEvent or NonPrivateEvent"
    )


def _event_from_row(kind: str, sigma: float, q: float, steps: int, sensitivity: float | None) -> Event:
    if kind == "dpsgd":
        return DPSGDEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)
    if kind == "nonprivate":
        return NonPrivateEvent(count=steps)
    if kind == "gaussian":
        return GaussianEvent(noise_multiplier=sigma, count=steps,
                             sensitivity=1.0 if sensitivity is None else sensitivity)
    raise FedrecInputError(f"ledger row of unknown kind {kind!r}: this fedrec cannot account for it; upgrade fedrec")


def describe_event(event: Event) -> str:
    if isinstance(event, DPSGDEvent):
        return f"DP-SGD σ={event.noise_multiplier:.4g}, q={event.sample_rate:.4g}, {event.steps} step(s)"
    if isinstance(event, NonPrivateEvent):
        return f"non-private release (ε = ∞), {event.count} release(s)"
    return f"Gaussian σ={event.noise_multiplier:.4g} x sensitivity {event.sensitivity:.4g}, {event.count} release(s)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _genesis_hash(meta: dict[str, str]) -> str:
    """The chain's anchor: SHA-256 of the meta that identifies this ledger."""
    return hashlib.sha256(_canonical([
        "fedrec-ledger-genesis", meta.get("format"), meta.get("schema_version"), meta.get("ledger_id"),
        meta.get("institution"), meta.get("created_at"),
    ])).hexdigest()


def _norm(value: Any, typ: type) -> Any:
    return None if value is None else typ(value)


def _row_hash(ledger_id: str, table: str, fields: dict[str, Any], prev_hash: str) -> str:
    """SHA-256 over the canonical encoding of a row's immutable fields, its ledger and prev_hash."""
    payload = [
        "fedrec-ledger-row", SCHEMA_VERSION, ledger_id, table,
        [[name, _norm(fields[name], typ)] for name, typ in _FIELDS[table]],
        prev_hash,
    ]
    return hashlib.sha256(_canonical(payload)).hexdigest()


@dataclass(frozen=True)
class _ChainState:
    problems: list[str]
    count: int
    last_seq: int
    last_hash: str
    hashes: dict[int, str]


class PrivacyLedger:
    """One institution's existing ledger file (see the module doc for the privacy contracts).

    Every method opens its own short-lived connection, so a ledger object can be shared by
    threads and survives forks; each write is one transaction.
    """

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True):
        """Open an existing ledger; :class:`FedrecInputError` (one line) if it is missing,
        unreadable, not SQLite, incomplete or of another schema version. Never creates one.
        ``durable=False`` (simulations only): commits without fsync (see the module doc)."""
        self.path = Path(path)
        self._synchronous = "FULL" if durable else "OFF"
        if not self.path.exists():
            raise FedrecInputError(
                f"{self.path}: no privacy ledger here (file does not exist); "
                "the institution creates one with `fedrec-client init`"
            )
        if not self.path.is_file():
            raise FedrecInputError(f"{self.path}: not a privacy ledger (not a regular file)")
        if not os.access(self.path, os.R_OK):
            raise FedrecInputError(f"{self.path}: the privacy ledger cannot be read (permission denied)")
        self._check_format()
        self._ensure_wal()

    # ------------------------------------------------------------------ creating
    @classmethod
    def initialize(
        cls,
        path: str | os.PathLike[str],
        *,
        institution: str,
        epsilon_cap: float,
        delta_cap: float,
    ) -> PrivacyLedger:
        """Create a new ledger at ``path`` with its cap: the institution's explicit step.

        Atomic: the complete database (schema, meta with a fresh ``ledger_id``, the initial cap
        as chain row 1) is written to a temporary file in the same folder with a rollback
        journal and fsynced, then published with ``os.link`` (fails if ``path`` exists: then
        :class:`FedrecInputError` "already exists", the existing file untouched) and the
        temporary name removed; only then is the published file switched to WAL. A kill at
        any moment leaves no file at ``path`` or a complete ledger.
        """
        path = Path(path)
        _check_cap(epsilon_cap, delta_cap)
        if not isinstance(institution, str) or not institution.strip():
            raise FedrecInputError(f"{path}: a ledger needs a non-empty institution name, got {institution!r}")
        if path.exists() or path.is_symlink():
            raise FedrecInputError(
                f"{path}: a privacy ledger already exists here; open it instead (re-initialising would "
                "forget what was spent)"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FedrecInputError(f"{path.parent}: cannot create the ledger folder ({err.strerror})") from None
        tmp = path.parent / f".{path.name}.init-{uuid.uuid4().hex}.tmp"
        try:
            _build(tmp, institution=institution, epsilon_cap=float(epsilon_cap), delta_cap=float(delta_cap))
            _crash_point("built")
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FedrecInputError(
                    f"{path}: a privacy ledger already exists here (created concurrently); open it instead"
                ) from None
            except OSError as err:
                raise FedrecInputError(f"{path}: cannot publish the new ledger ({err.strerror})") from None
            _crash_point("linked")
            _fsync_dir(path.parent)
        finally:
            for p in (tmp, tmp.with_name(tmp.name + "-journal")):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        _crash_point("unlinked")
        _fsync_dir(path.parent)
        led = cls(path)  # checks the published file and switches it to WAL
        _crash_point("wal")
        return led

    # ------------------------------------------------------------------ opening
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            con.execute(f"PRAGMA synchronous={self._synchronous}")
            yield con
        finally:
            con.close()

    def _check_format(self) -> None:
        try:
            with self._connect() as con:
                names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in names else {}
        except sqlite3.Error as err:  # not SQLite, unreadable, locked for good
            raise FedrecInputError(f"{self.path}: not a usable fedrec privacy ledger ({err})") from None
        if "meta" not in names:
            raise FedrecInputError(
                f"{self.path}: not a fedrec privacy ledger (no tables: empty or an interrupted creation); "
                "move it aside and re-initialise with `fedrec-client init`"
            )
        if meta.get("format") != LEDGER_FORMAT:
            raise FedrecInputError(f"{self.path}: not a fedrec privacy ledger (no '{LEDGER_FORMAT}' marker)")
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            raise FedrecInputError(f"{self.path}: not a fedrec privacy ledger (bad schema_version)") from None
        if version > SCHEMA_VERSION:
            raise FedrecInputError(
                f"{self.path}: ledger schema {version} is newer than this fedrec ({SCHEMA_VERSION}); upgrade fedrec"
            )
        if version < SCHEMA_VERSION:
            raise FedrecInputError(
                f"{self.path}: ledger schema {version} has no hash chain (this fedrec needs {SCHEMA_VERSION}); "
                "keep the old file as the record of what was spent and re-initialise with `fedrec-client init`, "
                "with a cap reduced by that spend"
            )
        missing = [t for t in _TABLES if t not in names] + [
            k for k in ("ledger_id", "institution", "created_at") if not meta.get(k)
        ]
        if missing:
            raise FedrecInputError(
                f"{self.path}: incomplete fedrec privacy ledger (missing {', '.join(missing)}); "
                "restore it from a backup"
            )
        self.institution: str = meta["institution"]
        self.created_at: str = meta["created_at"]
        self.ledger_id: str = meta["ledger_id"]
        self._meta = meta

    def _ensure_wal(self) -> None:
        """WAL for a published ledger (a kill right after publication leaves the build's
        rollback-journal mode, which is complete and usable; this finishes the switch)."""
        try:
            with self._connect() as con:
                if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    con.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error:  # read-only medium or busy: the ledger still works in its mode
            pass

    # --------------------------------------------------------------- hash chain
    def _chain(self, con: sqlite3.Connection) -> _ChainState:
        problems: list[str] = []
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        for key in ("format", "schema_version", "ledger_id", "institution", "created_at"):
            if meta.get(key) != self._meta.get(key):
                problems.append(f"meta {key} changed since this ledger was opened")
        rows: list[tuple[int, str, dict[str, Any]]] = []
        for table in ("caps", "events"):
            cols = [n for n, _ in _FIELDS[table]] + ["prev_hash", "row_hash"]
            for r in con.execute(f"SELECT {', '.join(cols)} FROM {table}"):  # noqa: S608 - fixed names
                rec = dict(zip(cols, r))
                rows.append((int(rec["seq"]) if rec["seq"] is not None else 0, table, rec))
        rows.sort(key=lambda t: (t[0], t[1]))
        ledger_id = meta.get("ledger_id", "")
        expected_prev = _genesis_hash(meta)
        expected_seq = 1
        hashes: dict[int, str] = {}
        last_seq = 0
        for seq, table, rec in rows:
            label = f"{table} row {rec['id']} (chain position {seq})"
            linked_gap = False
            if seq < expected_seq:
                problems.append(f"{label}: duplicate chain position (a row was inserted or copied in)")
            elif seq > expected_seq:
                lost = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
                problems.append(f"{label}: chain position(s) {lost} before it are missing (row(s) deleted)")
                linked_gap = True
            try:
                recomputed = _row_hash(ledger_id, table, rec, str(rec["prev_hash"]))
            except (TypeError, ValueError):
                recomputed = ""
            if recomputed != rec["row_hash"]:
                problems.append(f"{label}: its contents do not match its hash (edited, or copied from another ledger)")
            if rec["prev_hash"] != expected_prev and not linked_gap and seq >= expected_seq:
                if seq == 1:
                    problems.append(
                        f"{label}: does not start from this ledger's genesis (meta edited, or a chain from "
                        "another ledger)"
                    )
                else:
                    problems.append(
                        f"{label}: does not link to the row before it (inserted, copied from another ledger, "
                        "or the row before it was edited)"
                    )
            if table == "events" and rec["institution"] != meta.get("institution"):
                problems.append(f"{label}: belongs to institution {rec['institution']!r}, not "
                                f"{meta.get('institution')!r} (a foreign row)")
            expected_prev = str(rec["row_hash"])
            expected_seq = max(expected_seq, seq + 1)
            hashes[seq] = str(rec["row_hash"])
            last_seq = max(last_seq, seq)
        if not rows:
            problems.append("the ledger has no rows (its initial cap row was removed)")
        for table in ("caps", "events"):  # ids are assigned 1, 2, 3, ...: a gap is a deleted row
            ids = sorted(int(rec["id"]) for _, t, rec in rows if t == table)
            present = set(ids)
            for i in range(1, (ids[-1] if ids else 0) + 1):
                if i not in present:
                    problems.append(f"{table} row {i} is missing (deleted)")
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        for trig in _TRIGGERS:
            if trig not in names:
                problems.append(f"append-only trigger {trig} is missing (the ledger was opened for editing)")
        return _ChainState(problems, len(rows), last_seq, expected_prev, hashes)

    def _snapshot_chain(self) -> _ChainState:
        """The chain read in one read transaction (one consistent snapshot: a charge committed
        between reading caps and events cannot look like a gap)."""
        with self._connect() as con:
            con.execute("BEGIN")
            try:
                return self._chain(con)
            finally:
                con.execute("COMMIT")

    def verify_chain(self) -> list[str]:
        """Every problem of the hash chain, each naming the row (table, id, chain position):
        deleted rows, edited rows, foreign rows, a broken genesis, missing triggers. Empty
        when the chain is intact. Cutting the newest rows off is only visible against a
        recorded :meth:`head`."""
        return self._snapshot_chain().problems

    def head(self) -> tuple[int, str]:
        """``(rows in the chain, hash of the last row)``: record it with a run so that an auditor
        can detect a swapped, rebuilt or rolled-back ledger (:meth:`hash_at`)."""
        st = self._snapshot_chain()
        return st.count, st.last_hash

    def extends(self, head: tuple[int, str] | None) -> tuple[bool, tuple[int, str]]:
        """``(does the ledger still extend head, the current head)`` from one snapshot; ``head``
        None (nothing recorded yet) is always extended."""
        st = self._snapshot_chain()
        ok = head is None or st.hashes.get(int(head[0])) == str(head[1])
        return ok, (st.count, st.last_hash)

    def hash_at(self, position: int) -> str | None:
        """The row hash at chain position ``position`` (1-based), or None if there is none.
        A ledger extends a recorded head ``(n, h)`` iff ``hash_at(n) == h``."""
        return self._snapshot_chain().hashes.get(int(position))

    def _checked_tip(self, con: sqlite3.Connection, doing: str) -> tuple[int, str]:
        st = self._chain(con)
        if st.problems:
            raise FedrecInputError(
                f"institution {self.institution!r}: refused {doing}: the ledger's hash chain is broken "
                f"({st.problems[0]}{'; ' + str(len(st.problems) - 1) + ' more' if len(st.problems) > 1 else ''}); "
                f"nothing was computed; restore {self.path} from a backup or re-initialise it"
            )
        return st.last_seq, st.last_hash

    # --------------------------------------------------------------------- cap
    def cap(self) -> Cap | None:
        with self._connect() as con:
            row = con.execute("SELECT epsilon, delta, set_at FROM caps ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else Cap(float(row[0]), float(row[1]), str(row[2]))

    def cap_history(self) -> list[Cap]:
        with self._connect() as con:
            rows = con.execute("SELECT epsilon, delta, set_at FROM caps ORDER BY seq").fetchall()
        return [Cap(float(e), float(d), str(t)) for e, d, t in rows]

    def set_cap(self, *, epsilon: float, delta: float, note: str = "") -> Cap:
        """Append a new cap (the institution's decision; the history is kept). Refused
        (:class:`FedrecInputError`) on a broken hash chain."""
        _check_cap(epsilon, delta)
        con = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            con.execute(f"PRAGMA synchronous={self._synchronous}")
            con.execute("BEGIN IMMEDIATE")
            last_seq, last_hash = self._checked_tip(con, "a new cap")
            _insert_cap(con, ledger_id=self.ledger_id, seq=last_seq + 1, prev_hash=last_hash,
                        epsilon=float(epsilon), delta=float(delta), note=str(note))
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
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
        allow_non_private: bool = False,
        cap: tuple[float, float] | None = None,
        run_ceiling: float | None = None,
    ) -> int:
        """Verify the chain, check the cap and write the event as ``charged``, in one committed
        transaction. Returns the row id.

        ``cap`` ``(ε, δ)``: a stricter cap from elsewhere (the institution's policy), applied with
        the ledger's own (the smaller of each); ``run_ceiling``: the largest ε this run's rows
        (``run_id``) with the new event may compose to (the policy's max-run-epsilon). Both are
        checked inside the write transaction, so two charges racing on one ledger cannot both
        pass them (a check before the transaction can be passed by both).

        Raises (one line, nothing written) :class:`FedrecInputError` if the hash chain is broken,
        and :class:`BudgetExceeded` if composing every recorded event with this one would exceed the cap at the cap's δ, or
        for a :class:`NonPrivateEvent` unless ``allow_non_private`` (the institution's policy
        explicitly allows non-private simulation runs); an allowed non-private event skips the
        cap check and is recorded, so everything after it reports ε = ∞.
        """
        cols = event_to_columns(event)
        what = f"{task}/{model} run {run_id} round {round}"
        if isinstance(event, NonPrivateEvent) and not allow_non_private:
            raise BudgetExceeded(
                f"institution {self.institution!r}: refused {what}: it asks for a non-private release "
                "(ε = ∞), which only an institution policy allowing non-private simulation runs permits; "
                "nothing was computed"
            )
        con = sqlite3.connect(self.path, isolation_level=None, timeout=60.0)
        try:
            con.execute(f"PRAGMA synchronous={self._synchronous}")
            con.execute("BEGIN IMMEDIATE")  # write lock held from the check to the commit
            last_seq, last_hash = self._checked_tip(con, what)
            if not isinstance(event, NonPrivateEvent):
                cap_row = con.execute("SELECT epsilon, delta FROM caps ORDER BY seq DESC LIMIT 1").fetchone()
                if cap_row is None:
                    raise BudgetExceeded(
                        f"institution {self.institution!r}: the ledger {self.path} has no privacy cap; "
                        "set one before releasing anything"
                    )
                eps_cap, delta_cap = float(cap_row[0]), float(cap_row[1])
                if cap is not None:
                    eps_cap, delta_cap = min(eps_cap, float(cap[0])), min(delta_cap, float(cap[1]))
                history = [_event_from_row(*r) for r in con.execute(
                    "SELECT kind, noise_multiplier, sample_rate, steps, sensitivity FROM events ORDER BY seq"
                )]
                # spent ε before this charge is needed only to explain a refusal (one composition
                # less per charge); a recorded non-private release makes it ∞ whatever follows
                if any(isinstance(e, NonPrivateEvent) for e in history):
                    raise BudgetExceeded(
                        f"institution {self.institution!r}: refused {what} ({describe_event(event)}): the "
                        f"ledger records a non-private release, so spent ε is already ∞ (cap ε={eps_cap:g}); "
                        f"nothing was computed (ledger {self.path})"
                    )
                after = epsilon_for(history + [event], delta=delta_cap, accountant=accountant)
                if not (after <= eps_cap):
                    before = epsilon_for(history, delta=delta_cap, accountant=accountant)
                    raise BudgetExceeded(
                        f"institution {self.institution!r}: refused {what} "
                        f"({describe_event(event)}): it would raise spent ε from {before:.3f} to {after:.3f} "
                        f"at δ={delta_cap:g}, above the cap ε={eps_cap:g}; nothing was computed "
                        f"(remaining ε {max(0.0, eps_cap - before):.3f}; ledger {self.path})"
                    )
                if run_ceiling is not None:
                    run = [_event_from_row(*r) for r in con.execute(
                        "SELECT kind, noise_multiplier, sample_rate, steps, sensitivity FROM events"
                        " WHERE run_id = ? ORDER BY seq", (str(run_id),))]
                    run_eps = epsilon_for(run + [event], delta=delta_cap, accountant=accountant)
                    if not (run_eps <= float(run_ceiling) * (1 + 1e-9)):
                        raise RunCeilingExceeded(
                            f"institution {self.institution!r}: refused {what} ({describe_event(event)}): "
                            f"run {run_id} would spend ε = {run_eps:.3f}, above max-run-epsilon = "
                            f"{float(run_ceiling):g}; nothing was computed"
                        )
            row_id = int(con.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM events").fetchone()[0])
            fields: dict[str, Any] = {
                "id": row_id,
                "seq": last_seq + 1,
                "institution": self.institution,
                **cols,
                "run_id": str(run_id),
                "round": int(round),
                "task": str(task),
                "model": str(model),
                "charged_at": _now(),
                "pid": os.getpid(),
            }
            fields = {name: _norm(fields[name], typ) for name, typ in _EVENT_FIELDS}
            row_hash = _row_hash(self.ledger_id, "events", fields, last_hash)
            con.execute(
                "INSERT INTO events (id, seq, institution, kind, noise_multiplier, sample_rate, steps, sensitivity,"
                " run_id, round, task, model, status, charged_at, pid, prev_hash, row_hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'charged', ?, ?, ?, ?)",
                (
                    fields["id"], fields["seq"], fields["institution"], fields["kind"],
                    fields["noise_multiplier"], fields["sample_rate"], fields["steps"], fields["sensitivity"],
                    fields["run_id"], fields["round"], fields["task"], fields["model"], fields["charged_at"],
                    fields["pid"], last_hash, row_hash,
                ),
            )
            con.execute("COMMIT")
            return row_id
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    def mark_released(self, event_id: int) -> None:
        """``charged`` -> ``released`` (idempotent; not hashed, so the chain stays intact);
        unknown ids are an error."""
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
        """Event rows in chain order (optionally of one run / one status)."""
        sql = (
            "SELECT id, institution, kind, noise_multiplier, sample_rate, steps, sensitivity, run_id, round,"
            " task, model, status, charged_at, released_at, seq FROM events"
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
        sql += " ORDER BY seq"
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
                seq=int(r[14]),
            )
            for r in out
        ]

    def events(self, *, run_id: str | None = None) -> list[Event]:
        """Every recorded event (charged or released: both count as spent)."""
        return [r.event for r in self.rows(run_id=run_id)]

    def spent(self, *, delta: float | None = None, accountant: str = "prv") -> float:
        """ε(δ) of everything this institution ever charged (δ defaults to the cap's δ);
        ∞ once a non-private release is recorded."""
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


# ====================================================================== helpers
def _crash_point(step: str) -> None:
    """Test hook: a test replaces it to kill the process at a named step of ``initialize``."""


def _insert_cap(con: sqlite3.Connection, *, ledger_id: str, seq: int, prev_hash: str,
                epsilon: float, delta: float, note: str) -> None:
    cap_id = int(con.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM caps").fetchone()[0])
    fields = {"id": cap_id, "seq": seq, "epsilon": epsilon, "delta": delta, "set_at": _now(), "note": note}
    fields = {name: _norm(fields[name], typ) for name, typ in _CAP_FIELDS}
    con.execute(
        "INSERT INTO caps (id, seq, epsilon, delta, set_at, note, prev_hash, row_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (cap_id, seq, fields["epsilon"], fields["delta"], fields["set_at"], fields["note"], prev_hash,
         _row_hash(ledger_id, "caps", fields, prev_hash)),
    )


def _build(tmp: Path, *, institution: str, epsilon_cap: float, delta_cap: float) -> None:
    """The complete ledger in ``tmp`` (rollback journal, one transaction, fsynced)."""
    meta = {
        "format": LEDGER_FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "ledger_id": str(uuid.uuid4()),
        "institution": institution,
        "created_at": _now(),
    }
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=DELETE")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("BEGIN IMMEDIATE")
            for stmt in _split_sql(_SCHEMA):
                con.execute(stmt)
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            _insert_cap(con, ledger_id=meta["ledger_id"], seq=1, prev_hash=_genesis_hash(meta),
                        epsilon=epsilon_cap, delta=delta_cap, note="initial")
            con.execute("COMMIT")
        finally:
            con.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (sqlite3.Error, OSError) as err:
        raise FedrecInputError(f"{tmp.parent}: cannot write a new privacy ledger there ({err})") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_cap(epsilon: float, delta: float) -> None:
    try:
        eps, dlt = float(epsilon), float(delta)
    except (TypeError, ValueError):
        raise FedrecInputError(f"privacy cap (ε, δ) must be numbers, got ({epsilon!r}, {delta!r})") from None
    if not (eps > 0 and math.isfinite(eps)):
        raise FedrecInputError(f"privacy cap ε must be a positive finite number, got {epsilon!r}")
    if not (0 < dlt < 1):
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
