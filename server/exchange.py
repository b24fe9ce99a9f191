"""One request/reply trip between the ServerApp and its nodes, with a short reply poll.

Why not ``grid.send_and_receive`` as is: flwr 1.41's deployment grid (``HttpGrid``) pulls
replies and then sleeps a fixed 3 s until the next pull, so every trip of a run costs up to
3 s more than its slowest node. A SecAgg+ causal estimation makes about 25 trips (setup, then
mask / consistency / unmask per release), so the sleeps were about a fifth of a deployed run.
Here the same public Grid calls (``push_messages`` / ``pull_messages``) are polled every
``DEPLOYMENT_POLL_S``: one small request to the SuperLink on the ServerApp's own connection,
nothing on the nodes' side (each SuperNode keeps Flower's own 3 s idle poll). The simulation
engine's in-memory grid polls every 0.1 s (its ``pull_interval``): its own ``send_and_receive``
serves unless a straggler deadline is set (polling it faster did not shorten a 100-client SecAgg+
round's stages: the engine's dispatch loop waits 0.1 s too). Any other grid (test doubles) is
used through its own ``send_and_receive``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

#: seconds between two reply pulls on the deployment engine's grid (an HTTP request each)
DEPLOYMENT_POLL_S = 0.2


def _poll_interval(grid: Grid) -> tuple[float | None, bool]:
    """(how often to pull this grid's replies, whether it is the deployment engine's); None:
    use the grid's own ``send_and_receive``."""
    # imported here: flwr's grid modules are not needed to import this one
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, HttpGrid):
        return DEPLOYMENT_POLL_S, True
    if isinstance(grid, InMemoryGrid):
        return float(grid.pull_interval), False
    return None, False


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float | None,
                     enough: int | None = None, grace_s: float | None = None) -> list[Message]:
    """Push ``messages``; return the replies that arrived before ``timeout`` seconds (all of
    them when ``timeout`` is None), like ``Grid.send_and_receive`` but polling every
    ``DEPLOYMENT_POLL_S`` on the deployment engine.

    ``enough`` and ``grace_s`` (a straggler deadline, ``secagg.straggler-grace``): once ``enough``
    replies without error have come, wait at most ``grace_s`` more seconds for the others (on
    Flower's grids; a test double's own ``send_and_receive`` waits for every reply)."""
    poll, slow = _poll_interval(grid)
    deadline = enough is not None and grace_s is not None
    if poll is None or not (slow or deadline):
        return list(grid.send_and_receive(messages, timeout=timeout))
    messages = list(messages)
    kind = messages[0].metadata.message_type if messages else "-"
    t0 = time.monotonic()
    pending = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    graced = False
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if deadline and not graced and sum(not m.has_error() for m in replies) >= enough:
            graced = True  # enough to complete: the stragglers get grace_s more seconds
            end = time.monotonic() + grace_s if end is None else min(end, time.monotonic() + grace_s)
        if not pending or (end is not None and time.monotonic() >= end):
            break
        time.sleep(poll if end is None else max(0.0, min(poll, end - time.monotonic())))
    if slow:
        # one line per trip in the run's log (Flower's logger: `flwr log` and the run's log stream
        # show it): where a deployed run's time goes; each node's share is in its own log
        log(logging.INFO, "trip %s: %d of %d replies in %.1f s%s", kind, len(replies), len(messages),
            time.monotonic() - t0, f" ({len(pending)} late, dropped)" if pending and graced else "")
    return replies
