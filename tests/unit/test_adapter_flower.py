"""The LoRA adapter through the real ClientApp handlers of a node set up like a deployment: the
round is charged to the institution's ledger as model `adapter`, only LoRA + head deltas leave,
and they carry exactly the charged noise (real PEFT LoRA on the packaged MiniLM weights)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from fedrec.client import app as client_app
from fedrec.client.cli import app as client_cli
from fedrec.common.config import RunConfig
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import load_policy
from fedrec.server.aggregation import numpy_to_arrays
from fedrec.server.app import initial_adapter_arrays

CFG = RunConfig().override(**{"institutions": 3, "rounds": 2, "privacy.epsilon": 4.0, "model": "adapter", "lr": 2.0})


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A small ratings institution: 24 catalogue items with titles and genres, 30 persons."""
    from titled_institution import write_titled_institution

    rng = np.random.default_rng(0)
    rows = []
    for person in range(1, 31):
        taste = person % 6
        liked = [i for i in range(1, 25) if (i - 1) % 6 == taste]
        for item in rng.choice(liked, size=3, replace=False):
            rows.append((person, int(item), 4.5))
    root = write_titled_institution(tmp_path_factory.mktemp("adapter") / "institution_00", rows)
    res = CliRunner().invoke(client_cli, ["init", str(root), "--epsilon-cap", "8"])
    assert res.exit_code == 0, res.output
    return root


def train_msg(arrays: dict[str, np.ndarray], server_round: int = 1) -> Message:
    return Message(RecordDict({"arrays": numpy_to_arrays(arrays), "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=7, message_type="train")


def test_adapter_round_is_charged_and_releases_only_lora_and_head_with_the_charged_noise(folder):
    ctx = Context(run_id=5, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config=CFG.to_flat())
    start = initial_adapter_arrays(seed=0)
    a = client_app.train(train_msg(start), ctx)
    b = client_app.train(train_msg(start), ctx)
    for reply in (a, b):
        assert "refusal" not in reply.content.config_records, dict(reply.content.config_records["refusal"])
        names = set(reply.content.array_records["arrays"])
        assert names == set(start) and all("lora" in n or "head" in n for n in names)
    rows = PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows(run_id="5")
    assert [r.model for r in rows] == ["adapter", "adapter"] and {r.task for r in rows} == {"train"}
    sigma = rows[0].event.noise_multiplier
    # both replies started from the same weights and data: their difference is noise only,
    # N(0, 2 (lr σ C / (q · step-persons))^2) per coordinate: the public step denominator, not the
    # institution's 30 persons (tests/unit/test_adapter.py: the step never scales with the count)
    expected = CFG.train.sample_rate * CFG.train.step_persons
    assert expected != 30.0
    diff = np.concatenate([(a.content.array_records["arrays"][k].numpy().astype(np.float64)
                            - b.content.array_records["arrays"][k].numpy()).ravel() for k in sorted(start)])
    charged_sd = CFG.train.lr * sigma * CFG.privacy.clip_norm / expected
    measured_sd = float(np.std(diff)) / math.sqrt(2)
    assert measured_sd == pytest.approx(charged_sd, rel=5 / math.sqrt(2 * diff.size)), (measured_sd, charged_sd)
    assert a.content.metric_records["metrics"]["noise-var"] == pytest.approx((sigma * CFG.privacy.clip_norm) ** 2)


def test_adapter_evaluation_is_ranking_sums(folder):
    ctx = Context(run_id=6, node_id=7, node_config={"data-dir": str(folder), "metrics-release": "simulation"},
                  state=RecordDict(), run_config=CFG.to_flat())
    reply = client_app.evaluate(Message(RecordDict({"arrays": numpy_to_arrays(initial_adapter_arrays(seed=0)),
                                                    "config": ConfigRecord({"server-round": 1})}),
                                        dst_node_id=7, message_type="evaluate"), ctx)
    sums = reply.content.metric_records["metrics"]
    assert sums["n_ranked"] == 30 and 0 <= sums["ndcg_sum"] <= 30


# ---------------------------------------------------------------------- simulation-seeded noise
def _simulated_ctx(folder: Path, out: Path, noise_seed: int, run_id: int) -> Context:
    """A node as Flower's simulation engine starts it (partition-id), its policy provisioned by
    the harness under sim.policy-dir."""
    cfg = CFG.override(**{"data-dir": str(folder.parent), "sim.policy-dir": str(out / "policies"),
                          "sim.noise-seed": noise_seed, "institutions": 1})
    return Context(run_id=run_id, node_id=7, node_config={"partition-id": 0, "num-partitions": 1},
                   state=RecordDict(), run_config=cfg.to_flat())


def test_adapter_noise_is_seeded_from_sim_noise_seed_in_a_simulation(folder, tmp_path):
    from fedrec.simulations.provision import provision_institutions

    provision_institutions([folder.name], tmp_path, epsilon=100.0, delta=CFG.privacy.delta)
    start = initial_adapter_arrays(seed=0)

    def delta(noise_seed: int, run_id: int) -> np.ndarray:
        reply = client_app.train(train_msg(start), _simulated_ctx(folder, tmp_path, noise_seed, run_id))
        assert "refusal" not in reply.content.config_records, dict(reply.content.config_records["refusal"])
        return np.concatenate([reply.content.array_records["arrays"][k].numpy().ravel() for k in sorted(start)])

    a, b, c = delta(11, 1), delta(11, 2), delta(12, 3)
    assert np.array_equal(a, b)  # same seed, same round: the same release
    assert not np.allclose(a, c)  # another seed: other noise


# ---------------------------------------------------------------------- hybrid
HYBRID = RunConfig().override(**{"institutions": 2, "rounds": 2, "privacy.epsilon": 4.0, "model": "hybrid",
                                 "seed": 1, "sim.noise-seed": 1})


def test_unknown_model_is_one_line_error():
    from fedrec.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"model = 'bert' is not built; fix: use 'mf', 'adapter'.*'hybrid'"):
        RunConfig().override(model="bert")


def test_hybrid_train_and_count_replies_carry_only_mf_item_tensors(tmp_path):
    folder = _institution_folder(tmp_path, 0)  # its own ledger: the other tests' charges do not count here
    res = CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "8"])
    assert res.exit_code == 0, res.output
    ctx = Context(run_id=8, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                  run_config=HYBRID.override(**{"mf.dim": 2}).to_flat())
    n_items = 24
    arrays = {"item_bias": np.zeros(n_items, np.float32), "item_factors": np.full((n_items, 2), 0.1, np.float32)}
    counts = client_app.counts(Message(RecordDict({"config": ConfigRecord({"server-round": 0})}),
                                       dst_node_id=7, message_type="query.counts"), ctx)
    msg = Message(RecordDict({"arrays": numpy_to_arrays(arrays),
                              "precond": numpy_to_arrays({"precond": np.ones(n_items, np.float32)}),
                              "config": ConfigRecord({"server-round": 1})}), dst_node_id=7, message_type="train")
    reply = client_app.train(msg, ctx)
    assert set(counts.content.array_records["arrays"]) == {"counts"}
    assert set(reply.content.array_records["arrays"]) == {"item_bias", "item_factors"}
    for r in (counts, reply):
        assert set(r.content.array_records) == {"arrays"}
        for arr in r.content.array_records["arrays"].values():
            assert arr.numpy().shape[0] == n_items  # item side only: no person-shaped tensor
    rows = PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows(run_id="8")
    assert [r.task for r in rows] == ["item-counts", "train"]


def _institution_folder(root: Path, k: int) -> Path:
    """Two small institutions on one 24-item catalogue with titles and genres."""
    from titled_institution import write_titled_institution

    rng = np.random.default_rng(k)
    rows = [(p, int(i), 4.5) for p in range(1, 31)
            for i in rng.choice([i for i in range(1, 25) if (i - 1) % 6 == p % 6], size=3, replace=False)]
    return write_titled_institution(root / f"institution_{k:02d}", rows)


@pytest.mark.slow
def test_hybrid_flower_simulation_runs_under_dp_over_secagg(tmp_path):
    """A real Flower simulation (Ray, SecAgg+, real ledgers): 2 institutions x 2 rounds of the
    hybrid, ε recorded in each institution's ledger, the hybrid's NDCG reported."""
    import sqlite3

    from fedrec.client.train import plan_dp
    from fedrec.common.privacy.accountant import epsilon_for
    from fedrec.simulations.run import run_simulation

    data = tmp_path / "data"
    for k in range(2):
        _institution_folder(data, k)
    cfg = HYBRID.override(**{"data-dir": str(data)})
    assert cfg.secagg.enabled
    history = run_simulation(cfg, tmp_path / "out", quiet=True)
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    final = history["rounds"][-1]
    assert final["contributors"] == 2 and 0 <= final["ndcg10"] <= 1
    expected = epsilon_for(plan_dp(cfg).run_events(), delta=cfg.privacy.delta, accountant="prv")
    assert len(final["epsilon"]) == 2
    for eps in final["epsilon"].values():
        assert eps == pytest.approx(expected, rel=1e-6) and eps <= cfg.privacy.epsilon + 1e-9
    ledgers = sorted((tmp_path / "out" / "ledgers").glob("*.db"))
    assert len(ledgers) == 2
    for db in ledgers:
        with sqlite3.connect(db) as con:
            tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
            events = next(t for t in tables if "event" in t)
            statuses = [s for (s,) in con.execute(f"select status from {events}")]
        assert statuses == ["released"] * (cfg.train.rounds + 1)  # the counts + one per round


def test_hybrid_evaluation_ranks_by_the_blend_not_by_mf(folder):
    """The hybrid's evaluate needs the server's DP counts (refused without them) and ranks by
    the blend: the text prior separates the 6 tastes, so it beats MF's item biases alone."""
    node = {"data-dir": str(folder), "metrics-release": "simulation"}
    arrays = {"item_bias": np.zeros(24, np.float32)}

    def evaluate(model: str, counts: np.ndarray | None):
        ctx = Context(run_id=9, node_id=7, node_config=node, state=RecordDict(),
                      run_config=HYBRID.override(model=model).to_flat())
        content = RecordDict({"arrays": numpy_to_arrays(arrays), "config": ConfigRecord({"server-round": 1})})
        if counts is not None:
            content["hybrid"] = numpy_to_arrays({"counts": counts})
            content["hybrid-config"] = ConfigRecord({"count-noise-var": 0.0})
        return client_app.evaluate(Message(content, dst_node_id=7, message_type="evaluate"), ctx)

    assert dict(evaluate("hybrid", None).content.config_records["refusal"]) == {"code": "data"}
    flat = np.zeros(24, np.float32)
    mf = evaluate("mf", None).content.metric_records["metrics"]
    hy = evaluate("hybrid", flat).content.metric_records["metrics"]
    assert hy["n_ranked"] == mf["n_ranked"] == 30
    assert hy["ndcg_sum"] > mf["ndcg_sum"] + 3, (hy["ndcg_sum"], mf["ndcg_sum"])


def test_hybrid_popularity_pools_the_institutions_own_counts(folder):
    """The Flower hybrid's popularity is the institution's own exact counts pooled with the
    released DP counts (common/models/hybrid.pooled_popularity): with released counts of zero
    and overwhelming declared noise, the popularity follows the institution's own counts (a
    ranking different from the flat one exact zero counts give); with the DP counts alone both
    would be flat and rank alike."""
    node = {"data-dir": str(folder), "metrics-release": "simulation"}
    arrays = {"item_bias": np.zeros(24, np.float32)}

    def evaluate(noise_var: float) -> dict:
        ctx = Context(run_id=9, node_id=7, node_config=node, state=RecordDict(),
                      run_config=HYBRID.override(model="hybrid").to_flat())
        content = RecordDict({"arrays": numpy_to_arrays(arrays), "config": ConfigRecord({"server-round": 1}),
                              "hybrid": numpy_to_arrays({"counts": np.zeros(24, np.float32)}),
                              "hybrid-config": ConfigRecord({"count-noise-var": noise_var})})
        return client_app.evaluate(Message(content, dst_node_id=7, message_type="evaluate"), ctx).content.metric_records["metrics"]

    exact, noisy = evaluate(0.0), evaluate(1e12)
    assert exact["n_ranked"] == noisy["n_ranked"] == 30
    assert noisy["ndcg_sum"] != pytest.approx(exact["ndcg_sum"], abs=1e-9), (noisy, exact)
