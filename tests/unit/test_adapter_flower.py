"""The LoRA adapter through the real ClientApp handlers of a node set up like a deployment: the
round is charged to the institution's ledger as model `adapter`, only LoRA + head deltas leave,
and they carry exactly the charged noise (real PEFT LoRA on the packaged MiniLM weights)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
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
    root = tmp_path_factory.mktemp("adapter") / "institution_00"
    root.mkdir()
    genres = ["Comedy", "Drama", "Horror|Thriller", "Animation|Children", "Documentary", "Sci-Fi|Action"]
    items = pd.DataFrame({"item_id": np.arange(1, 25), "title": [f"Film number {i}" for i in range(1, 25)],
                          "year": 1990.0 + np.arange(24) % 20, "genres": [genres[i % 6] for i in range(24)]})
    items.to_parquet(root / "items.parquet", index=False)
    rng = np.random.default_rng(0)
    rows = []
    for person in range(1, 31):
        taste = person % 6
        liked = [i for i in range(1, 25) if (i - 1) % 6 == taste]
        for item in rng.choice(liked, size=3, replace=False):
            rows.append((person, int(item), 4.5))
    df = pd.DataFrame(rows, columns=["person_id", "item_id", "rating"])
    test = df.groupby("person_id").head(1)
    df.drop(test.index).to_parquet(root / "ratings_train.parquet", index=False)
    test.to_parquet(root / "ratings_test.parquet", index=False)
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
    # N(0, 2 (lr σ C / expected batch)^2) per coordinate with the whole institution each step
    expected = 30.0
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
