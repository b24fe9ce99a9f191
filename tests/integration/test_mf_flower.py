"""Federated MF on the real Flower simulation engine, end to end (no mocks of Flower/Opacus)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pandas as pd
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.client import app as client_app
from fedrec.client.train import plan_dp
from fedrec.common.config import RunConfig
from fedrec.common.models.item_prior import catalogue_features
from fedrec.common.privacy.accountant import epsilon_for
from fedrec.common.ratings import load_institution_ratings
from fedrec.server.aggregation import numpy_to_arrays
from fedrec.simulations.movielens import movielens_split, write_movielens_federation
from fedrec.simulations.run import run_simulation

pytestmark = pytest.mark.slow

CFG = RunConfig().override(**{"institutions": 3, "rounds": 2, "privacy.epsilon": 8.0, "seed": 3})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    history = run_simulation(CFG, out, quiet=True)
    return out, history


def test_simulation_completes_and_beats_global_mean(run):
    out, history = run
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert (out / "metrics.png").stat().st_size > 0 and (out / "config.json").exists()
    split = movielens_split(institutions=3, skew=CFG.data.partition_skew, test_fraction=0.2, seed=3)
    r = split.ratings
    global_mean = r.rating[~split.test].mean()
    rmse_global_mean = float(np.sqrt(((r.rating[split.test] - global_mean) ** 2).mean()))
    final = history["rounds"][-1]
    for key in ("rmse", "mae", "ndcg10", "hr10", "epsilon"):
        assert key in final
    assert final["rmse"] < rmse_global_mean - 0.05, (final["rmse"], rmse_global_mean)
    assert all(r["contributors"] == 3 for r in history["rounds"])


def test_reported_epsilon_is_the_whole_run_composed_from_the_ledger(run):
    out, history = run
    sched = plan_dp(CFG)  # σ is a function of the public run config only
    expected = epsilon_for(sched.run_events(), delta=CFG.privacy.delta, accountant="prv")
    final_eps = history["rounds"][-1]["epsilon"]
    assert len(final_eps) == 3
    for eps in final_eps.values():
        assert eps == pytest.approx(expected, rel=1e-6)
        assert eps <= CFG.privacy.epsilon + 1e-9
    # ε grows round by round: no per-round reset
    first = history["rounds"][0]["epsilon"]
    assert all(first[k] < final_eps[k] for k in final_eps)
    ledgers = sorted((out / "ledgers").glob("*.db"))
    assert len(ledgers) == 3
    for db in ledgers:
        with sqlite3.connect(db) as con:
            tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
            events = next(t for t in tables if "event" in t)
            rows = con.execute(f"select status from {events}").fetchall()
        assert len(rows) == CFG.train.rounds + 1  # counts + one per round
        assert {s for (s,) in rows} == {"released"}


def test_no_user_side_parameter_leaves_the_institution(tmp_path, monkeypatch):
    """Inspect what the train and count handlers hand to secure aggregation."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)
    folder = write_movielens_federation(tmp_path / "data", institutions=3, skew=0.5, test_fraction=0.2, seed=0)[1]
    inst = load_institution_ratings(folder)
    cfg = CFG.override(**{"results-dir": str(tmp_path), "mf.dim": 2})
    from typer.testing import CliRunner

    from fedrec.client.cli import app as client_cli

    assert CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "10"]).exit_code == 0
    ctx = Context(run_id=1, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config=cfg.to_flat())
    n_items = inst.n_items
    arrays = numpy_to_arrays({"item_bias": np.zeros(n_items, np.float32),
                              "item_factors": np.full((n_items, 2), 0.1, np.float32)})
    precond = numpy_to_arrays({"precond": np.ones(n_items, np.float32)})
    msg = Message(RecordDict({"arrays": arrays, "precond": precond, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    reply = client_app.train(msg, ctx)
    counts = client_app.counts(Message(RecordDict({"config": ConfigRecord({"server-round": 0})}),
                                       dst_node_id=7, message_type="query.counts"), ctx)
    user_shapes = {(inst.n_persons,), (inst.n_persons, 2)}
    assert set(reply.content.array_records["arrays"]) == {"item_bias", "item_factors"}
    for r in (reply, counts):
        assert set(r.content.array_records) == {"arrays"} and not r.content.config_records
        for name, arr in r.content.array_records["arrays"].items():
            values = arr.numpy()
            assert name in ("item_bias", "item_factors", "counts")
            assert values.shape in {(n_items,), (n_items, 2)} and values.shape not in user_shapes
        # public accounting facts only: nothing data-dependent (no clipped fraction, no count)
        assert set(r.content.metric_records["metrics"]) <= {
            "epsilon", "epsilon-rdp", "delta", "noise-var", "count-noise-var"}
    # the catalogue reply carries the public item table's features and nothing about persons
    cat = client_app.catalogue(Message(RecordDict(), dst_node_id=7, message_type="query.catalogue"), ctx)
    assert set(cat.content.array_records) == {"public"}
    features = cat.content.array_records["public"]["item-features"].numpy()
    items = pd.read_parquet(folder / "items.parquet")
    np.testing.assert_array_equal(features, catalogue_features(items))
    assert features.shape[0] == n_items and features.shape[1] > 10  # genres and year


def _write_bad(folder: Path, content: str) -> None:
    good = write_movielens_federation(folder.parent / "good", institutions=1, skew=0, test_fraction=0.2, seed=0)[0]
    folder.mkdir(parents=True)
    for f in good.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "ratings_train.parquet").unlink()
    (folder / "ratings_train.csv").write_text(content)


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("person_id,item_id\n1,31\n", "missing column 'rating'"),
        ("person_id,item_id,rating\n1,31,2.5\n1,1029,good\n", "row 3, column rating"),
        ("person_id,item_id,rating\n1,31,2.5\n1,99999999,3\n", "row 3, column item_id: unknown id 99999999"),
    ],
)
def test_bad_ratings_file_gives_one_line_error_and_nonzero_exit(tmp_path, content, expect):
    _write_bad(tmp_path / "data" / "institution_00", content)
    proc = subprocess.run(
        [sys.executable, "-m", "fedrec.simulations.cli", "run", "--data", str(tmp_path / "data"),
         "--institutions", "1", "--rounds", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "ratings_train.csv" in lines[0] and expect in lines[0] and "fix:" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_deployed_institution_refuses_non_dp_metrics_unless_it_opts_in(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    folder = write_movielens_federation(tmp_path / "data", institutions=3, skew=0.5, test_fraction=0.2, seed=0)[0]
    n_items = load_institution_ratings(folder).n_items
    content = RecordDict({"arrays": numpy_to_arrays({"item_bias": np.zeros(n_items, np.float32)}),
                          "config": ConfigRecord({"server-round": 1})})
    node = {"data-dir": str(folder)}
    for node_config, refused in ((node, True), ({**node, "metrics-release": "simulation"}, False)):
        ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=CFG.to_flat())
        reply = client_app.evaluate(Message(content, dst_node_id=7, message_type="evaluate"), ctx)
        assert ("refusal" in reply.content.config_records) is refused
        if not refused:
            assert reply.content.metric_records["metrics"]["n_ratings"] > 0
