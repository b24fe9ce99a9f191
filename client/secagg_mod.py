"""fedrec's SecAgg+ client mod for Flower's Message API.

Use it as a ClientApp mod::

    from fedrec.client.secagg_mod import secaggplus_mod
    app = ClientApp(mods=[secaggplus_mod])   # first (outermost): it answers setup/unmask
                                             # messages itself, before any other mod runs

Messages from ``server/secagg_workflow.py`` carry a ConfigRecord named ``"fedrec.secagg"``
(the :data:`SECAGG_RECORD`) whose ``stage`` says what to do:

* ``setup-keys`` / ``setup-shares`` (once per session): answered by the mod itself — fresh
  X25519 key pairs, then AES-GCM-encrypted Shamir shares for the neighbours. The handler
  is not called. These stages reuse the round's own message type (e.g. ``train``), because a
  Message-API ClientApp runs its mods only for message types that have a handler.
* ``mask``: the mod validates the request (known session, fresh slot) *before* the handler
  runs, calls the handler, and replaces the reply's ``"arrays"`` (the handler's already
  noised contribution) by one quantized, masked uint vector; ``"metrics"`` pass unchanged. A
  ``"refusal"`` reply passes unchanged (the server counts the node as dropped).
* ``consistency``: the node signs (Ed25519 session key) the survivor set of the slot it just
  masked, once per slot, after checking it against its floors and its own view of the graph.
* ``unmask``: the mod opens the share ciphertexts the server forwards and returns the shares,
  only for the survivor set it signed and only with a quorum of matching survivor signatures.

**Identity and floors (issue 28).** Key advertisements are signed with an Ed25519 run key that
the institution's long-term ECDSA key certifies (once a day; peers verify each certificate
once per run against the federation roster and keep its digest in ``context.state``), both the
key and the roster named by the institution's policy (``identity-key``, ``roster`` in ``privacy.toml``; see
:func:`node_policy_file`). A node without them answers every setup with the refusal code
``secagg`` (the detail stays in its log): it never falls back to unsigned keys. The policy's
``min-round-size`` is the node's floor on the active set, the survivor set and the committee.

Protocol secrets (X25519 private keys, pairwise seeds, self-mask seeds, the run key) live in
``context.state`` under the same name; they never appear in a reply.

**Plain mode.** A message *without* the SecAgg record would send the contribution in the
clear. The mod refuses that (a ``"refusal"`` reply, before the handler runs for ``train``
messages, and by withholding the ``"arrays"`` of any other reply) whenever secure
aggregation is required. Requirement, in order:

1. the node config key ``secagg-required`` (set by the institution's IT) — always wins;
   nothing the server sends can lower it;
2. otherwise, on a *simulated* node (one with Flower simulation's ``partition-id`` and
   ``num-partitions`` in its node config), the run config's ``secagg.enabled`` (default true):
   a simulation may opt into plain sums for tests and benchmark peers;
3. otherwise: required.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from functools import lru_cache
from pathlib import Path

from fedrec.common.secagg import ClientState, SecAggClient, SecAggError
from fedrec.common.secagg._identity import Identity, IdentityError

NOISE_RECORD = "fedrec.noise"  #: the handler's distributed-noise floor (client/node.py)

log = logging.getLogger(__name__)

__all__ = ["secaggplus_mod", "SECAGG_RECORD", "secagg_required"]

SECAGG_RECORD = "fedrec.secagg"
_STATE = "fedrec.secagg"


def _truthy(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def secagg_required(context: Context) -> bool:
    """Whether this node may only release contributions through SecAgg+ (see module doc)."""
    node = context.node_config
    if "secagg-required" in node:
        return _truthy(node["secagg-required"])
    if "partition-id" in node and "num-partitions" in node:
        return _truthy(context.run_config.get("secagg.enabled", True))
    return True


def _refuse(msg: Message, reason: str) -> Message:
    return Message(RecordDict({"refusal": ConfigRecord({"reason": reason})}), reply_to=msg)


def _error(msg: Message, reason: str) -> Message:
    log.warning("secagg: %s", reason)
    return Message(RecordDict({SECAGG_RECORD: ConfigRecord({"error": reason})}), reply_to=msg)


def node_policy_file(context: Context) -> Path | None:
    """The institution policy this node obeys (as client/node.py finds it): a deployed node's
    node config ``policy`` or ``<data-dir>/privacy.toml``; a simulated node's
    ``<sim.policy-dir>/<the partition-id-th institution folder, in name order>/privacy.toml``."""
    from fedrec.common.privacy.policy import POLICY_FILE

    node = context.node_config
    if not ("partition-id" in node and "num-partitions" in node):
        if "policy" in node:
            return Path(str(node["policy"]))
        return Path(str(node["data-dir"])) / POLICY_FILE if "data-dir" in node else None
    root = str(context.run_config.get("sim.policy-dir", "") or "")
    try:
        mtime = Path(root).stat().st_mtime if root else None
    except OSError:
        return None
    if mtime is None or not Path(root).is_dir():
        return None
    folders = _policy_folders(root, mtime)
    pid = int(node["partition-id"])
    return folders[pid] / POLICY_FILE if pid < len(folders) else None


@lru_cache(maxsize=8)
def _policy_folders(root: str, mtime: float) -> tuple[Path, ...]:
    """The institution folders of a simulation's policy dir, in name order; cached per (dir,
    mtime): one simulation process plays every node, and listing 1,000 folders on each message
    made each node's work grow with n."""
    from fedrec.common.privacy.policy import POLICY_FILE

    return tuple(sorted(p for p in Path(root).iterdir() if (p / POLICY_FILE).is_file()))


@lru_cache(maxsize=16)
def _roster(path: str, mtime: float):
    from fedrec.common.secagg._identity import load_roster

    return load_roster(path)


@lru_cache(maxsize=4096)
def _identity_from(policy_file: str, mtime: float) -> tuple[Identity | None, int, str]:
    """Cached per (file, mtime): a simulation process plays many nodes, a deployed one just one."""
    from fedrec.common.errors import FedrecInputError
    from fedrec.common.privacy.policy import load_policy

    try:
        pol = load_policy(policy_file)
    except FedrecInputError as err:
        return None, 0, str(err)
    key, roster = getattr(pol, "identity_key", None), getattr(pol, "roster", None)
    if key is None or roster is None:
        return None, pol.min_round_size, (f"{policy_file}: no identity-key / roster: secure aggregation needs the "
                                          "institution's signing key and the federation roster")
    try:
        return Identity.load(key, _roster(str(roster), Path(roster).stat().st_mtime)), pol.min_round_size, ""
    except OSError as err:
        return None, pol.min_round_size, f"{roster}: cannot read the roster ({type(err).__name__})"
    except IdentityError as err:
        return None, pol.min_round_size, str(err)


def node_identity(context: Context) -> tuple[Identity | None, int, str]:
    """(identity or None, the policy's min-round-size, why there is no identity)."""
    path = node_policy_file(context)
    if path is None:
        return None, 0, "no institution policy found for this node (node config policy / data-dir)"
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None, 0, f"{path}: no institution policy here"
    return _identity_from(str(path), mtime)


def _load(context: Context) -> SecAggClient:
    rec = context.state.config_records.get(_STATE)
    identity, min_set, _ = node_identity(context)
    return SecAggClient(ClientState.from_dict(dict(rec.items())) if rec is not None else None,
                        identity=identity, min_set=min_set)


def rounding_rng(context: Context, rec) -> np.random.Generator | None:
    """The stochastic-rounding generator of one masked contribution: None (a fresh generator
    from the OS CSPRNG, :func:`fedrec.common.secagg._quantize.secure_rng`) on a deployed node;
    on a *simulated* node whose run config sets ``sim.noise-seed`` >= 0, one derived from that
    seed, the node's partition id, the round and the slot, so two simulations with the same
    seed give the same sums. The rounding is post-processing of already noised values (no
    privacy rests on it), but deployment keeps the CSPRNG, as for the noise itself."""
    from fedrec.client.node import is_simulated
    from fedrec.common.config import derive_seed

    base = int(context.run_config.get("sim.noise-seed", -1))
    if base < 0 or not is_simulated(context):
        return None
    return np.random.default_rng(derive_seed(base, "secagg-rounding", int(context.node_config["partition-id"]),
                                             int(rec.get("round", 0)), int(rec["slot"])))


def _save(context: Context, client: SecAggClient) -> None:
    context.state.config_records[_STATE] = ConfigRecord(client.state.to_dict())


def secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: SecAgg+ for messages that carry the ``fedrec.secagg`` record (see module doc)."""
    rec = msg.content.config_records.get(SECAGG_RECORD)
    if rec is None:
        return _plain(msg, context, call_next)
    stage = str(rec.get("stage", ""))
    client = _load(context)
    if stage == "setup-keys" and client.identity is None:
        log.warning("secagg refused: %s", node_identity(context)[2])
        return Message(RecordDict({"refusal": ConfigRecord({"code": "secagg"})}), reply_to=msg)
    if client.is_mask_stage(rec):
        return _mask(msg, context, call_next, client, rec)
    try:
        out = client.handle(rec)
    except (SecAggError, ValueError, KeyError) as err:
        return _error(msg, f"{stage}: {err}")
    _save(context, client)
    return Message(RecordDict({SECAGG_RECORD: ConfigRecord(out)}), reply_to=msg)


def _mask(msg: Message, context: Context, call_next: ClientAppCallable, client: SecAggClient, rec) -> Message:
    try:  # refuse before the handler charges the budget or touches data
        client.check_mask_request(rec)
    except SecAggError as err:
        return _error(msg, f"mask: {err}")
    except (ValueError, TypeError, KeyError) as err:  # a malformed record (wrong types, missing keys)
        return _error(msg, f"mask: malformed request ({type(err).__name__})")
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply  # refusal / failure / nothing to sum: the server counts a dropout
    arrays = reply.content.array_records["arrays"]
    names = list(arrays.keys())
    parts = [arrays[k].numpy() for k in names]
    shapes = [list(p.shape) for p in parts]
    vec = np.concatenate([p.ravel() for p in parts]) if parts else np.zeros(0)
    noise = reply.content.config_records.get(NOISE_RECORD)
    try:  # a distributed-noise share is never clamped at the coordinator's bound: wrapped (_quantize doc)
        # a distributed share carries its own noise std where its handler knows it in the release's
        # units (the Gaussian sums of causal and strategy releases): the coordinator's step is checked
        # against it (_quantize.check_share_step); MF and adapter deltas do not carry it yet
        share_std = None if noise is None or "share-std" not in noise else float(noise["share-std"])
        masked = client.mask(rec, vec, rounding_rng(context, rec), wrap=noise is not None, share_std=share_std)
        if noise is not None:  # distributed noise: never unmask below its n_min survivors
            client.set_survivor_floor(int(rec["slot"]), int(noise["n-min"]))
    except (SecAggError, ValueError) as err:  # after the handler: the text may depend on the data
        log.warning("secagg: mask refused after the handler ran: %s", err)  # detail stays in the log
        return _error(msg, "mask: contribution not masked (reason in the institution's log)")
    _save(context, client)
    content = RecordDict()
    for key, record in reply.content.items():
        if key != "arrays":
            content[key] = record
    content["arrays"] = ArrayRecord({"masked": Array(masked)})
    content[SECAGG_RECORD] = ConfigRecord(
        {"names": names, "shapes": json.dumps(shapes), "slot": int(rec["slot"])}
    )
    return Message(content, reply_to=msg)


def _plain(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not secagg_required(context):
        return call_next(msg, context)
    why = ("this institution requires secure aggregation (node config secagg-required); "
           "the server asked for a contribution in the clear")
    if msg.metadata.message_type.split(".")[0] == "train":
        return _refuse(msg, why)
    reply = call_next(msg, context)
    if not reply.has_error() and "arrays" in reply.content.array_records:
        log.warning("secagg: withheld an unmasked contribution (%s)", msg.metadata.message_type)
        return _refuse(msg, why)
    return reply
