"""The server half of SecAgg+ as bookkeeping over plain dicts (private).

Flower-free: ``server/secagg_workflow.py`` sends the records this class produces and feeds
back the replies. One :class:`ServerSession` = one key setup, valid for ``slots`` masked
rounds. Pairwise masks follow the sparse neighbour graph; the Shamir shares of every node's
per-slot secrets are held by a random committee of share holders (Flamingo-style), so the
unmask stage talks to the committee only. A slot is never reused. Every node holds one mask key pair per slot, so removing a
dropout's masks in slot r (by reconstructing its slot-r key) reveals nothing about its
masks in other slots: it rejoins next round under keys the server has never seen. A node
that missed the setup joins through a new setup (every node re-keys).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedrec.common.secagg import _graph, _keys, _masking, _quantize, _shamir, _wire
from fedrec.common.secagg._client import (MAX_DROPOUT_PERMILLE, STAGE_CONSISTENCY, STAGE_MASK, STAGE_SETUP_KEYS,
                                          STAGE_SETUP_SHARES, STAGE_UNMASK)
from fedrec.common.secagg._errors import SecAggError


def threshold_for(k: int) -> int:
    """Shamir threshold for k shareholders: a strict majority (t > k/2)."""
    return k // 2 + 1


def default_committee(n: int) -> int:
    """Share holders per session: every node up to 32, else 32 random nodes (threshold 17)."""
    return min(n, 32)


class _Ciphertexts(dict):
    """``(kind, sender, holder, slot) -> ciphertext``, filled lazily from each sender's two lists
    (holder-major, one per slot): 2 x committee x slots entries per node were ~0.1 M dict
    insertions per 100-node setup on the server's critical path; a round reads ~2 per holder."""

    def __init__(self) -> None:
        super().__init__()
        self._lists: dict[int, tuple[list, list, dict[int, int], int]] = {}

    def add_sender(self, sender: int, ct_s: list, ct_b: list, committee: Sequence[int], slots: int) -> None:
        self._lists[sender] = (ct_s, ct_b, {j: p for p, j in enumerate(committee)}, slots)

    def __missing__(self, key: tuple[str, int, int, int]) -> bytes:
        kind, sender, holder, slot = key
        if sender not in self._lists or kind not in ("s", "b"):
            raise KeyError(key)
        ct_s, ct_b, pos, slots = self._lists[sender]
        if holder not in pos or not 0 <= slot < slots:
            raise KeyError(key)
        value = bytes((ct_s if kind == "s" else ct_b)[pos[holder] * slots + slot])
        self[key] = value
        return value


@dataclass
class ServerSession:
    nodes: dict[int, int]  #: node id -> session index (1..n)
    slots: int
    degree: int = 0  #: neighbours per node in the mask graph (0 = complete graph)
    committee_size: int = 0  #: share holders (0 = default_committee(n))
    max_dropout_permille: int = 300  #: the dropout tolerance the nodes sign into their advertisements
    session: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    c_pks: dict[int, bytes] = field(default_factory=dict)
    s_pks: dict[int, list[bytes]] = field(default_factory=dict)  #: per slot
    neighbours: dict[int, list[int]] = field(default_factory=dict)
    committee: list[int] = field(default_factory=list)
    threshold: int = 0
    members: set[int] = field(default_factory=set)  #: indices that completed setup
    #: index -> (advert, its signature by the run key, run-key certificate, its identity signature)
    adverts: dict[int, tuple[bytes, bytes, bytes, bytes]] = field(default_factory=dict)
    plan: bytes = b""  #: the plan hash (graph/committee seed) every share ciphertext is bound to
    #: why a node's reply was not used (node id -> reason), per stage; the workflow logs them
    rejected: dict[int, str] = field(default_factory=dict)
    #: slot -> node id -> the survivor's signature of the slot's survivor set (consistency round)
    signatures: dict[int, dict[int, bytes]] = field(default_factory=dict)
    next_slot: int = 0
    # (kind, sender, holder, slot) -> share ciphertext (s: slot mask key, b: slot self seed)
    _ct: _Ciphertexts = field(default_factory=lambda: _Ciphertexts())

    @classmethod
    def create(cls, node_ids: Sequence[int], *, slots: int, degree: int | None,
               committee: int | None = None, max_dropout: float = 0.3) -> ServerSession:
        """``degree``: neighbours per node; 0 = complete graph; None = automatic (see ``_graph``).
        ``committee``: share holders; None = :func:`default_committee`."""
        if degree is None:
            degree = _graph.default_degree(len(node_ids))
        mdp = int(round(1000 * float(max_dropout)))
        if not 0 <= mdp <= MAX_DROPOUT_PERMILLE:
            raise SecAggError(f"max_dropout {max_dropout} must lie in [0, 0.5): unmasking needs a strict majority")
        return cls(nodes={nid: i + 1 for i, nid in enumerate(sorted(node_ids))}, slots=slots, degree=degree,
                   committee_size=committee or 0, max_dropout_permille=mdp)

    @staticmethod
    def quantization(*, clip_range: float, noise_std: float | None, n_clients: int, dim: int) -> _quantize.QuantParams:
        return _quantize.derive(clip_range=clip_range, noise_std=noise_std, n_clients=n_clients, dim=dim)

    @staticmethod
    def dequantize(total: np.ndarray, n_contributors: int, quant: _quantize.QuantParams) -> tuple[np.ndarray, int]:
        """(float64 sum, number of clamped coordinates) from the unmasked integer sum."""
        return _quantize.dequantize(total, n_contributors, quant)

    @property
    def node_of(self) -> dict[int, int]:
        return {i: nid for nid, i in self.nodes.items()}

    # ------------------------------------------------------------------ setup
    def setup_keys_records(self) -> dict[int, dict]:
        return {nid: {"stage": STAGE_SETUP_KEYS, "session": self.session, "index": i, "slots": self.slots,
                      "max-dropout-permille": self.max_dropout_permille}
                for nid, i in self.nodes.items()}

    def keys_received(self, replies: Mapping[int, Mapping]) -> dict[int, dict]:
        """Signed advertisements from the nodes that answered stage 1 -> the stage-2 record of
        each. A malformed advertisement is that node's dropout (reason in :attr:`rejected`); the
        server cannot verify signatures (it holds no roster) and need not: every client does."""
        self.rejected = {}
        for nid, rec in replies.items():
            i = self.nodes[nid]
            try:
                blob, sig = bytes(rec["advert"]), bytes(rec["sig"])
                cert, cert_sig = bytes(rec["cert"]), bytes(rec["cert-sig"])
                a = _wire.decode_advert(blob)
            except (KeyError, TypeError, ValueError) as err:
                self.rejected[nid] = f"malformed key advertisement ({err})"
                continue
            if a.session != self.session or a.index != i or a.slots != self.slots:
                self.rejected[nid] = "advertisement for another session, index or slot count"
                continue
            self.adverts[i] = (blob, sig, cert, cert_sig)
            self.c_pks[i], self.s_pks[i] = a.c_pk, list(a.s_pks)
        alive = sorted(self.adverts)
        size = min(len(alive), self.committee_size or default_committee(len(alive)))
        roll = [(i, _wire.decode_advert(self.adverts[i][0]).name, _wire.advert_hash(self.adverts[i][0]))
                for i in alive]
        self.plan = _wire.plan_seed(self.session, roll)
        degree = self.degree if self.degree < len(alive) - 1 else 0
        self.neighbours, self.committee = _graph.plan(alive, degree, size, self.plan)
        self.threshold = threshold_for(len(self.committee))
        common = {"stage": STAGE_SETUP_SHARES, "session": self.session, "slots": self.slots,
                  "roll-index": [e[0] for e in roll], "roll-name": [e[1] for e in roll],
                  "roll-hash": [e[2] for e in roll],
                  "degree": degree, "committee-size": size, "threshold": self.threshold}
        cset = set(self.committee)
        out = {}
        for i in alive:
            # a node needs the full advertisement of its neighbours and the committee (it verifies
            # their signatures); a share holder needs every member's channel key (hash-checked)
            need = alive if i in cset else sorted(cset | set(self.neighbours[i]) | {i})
            out[self.node_of[i]] = dict(common, index=i, adverts=[self.adverts[j][0] for j in need],
                                        sigs=[self.adverts[j][1] for j in need],
                                        certs=[self.adverts[j][2] for j in need],
                                        **{"cert-sigs": [self.adverts[j][3] for j in need]})
        return out

    def shares_received(self, replies: Mapping[int, Mapping]) -> None:
        """Store the encrypted shares; members = nodes that completed both setup stages."""
        C, R = len(self.committee), self.slots
        for nid, rec in replies.items():
            i = self.nodes[nid]
            ct_s, ct_b = list(rec["ct-s"]), list(rec["ct-b"])
            if len(ct_s) != C * R or len(ct_b) != C * R:
                raise SecAggError(f"node {nid} sent {len(ct_s)}/{len(ct_b)} share ciphertexts, expected "
                                  f"{C * R} of each")
            self._ct.add_sender(i, ct_s, ct_b, self.committee, R)
            self.members.add(i)
        holders = [j for j in self.committee if j in self.members]
        if len(holders) < self.threshold:
            raise SecAggError(f"setup: {len(holders)} of {C} share holders completed the setup, "
                              f"{self.threshold} needed")

    def usable_for(self, node_ids: Sequence[int]) -> bool:
        """Can a round over ``node_ids`` run in this session (all completed setup, a slot left)?"""
        idx = [self.nodes.get(n) for n in node_ids]
        return self.next_slot < self.slots and all(i is not None and i in self.members for i in idx)

    # ------------------------------------------------------------------- mask
    def consistency_records(self, slot: int, survivors: Sequence[int],
                            holders: Sequence[int] | None = None) -> dict[int, dict]:
        """Consistency round: each share holder asked (default: every surviving one) signs the
        survivor set."""
        s_idx = sorted(self.nodes[n] for n in survivors)
        if holders is None:
            cset = set(self.committee)
            holders = [n for n in survivors if self.nodes[n] in cset]
        return {n: {"stage": STAGE_CONSISTENCY, "session": self.session, "slot": slot, "survivors": s_idx}
                for n in holders}

    def signature_quorum(self) -> int:
        """Matching holder signatures every holder requires (SecAggClient.signature_quorum; a
        holder's own policy floor may raise it)."""
        c = len(self.committee)
        by_tol = -(-(1000 - self.max_dropout_permille) * c // 1000)
        return min(c, max(c // 2 + 1, by_tol, 2))

    def mask_record(self, node_ids: Sequence[int], quant: _quantize.QuantParams, server_round: int) -> tuple[int, dict]:
        slot = self.next_slot
        self.next_slot += 1  # burned whatever happens next
        active = sorted(self.nodes[n] for n in node_ids)
        return slot, {"stage": STAGE_MASK, "session": self.session, "slot": slot, "active": active,
                      "round": int(server_round), **quant.to_record()}

    # ----------------------------------------------------------------- unmask
    def holders_among(self, survivors: Sequence[int]) -> list[int]:
        """Share holders (node ids) still reachable, in random order; SecAggError if too few."""
        alive = {self.nodes[n] for n in survivors}
        ask = [self.node_of[v] for v in _graph.sample([v for v in self.committee if v in alive], len(alive))]
        if len(ask) < self.threshold:
            raise SecAggError(f"only {len(ask)} share holders survived, {self.threshold} needed")
        return ask

    def unmask_records(self, slot: int, survivors: Sequence[int], dropped: Sequence[int],
                       holders: Sequence[int] | None = None,
                       signatures: Mapping[int, bytes] | None = None) -> dict[int, dict]:
        """Per share holder asked (default: every surviving one): the ciphertexts it must open —
        self-seed shares of survivors, this slot's mask-key shares of dropouts."""
        s_idx = sorted(self.nodes[n] for n in survivors)
        d_idx = sorted(self.nodes[n] for n in dropped)
        if holders is None:
            holders = self.holders_among(survivors)
        out = {}
        if signatures is None:
            signatures = self.signatures.get(slot, {})
        sig_from = sorted(self.nodes[n] for n in signatures)
        sig = [bytes(signatures[self.node_of[j]]) for j in sig_from]
        frm = s_idx + d_idx
        kind = ["b"] * len(s_idx) + ["s"] * len(d_idx)
        for nid in holders:
            v = self.nodes[nid]
            ct = [self._ct[(k, u, v, slot)] for u, k in zip(frm, kind)]
            out[nid] = {"stage": STAGE_UNMASK, "session": self.session, "slot": slot,
                        "survivors": s_idx, "dropped": d_idx, "ct": ct, "ct-from": frm, "ct-kind": kind,
                        "sig-from": sig_from, "sig": sig}
        return out

    def check_survivors(self, survivors: Sequence[int]) -> None:
        """Refuse to unmask when the survivors' graph is split: that would reveal partial sums."""
        s_idx = [self.nodes[n] for n in survivors]
        if not _graph.connected(s_idx, self.neighbours):
            raise SecAggError("survivors' neighbour graph is disconnected: unmasking would reveal partial sums")

    def unmask(self, slot: int, masked: Mapping[int, np.ndarray], dropped: Sequence[int],
               share_replies: Mapping[int, Mapping]) -> np.ndarray:
        """Sum of the survivors' masked vectors with every mask removed (mod 2^bits)."""
        s_idx = {self.nodes[n] for n in masked}
        d_idx = {self.nodes[n] for n in dropped}
        cset = set(self.committee)
        b_sh: dict[int, dict[int, bytes]] = {u: {} for u in s_idx}
        s_sh: dict[int, dict[int, bytes]] = {u: {} for u in d_idx}
        for nid, rec in share_replies.items():
            v = self.nodes[nid]
            if v not in cset:
                continue
            for u, kind, share in zip(rec["share-from"], rec["share-kind"], rec["shares"]):
                u = int(u)
                if kind == "b" and u in b_sh:
                    b_sh[u][v] = bytes(share)
                elif kind == "s" and u in s_sh:
                    s_sh[u][v] = bytes(share)
        vecs = list(masked.values())
        total = vecs[0].copy()
        for y in vecs[1:]:
            total += y
        t = self.threshold
        for u in sorted(s_idx):
            if len(b_sh[u]) < t:
                raise SecAggError(f"unmask: {len(b_sh[u])} self-seed shares for node {self.node_of[u]}, {t} needed")
            seed = _shamir.combine(b_sh[u], t)
            _masking.add_into(total, _keys.slot_key(seed, session=self.session, slot=slot, kind=b"self"), -1)
        for u in sorted(d_idx):
            if len(s_sh[u]) < t:
                raise SecAggError(f"unmask: {len(s_sh[u])} mask-key shares for dropped node {self.node_of[u]}, "
                                  f"{t} needed")
            s_sk = _shamir.combine(s_sh[u], t)  # u's mask key for this slot only
            for w in self.neighbours[u]:
                if w in s_idx:  # w added sign(w, u) * mask(w, u); take it out
                    seed = _keys.pair_seed(s_sk, self.s_pks[w][slot], session=self.session, a=u, b=w, slot=slot)
                    _masking.add_into(total, _keys.slot_key(seed, session=self.session, slot=slot, kind=b"pair"),
                                      -_masking.pair_sign(w, u))
        return total
