"""The MF handlers' per-process caches are never stale (issue 33: 1,000 institutions per round).

* ``client/train.py``'s :func:`plan_dp` memoises the σ calibration on the public fields it reads:
  changing any one of them gives the plan a fresh calibration gives, never the cached one.
* ``client/app.py``'s institution cache is keyed on the folder's files and the run config: a
  rewritten data file, an added file or a changed config reloads what every handler uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from fedrec.client import app as client_app
from fedrec.client import train as client_train
from fedrec.common.config import RunConfig
from fedrec.common.ratings import TRAIN_FILE, load_institution_ratings
from fedrec.simulations.movielens import write_movielens_federation

BASE = RunConfig().override(**{"institutions": 3, "rounds": 2, "privacy.epsilon": 1.0, "sample-rate": 0.5})

#: every public field plan_dp reads, with a second value (the memo key must hold each one)
FIELDS = {
    "privacy.epsilon": 2.0,
    "privacy.delta": 1e-6,
    "privacy.accountant": "rdp",
    "sample-rate": 0.25,
    "rounds": 3,
    "local-steps": 2,
    "privacy.count-budget-share": 0.3,
    "privacy.clip-norm": 0.5,
}


@pytest.fixture(autouse=True)
def fast_calibration(monkeypatch):
    """The accountant's calibration (seconds each) replaced by a cheap stand-in that depends on
    every argument it gets, so that the memo's key, not the accountant, is what is tested (the
    real calibration's ε is tested in test_mf_privacy.py, through the same memo). The memo is
    emptied before and after, so no stand-in value outlives this module."""

    def by_noise(*, target_epsilon, delta, sample_rate, steps, accountant):
        return 1.0 + abs(hash((target_epsilon, delta, sample_rate, steps, accountant))) % 10_000 / 1e3

    def by_events(events, *, target_epsilon, delta, accountant):
        return 1.0 + abs(hash((repr(events(1.0)), target_epsilon, delta, accountant))) % 10_000 / 1e3

    client_train._calibrated_schedule.cache_clear()
    client_app._load.cache_clear()
    monkeypatch.setattr(client_train, "calibrate_noise_multiplier", by_noise)
    monkeypatch.setattr(client_train, "calibrate_for_events", by_events)
    yield
    client_train._calibrated_schedule.cache_clear()
    client_app._load.cache_clear()


def _fresh(cfg: RunConfig) -> client_train.DPSchedule:
    """The plan without the memo (the calibration itself, run anew)."""
    t, p = cfg.train, cfg.privacy
    return client_train._calibrated_schedule.__wrapped__(
        epsilon=p.epsilon, delta=p.delta, accountant=p.accountant, sample_rate=t.sample_rate, rounds=t.rounds,
        local_steps=t.local_steps, count_budget_share=p.count_budget_share, clip_norm=p.clip_norm)


@pytest.mark.parametrize("base_rate", [1.0, 0.5])  # both calibration paths (full batch, subsampled)
def test_a_changed_public_field_is_never_served_the_cached_plan(base_rate):
    base_cfg = BASE.override(**{"sample-rate": base_rate})
    base = client_train.plan_dp(base_cfg)
    assert base == _fresh(base_cfg)
    for field, value in FIELDS.items():
        changed_cfg = base_cfg.override(**{field: value})
        changed = client_train.plan_dp(changed_cfg)
        assert changed == _fresh(changed_cfg), field
        assert changed != base, f"{field} does not change the plan: the test would not see a stale one"
        assert client_train.plan_dp(base_cfg) == base  # and the first plan is still served for its config


def test_the_plan_is_calibrated_once_per_config(monkeypatch):
    cfg = BASE.override(**{"privacy.epsilon": 3.25})
    calls = []
    stand_in = client_train.calibrate_for_events

    def counting(*a, **k):
        calls.append(1)
        return stand_in(*a, **k)

    monkeypatch.setattr(client_train, "calibrate_for_events", counting)
    first = [client_train.plan_dp(cfg) for _ in range(5)]
    assert len(calls) == 1 and all(s is first[0] for s in first)


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_movielens_federation(tmp_path / "ml", institutions=3, skew=0.5, test_fraction=0.2, seed=0)[0]


def _ctx(folder: Path, cfg: RunConfig = BASE) -> Context:
    return Context(run_id=1, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                   run_config=cfg.to_flat())


def test_a_rewritten_data_file_is_reloaded(folder):
    _, before = client_app._institution(_ctx(folder))
    assert client_app._institution(_ctx(folder))[1] is before  # cached while nothing changes
    train = pd.read_parquet(folder / TRAIN_FILE)
    train["rating"] = 1.0  # every training rating changes: what DP-SGD trains on
    stat = (folder / TRAIN_FILE).stat()
    train.to_parquet(folder / TRAIN_FILE, index=False)
    os.utime(folder / TRAIN_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even 1 ns later
    _, after = client_app._institution(_ctx(folder))
    assert after is not before
    assert np.all(after.data.train_rating == 1.0) and not np.all(before.data.train_rating == 1.0)
    np.testing.assert_array_equal(after.ratings.rating.numpy(), np.ones(len(train), np.float32))
    assert after.data.n_persons == load_institution_ratings(folder).n_persons


def test_a_file_added_or_a_config_changed_is_a_new_entry(folder):
    _, first = client_app._institution(_ctx(folder))
    (folder / "ratings_extra.csv").write_text("person_id,item_id,rating\n")  # a table the loaders may read
    _, second = client_app._institution(_ctx(folder))
    assert second is not first
    cfg = BASE.override(**{"privacy.epsilon": 0.5})
    _, third = client_app._institution(_ctx(folder, cfg))
    assert third.schedule == client_train.plan_dp(cfg) != second.schedule


def test_the_nodes_own_files_do_not_reload_the_data(folder):
    """The ledger (written by every release), its WAL and the policy live in a deployed node's
    folder too: they are not data, and must not make every message a new cache entry (each one
    a copy of the institution's data)."""
    _, first = client_app._institution(_ctx(folder))
    for name in ("privacy-ledger.db", "privacy-ledger.db-wal", "privacy-ledger.db-shm", "privacy.toml"):
        (folder / name).write_bytes(b"written by the node")
    assert client_app._institution(_ctx(folder))[1] is first
