"""server/exchange.py: the deployment grid's replies are collected with a short poll.

The SuperLink side is a queue with timed replies behind flwr's own ``HttpGrid`` class (its
``push_messages`` / ``pull_messages`` replaced): what is tested is the poll loop, not Flower's
transport, which the deployment e2e tests run for real.
"""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supercore.task_identity import TaskIdentity

from fedrec.server.exchange import DEPLOYMENT_POLL_S, send_and_receive


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are made inside a run (flwr stamps the run and node on them)."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class TimedReplies(HttpGrid):
    """Each pushed message is answered ``delays[k]`` seconds after it was pushed (None: never)."""

    def __init__(self, delays: list[float | None]) -> None:
        super().__init__(token="test")
        self.delays = delays
        self.pulls = 0
        self.out: list[tuple[float, str, Message]] = []

    def push_messages(self, messages):
        ids = []
        for k, m in enumerate(messages):
            mid = f"m{k}"
            if self.delays[k] is not None:
                reply = Message(RecordDict(), reply_to=m)
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self.out.append((time.monotonic() + self.delays[k], mid, reply))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        now, want = time.monotonic(), set(message_ids)
        ready = [r for t, mid, r in self.out if t <= now and mid in want]
        self.out = [(t, mid, r) for t, mid, r in self.out if not (t <= now and mid in want)]
        return ready


def _msgs(n: int) -> list[Message]:
    msgs = []
    for k in range(n):
        m = Message(RecordDict(), dst_node_id=k + 1, message_type="train")
        m.metadata.__dict__["_message_id"] = f"m{k}"
        msgs.append(m)
    return msgs


def test_replies_are_collected_within_a_poll_of_the_last_one():
    grid = TimedReplies([0.1, 0.4, 0.25])
    t0 = time.monotonic()
    replies = send_and_receive(grid, _msgs(3), timeout=30)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # flwr 1.41's HttpGrid.send_and_receive sleeps 3 s between pulls: this would take >= 3 s
    assert took < 0.4 + 3 * DEPLOYMENT_POLL_S, took
    assert grid.pulls >= 2


def test_a_missing_reply_ends_at_the_timeout_with_the_replies_that_came():
    grid = TimedReplies([0.05, None])
    t0 = time.monotonic()
    replies = send_and_receive(grid, _msgs(2), timeout=0.7)
    took = time.monotonic() - t0
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.7 <= took < 0.7 + 2 * DEPLOYMENT_POLL_S, took


def test_a_straggler_deadline_stops_waiting_grace_seconds_after_enough_replies():
    grid = TimedReplies([0.05, 0.1, None])  # the third node is dead
    t0 = time.monotonic()
    replies = send_and_receive(grid, _msgs(3), timeout=30, enough=2, grace_s=0.3)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.1 + 0.3 <= took < 0.1 + 0.3 + 2 * DEPLOYMENT_POLL_S, took
    # a late but live node still counts when it answers within the grace
    grid = TimedReplies([0.05, 0.1, 0.25])
    replies = send_and_receive(grid, _msgs(3), timeout=30, enough=2, grace_s=0.6)
    assert len(replies) == 3


def test_the_straggler_grace_setting_is_checked():
    from fedrec.common.config import ConfigError, RunConfig

    assert RunConfig.from_flat({"secagg.straggler-grace": 5}).secagg.straggler_grace == 5.0
    assert RunConfig.from_flat({}).secagg.straggler_grace == -1.0  # default: wait for every node
    with pytest.raises(ConfigError, match="straggler-grace"):
        RunConfig.from_flat({"secagg.straggler-grace": -3})
