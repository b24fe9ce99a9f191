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

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

import numpy as np

from fedrec.common.secagg import _graph, _identity, _keys, _masking, _quantize, _shamir, _wire
from fedrec.common.secagg._errors import SecAggProtocolError

STAGE_SETUP_KEYS = "setup-keys"
STAGE_SETUP_SHARES = "setup-shares"
STAGE_MASK = "mask"
STAGE_CONSISTENCY = "consistency"
STAGE_UNMASK = "unmask"
#: a coordinator may declare at most this fraction dropped (unmasking needs a strict majority)
MAX_DROPOUT_PERMILLE = 499
#: the smallest sparse degree a node accepts (0 = complete graph)
MIN_DEGREE = 4


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
    # ---- lying-coordinator defences (issue 28)
    name: str = ""  #: this institution's name in the roster
    advert: bytes = b""  #: the advertisement this node signed for the session
    e_sk: bytes = b""  #: Ed25519 session signing key (signs consistency messages)
    max_dropout: int = 0  #: accepted dropout tolerance, per mille (< 500)
    min_set: int = 0  #: the policy's floor on every set (active, survivors, committee)
    members: list[int] = field(default_factory=list)  #: indices with a verified advertisement
    e_pks: bytes = b""  #: the committee's Ed25519 keys, one per holder (committee order)
    degree: int = 0
    committee_size: int = 0
    plan_seed: bytes = b""  #: the plan hash: seed of graph and committee, bound into every share
    mask_slot: int = -1  #: the last slot this node masked, and the active set it was told
    mask_active: list[int] = field(default_factory=list)
    signed_slot: int = -1  #: the last slot whose survivor set this node signed, and that set
    signed_survivors: list[int] = field(default_factory=list)
    seen_sessions: list[bytes] = field(default_factory=list)  #: never key the same session twice
    # ---- the identity cache (kept across sessions): this node's run key and its certificate,
    # and the digests of the peers' certificates it verified (see _identity)
    run_sk: bytes = b""  #: Ed25519 run key: signs this node's advertisements
    run_cert: bytes = b""  #: (name, run key, validity), signed with the identity key
    run_cert_sig: bytes = b""
    run_owner: bytes = b""  #: SHA-256 of the identity key line that signed run_cert
    verified: bytes = b""  #: 32-byte digests of verified peer certificates (newest last)

    def to_dict(self) -> dict[str, Any]:
        """Flat values for a Flower ConfigRecord; lists of indices are packed into bytes (a
        ConfigRecord type-checks every list element, and the state is saved after every message)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _INDEX_LISTS:
                v = np.asarray(v, dtype="<i8").tobytes()
            elif f.name == "seen_sessions":
                v = b"".join(v)
            elif f.name == "released":
                v = ",".join(v)
            out[f.name] = list(v) if isinstance(v, list) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientState:
        st = cls()
        for k in (f.name for f in fields(cls)):
            if k in d:
                v = d[k]
                if k in _INDEX_LISTS and isinstance(v, bytes):
                    v = np.frombuffer(v, dtype="<i8").tolist()
                elif k == "seen_sessions" and isinstance(v, bytes):
                    v = [v[i:i + 16] for i in range(0, len(v), 16)]
                elif k == "released" and isinstance(v, str):
                    v = v.split(",") if v else []
                setattr(st, k, list(v) if isinstance(getattr(st, k), list) else v)
        return st


#: verified certificate digests a node keeps (the federation's members, with room for renewals)
_VERIFIED_MAX = 4096

#: ClientState fields that are lists of integers (packed as little-endian int64 bytes)
_INDEX_LISTS = frozenset({"committee", "neighbours", "peers", "floors", "members", "mask_active",
                          "signed_survivors"})


def _at(blob: bytes, i: int) -> bytes:
    return blob[32 * i: 32 * (i + 1)]


def _erase(blob: bytes, idx) -> bytes:
    b = bytearray(blob)
    for i in idx:
        b[32 * i: 32 * (i + 1)] = bytes(32)
    return bytes(b)


@lru_cache(maxsize=64)
def _session_graph(members: tuple[int, ...], degree: int, committee_size: int, seed: bytes) -> dict[int, list[int]]:
    """The session's neighbour graph (read-only), recomputed from the plan hash once per process
    and session rather than at each consistency and unmask request."""
    return _graph.plan(members, degree, committee_size, seed)[0]


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise SecAggProtocolError(why)


class SecAggClient:
    """One node's SecAgg+ protocol state; ``state`` round-trips through :meth:`ClientState.to_dict`."""

    def __init__(self, state: ClientState | None = None, *, identity: _identity.Identity | None = None,
                 min_set: int = 0):
        """``identity``: this institution's long-term key and roster (required to set up a
        session); ``min_set``: its policy's floor on the active set, the survivor set and the
        committee (``min-round-size``)."""
        self.state = state or ClientState()
        self.identity = identity
        self.min_set = int(min_set)

    def _graph(self) -> dict[int, list[int]]:
        st = self.state
        return _session_graph(tuple(st.members), st.degree, st.committee_size, st.plan_seed)

    def _floor(self, slot: int) -> int:
        st = self.state
        nmin = st.floors[slot] if slot < len(st.floors) else 0
        return max(2, nmin, st.min_set, self.min_set)

    # ------------------------------------------------------------------ setup
    def setup_keys(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 1: fresh key pairs for a new session (any previous session is discarded): one
        channel key pair, one Ed25519 session signing key and one mask key pair per slot, in an
        advertisement signed with the institution's long-term identity key.

        Refuses without an identity (never advertises unsigned keys), a session id it has keyed
        before (replay), or a dropout tolerance of half the nodes or more."""
        if self.identity is None:
            raise SecAggProtocolError("this node has no identity key and roster (policy identity-key / roster): "
                                      "it never advertises unsigned keys")
        session = bytes(rec["session"])
        _need(len(session) == 16, "session id must be 16 bytes")
        slots = int(rec["slots"])
        _need(int(rec["index"]) >= 1 and 1 <= slots <= 1024, "bad index or slot count")
        mdp = int(rec.get("max-dropout-permille", 0))
        _need(0 <= mdp <= MAX_DROPOUT_PERMILLE, f"dropout tolerance {mdp / 1000:g} refused: unmasking needs a "
                                                "strict majority (max-dropout-fraction < 0.5)")
        seen = list(self.state.seen_sessions)
        _need(session not in seen, "this session id was keyed before: replay refused")
        old = self.state
        run_sk, cert, cert_sig, owner = self._run_key(old)
        c_sk, c_pk = _keys.generate_keypair()
        e_sk, e_pk = _identity.session_signing_keypair()
        pairs = [_keys.generate_keypair() for _ in range(slots)]
        adv = _wire.Advert(session=session, index=int(rec["index"]), slots=slots, max_dropout_permille=mdp,
                           time=int(time.time()), name=self.identity.name, c_pk=c_pk, e_pk=e_pk,
                           s_pks=tuple(pk for _, pk in pairs))
        blob = _wire.encode_advert(adv)
        self.state = ClientState(session=session, index=int(rec["index"]), c_sk=c_sk,
                                 s_sks=b"".join(sk for sk, _ in pairs), slots=slots, name=self.identity.name,
                                 advert=blob, e_sk=e_sk, max_dropout=mdp, min_set=self.min_set,
                                 seen_sessions=(seen + [session])[-64:], run_sk=run_sk, run_cert=cert,
                                 run_cert_sig=cert_sig, run_owner=owner, verified=old.verified)
        return {"advert": blob, "sig": _identity.session_sign(run_sk, blob), "cert": cert, "cert-sig": cert_sig}

    def _run_key(self, old: ClientState) -> tuple[bytes, bytes, bytes, bytes]:
        """(run key, certificate, its signature, owner digest): the cached ones while they are
        this identity's and valid for at least RUN_CERT_RENEW_S more, else a fresh run key
        certified with the identity key (one P-384 signature per day, not per session)."""
        ident = self.identity
        owner = hashlib.sha256(_identity.public_openssh(ident.key.public_key()).encode()).digest()
        now = int(time.time())
        if old.run_sk and old.run_owner == owner:
            try:
                name, _, nb, na = _identity.decode_run_cert(old.run_cert)
            except (ValueError, UnicodeDecodeError):
                name, nb, na = "", 0, 0
            if name == ident.name and nb <= now and now + _identity.RUN_CERT_RENEW_S <= na:
                return old.run_sk, old.run_cert, old.run_cert_sig, owner
        run_sk, run_pk = _identity.session_signing_keypair()
        cert = _identity.encode_run_cert(ident.name, run_pk, now - _wire.CLOCK_SKEW_S, now + _identity.RUN_CERT_TTL_S)
        return run_sk, cert, ident.sign(cert), owner

    def _roll(self, rec: Mapping[str, Any]) -> list[tuple[int, str, bytes]]:
        """The session roll (index, name, advertisement hash per member), checked without a
        signature: unique indices and names, every name in this node's roster, this node's own
        advertisement unaltered."""
        st, ident = self.state, self.identity
        _need(ident is not None, "no identity/roster to verify key advertisements against")
        idx, names, hashes = list(rec["roll-index"]), list(rec["roll-name"]), list(rec["roll-hash"])
        _need(len(idx) == len(names) == len(hashes), "malformed session roll")
        roll = [(int(i), str(nm), bytes(h)) for i, nm, h in zip(idx, names, hashes)]
        for i, nm, h in roll:
            _need(i >= 1 and len(h) == 32, "malformed session roll")
            _need(ident.roster.key_of(nm) is not None, f"advertisement from {nm!r}, who is not in this node's roster")
        _need(len({i for i, _, _ in roll}) == len(roll) and len({nm for _, nm, _ in roll}) == len(roll),
              "duplicate member in the session roll")
        own = [(nm, h) for i, nm, h in roll if i == st.index]
        _need(own == [(st.name, _wire.advert_hash(st.advert))], "this node's own advertisement is missing or altered")
        return roll

    def _checked_adverts(self, rec: Mapping[str, Any], roll: list[tuple[int, str, bytes]]) -> dict[int, tuple[_wire.Advert, bytes, bytes]]:
        """The full advertisements sent to this node, each matching its roll entry and made for
        this session and its parameters: index -> (advert, blob, signature). Signatures are
        checked later, only for the members whose keys this node uses (:meth:`setup_shares`)."""
        st = self.state
        blobs, sigs = list(rec["adverts"]), list(rec["sigs"])
        certs, cert_sigs = list(rec.get("certs", [])), list(rec.get("cert-sigs", []))
        _need(len(blobs) == len(sigs) == len(certs) == len(cert_sigs), "malformed advertisement list")
        entry = {i: (nm, h) for i, nm, h in roll}
        now = time.time()
        out: dict[int, tuple[_wire.Advert, bytes, bytes, bytes, bytes]] = {}
        for blob, sig, cert, cert_sig in zip(blobs, sigs, certs, cert_sigs):
            blob = bytes(blob)
            try:
                a = _wire.decode_advert(blob)
            except (ValueError, UnicodeDecodeError) as err:
                raise SecAggProtocolError(f"malformed key advertisement: {err}") from None
            _need(a.session == st.session, f"advertisement of {a.name!r} is for another session: replay refused")
            _need(a.slots == st.slots and a.max_dropout_permille == st.max_dropout,
                  f"advertisement of {a.name!r} was made for other session parameters")
            _need(now - _wire.ADVERT_MAX_AGE_S <= a.time <= now + _wire.CLOCK_SKEW_S,
                  f"advertisement of {a.name!r} is stale or from the future: replay refused")
            _need(entry.get(a.index) == (a.name, _wire.advert_hash(blob)) and a.index not in out,
                  f"advertisement of {a.name!r} (index {a.index}) does not match the session roll")
            out[a.index] = (a, blob, bytes(sig), bytes(cert), bytes(cert_sig))
        return out

    def _verify_signature(self, a: _wire.Advert, blob: bytes, sig: bytes, cert: bytes, cert_sig: bytes,
                          known: set[bytes]) -> None:
        """The advertisement is signed by the run key that ``a.name``'s identity key (in this
        node's roster) certified, and was made inside the certificate's validity. A certificate
        verified before (same roster key, same bytes) is not verified again."""
        roster = self.identity.roster
        pk, line = roster.key_of(a.name), roster.line_of(a.name)
        _need(pk is not None and line is not None, f"advertisement from {a.name!r}, who is not in this node's roster")
        try:
            name, run_pk, nb, na = _identity.decode_run_cert(cert)
        except (ValueError, UnicodeDecodeError) as err:
            raise SecAggProtocolError(f"run-key certificate of {a.name!r} is malformed: {err}") from None
        now = time.time()
        _need(name == a.name, f"advertisement of {a.name!r} comes with {name!r}'s run-key certificate")
        _need(nb - _wire.CLOCK_SKEW_S <= now <= na and nb <= a.time <= na,
              f"run-key certificate of {a.name!r} is expired or not yet valid")
        st = self.state
        digest = _identity.cert_digest(line, cert, cert_sig)
        if digest not in known:
            _need(_identity.verify_identity(pk, bytes(cert_sig), cert),
                  f"run-key certificate of {a.name!r} has an invalid signature: forged keys refused")
            st.verified = (st.verified + digest)[-32 * _VERIFIED_MAX:]
            known.add(digest)
        _need(_identity.session_verify(run_pk, bytes(sig), blob),
              f"advertisement of {a.name!r} (index {a.index}) has an invalid signature: forged keys refused")

    def setup_shares(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 2: from the session roll (every member's index, name and advertisement hash)
        compute the plan hash, the neighbour graph and the share-holder committee (never take
        the server's word); verify the signed advertisements of this node's neighbours and of
        the committee against its own roster (O(k + committee) signatures, not O(n)); agree
        pairwise seeds with neighbours (one per slot); encrypt, for each share holder, Shamir
        shares of each slot's mask key and self seed, bound to the plan hash.

        Why only those signatures: a node uses no other member's keys, except a share holder,
        which uses every member's channel key to open their shares — those are bound to the
        roll through its hash, and every share ciphertext to the plan hash (AES-GCM associated
        data), so a member shown another roll than the holders cannot have its shares opened.
        An unsigned entry the server invents (a "fake" member) is verified by each of its
        honest neighbours, which then refuse the session; with no honest neighbour left it is
        cut off from every honest survivor, and the holders refuse a split survivor graph.

        Refuses: an unverifiable advertisement, fewer members or holders than the policy's
        floor, a sparse degree below :data:`MIN_DEGREE`, a threshold that is not a strict
        majority of the committee."""
        st = self.state
        self._check_session(rec)
        _need(bool(st.s_sks), "setup already completed for this session")
        roll = self._roll(rec)
        full = self._checked_adverts(rec, roll)
        members = sorted(i for i, _, _ in roll)
        n, R = len(members), st.slots
        floor = max(2, st.min_set)
        _need(n >= floor, f"{n} members in the session, below this node's floor {floor}")
        degree, csize = int(rec["degree"]), int(rec["committee-size"])
        _need(degree == 0 or degree >= min(n - 1, MIN_DEGREE), f"neighbour degree {degree} below {MIN_DEGREE}")
        csize = min(csize, n)
        _need(csize >= floor, f"a committee of {csize} share holders, below this node's floor {floor}")
        seed = _wire.plan_seed(st.session, roll)
        graph, committee = _graph.plan(members, degree, csize, seed)
        t = len(committee) // 2 + 1
        _need(int(rec.get("threshold", t)) == t, f"threshold {rec.get('threshold')} is not the strict majority "
                                                  f"{t} of the {len(committee)} share holders")
        me = st.index
        verify = (set(graph[me]) | set(committee)) - {me}
        need = (set(members) if me in committee else verify) - {me}
        missing = sorted(need - set(full))
        _need(not missing, f"the advertisements of members {missing[:8]} are missing")
        known = {st.verified[i:i + 32] for i in range(0, len(st.verified), 32)}  # certificates verified before
        for j in sorted(verify):
            self._verify_signature(*full[j], known)
        adverts = {j: full[j][0] for j in need - {me}}
        adverts[me] = _wire.decode_advert(st.advert)
        nbrs = graph[me]
        peers = members if me in committee else committee
        st.neighbours, st.committee, st.threshold, st.peers = nbrs, committee, t, peers
        st.members, st.degree, st.committee_size, st.plan_seed = members, degree, csize, seed
        st.e_pks = b"".join(adverts[j].e_pk for j in committee)  # they sign consistency messages
        c_key = _keys.private_key(st.c_sk)
        chan = [
            _keys.channel_key(c_key, adverts[j].c_pk, session=st.session, a=me, b=j) if j != me
            else _keys.hkdf(st.c_sk, salt=st.session, info=b"fedrec-secagg/self")  # own share
            for j in peers
        ]
        st.chan_keys = b"".join(chan)
        s_keys = [_keys.private_key(_at(st.s_sks, slot)) for slot in range(R)]
        st.pair_seeds = b"".join(
            _keys.pair_seed(s_keys[slot], adverts[j].s_pks[slot], session=st.session, a=me, b=j, slot=slot)
            for j in nbrs for slot in range(R)
        )
        seeds = [secrets.token_bytes(32) for _ in range(R)]
        st.self_seeds = b"".join(seeds)
        s_shares = [_shamir.split(_at(st.s_sks, slot), committee, t) for slot in range(R)]
        b_shares = [_shamir.split(b, committee, t) for b in seeds]
        key_of = dict(zip(peers, chan))
        ct_s, ct_b = [], []
        for p, j in enumerate(committee):
            key = _keys.aead(key_of[j])  # one AES-GCM context per holder, 2 x slots encryptions
            for slot in range(R):
                ct_s.append(_keys.encrypt(key, s_shares[slot][p], _keys.associated_data(
                    session=st.session, sender=me, receiver=j, kind="s", slot=slot, plan=seed)))
                ct_b.append(_keys.encrypt(key, b_shares[slot][p], _keys.associated_data(
                    session=st.session, sender=me, receiver=j, kind="b", slot=slot, plan=seed)))
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
        try:  # read now, not after the handler has charged and computed
            _quantize.QuantParams.from_record(rec)
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggProtocolError(f"malformed quantization parameters ({type(err).__name__})") from None
        active = set(int(x) for x in rec["active"])
        _need(st.index in active, "this node is not in the round's active set")
        if st.members:  # a signed session: floors on the active set (attack B of issue 28)
            _need(active <= set(st.members), "the active set names nodes outside this session")
            floor = self._floor(slot)
            _need(len(active) >= floor, f"an active set of {len(active)}, below this node's floor {floor}")
            live = len(set(st.neighbours) & active)
            need = _graph.min_live_neighbours(len(st.neighbours))
            _need(live >= need, f"only {live} of this node's {len(st.neighbours)} neighbours are active, "
                                f"{need} needed: its pairwise masks would not hide its input")

    def mask(self, rec: Mapping[str, Any], vector: np.ndarray, rng: np.random.Generator | None = None, *,
             wrap: bool = False, share_std: float | None = None) -> np.ndarray:
        """Quantize ``vector`` and add the self mask and the pairwise masks of active neighbours.
        ``wrap``: a distributed-noise share, reduced modulo 2^bits instead of clamped
        (:func:`fedrec.common.secagg._quantize.quantize`); ``share_std``: the noise std such a
        share carries per coordinate, against which the coordinator's step is checked
        (:func:`fedrec.common.secagg._quantize.check_share_step`) before anything is masked."""
        self.check_mask_request(rec)
        st = self.state
        slot = int(rec["slot"])
        params = _quantize.QuantParams.from_record(rec)
        if wrap and share_std is not None:
            _quantize.check_share_step(params, float(share_std))
        y = _quantize.quantize(vector, params, rng, wrap=wrap)
        st.last_slot = slot  # burn the slot before anything leaves
        st.mask_slot, st.mask_active = slot, sorted(int(x) for x in rec["active"])
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

    # ------------------------------------------------------------ consistency
    def _check_view(self, slot: int, survivors: set[int]) -> None:
        """The survivor set a signed session accepts for ``slot`` (the holder's own view)."""
        st = self.state
        active = set(st.mask_active)
        _need(survivors <= active, "the survivor set names nodes outside the round's active set")
        least = self._floor(slot)
        _need(len(survivors) >= least, f"{len(survivors)} survivors, below this node's floor {least}")
        graph = self._graph()
        _need(_graph.connected(survivors, graph),
              "the survivors' neighbour graph is split: unmasking would reveal partial sums")
        for w in sorted(survivors):
            live = len(set(graph[w]) & survivors)
            need = _graph.min_live_neighbours(len(graph[w]))
            _need(live >= need, f"node {w} has {len(graph[w]) - live} of its {len(graph[w])} neighbours reported "
                                f"dropped (tolerance {len(graph[w]) - need}): its self seed stays hidden")

    def consistency(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """As share holder: sign the active and survivor sets of the slot this node just masked,
        once per slot, after checking them in its own view (floors, connected survivor graph,
        enough live neighbours for every survivor). A second, different survivor set for the
        same slot is refused, so an honest holder never vouches for two views."""
        st = self.state
        self._check_session(rec)
        _need(bool(st.members) and bool(st.e_sk), "no signed session: re-key required")
        _need(st.index in st.committee, "this node holds no shares: it is not asked to sign")
        slot = int(rec["slot"])
        _need(slot == st.mask_slot, f"consistency for slot {slot}, but this node last masked slot {st.mask_slot}")
        survivors = set(int(x) for x in rec["survivors"])
        _need(st.index in survivors, "this node contributed but is not among the survivors")
        if st.signed_slot == slot:
            _need(sorted(survivors) == list(st.signed_survivors),
                  "a different survivor set for a slot already signed: refused")
        self._check_view(slot, survivors)
        st.signed_slot, st.signed_survivors = slot, sorted(survivors)
        msg = _wire.consistency_message(st.session, slot, st.mask_active, survivors)
        return {"sig": _identity.session_sign(st.e_sk, msg), "slot": slot}

    def signature_quorum(self, slot: int) -> int:
        """Matching signatures of share holders a holder needs before it reveals anything: a
        strict majority of the committee, at least (1 - tolerance) of it, at least the floor.
        Honest holders sign one survivor set per slot, so two different sets can both reach the
        quorum only if at least 2·quorum - committee holders collude."""
        st = self.state
        c = len(st.committee)
        by_tol = -(-(1000 - st.max_dropout) * c // 1000)
        return min(c, max(c // 2 + 1, by_tol, self._floor(slot)))

    def _check_signatures(self, rec: Mapping[str, Any], slot: int, survivors: set[int]) -> None:
        st = self.state
        msg = _wire.consistency_message(st.session, slot, st.mask_active, survivors)
        pos = {j: p for p, j in enumerate(st.committee)}
        holders = set(st.committee) & survivors
        good = set()
        need = self.signature_quorum(slot)
        for j, sig in zip(rec.get("sig-from", []), rec.get("sig", [])):
            if len(good) >= need:
                break  # the quorum is met: the remaining signatures cannot change the decision
            j = int(j)
            if j in holders and j in pos and j not in good and _identity.session_verify(
                    _at(st.e_pks, pos[j]), bytes(sig), msg):
                good.add(j)
        _need(len(good) >= need, f"{len(good)} share holders signed this survivor set, {need} needed: "
                                 "the coordinator may be showing different views")

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
        if st.members:  # a signed session: only the view this holder signed, vouched for by a quorum
            _need(slot == st.signed_slot and sorted(survivors) == list(st.signed_survivors),
                  "unmask for a survivor set this node did not sign")
            _need(dropped == set(st.mask_active) - survivors,
                  "the dropped set is not the active set minus the survivors")
            self._check_view(slot, survivors)
            self._check_signatures(rec, slot, survivors)
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
                session=st.session, sender=u, receiver=st.index, kind=kind, slot=slot, plan=st.plan_seed))
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
        if stage == STAGE_CONSISTENCY:
            return self.consistency(rec)
        if stage == STAGE_UNMASK:
            return self.unmask(rec)
        raise SecAggProtocolError(f"unknown secagg stage {stage!r}")

    def _check_session(self, rec: Mapping[str, Any]) -> None:
        _need(bool(self.state.session) and bytes(rec["session"]) == self.state.session,
              "unknown secure-aggregation session: re-key required")
