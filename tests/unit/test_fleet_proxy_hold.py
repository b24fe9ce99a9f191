"""The fleet proxy's pull hold (long poll), driven as the ASGI app uvicorn serves, with the
upstream SuperLink answered by ``httpx.MockTransport`` (the real SuperLink path runs in
tests/e2e/test_deployment.py): an empty ``pull-messages`` answer is held and re-asked until a
message comes or the hold ends; every other answer, and every other path, passes at once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from flwr.proto.fleet_pb2 import PullMessagesResponse, Reconnect
from flwr.proto.message_pb2 import Message as MessageProto

from fedrec.server.fleet_proxy import (FleetProxy, MAX_HOLD_INTERVAL_S, MAX_REPOLLS_PER_S, pull_is_empty,
                                       repoll_interval)

EMPTY = PullMessagesResponse().SerializeToString()
WITH_MESSAGE = PullMessagesResponse(messages_list=[MessageProto()]).SerializeToString()
RECONNECT = PullMessagesResponse(reconnect=Reconnect(reconnect=5)).SerializeToString()


def _proxy(answers: list[tuple[int, bytes]], *, hold: float, seen: list) -> FleetProxy:
    """A proxy whose upstream answers ``answers`` in turn (the last one forever)."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.content, request.headers.get("flwr-timestamp"), time.monotonic()))
        status, body = answers[min(len(seen) - 1, len(answers) - 1)]
        return httpx.Response(status, content=body)

    proxy = FleetProxy("https://127.0.0.1:1", ca_cert=None, pull_hold=hold)
    proxy.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return proxy


def _call(proxy: FleetProxy, path: str, body: bytes = b"req") -> tuple[int, bytes, float]:
    """One POST through the ASGI app: (status, body, seconds)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(event):
        sent.append(event)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"flwr-timestamp", b"2026-12-05T00:00:00"), (b"host", b"x")]}
    t0 = time.monotonic()
    asyncio.run(proxy(scope, receive, send))
    start = next(e for e in sent if e["type"] == "http.response.start")
    content = b"".join(e.get("body", b"") for e in sent if e["type"] == "http.response.body")
    return start["status"], content, time.monotonic() - t0


def test_an_empty_pull_is_held_until_a_message_comes_and_re_asked_with_the_nodes_own_request():
    seen: list = []
    proxy = _proxy([(200, EMPTY)] * 4 + [(200, WITH_MESSAGE)], hold=5.0, seen=seen)
    status, content, secs = _call(proxy, "/v1/fleet/pull-messages", b"signed-pull")
    assert status == 200 and content == WITH_MESSAGE
    assert len(seen) == 5
    # every re-ask is the node's request unchanged (body and signed headers), ~0.1 s apart
    assert {s[1] for s in seen} == {b"signed-pull"} and {s[2] for s in seen} == {"2026-12-05T00:00:00"}
    gaps = [b[3] - a[3] for a, b in zip(seen, seen[1:])]
    assert all(0.09 <= g <= 0.5 for g in gaps), gaps
    assert 0.35 <= secs < 2.0
    assert proxy.held == 0


def test_a_pull_that_stays_empty_is_answered_empty_when_the_hold_ends():
    seen: list = []
    proxy = _proxy([(200, EMPTY)], hold=0.6, seen=seen)
    status, content, secs = _call(proxy, "/v1/fleet/pull-messages")
    assert status == 200 and content == EMPTY
    assert 0.55 <= secs < 1.5 and 4 <= len(seen) <= 8
    assert proxy.held == 0


@pytest.mark.parametrize("answer", [(200, WITH_MESSAGE), (200, RECONNECT), (401, EMPTY), (200, b"\xff\xff junk")],
                         ids=["message", "reconnect", "error-status", "unreadable"])
def test_anything_but_an_empty_pull_passes_at_once(answer):
    seen: list = []
    proxy = _proxy([answer, (200, WITH_MESSAGE)], hold=5.0, seen=seen)
    status, content, secs = _call(proxy, "/v1/fleet/pull-messages")
    assert (status, content) == answer and len(seen) == 1 and secs < 0.5


@pytest.mark.parametrize("path", ["/v1/fleet/push-messages", "/v1/fleet/send-node-heartbeat",
                                  "/v1/fleet/pull-object"])
def test_other_fleet_calls_are_never_held(path):
    seen: list = []
    proxy = _proxy([(200, EMPTY), (200, WITH_MESSAGE)], hold=5.0, seen=seen)
    status, content, secs = _call(proxy, path)
    assert (status, content) == (200, EMPTY) and len(seen) == 1 and secs < 0.5


def test_a_held_pull_answers_at_once_when_the_server_stops():
    seen: list = []
    proxy = _proxy([(200, EMPTY)], hold=20.0, seen=seen)
    t0 = time.monotonic()
    proxy.stopping = lambda: time.monotonic() - t0 > 0.3
    status, content, secs = _call(proxy, "/v1/fleet/pull-messages")
    assert (status, content) == (200, EMPTY) and 0.25 < secs < 1.0


def test_hold_zero_forwards_every_pull_as_it_comes():
    seen: list = []
    proxy = _proxy([(200, EMPTY), (200, WITH_MESSAGE)], hold=0.0, seen=seen)
    assert _call(proxy, "/v1/fleet/pull-messages")[:2] == (200, EMPTY) and len(seen) == 1


def test_the_superlink_sees_a_bounded_rate_however_many_pulls_are_held():
    for held in (1, 3, 5, 10, 100, 1000):
        rate = held / repoll_interval(held)  # upstream requests per second, all held pulls together
        assert repoll_interval(held) >= 0.1 and rate <= max(MAX_REPOLLS_PER_S, 10 * held) + 1e-9
        assert rate <= MAX_REPOLLS_PER_S + 1e-9 or held * 10 <= MAX_REPOLLS_PER_S


def test_beyond_the_held_pulls_the_rate_allows_a_pull_is_answered_at_once():
    """A large federation: once as many pulls are held as the rate bound re-asks every 0.5 s (25),
    the next one gets the SuperLink's answer at once, as without the proxy — holding it with a
    slower re-poll would make that node hear of a message later than Flower's own 3 s sleep."""
    cap = int(MAX_REPOLLS_PER_S * MAX_HOLD_INTERVAL_S)
    assert cap == 25 and repoll_interval(cap) <= MAX_HOLD_INTERVAL_S < repoll_interval(cap + 1)
    seen: list = []
    proxy = _proxy([(200, EMPTY), (200, WITH_MESSAGE)], hold=5.0, seen=seen)
    proxy.held = cap  # as if 25 other nodes' pulls were being held
    status, content, secs = _call(proxy, "/v1/fleet/pull-messages")
    assert (status, content) == (200, EMPTY) and len(seen) == 1 and secs < 0.5
    proxy.held = cap - 1  # one fewer: this one is held (and re-asked ~every 0.5 s)
    seen.clear()
    assert _call(proxy, "/v1/fleet/pull-messages")[:2] == (200, WITH_MESSAGE) and len(seen) == 2


def test_only_an_empty_readable_answer_counts_as_empty():
    assert pull_is_empty(200, EMPTY) and pull_is_empty(200, b"")
    assert not pull_is_empty(200, WITH_MESSAGE) and not pull_is_empty(200, RECONNECT)
    assert not pull_is_empty(500, EMPTY) and not pull_is_empty(200, b"\xff\xff junk")


@pytest.mark.parametrize("hold", [-1.0, 26.0, float("nan")])
def test_a_hold_outside_the_nodes_timeout_is_refused(hold):
    with pytest.raises(ValueError, match="pull_hold"):
        FleetProxy("https://127.0.0.1:1", ca_cert=None, pull_hold=hold)
