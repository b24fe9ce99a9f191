"""Secure sums -> new global parameters.

Every payload an institution releases reaches the server through a :class:`SumProtocol`:
the server asks a set of nodes for a contribution (a named set of float arrays under the
reply's ``"arrays"`` ArrayRecord) and gets back only their **sum**, with the list of nodes whose
vector is in it. Two implementations exist:

* :class:`PlainSum` — the nodes reply with their vectors in the clear and the server adds
  them. Only for tests and for the benchmark's "plain" row: it shows the server every update.
* ``server.secagg_workflow.SecAggPlusSum`` — our SecAgg+ (the default): the reply carries a
  masked vector and the server recovers only the sum.

A node that refuses (budget exhausted) or fails counts as dropped; a round with too few
contributors raises :class:`RoundFailed` loudly — it never silently keeps the old model.

Reply contract for every task handler on the client (``client/app.py``):
``content["arrays"]`` — the contribution to be summed (ArrayRecord of float arrays);
``content["metrics"]`` — public per-node metrics (ε spent, δ, …), MetricRecord;
``content["refusal"]`` — ConfigRecord ``{"reason": str}`` instead of arrays when the node's
guard refused the release.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.server.exchange import send_and_receive

log = logging.getLogger(__name__)

__all__ = [
    "RoundFailed",
    "RoundResult",
    "SumProtocol",
    "PlainSum",
    "arrays_to_numpy",
    "numpy_to_arrays",
]


class RoundFailed(RuntimeError):
    """A round could not produce a valid sum (too few contributors, protocol failure)."""


@dataclass
class RoundResult:
    #: sum over contributors of each named array; None if nobody contributed
    total: dict[str, np.ndarray] | None
    contributors: list[int]
    dropped: list[int]
    #: public per-node metrics, e.g. {"epsilon": 3.1}
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    #: per-node refusal reasons (budget guard)
    refusals: dict[int, str] = field(default_factory=dict)


class SumProtocol(Protocol):
    def run_round(
        self,
        grid: Grid,
        node_ids: list[int],
        *,
        message_type: str,
        content: RecordDict,
        server_round: int,
        min_contributors: int,
        timeout: float = 600.0,
    ) -> RoundResult: ...


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: _as_array(v) for k, v in arrays.items()})


def _as_array(v: np.ndarray):  # small helper: flwr Array from numpy
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


def split_replies(
    replies: Iterable[Message],
) -> tuple[dict[int, Message], dict[int, str], list[int]]:
    """Sort replies into (ok by node, refusals by node, failed node ids)."""
    ok: dict[int, Message] = {}
    refusals: dict[int, str] = {}
    failed: list[int] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            failed.append(node)
            log.warning("node %s failed: %s", node, msg.error.reason)
            continue
        if "refusal" in msg.content.config_records:
            # institutions send a generic code (client/node.py), never a text about their data
            rec = msg.content.config_records["refusal"]
            refusals[node] = str(rec.get("code", rec.get("reason", "refused")))
            continue
        ok[node] = msg
    return ok, refusals, failed


def reply_metrics(msg: Message) -> dict[str, float]:
    if "metrics" in msg.content.metric_records:
        return {k: float(v) for k, v in msg.content.metric_records["metrics"].items()}
    return {}


class PlainSum:
    """Sum in the clear. The server sees each update: tests and benchmark peer only.

    ``straggler_grace``: seconds to keep waiting for the last nodes once ``min_contributors``
    have answered (``secagg.straggler-grace``); None = wait for every node."""

    def __init__(self, straggler_grace: float | None = None) -> None:
        self.straggler_grace = straggler_grace

    def run_round(
        self,
        grid: Grid,
        node_ids: list[int],
        *,
        message_type: str,
        content: RecordDict,
        server_round: int,
        min_contributors: int,
        timeout: float = 600.0,
    ) -> RoundResult:
        messages = [
            Message(content=content, dst_node_id=n, message_type=message_type)
            for n in node_ids
        ]
        replies = list(send_and_receive(grid, messages, timeout=timeout, enough=min_contributors,
                                       grace_s=self.straggler_grace))
        ok, refusals, failed = split_replies(replies)
        answered = set(ok) | set(refusals) | set(failed)
        dropped = sorted(set(failed) | set(refusals) | (set(node_ids) - answered))
        total: dict[str, np.ndarray] | None = None
        for msg in ok.values():
            arrays = arrays_to_numpy(msg.content.array_records["arrays"])
            if total is None:
                total = {k: v.astype(np.float64).copy() for k, v in arrays.items()}
            else:
                for k, v in arrays.items():
                    total[k] += v
        if len(ok) < min_contributors:
            raise RoundFailed(
                f"round {server_round}: {len(ok)} of {len(node_ids)} nodes contributed, "
                f"{min_contributors} needed (refused: {refusals}, failed: {failed})"
            )
        return RoundResult(
            total=total,
            contributors=sorted(ok),
            dropped=dropped,
            metrics={n: reply_metrics(m) for n, m in ok.items()},
            refusals=refusals,
        )
