"""Reproducible simulations, random deployments (issue 33).

``sim.noise-seed`` fixes every release's DP noise — but only on a node Flower's simulation
engine started (``partition-id`` in its node config). A node set up like a deployment (its own
data folder and privacy.toml) ignores the knob and draws its noise from the OS CSPRNG: a
coordinator who could fix an institution's noise could subtract it.

The handlers are the real ClientApp handlers over real ledgers; the two-Flower-run check is in
tests/integration/test_sweep.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from fedrec.client import app as client_app
from fedrec.client import causal_app
from fedrec.client.cli import app as client_cli
from fedrec.common.config import RunConfig, derive_seed
from fedrec.common.ratings import load_institution_ratings
from fedrec.server.aggregation import numpy_to_arrays
from fedrec.simulations.movielens import write_movielens_federation
from fedrec.simulations.provision import provision_institutions

BASE = RunConfig().override(**{"institutions": 3, "rounds": 2, "privacy.epsilon": 1.0, "seed": 3})


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ml")
    write_movielens_federation(root, institutions=3, skew=0.5, test_fraction=0.2, seed=0)
    return root


def sim_ctx(root: Path, policies: Path, **overrides) -> Context:
    """A node as Flower's simulation engine starts it (partition-id), institution 0."""
    flat = {**BASE.to_flat(), "data-dir": str(root), "sim.policy-dir": str(policies), **overrides}
    return Context(run_id=31, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config=flat)


def deployed_ctx(folder: Path, **overrides) -> Context:
    """A node set up like a deployment: its own data folder, no simulation ids."""
    return Context(run_id=32, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                   run_config={**BASE.to_flat(), **overrides})


def train_msg(folder: Path, server_round: int = 1) -> Message:
    n_items = load_institution_ratings(folder).n_items
    content = RecordDict({"arrays": numpy_to_arrays({"item_bias": np.zeros(n_items, np.float32)}),
                          "precond": numpy_to_arrays({"precond": np.full(n_items, 0.1, np.float32)}),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=7, message_type="train")


def counts_msg() -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=7, message_type="query.counts")


def delta(reply: Message) -> np.ndarray:
    assert "refusal" not in reply.content.config_records, dict(reply.content.config_records["refusal"])
    return reply.content.array_records["arrays"]["item_bias"].numpy().astype(np.float64)


def counts(reply: Message) -> np.ndarray:
    assert "refusal" not in reply.content.config_records, dict(reply.content.config_records["refusal"])
    return reply.content.array_records["arrays"]["counts"].numpy().astype(np.float64)


def test_derived_seeds_are_stable_and_distinct_per_release():
    assert derive_seed(0, "institution_00", "train", 1) == derive_seed(0, "institution_00", "train", 1)
    seeds = {derive_seed(b, inst, task, r) for b in (0, 1) for inst in ("institution_00", "institution_01")
             for task in ("train", "item-counts") for r in (1, 2)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)


def test_noise_seed_knob_is_validated():
    assert RunConfig().sim.noise_seed == -1  # default: fresh noise from the OS
    with pytest.raises(ValueError, match="sim.noise-seed"):
        RunConfig().override(**{"sim.noise-seed": -2})


def test_a_simulated_node_repeats_its_noise_under_the_same_seed(federation, tmp_path):
    policies = provision_institutions(["institution_00"], tmp_path / "run", epsilon=50.0, delta=1e-5)
    folder = federation / "institution_00"
    same = sim_ctx(federation, policies, **{"sim.noise-seed": 5})
    other = sim_ctx(federation, policies, **{"sim.noise-seed": 6})
    # item counts and two train releases: identical under one seed, different under another
    c1, c2 = counts(client_app.counts(counts_msg(), same)), counts(client_app.counts(counts_msg(), same))
    np.testing.assert_array_equal(c1, c2)
    assert not np.array_equal(c1, counts(client_app.counts(counts_msg(), other)))
    a, b = delta(client_app.train(train_msg(folder), same)), delta(client_app.train(train_msg(folder), same))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, delta(client_app.train(train_msg(folder), other)))
    # each round draws its own noise (seed derived per round, not one stream reused)
    assert not np.array_equal(a, delta(client_app.train(train_msg(folder, server_round=2), same)))
    # without the knob, a simulation draws fresh noise every time (benchmarks average such draws)
    fresh = sim_ctx(federation, policies)
    assert not np.array_equal(delta(client_app.train(train_msg(folder), fresh)),
                              delta(client_app.train(train_msg(folder), fresh)))


def test_a_deployed_node_ignores_the_noise_seed(federation, tmp_path, caplog):
    folder = tmp_path / "institution_00"
    folder.mkdir()
    for f in (federation / "institution_00").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    res = CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "50", "--max-run-epsilon", "2"])
    assert res.exit_code == 0, res.output
    ctx = deployed_ctx(folder, **{"sim.noise-seed": 5})
    assert client_app.simulation_seed(ctx, RunConfig.from_flower(ctx.run_config), "x") is None
    c1, c2 = counts(client_app.counts(counts_msg(), ctx)), counts(client_app.counts(counts_msg(), ctx))
    assert not np.array_equal(c1, c2)
    a, b = delta(client_app.train(train_msg(folder), ctx)), delta(client_app.train(train_msg(folder), ctx))
    assert not np.array_equal(a, b)
    assert "ignored sim.noise-seed" in caplog.text


@pytest.fixture(scope="module")
def causal_federation(simulated_institution) -> Path:
    """The data-dir of a one-institution health federation (its one folder inside)."""
    return simulated_institution("health", people=400, seed=2).parent


def causal_reply(root: Path, ctx: Context) -> np.ndarray:
    conf = ConfigRecord({"server-round": 1, "step": "propensity:1", "items": json.dumps(["walking_group"]),
                         "noise-multiplier": 20.0})
    msg = Message(RecordDict({"config": conf, "arrays": numpy_to_arrays({"beta/walking_group": np.zeros(11)})}),
                  dst_node_id=7, message_type="query.causal_propensity")
    reply = causal_app.causal_propensity(msg, ctx)
    assert "refusal" not in reply.content.config_records, dict(reply.content.config_records["refusal"])
    return np.concatenate([a.numpy().ravel() for a in reply.content.array_records["arrays"].values()])


def test_causal_releases_follow_the_same_rule(causal_federation, tmp_path):
    from fedrec.common.causal.config import CausalConfig

    name = next(p.name for p in causal_federation.iterdir() if p.is_dir())
    policies = provision_institutions([name], tmp_path / "run", epsilon=50.0, delta=1e-5)
    causal = CausalConfig(items=("walking_group",), epsilon=1.0).to_flat()

    def ctx(node_config: dict, seed: int) -> Context:
        flat = {**BASE.to_flat(), **causal, "data-dir": str(causal_federation), "sim.policy-dir": str(policies),
                "sim.noise-seed": seed}
        return Context(run_id=33, node_id=7, node_config=node_config, state=RecordDict(), run_config=flat)

    sim = {"partition-id": 0, "num-partitions": 1}
    np.testing.assert_array_equal(causal_reply(causal_federation, ctx(sim, 5)), causal_reply(causal_federation, ctx(sim, 5)))
    assert not np.array_equal(causal_reply(causal_federation, ctx(sim, 5)), causal_reply(causal_federation, ctx(sim, 6)))
    # deployed-like: the same institution folder with a policy of its own, the knob ignored
    folder = causal_federation / name
    res = CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "50", "--max-run-epsilon", "2"])
    assert res.exit_code == 0, res.output
    dep = {"data-dir": str(folder)}
    assert not np.array_equal(causal_reply(causal_federation, ctx(dep, 5)), causal_reply(causal_federation, ctx(dep, 5)))


@pytest.mark.parametrize("seed", [0, 11])
def test_the_causal_simulation_passes_its_seed_to_the_noise(tmp_path, monkeypatch, seed):
    """`fedrec-sim causal --seed S` (and the demo's causal step) hands S to the simulated nodes as
    ``sim.noise-seed``: without it every causal run drew fresh OS noise and the demo's ATEs
    changed between two runs of the same command (measured: diet counselling -2.68 vs -1.94)."""
    from fedrec.common.causal.config import CausalConfig
    from fedrec.simulations import causal_cli, run

    seen: dict = {}

    def fake_launch(overrides, work, **kw):
        seen.update(overrides)
        (tmp_path / "out" / "causal_raw.json").write_text("{}")

    monkeypatch.setattr(run, "launch_flower", fake_launch)
    (tmp_path / "out").mkdir()
    causal_cli._run_flower(tmp_path, CausalConfig(epsilon=1.0), 3, tmp_path / "out", seed=seed, plain=True,
                           policy_dir=tmp_path / "policies")
    assert seen["sim.noise-seed"] == seed and seen["seed"] == seed
