"""Key agreement, key derivation and authenticated encryption for SecAgg+.

Private to :mod:`fedrec.common.secagg`; only ``cryptography`` primitives:

* X25519 for the key pairs each participant advertises per session (``c``: the
  share-encryption channel; ``s``: one pairwise-mask key pair *per slot* (round), so that
  revealing a dropout's key for one round reveals nothing about its masks in any other);
* HKDF-SHA256 to turn agreed secrets into channel keys and per-slot mask keys;
* AES-256-GCM for share ciphertexts, with associated data binding every ciphertext to
  (session, sender, receiver, kind, slot), so a ciphertext replayed in another session,
  slot, direction or kind fails authentication.
"""

from __future__ import annotations

import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw


class ShareAuthError(ValueError):
    """A share ciphertext failed authentication (tampered, replayed or misrouted)."""


def generate_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        sk.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
    )


def agree(private: bytes | X25519PrivateKey, public: bytes) -> bytes:
    """The 32-byte X25519 shared secret (``private``: raw bytes, or a loaded key to reuse)."""
    sk = private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
    return sk.exchange(X25519PublicKey.from_public_bytes(public))


def private_key(raw: bytes) -> X25519PrivateKey:
    """Load a raw X25519 private key once, for many agreements."""
    return X25519PrivateKey.from_private_bytes(raw)


def hkdf(secret: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869), computed with two HMAC-SHA256 calls for keys of up to 32 bytes:
    the same bytes as ``cryptography``'s HKDF (checked in tests/unit/test_secagg_primitives.py),
    without building an HKDF object per key (a 100-node setup derives ~30,000 keys)."""
    if length > 32:
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)
    prk = hmac.digest(salt or bytes(32), secret, "sha256")  # extract (an empty salt is 32 zero bytes)
    return hmac.digest(prk, info + b"\x01", "sha256")[:length]  # expand: T(1)


def _pair(a: int, b: int) -> bytes:
    return struct.pack(">II", min(a, b), max(a, b))


def channel_key(private: bytes | X25519PrivateKey, public: bytes, *, session: bytes, a: int, b: int) -> bytes:
    """Symmetric AES-256-GCM key between participants ``a`` and ``b`` of ``session``."""
    return hkdf(agree(private, public), salt=session, info=b"fedrec-secagg/channel" + _pair(a, b))


def pair_seed(private: bytes | X25519PrivateKey, public: bytes, *, session: bytes, a: int, b: int,
              slot: int) -> bytes:
    """The full 256-bit pairwise mask secret of ``a`` and ``b`` for one slot of ``session``.

    ``private``/``public`` are the slot's own mask key pairs: revealing one node's slot key
    (to remove a dropout's masks) exposes that slot's pairwise masks and no other.
    """
    return hkdf(agree(private, public), salt=session,
                info=b"fedrec-secagg/pair" + _pair(a, b) + struct.pack(">Q", slot))


def slot_key(seed: bytes, *, session: bytes, slot: int, kind: bytes) -> bytes:
    """Per-slot (per-round) 256-bit keystream key from a 256-bit seed: HKDF(seed, slot)."""
    return hkdf(seed, salt=session, info=b"fedrec-secagg/mask/" + kind + struct.pack(">Q", slot))


def associated_data(*, session: bytes, sender: int, receiver: int, kind: str, slot: int, plan: bytes) -> bytes:
    """What a share ciphertext is bound to. ``plan``: the sender's plan hash (its roll of the
    session's members, hence its graph and committee): a holder shown another roll derives another
    plan hash and cannot open the share."""
    return (b"fedrec-secagg/share|" + session + struct.pack(">IIQ", sender, receiver, slot) + kind.encode()
            + b"|" + plan)


def encrypt(key: bytes | AESGCM, plaintext: bytes, ad: bytes) -> bytes:
    """``nonce | AES-256-GCM(plaintext, ad)`` with a fresh random nonce. ``key``: 32 raw bytes,
    or an :func:`aead` built once for many encryptions under the same key."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + (key if isinstance(key, AESGCM) else AESGCM(key)).encrypt(nonce, plaintext, ad)


def aead(key: bytes) -> AESGCM:
    """An AES-256-GCM context for ``key``, to reuse across :func:`encrypt` calls."""
    return AESGCM(key)


def decrypt(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], ad)
    except (InvalidTag, ValueError) as err:
        raise ShareAuthError("share ciphertext failed authentication (tampered or replayed)") from err
