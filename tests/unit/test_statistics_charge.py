"""client/node.py ``charge_statistics_release``: the one preamble of every statistics release
(causal steps, strategy values). Real policy, real guard, real SQLite ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from fedrec.client.cli import app as client_cli
from fedrec.client.guard import Refusal, ReleaseRequest
from fedrec.client.node import charge_statistics_release
from fedrec.common.privacy.accountant import GaussianEvent
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import load_policy


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def site(simulated_institution, tmp_path_factory) -> Path:
    import shutil

    folder = tmp_path_factory.mktemp("site") / "institution"
    shutil.copytree(simulated_institution("health", people=300, seed=5), folder)  # init writes into it
    res = CliRunner().invoke(client_cli, ["init", str(folder), "--epsilon-cap", "4", "--max-run-epsilon", "2"])
    assert res.exit_code == 0, res.output
    return folder


def _rows(folder: Path) -> list:
    return PrivacyLedger(load_policy(folder / "privacy.toml").ledger).rows()


def _charge(folder: Path, sigma: float, *, dp: bool = True, epsilon: float = 1.0):
    msg = Message(RecordDict({"config": ConfigRecord({"items": json.dumps(["x"])})}), dst_node_id=7,
                  message_type="query.causal_moments")
    ctx = Context(run_id=31, node_id=7, node_config={"data-dir": str(folder)}, state=RecordDict(), run_config={})
    return charge_statistics_release(msg, ctx, folder, folder.name, sigma=sigma, sensitivity=3.0,
                                     request=ReleaseRequest(epsilon=epsilon, delta=1e-5), dp=dp, accountant="prv",
                                     server_round=4, task="causal-moments")


def test_the_release_is_charged_before_it_leaves(site):
    before = len(_rows(site))
    got = _charge(site, 7.0)
    rows = _rows(site)
    assert len(rows) == before + 1
    row = rows[-1]
    assert row.event == GaussianEvent(noise_multiplier=7.0, sensitivity=3.0) == got.charge.event
    assert (row.run_id, row.round, row.task, row.model) == ("31", 4, "causal-moments", "causal")
    assert row.status == "charged"  # write-ahead: released only once the caller's reply is built
    assert got.share == 1.0  # local noise: the whole σ at this institution
    got.guard.released(got.charge)
    assert _rows(site)[-1].status == "released"


@pytest.mark.parametrize("sigma", [math.nan, math.inf, -1.0])
def test_an_unusable_noise_multiplier_is_refused_and_nothing_is_charged(site, sigma):
    before = len(_rows(site))
    with pytest.raises(Refusal) as err:
        _charge(site, sigma)
    assert err.value.code == "policy"
    assert len(_rows(site)) == before


def test_no_noise_in_a_dp_run_is_refused_and_nothing_is_charged(site):
    before = len(_rows(site))
    with pytest.raises(Refusal, match="without noise"):
        _charge(site, 0.0)
    assert len(_rows(site)) == before


def test_the_policy_refuses_before_any_charge(site):
    before = len(_rows(site))
    with pytest.raises(Refusal):  # the run asks for more than max-run-epsilon = 2
        _charge(site, 7.0, epsilon=3.0)
    assert len(_rows(site)) == before
