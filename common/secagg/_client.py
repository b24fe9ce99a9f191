"""The client half of SecAgg+ as a state machine over plain dicts (private).

Flower-free: ``client/secagg_mod.py`` moves records in and out of messages and keeps
:class:`ClientState` in ``context.state``. Each method checks what the server asks for and
refuses (``SecAggProtocolError``) anything an honest server would never send, because that is
what would leak an input: a reused slot, or both kinds of share (self seed and mask key) for
one node in one slot. Mask keys are per slot, so revealing a dropout's key for one round
tells nothing about its masks in any other round: the node is re-keyed for the next round by
construction.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from fedrec.common.secagg import _keys, _masking, _quantize, _shamir
from fedrec.common.secagg._errors import SecAggProtocolError

STAGE_SETUP_KEYS = "setup-keys"
STAGE_SETUP_SHARES = "setup-shares"
STAGE_MASK = "mask"
STAGE_UNMASK = "unmask"


@dataclass
class ClientState:
    session: bytes = b""
    index: int = 0
    c_sk: bytes = b""
    # 32-byte secrets are packed into one bytes blob per kind (cheap to store in a record)
    s_sks: bytes = b""  #: per-slot mask private keys, erased after setup
    slots: int = 0
    threshold: int = 0  #: of the share-holder committee
    committee: list[int] = field(default_factory=list)
    neighbours: list[int] = field(default_factory=list)
    pair_seeds: bytes = b""  #: neighbour-major, one per slot
    peers: list[int] = field(default_factory=list)  #: nodes this one has a share channel with
    chan_keys: bytes = b""  #: one per peer
    self_seeds: bytes = b""  #: one per slot
    last_slot: int = -1
    #: as share holder: the slot of the last unmask request and the shares released for it,
    #: "node:kind" (one kind per node and slot, ever)
    released_slot: int = -1
    released: list[str] = field(default_factory=list)
    #: per slot, the fewest survivors this node's input may be unmasked with (distributed
    #: noise: its n_min; 0 where it set none)
    floors: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientState:
        st = cls()
        for k in (f.name for f in fields(cls)):
            if k in d:
                v = d[k]
                setattr(st, k, list(v) if isinstance(getattr(st, k), list) else v)
        return st


def _at(blob: bytes, i: int) -> bytes:
    return blob[32 * i: 32 * (i + 1)]


def _erase(blob: bytes, idx) -> bytes:
    b = bytearray(blob)
    for i in idx:
        b[32 * i: 32 * (i + 1)] = bytes(32)
    return bytes(b)


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise SecAggProtocolError(why)


class SecAggClient:
    """One node's SecAgg+ protocol state; ``state`` round-trips through :meth:`ClientState.to_dict`."""

    def __init__(self, state: ClientState | None = None):
        self.state = state or ClientState()

    # ------------------------------------------------------------------ setup
    def setup_keys(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 1: fresh key pairs for a new session (any previous session is discarded):
        one channel key pair and one mask key pair per slot."""
        session = bytes(rec["session"])
        _need(len(session) == 16, "session id must be 16 bytes")
        slots = int(rec["slots"])
        _need(int(rec["index"]) >= 1 and 1 <= slots <= 1024, "bad index or slot count")
        c_sk, c_pk = _keys.generate_keypair()
        pairs = [_keys.generate_keypair() for _ in range(slots)]
        self.state = ClientState(session=session, index=int(rec["index"]), c_sk=c_sk,
                                 s_sks=b"".join(sk for sk, _ in pairs), slots=slots)
        return {"c-pk": c_pk, "s-pks": [pk for _, pk in pairs]}

    def setup_shares(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 2: agree pairwise seeds with neighbours (one per slot); encrypt, for each share
        holder, Shamir shares of each slot's mask key and self seed."""
        st = self.state
        self._check_session(rec)
        _need(bool(st.s_sks), "setup already completed for this session")
        nbrs = [int(x) for x in rec["neighbours"]]
        s_pks = list(rec["s-pks"])
        committee = [int(x) for x in rec["committee"]]
        peers = [int(x) for x in rec["peers"]]
        c_pks = list(rec["c-pks"])
        t, R = int(rec["threshold"]), st.slots
        _need(len(s_pks) == len(nbrs) * R and len(set(nbrs)) == len(nbrs), "inconsistent neighbour list")
        _need(st.index not in nbrs, "a node cannot be its own neighbour")
        _need(len(peers) == len(c_pks) and set(committee) <= set(peers) and len(set(committee)) == len(committee),
              "inconsistent committee")
        _need(st.index not in committee or set(peers) >= set(nbrs), "a share holder needs every channel key")
        _need(1 <= t <= len(committee) and 2 * t > len(committee),
              f"threshold {t} must be a majority of the {len(committee)} share holders")
        me = st.index
        st.neighbours, st.committee, st.threshold, st.peers = nbrs, committee, t, peers
        chan = [
            _keys.channel_key(st.c_sk, bytes(pk), session=st.session, a=me, b=j) if j != me
            else _keys.hkdf(st.c_sk, salt=st.session, info=b"fedrec-secagg/self")  # own share
            for j, pk in zip(peers, c_pks)
        ]
        st.chan_keys = b"".join(chan)
        st.pair_seeds = b"".join(
            _keys.pair_seed(_at(st.s_sks, slot), bytes(s_pks[p * R + slot]), session=st.session, a=me, b=j, slot=slot)
            for p, j in enumerate(nbrs) for slot in range(R)
        )
        seeds = [secrets.token_bytes(32) for _ in range(R)]
        st.self_seeds = b"".join(seeds)
        s_shares = [_shamir.split(_at(st.s_sks, slot), committee, t) for slot in range(R)]
        b_shares = [_shamir.split(b, committee, t) for b in seeds]
        key_of = dict(zip(peers, chan))
        ct_s, ct_b = [], []
        for p, j in enumerate(committee):
            key = key_of[j]
            for slot in range(R):
                ct_s.append(_keys.encrypt(key, s_shares[slot][p], _keys.associated_data(
                    session=st.session, sender=me, receiver=j, kind="s", slot=slot)))
                ct_b.append(_keys.encrypt(key, b_shares[slot][p], _keys.associated_data(
                    session=st.session, sender=me, receiver=j, kind="b", slot=slot)))
        st.s_sks = b""  # the pairwise seeds are derived; the private mask keys are no longer needed
        st.c_sk = b""  # nor the channel key pair (channel keys are derived)
        return {"ct-s": ct_s, "ct-b": ct_b}

    # ------------------------------------------------------------------- mask
    def check_mask_request(self, rec: Mapping[str, Any]) -> None:
        """Validate a masking request *before* the handler computes (and charges) anything."""
        st = self.state
        self._check_session(rec)
        slot = int(rec["slot"])
        _need(st.threshold > 0, "setup incomplete: re-key required")
        _need(0 <= slot < st.slots, f"slot {slot} outside this session's {st.slots} slots: re-key required")
        _need(slot > st.last_slot, f"slot {slot} already used (last {st.last_slot}): refusing to reuse a mask")
        _need(st.index in set(int(x) for x in rec["active"]), "this node is not in the round's active set")

    def mask(self, rec: Mapping[str, Any], vector: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Quantize ``vector`` and add the self mask and the pairwise masks of active neighbours."""
        self.check_mask_request(rec)
        st = self.state
        slot = int(rec["slot"])
        params = _quantize.QuantParams.from_record(rec)
        y = _quantize.quantize(vector, params, rng)
        st.last_slot = slot  # burn the slot before anything leaves
        _masking.add_into(y, _keys.slot_key(_at(st.self_seeds, slot), session=st.session, slot=slot, kind=b"self"), +1)
        active = set(int(x) for x in rec["active"])
        for p, j in enumerate(st.neighbours):
            if j in active:
                seed = _at(st.pair_seeds, p * st.slots + slot)
                _masking.add_into(y, _keys.slot_key(seed, session=st.session, slot=slot, kind=b"pair"),
                                  _masking.pair_sign(st.index, j))
        # forward secrecy: used seeds and pairwise seeds are erased
        st.self_seeds = _erase(st.self_seeds, [slot])
        st.pair_seeds = _erase(st.pair_seeds, [p * st.slots + slot for p in range(len(st.neighbours))])
        return y

    def set_survivor_floor(self, slot: int, n_min: int) -> None:
        """Distributed noise: this node's input in ``slot`` carries σ²/n_min of the noise, so it
        holds back every self-seed share of that slot unless at least ``n_min`` survive."""
        st = self.state
        _need(0 <= slot < st.slots, f"slot {slot} outside this session")
        floors = list(st.floors) + [0] * (st.slots - len(st.floors))
        floors[slot] = max(floors[slot], int(n_min))
        st.floors = floors

    # ----------------------------------------------------------------- unmask
    def unmask(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """As share holder: decrypt the requested shares of one slot — self-seed shares of
        survivors, mask-key shares of dropouts — never both kinds for one node in one slot."""
        st = self.state
        self._check_session(rec)
        _need(st.index in st.committee, "this node holds no shares")
        slot = int(rec["slot"])
        _need(0 <= slot < st.slots, f"slot {slot} outside this session")
        _need(slot >= st.released_slot, f"unmask for slot {slot} after slot {st.released_slot}: replay refused")
        survivors = set(int(x) for x in rec["survivors"])
        dropped = set(int(x) for x in rec["dropped"])
        _need(not survivors & dropped, "a node cannot be both survivor and dropped")
        floor = st.floors[slot] if slot < len(st.floors) else 0
        _need(len(survivors) >= floor,
              f"unmask with {len(survivors)} survivors, below this node's distributed-noise n_min {floor}")
        senders = [int(x) for x in rec["ct-from"]]
        kinds = [str(x) for x in rec["ct-kind"]]
        cts = list(rec["ct"])
        _need(len(senders) == len(kinds) == len(cts) and len(set(senders)) == len(senders),
              "malformed share request (one share per sender)")
        key_of = {j: _at(st.chan_keys, p) for p, j in enumerate(st.peers)}
        given = dict(x.split(":") for x in st.released) if slot == st.released_slot else {}
        out_share, out_from, out_kind = [], [], []
        for u, kind, ct in zip(senders, kinds, cts):
            _need(u in key_of, f"node {u} is not a participant")
            if kind == "b":
                _need(u in survivors, f"self-seed share requested for node {u}, not a survivor")
            elif kind == "s":
                _need(u in dropped, f"mask-key share requested for node {u}, not a dropout")
            else:
                raise SecAggProtocolError(f"unknown share kind {kind!r}")
            _need(given.get(str(u), kind) == kind,
                  f"node {u}: a {given.get(str(u))!r} share was already released for this slot; "
                  "releasing both would reveal its input")
            share = _keys.decrypt(key_of[u], bytes(ct), _keys.associated_data(
                session=st.session, sender=u, receiver=st.index, kind=kind, slot=slot))
            out_share.append(share)
            out_from.append(u)
            out_kind.append(kind)
        for u, kind in zip(out_from, out_kind):
            given[str(u)] = kind
        st.released_slot, st.released = slot, [f"{u}:{k}" for u, k in given.items()]
        return {"shares": out_share, "share-from": out_from, "share-kind": out_kind}

    def is_mask_stage(self, rec: Mapping[str, Any]) -> bool:
        return str(rec.get("stage", "")) == STAGE_MASK

    def handle(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a setup or unmask request (everything but ``mask``)."""
        stage = str(rec.get("stage", ""))
        if stage == STAGE_SETUP_KEYS:
            return self.setup_keys(rec)
        if stage == STAGE_SETUP_SHARES:
            return self.setup_shares(rec)
        if stage == STAGE_UNMASK:
            return self.unmask(rec)
        raise SecAggProtocolError(f"unknown secagg stage {stage!r}")

    def _check_session(self, rec: Mapping[str, Any]) -> None:
        _need(bool(self.state.session) and bytes(rec["session"]) == self.state.session,
              "unknown secure-aggregation session: re-key required")
