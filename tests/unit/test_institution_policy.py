"""The institution owns its guarantee: a node set up like a deployment (its own data folder and
privacy.toml, no simulation ids) refuses whatever the coordinator's run config asks beyond its
policy — nothing released, nothing charged, only a generic code to the server.

The handlers are the real ClientApp handlers (client/app.py, client/causal_app.py) over a real
SQLite ledger created by the real `fedrec-client init`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from fedrec.client import app as client_app
from fedrec.client import causal_app
from fedrec.client.cli import app as client_cli
from fedrec.client.guard import REFUSAL_CODES
from fedrec.client.train import plan_dp
from fedrec.common.config import RunConfig
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import load_policy
from fedrec.common.ratings import load_institution_ratings
from fedrec.server.aggregation import numpy_to_arrays
from fedrec.simulations.movielens import write_movielens_federation

BASE = RunConfig().override(**{"institutions": 3, "rounds": 2, "privacy.epsilon": 1.0, "seed": 3})


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


def init(folder: Path, *args: str) -> None:
    res = CliRunner().invoke(client_cli, ["init", str(folder), *args])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def mf_folder(tmp_path_factory) -> Path:
    return write_movielens_federation(tmp_path_factory.mktemp("ml"), institutions=3, skew=0.5, test_fraction=0.2,
                                      seed=0)[0]


@pytest.fixture
def node(tmp_path, mf_folder):
    """A deployed MF node: a copy of one institution folder with its own policy and ledger."""
    folder = tmp_path / mf_folder.name
    folder.mkdir()
    for f in mf_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    init(folder, "--epsilon-cap", "4", "--max-run-epsilon", "2", "--noise-modes", "local,distributed",
         "--min-round-size", "3")
    return folder


def ctx_for(folder: Path, **overrides) -> Context:
    cfg = BASE.to_flat()
    cfg.update(overrides)
    return Context(run_id=11, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(), run_config=cfg)


def secagg_record(active: list[int]) -> ConfigRecord:
    """The part of a SecAgg+ masking record the handler reads (the round's active set)."""
    return ConfigRecord({"stage": "mask", "active": active, "slot": 0})


def train_msg(folder: Path, *, active: list[int] | None = None) -> Message:
    n_items = load_institution_ratings(folder).n_items
    content = RecordDict({"arrays": numpy_to_arrays({"item_bias": np.zeros(n_items, np.float32)}),
                          "precond": numpy_to_arrays({"precond": np.full(n_items, 0.1, np.float32)}),
                          "config": ConfigRecord({"server-round": 1})})
    if active is not None:
        content["fedrec.secagg"] = secagg_record(active)
    return Message(content, dst_node_id=7, message_type="train")


def counts_msg(active: list[int] | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 0})})
    if active is not None:
        content["fedrec.secagg"] = secagg_record(active)
    return Message(content, dst_node_id=7, message_type="query.counts")


def ledger_rows(folder: Path) -> int:
    return len(PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows())


def refusal_code(reply: Message) -> str | None:
    rec = reply.content.config_records.get("refusal")
    if rec is None:
        return None
    assert set(rec.keys()) == {"code"}, dict(rec)  # a code, never a text about the data
    assert str(rec["code"]) in REFUSAL_CODES
    assert not reply.content.array_records and not reply.content.metric_records
    return str(rec["code"])


def test_an_honest_run_releases_and_charges(node):
    reply = client_app.counts(counts_msg(), ctx_for(node))
    assert refusal_code(reply) is None and "counts" in reply.content.array_records["arrays"]
    reply = client_app.train(train_msg(node), ctx_for(node))
    assert refusal_code(reply) is None
    assert set(reply.content.metric_records["metrics"]) == {"epsilon", "epsilon-rdp", "delta", "noise-var"}
    assert ledger_rows(node) == 2


@pytest.mark.parametrize(("overrides", "code"), [
    ({"privacy.epsilon": math.inf}, "policy"),          # a non-private release
    ({"privacy.epsilon": 3.0}, "policy"),               # above max-run-epsilon = 2
    ({"privacy.delta": 1e-3}, "policy"),                # δ above the policy's delta-cap
    ({"privacy.ledger-dir": "/tmp/elsewhere"}, "internal"),   # no such run knob any more
    ({"privacy.epsilon-cap": 1e9}, "internal"),
])
def test_coordinator_requests_beyond_the_policy_are_refused(node, overrides, code, tmp_path):
    for msg in (counts_msg(), train_msg(node)):
        handler = client_app.counts if msg.metadata.message_type == "query.counts" else client_app.train
        reply = handler(msg, ctx_for(node, **overrides))
        assert refusal_code(reply) == code
    assert ledger_rows(node) == 0
    assert not Path("/tmp/elsewhere").exists()


def test_a_missing_ledger_refuses_and_is_not_recreated(node):
    ledger = load_policy(node / "privacy.toml").ledger
    ledger.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(ledger) + suffix).unlink(missing_ok=True)
    assert refusal_code(client_app.train(train_msg(node), ctx_for(node))) == "ledger"
    assert not ledger.exists()


def test_a_table_less_ledger_file_refuses(node):
    ledger = load_policy(node / "privacy.toml").ledger
    ledger.unlink()
    ledger.write_bytes(b"")
    assert refusal_code(client_app.train(train_msg(node), ctx_for(node))) == "ledger"


def test_distributed_noise_needs_a_round_of_n_min(node):
    # n_min above the round's active set: each client's σ²/n_min would leave the sum short
    ctx = ctx_for(node, **{"privacy.noise-mode": "distributed", "privacy.n-min": 3})
    assert refusal_code(client_app.train(train_msg(node, active=[1, 2]), ctx)) == "policy"
    # n_min below the institution's min-round-size (3)
    ctx = ctx_for(node, **{"privacy.noise-mode": "distributed", "privacy.n-min": 2})
    assert refusal_code(client_app.train(train_msg(node, active=[1, 2, 3]), ctx)) == "policy"
    # outside secure aggregation
    ctx = ctx_for(node, **{"privacy.noise-mode": "distributed", "privacy.n-min": 3})
    assert refusal_code(client_app.train(train_msg(node), ctx)) == "policy"
    assert ledger_rows(node) == 0
    # a round of 3 with n_min 3 is accepted; the reply tells the SecAgg+ mod its survivor floor
    reply = client_app.train(train_msg(node, active=[1, 2, 3]), ctx)
    assert refusal_code(reply) is None
    assert int(reply.content.config_records["fedrec.noise"]["n-min"]) == 3


def test_a_noise_mode_the_policy_does_not_list_is_refused(tmp_path, mf_folder):
    folder = tmp_path / "local_only"
    folder.mkdir()
    for f in mf_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    init(folder, "--epsilon-cap", "4")
    ctx = ctx_for(folder, **{"privacy.noise-mode": "distributed", "privacy.n-min": 3})
    assert refusal_code(client_app.train(train_msg(folder, active=[1, 2, 3]), ctx)) == "policy"
    assert ledger_rows(folder) == 0


def test_a_run_whose_plan_exceeds_the_remaining_budget_is_refused_before_round_one(tmp_path, mf_folder):
    folder = tmp_path / "small_cap"
    folder.mkdir()
    for f in mf_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    init(folder, "--epsilon-cap", "1.0")
    ctx = ctx_for(folder, **{"privacy.epsilon": 0.8, "rounds": 5})
    assert refusal_code(client_app.counts(counts_msg(), ctx)) is None  # the first run fits
    for r in range(1, 6):
        assert refusal_code(client_app.train(train_msg(folder), ctx)) is None
    spent = ledger_rows(folder)
    ctx2 = Context(run_id=12, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(),
                   run_config=ctx.run_config)
    assert refusal_code(client_app.counts(counts_msg(), ctx2)) == "budget"  # a second one does not
    assert ledger_rows(folder) == spent  # nothing charged


def test_errors_reach_the_server_as_codes_and_the_detail_stays_in_the_log(node, caplog):
    msg = train_msg(node)
    (node / "ratings_train.parquet").unlink()
    (node / "ratings_train.csv").write_text("person_id,item_id,rating\n1,31,2.5\n1,1029,secret-value-93\n")
    client_app._load.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fedrec.client"):
        reply = client_app.train(msg, ctx_for(node))
    assert refusal_code(reply) == "data"
    assert "secret-value-93" not in repr(reply.content)
    assert "secret-value-93" in caplog.text


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_reported_noise_and_the_ledger_match_what_the_handler_adds(node, mode):
    """Two train replies from the same global model differ only by the noise: its empirical
    variance must be what the ledger's charged σ implies — σ²C² (local) or σ²C²/n_min
    (distributed) — so a client adding σ/10 while charging σ fails this."""
    extra = {"privacy.noise-mode": "distributed", "privacy.n-min": 3} if mode == "distributed" else {}
    active = [1, 2, 3] if mode == "distributed" else None
    ctx = ctx_for(node, **{"privacy.epsilon": 2.0, **extra})
    assert refusal_code(client_app.counts(counts_msg(active), ctx)) is None
    a = client_app.train(train_msg(node, active=active), ctx)
    b = client_app.train(train_msg(node, active=active), ctx)
    lr, precond = BASE.train.lr, 0.1  # train_msg's public preconditioner
    diff = (a.content.array_records["arrays"]["item_bias"].numpy().astype(np.float64)
            - b.content.array_records["arrays"]["item_bias"].numpy()) / (lr * precond)
    rows = PrivacyLedger(load_policy(node / "privacy.toml").ledger).rows()
    train_rows = [r for r in rows if r.task == "train"]
    assert len(train_rows) == 2
    sigma = train_rows[0].event.noise_multiplier
    charged_sd = sigma * BASE.privacy.clip_norm / (math.sqrt(3) if mode == "distributed" else 1.0)
    measured_sd = float(np.std(diff)) / math.sqrt(2)
    n = diff.size  # thousands of coordinates: the std is known to ~1/sqrt(2n)
    assert measured_sd == pytest.approx(charged_sd, rel=5 / math.sqrt(2 * n)), (measured_sd, charged_sd)
    assert a.content.metric_records["metrics"]["noise-var"] == pytest.approx(charged_sd**2)
    sched = plan_dp(BASE.override(**{"privacy.epsilon": 2.0}))
    assert sigma == pytest.approx(sched.noise_multiplier)


# ------------------------------------------------------------------------------------ causal
@pytest.fixture(scope="module")
def causal_folder(tmp_path_factory):
    from fedrec.common.datasets import write_institution
    from fedrec.simulations.domains import domain_federation

    root = tmp_path_factory.mktemp("health")
    insts, _ = domain_federation("health", institutions=1, people=400, seed=2, skew=0.0)
    folder = write_institution(root / insts[0].name, insts[0])
    init(folder, "--epsilon-cap", "4", "--max-run-epsilon", "2", "--noise-modes", "local,distributed")
    return folder


def causal_msg(step: str = "propensity", *, sigma: float = 5.0, active: list[int] | None = None) -> Message:
    p = 11
    conf = ConfigRecord({"server-round": 1, "step": f"{step}:1", "items": json.dumps(["walking_group"]),
                         "noise-multiplier": sigma})
    content = RecordDict({"config": conf, "arrays": numpy_to_arrays({"beta/walking_group": np.zeros(p)})})
    if active is not None:
        content["fedrec.secagg"] = secagg_record(active)
    return Message(content, dst_node_id=7, message_type=f"query.causal_{step}")


def causal_ctx(folder: Path, **causal) -> Context:
    from fedrec.common.causal.config import CausalConfig

    ccfg = CausalConfig(items=("walking_group",), **causal)
    flat = {**BASE.to_flat(), **ccfg.to_flat()}
    return Context(run_id=21, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(), run_config=flat)


@pytest.mark.parametrize(("causal", "sigma", "active"), [
    ({"epsilon": math.inf}, 0.0, None),                                      # exact sums
    ({"epsilon": 1.0, "noise_mode": "distributed", "n_min": 10_000}, 5.0, [1, 2, 3]),  # 10^4x less noise
    ({"epsilon": 1.0}, 0.0, None),                                           # no noise while DP
])
def test_causal_requests_beyond_the_policy_are_refused(causal_folder, causal, sigma, active):
    before = ledger_rows(causal_folder)
    reply = causal_app.causal_propensity(causal_msg(sigma=sigma, active=active), causal_ctx(causal_folder, **causal))
    assert refusal_code(reply) == "policy"
    assert ledger_rows(causal_folder) == before


def test_causal_release_carries_the_charged_noise(causal_folder):
    """The propensity release's spread over repeated draws is the charged σ·Δ (σ/10 fails)."""
    ctx = causal_ctx(causal_folder, epsilon=1.0)
    draws = []
    for _ in range(12):
        reply = causal_app.causal_propensity(causal_msg(sigma=20.0), ctx)
        assert refusal_code(reply) is None
        draws.append(np.concatenate([a.numpy().ravel() for a in reply.content.array_records["arrays"].values()]))
    rows = [r for r in PrivacyLedger(load_policy(causal_folder / "privacy.toml").ledger).rows(run_id="21")]
    ev = rows[-1].event
    charged_sd = ev.noise_multiplier * ev.sensitivity
    spread = np.std(np.asarray(draws), axis=0, ddof=1)
    measured = float(np.sqrt(np.mean(spread**2)))
    k = len(draws) - 1
    dof = k * spread.size
    assert measured == pytest.approx(charged_sd, rel=5 / math.sqrt(2 * dof)), (measured, charged_sd)


def test_a_holder_never_unmasks_distributed_noise_below_its_n_min():
    """A node that added σ²/n_min in a slot holds back its shares for that slot unless at least
    n_min survive: the server cannot unmask a sum carrying too little noise."""
    from fedrec.common.secagg import ClientState, SecAggClient, SecAggProtocolError

    session = b"s" * 16
    client = SecAggClient(ClientState(session=session, index=1, slots=2, committee=[1, 2, 3, 4], threshold=3))
    client.set_survivor_floor(0, 3)
    request = {"session": session, "slot": 0, "survivors": [1, 2], "dropped": [3, 4],
               "ct-from": [], "ct-kind": [], "ct": []}
    with pytest.raises(SecAggProtocolError, match="below this node's distributed-noise n_min 3"):
        client.unmask(request)
    assert client.unmask({**request, "survivors": [1, 2, 3], "dropped": [4]})["shares"] == []
    # slots without distributed noise keep no floor
    assert client.unmask({**request, "slot": 1})["shares"] == []


def _guard_with_caps(tmp_path: Path, *, ledger_cap: float, policy_cap: float, max_run: float):
    from fedrec.client.guard import ReleaseGuard
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.privacy.policy import InstitutionPolicy

    ledger = PrivacyLedger.initialize(tmp_path / "ledger.sqlite", institution="inst", epsilon_cap=ledger_cap,
                                      delta_cap=1e-5)
    policy = InstitutionPolicy(ledger=tmp_path / "ledger.sqlite", epsilon_cap=policy_cap, max_run_epsilon=max_run)
    return ReleaseGuard(ledger, institution="inst", policy=policy)


def test_the_policy_cap_binds_when_stricter_than_the_ledger_cap(tmp_path):
    """The ledger alone (cap 10) would accept this release; the institution's policy (cap 1) must not:
    refused with code budget, nothing written, before and at charge time alike."""
    from fedrec.client.guard import Refusal
    from fedrec.common.privacy.accountant import GaussianEvent, epsilon_for

    guard = _guard_with_caps(tmp_path, ledger_cap=10.0, policy_cap=1.0, max_run=1.0)
    event = GaussianEvent(noise_multiplier=1.0)  # ε ≈ 4.4 at δ = 1e-5: within 10, above 1
    assert 1.0 < epsilon_for([event], delta=1e-5, accountant="prv") < 10.0
    with pytest.raises(Refusal) as err:
        guard.charge(event, run_id="r1", round=1, task="train", model="mf")
    assert err.value.code == "budget" and "above the cap ε=1" in err.value.detail
    with pytest.raises(Refusal) as err:
        guard.check_plan([event], run_id="r1")
    assert err.value.code == "budget"
    assert guard.ledger.rows() == []


def test_a_run_cannot_pass_max_run_epsilon_one_charge_at_a_time(tmp_path):
    """Each charge fits the cap, but the run's rows together pass max-run-epsilon: the second
    charge of the run is refused (policy); a charge of another run still fits."""
    from fedrec.client.guard import Refusal
    from fedrec.common.privacy.accountant import GaussianEvent

    guard = _guard_with_caps(tmp_path, ledger_cap=50.0, policy_cap=50.0, max_run=5.0)
    event = GaussianEvent(noise_multiplier=1.0)  # ε ≈ 4.4: one fits in 5, two do not
    guard.charge(event, run_id="r1", round=1, task="train", model="mf")
    with pytest.raises(Refusal) as err:
        guard.charge(event, run_id="r1", round=2, task="train", model="mf")
    assert err.value.code == "policy" and "max-run-epsilon" in err.value.detail
    guard.charge(event, run_id="r2", round=1, task="train", model="mf")
    assert [r.run_id for r in guard.ledger.rows()] == ["r1", "r2"]


def test_a_deployed_nodes_ledger_commits_durably_and_only_a_simulated_one_skips_fsync(node):
    """A deployed node's guard commits every charge with fsync (synchronous=FULL: the charge
    survives the machine losing power before the release is marked); only a simulated node's
    guard, whose ledgers are scratch files, commits without (synchronous=OFF). Read back from
    the connection the guard's ledger really opens."""
    from fedrec.client.guard import open_guard

    def synchronous(guard) -> int:
        with guard.ledger._connect() as con:
            return int(con.execute("PRAGMA synchronous").fetchone()[0])

    policy = load_policy(node / "privacy.toml")
    deployed = open_guard(policy, institution=PrivacyLedger(policy.ledger).institution, simulated=False)
    assert synchronous(deployed) == 2  # FULL
    simulated = open_guard(policy, institution=deployed.institution, simulated=True)
    assert synchronous(simulated) == 0  # OFF
