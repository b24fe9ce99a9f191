"""What a node knows about itself: its policy, its guard, and how it answers the server.

* :func:`node_guard` — the institution's guard from the policy the **node** names: a deployed
  node (no simulation ids) reads its node config's ``policy`` or ``<data-dir>/privacy.toml``;
  nothing in the run config can move it. A simulated node (Flower simulation's
  ``partition-id``/``num-partitions``) is played by the simulation harness, which writes every
  institution's policy and ledger before the run under ``sim.policy-dir``.
* :func:`private_errors` — wraps a message handler so that whatever goes wrong, the server gets
  a generic refusal code and never an error text: exception messages and refusal details can
  name private values ("people.csv row 18, column age: 93 ..."). The detail goes to the
  institution's log.
* :func:`secagg_round_size` — the participants of this round per the secure-aggregation record
  the handler's reply will be masked under (None when the message has none).
* :func:`charge_statistics_release` — the preamble every statistics release (causal steps,
  strategy values) runs before it touches data: σ usable, the institution's policy accepts the
  run's request, σ agrees with the run's declared DP, the event charged (write-ahead).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedrec.client.guard import Charge, Refusal, ReleaseGuard, ReleaseRequest, open_guard
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.accountant import GaussianEvent, NonPrivateEvent
from fedrec.common.privacy.policy import POLICY_FILE, load_policy

log = logging.getLogger("fedrec.client")

__all__ = ["is_simulated", "policy_path", "node_guard", "refusal_reply", "private_errors",
           "secagg_round_size", "NOISE_RECORD", "StatisticsCharge", "charge_statistics_release"]

#: reply record that tells the SecAgg+ mod the survivor floor of distributed noise
NOISE_RECORD = "fedrec.noise"
_SECAGG_RECORD = "fedrec.secagg"  # same name as client/secagg_mod.SECAGG_RECORD


def is_simulated(context: Context) -> bool:
    """A node started by Flower's simulation engine (the harness plays the institution)."""
    node = context.node_config
    return "partition-id" in node and "num-partitions" in node


def policy_path(context: Context, folder: Path) -> Path:
    """The privacy policy this node obeys (see module doc)."""
    node = context.node_config
    if not is_simulated(context):
        return Path(str(node["policy"])) if "policy" in node else Path(folder) / POLICY_FILE
    root = str(context.run_config.get("sim.policy-dir", "") or "")
    if not root:
        raise Refusal("policy", "simulated node without sim.policy-dir: the harness provisions no policy")
    return Path(root) / Path(folder).name / POLICY_FILE


def node_guard(context: Context, folder: Path, institution: str, *, accountant: str = "prv") -> ReleaseGuard:
    """Open the institution's guard; :class:`Refusal` when the policy or ledger is unusable."""
    path = policy_path(context, folder)
    try:
        policy = load_policy(path)
    except FedrecInputError as err:
        raise Refusal("policy", str(err)) from None
    guard = open_guard(policy, institution=institution, accountant=accountant, simulated=is_simulated(context))
    _pin_head(context, guard)
    return guard


_HEAD_STATE = "fedrec.ledger-head"


def _pin_head(context: Context, guard: ReleaseGuard) -> None:
    """Refuse (``ledger``) a ledger that no longer extends the head this node saw at its previous
    message of the run (``context.state``): a file replaced by an older copy or rebuilt has a
    valid hash chain of its own, and would let the run spend its budget again. Then pin the
    current head."""
    path = str(guard.ledger.path)
    rec = context.state.config_records.get(_HEAD_STATE)
    prev = (int(rec["rows"]), str(rec["hash"])) if rec is not None and str(rec.get("ledger", "")) == path else None
    ok, head = guard.ledger.extends(prev)
    if not ok:
        raise Refusal("ledger", f"{path}: the ledger no longer holds row {prev[0]} as this node saw it earlier in the "
                                "run: it was replaced by an older copy, rebuilt or rolled back; nothing was charged; "
                                "fix: restore the ledger file that holds every charge")
    context.state.config_records[_HEAD_STATE] = ConfigRecord({"ledger": path, "rows": int(head[0]), "hash": head[1]})


def refusal_reply(msg: Message, code: str) -> Message:
    """A refusal the server can read: a code, nothing else."""
    return Message(RecordDict({"refusal": ConfigRecord({"code": code})}), reply_to=msg)


def private_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn any refusal or exception of ``handler`` into a generic refusal code (see module doc)."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Refusal as err:
            log.warning("refused %s: [%s] %s", msg.metadata.message_type, err.code, err.detail)
            return refusal_reply(msg, err.code)
        except FedrecInputError as err:
            log.warning("refused %s: [data] %s", msg.metadata.message_type, err)
            return refusal_reply(msg, "data")
        except Exception:  # noqa: BLE001 - nothing of an exception may reach the server
            log.exception("failed %s (the server sees only the code 'internal')", msg.metadata.message_type)
            return refusal_reply(msg, "internal")

    return wrapped


def secagg_round_size(msg: Message) -> int | None:
    """Participants of this round per the message's SecAgg+ masking record (None: none)."""
    rec = msg.content.config_records.get(_SECAGG_RECORD)
    if rec is None or str(rec.get("stage", "")) != "mask" or "active" not in rec:
        return None
    return len({int(x) for x in rec["active"]})


def noise_record(n_min: int, share_std: float | None = None) -> ConfigRecord:
    """Reply record carrying, to the SecAgg+ mod, the survivor floor of distributed noise and,
    where the handler knows it in the release's units, the noise std its share carries per
    coordinate (the mod refuses a quantization step too coarse for it: _quantize.check_share_step)."""
    rec = {"n-min": int(n_min)}
    if share_std is not None:
        rec["share-std"] = float(share_std)
    return ConfigRecord(rec)


@dataclasses.dataclass(frozen=True)
class StatisticsCharge:
    """What a statistics handler needs after its charge: the guard (to mark the release and read
    ε spent), the noise share the policy accepted, and the charged ledger entry."""

    guard: ReleaseGuard
    share: float
    charge: Charge


def charge_statistics_release(msg: Message, context: Context, folder: Path, institution: str, *, sigma: float,
                              sensitivity: float, request: ReleaseRequest, dp: bool, accountant: str,
                              server_round: int, task: str, model: str = "causal") -> StatisticsCharge:
    """Policy check and write-ahead charge of one Gaussian statistics release, before any data is read.

    Privacy contract: returns only once the institution's ledger holds the release's event —
    ``GaussianEvent(σ, sensitivity)`` with σ the server's noise multiplier and ``sensitivity``
    the release's public L2 bound (``NonPrivateEvent`` at σ = 0, which the guard refuses
    unless the policy allows non-private releases). The caller must noise its sums with
    ``charge.event`` and ``share`` (common/privacy/release.py) and call
    ``guard.released(charge)`` after the reply is built. Refused (:class:`Refusal`, nothing
    charged): σ negative or not finite; the run's ``request`` (ε, δ, noise mode, n_min against
    this round's SecAgg+ size) outside the institution's policy; σ = 0 in a run declared DP;
    σ > 0 in a run declared non-private; a charge over the cap or the per-run ceiling.
    """
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise Refusal("policy", f"noise multiplier {sigma} is not usable")
    guard = node_guard(context, folder, institution, accountant=accountant)
    # the round's size is read from the message's SecAgg+ record, never taken from the caller
    share = guard.authorize(dataclasses.replace(request, round_size=secagg_round_size(msg)))
    if sigma == 0 and dp:
        raise Refusal("policy", "the server asked for a release without noise while the run is DP")
    if sigma > 0 and not dp:
        raise Refusal("policy", "the server asked for noise in a run it declared non-private")
    event = GaussianEvent(noise_multiplier=sigma, sensitivity=sensitivity) if sigma > 0 else NonPrivateEvent()
    charge = guard.charge(event, run_id=str(context.run_id), round=server_round, task=task, model=model)
    return StatisticsCharge(guard=guard, share=share, charge=charge)
