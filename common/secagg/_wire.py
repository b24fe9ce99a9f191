"""Signed byte layouts of SecAgg+ (private): key advertisements, the session roll and plan
hash, and consistency messages. Client and server build the same bytes; only clients verify them.

Advertisement (signed with the institution's Ed25519 run key, which its long-term ECDSA (P-256) key
certifies: ``_identity``'s run-key certificate travels next to it)::

    b"fedrec-secagg/advert/v1" | session (16) | index u32 | slots u32 | max-dropout (u16, per
    mille) | time u64 (unix s) | name length u16 | name (utf-8) | c-pk (32) | e-pk (32) |
    s-pk (32) x slots

``c-pk``: X25519 channel key; ``e-pk``: Ed25519 session signing key (signs consistency
messages); ``s-pk``: X25519 mask key of each slot. Binding the session, the index, the slot
count, the dropout tolerance and the time means an advertisement cannot be replayed in another
session or position, and a server cannot hand two nodes different tolerances.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

ADVERT_MAGIC = b"fedrec-secagg/advert/v1"
_HEAD = struct.Struct(">16sIIHQH")
#: an advertisement older than this (or more than CLOCK_SKEW_S in the future) is refused
ADVERT_MAX_AGE_S = 3600
CLOCK_SKEW_S = 300


@dataclass(frozen=True)
class Advert:
    session: bytes
    index: int
    slots: int
    max_dropout_permille: int
    time: int
    name: str
    c_pk: bytes
    e_pk: bytes
    s_pks: tuple[bytes, ...]


def encode_advert(a: Advert) -> bytes:
    name = a.name.encode()
    return (ADVERT_MAGIC + _HEAD.pack(a.session, a.index, a.slots, a.max_dropout_permille, a.time, len(name))
            + name + a.c_pk + a.e_pk + b"".join(a.s_pks))


def decode_advert(blob: bytes) -> Advert:
    """Parse; ``ValueError`` on anything malformed."""
    m = len(ADVERT_MAGIC)
    if blob[:m] != ADVERT_MAGIC or len(blob) < m + _HEAD.size:
        raise ValueError("not a fedrec SecAgg+ key advertisement")
    session, index, slots, mdp, t, nlen = _HEAD.unpack_from(blob, m)
    pos = m + _HEAD.size
    name = blob[pos:pos + nlen].decode()
    pos += nlen
    if len(blob) != pos + 64 + 32 * slots:
        raise ValueError("key advertisement has the wrong length")
    c_pk, e_pk = blob[pos:pos + 32], blob[pos + 32:pos + 64]
    pos += 64
    s_pks = tuple(blob[pos + 32 * i: pos + 32 * (i + 1)] for i in range(slots))
    return Advert(session, index, slots, mdp, t, name, c_pk, e_pk, s_pks)


def advert_hash(blob: bytes) -> bytes:
    """SHA-256 of one advertisement: its entry in the session roll."""
    return hashlib.sha256(blob).digest()


def plan_seed(session: bytes, roll: Sequence[tuple[int, str, bytes]]) -> bytes:
    """Seed of the session's graph and committee, and the *plan hash* every share ciphertext is
    bound to: a hash of the session id and the roll, one ``(index, name, SHA-256 of the
    advertisement)`` entry per member (fresh keys the server did not know when it chose the
    session). Two nodes with the same plan hash have the same members, graph, committee and
    advertisements; a node shown another roll cannot have its shares opened by the holders."""
    h = hashlib.sha256(b"fedrec-secagg/plan/v2" + session)
    for index, name, digest in sorted(roll):
        nm = name.encode()
        h.update(struct.pack(">IH", index, len(nm)) + nm + digest)
    return h.digest()


def consistency_message(session: bytes, slot: int, active: Sequence[int], survivors: Sequence[int]) -> bytes:
    """What a survivor signs: the round's active set and survivor set as it was told them."""
    a, s = sorted(int(x) for x in active), sorted(int(x) for x in survivors)
    return (b"fedrec-secagg/consistency/v1" + session + struct.pack(">QII", slot, len(a), len(s))
            + struct.pack(f">{len(a)}I", *a) + struct.pack(f">{len(s)}I", *s))
