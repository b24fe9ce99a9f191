"""Long-term institution identities and the federation roster (private).

Security contract: a SecAgg+ participant accepts another participant's per-session keys only
from a key advertisement signed by that institution's long-term key **as listed in its own
copy of the roster** — never a key the server vouches for. A server that substitutes a key
(attack C of issue 28) or invents a member (a Sybil) therefore produces an advertisement no
honest client accepts.

* identity keys: ECDSA on NIST P-256 with SHA-256 (new keys, :data:`CURVE`) or P-384 with
  SHA-384 (accepted: keys made before P-256 became the default), the key types Flower's SuperNode
  authentication registers (``flwr supernode register`` takes the OpenSSH public key; Flower
  accepts any NIST curve), so one key pair is both the node's transport identity and its SecAgg+
  signing identity. Why P-256: every other primitive of a session is at the 128-bit level
  (X25519, from which the AES-256-GCM keys are derived, and Ed25519), so P-384's 192 bits bought nothing while its
  verification was ~6-9x slower and 40% of a first setup's time (issue 28 profile);
* roster: TOML ``[members] <institution> = "ecdsa-sha2-nistp256 AAAA..."``, distributed to every
  institution out of band (with the federation's CA certificate);
* run keys (the identity cache): a node signs, once per day at most, a **run-key certificate**
  with its long-term ECDSA key — ``(name, Ed25519 run key, validity)`` — and signs each session's key
  advertisement with that Ed25519 run key. A peer verifies the certificate against its own
  roster once (it keeps the digest of each certificate it verified, bound to the roster key it
  verified it with) and every advertisement with the run key (Ed25519, cheaper than ECDSA):
  the ECDSA work of a setup is paid in a node's first session with each peer, not in every
  re-key. A server cannot make a certificate (no institution's key), and a certificate alone
  signs nothing for a session: the advertisement's own signature binds the session;
* per-session signing keys: Ed25519, advertised inside the signed advertisement; they sign the
  per-round consistency messages (sub-millisecond, where P-384 would cost ~1 ms per verify).
"""

from __future__ import annotations

import hashlib
import os
import struct
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

#: the curve of new identity keys
CURVE = ec.SECP256R1
#: every curve an identity key may be on, with the hash ECDSA uses on it (the OpenSSH pairing:
#: ecdsa-sha2-nistp256 / ecdsa-sha2-nistp384)
_ECDSA_BY_CURVE: dict[str, ec.ECDSA] = {"secp256r1": ec.ECDSA(hashes.SHA256()), "secp384r1": ec.ECDSA(hashes.SHA384())}
_ACCEPTED = "ECDSA on NIST P-256 or P-384 (ecdsa-sha2-nistp256 / ecdsa-sha2-nistp384)"
_RAW = serialization.Encoding.Raw


def _ecdsa_for(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> ec.ECDSA:
    return _ECDSA_BY_CURVE[key.curve.name]


def _accepted(key: object) -> bool:
    return isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) and key.curve.name in _ECDSA_BY_CURVE


class IdentityError(ValueError):
    """An identity key or roster that cannot be used (the message says which file and why)."""


# ------------------------------------------------------------------ long-term identity keys
def generate_identity() -> tuple[bytes, str]:
    """(PEM PKCS#8 private key, OpenSSH public key line) of a fresh identity on :data:`CURVE`."""
    sk = ec.generate_private_key(CURVE())
    pem = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())
    return pem, public_openssh(sk.public_key())


def public_openssh(pk: ec.EllipticCurvePublicKey) -> str:
    return pk.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def write_identity(path: str | os.PathLike[str]) -> str:
    """Write a fresh private key to ``path`` (mode 0600, never overwriting); return the public key."""
    path = Path(path)
    pem, pub = generate_identity()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return pub


def load_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IdentityError(f"{path}: cannot read the identity key ({type(err).__name__})") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            sk = serialization.load_ssh_private_key(data, password=None)
        else:
            sk = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise IdentityError(f"{path}: not an unencrypted PEM/OpenSSH private key ({err})") from None
    if not _accepted(sk):
        raise IdentityError(f"{path}: the identity key must be {_ACCEPTED}; fix: make one with `fedrec-client keygen`")
    return sk


def parse_public(line: str, *, where: str = "roster") -> ec.EllipticCurvePublicKey:
    try:
        pk = serialization.load_ssh_public_key(line.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise IdentityError(f"{where}: not an OpenSSH public key ({err})") from None
    if not _accepted(pk):
        raise IdentityError(f"{where}: must be {_ACCEPTED}")
    return pk


# ------------------------------------------------------------------ roster
@dataclass(frozen=True)
class Roster:
    """The federation's members: institution name -> long-term public key."""

    members: dict[str, ec.EllipticCurvePublicKey]
    source: str = "roster"

    def key_of(self, name: str) -> ec.EllipticCurvePublicKey | None:
        return self.members.get(name)

    def name_of(self, pk: ec.EllipticCurvePublicKey) -> str | None:
        return self._by_key.get(public_openssh(pk))

    def line_of(self, name: str) -> str | None:
        """The member's public key as its OpenSSH line (cached), or None."""
        return self._lines.get(name)

    @cached_property
    def _lines(self) -> dict[str, str]:
        return {name: public_openssh(key) for name, key in self.members.items()}

    @cached_property
    def _by_key(self) -> dict[str, str]:
        """OpenSSH public key line -> name, built once (a simulation process loads many
        identities against one roster: a linear scan per load made setup grow with n²)."""
        out: dict[str, str] = {}
        for name, key in self.members.items():
            out.setdefault(public_openssh(key), name)  # the first name listed, as a scan would find
        return out


def load_roster(path: str | os.PathLike[str]) -> Roster:
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise IdentityError(f"{path}: cannot read the roster ({type(err).__name__})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise IdentityError(f"{path}: not valid TOML ({err})") from None
    members = table.get("members")
    if not isinstance(members, dict) or not members:
        raise IdentityError(f"{path}: no [members] table (name = \"ecdsa-sha2-nistp384 AAAA...\")")
    out = {}
    for name, line in members.items():
        if not isinstance(line, str):
            raise IdentityError(f"{path}: [members] {name} must be an OpenSSH public key string")
        out[str(name)] = parse_public(line, where=f"{path}: [members] {name}")
    return Roster(out, source=str(path))


def write_roster(path: str | os.PathLike[str], members: dict[str, str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# fedrec federation roster: institution = long-term public key (OpenSSH)", "[members]"]
    lines += [f'"{name}" = "{pub}"' for name, pub in sorted(members.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Identity:
    """This institution's signing key, its name in the roster, and the roster itself."""

    name: str
    key: ec.EllipticCurvePrivateKey
    roster: Roster

    @classmethod
    def load(cls, key_path: str | os.PathLike[str], roster_path: str | os.PathLike[str] | Roster) -> Identity:
        """``roster_path``: the roster file, or an already loaded :class:`Roster`."""
        key = load_private_key(key_path)
        roster = roster_path if isinstance(roster_path, Roster) else load_roster(roster_path)
        name = roster.name_of(key.public_key())
        if name is None:
            raise IdentityError(f"{key_path}: this institution's public key is not in the roster {roster_path}")
        return cls(name=name, key=key, roster=roster)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, _ecdsa_for(self.key))


def verify_identity(pk: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        pk.verify(signature, data, _ecdsa_for(pk))
        return True
    except (InvalidSignature, ValueError, KeyError, AttributeError):  # KeyError/AttributeError: not an accepted key
        return False


# ------------------------------------------------------------------ run-key certificates
RUN_CERT_MAGIC = b"fedrec-secagg/run-key/v1"
#: a run-key certificate is valid this long; a node issues a new one when less than
#: RUN_CERT_RENEW_S of it is left (so every advertisement it signs stays inside the validity)
RUN_CERT_TTL_S = 24 * 3600
RUN_CERT_RENEW_S = 2 * 3600
_CERT_HEAD = struct.Struct(">QQH")


def encode_run_cert(name: str, run_pk: bytes, not_before: int, not_after: int) -> bytes:
    """``magic | not-before u64 | not-after u64 | name length u16 | name | Ed25519 run key (32)``."""
    nm = name.encode()
    if len(run_pk) != 32:
        raise ValueError("a run key is a raw 32-byte Ed25519 public key")
    return RUN_CERT_MAGIC + _CERT_HEAD.pack(int(not_before), int(not_after), len(nm)) + nm + run_pk


def decode_run_cert(blob: bytes) -> tuple[str, bytes, int, int]:
    """(name, run key, not-before, not-after); ``ValueError`` on anything malformed."""
    m = len(RUN_CERT_MAGIC)
    if blob[:m] != RUN_CERT_MAGIC or len(blob) < m + _CERT_HEAD.size:
        raise ValueError("not a fedrec SecAgg+ run-key certificate")
    nb, na, nlen = _CERT_HEAD.unpack_from(blob, m)
    pos = m + _CERT_HEAD.size
    if len(blob) != pos + nlen + 32:
        raise ValueError("run-key certificate has the wrong length")
    return blob[pos:pos + nlen].decode(), blob[pos + nlen:], nb, na


def cert_digest(roster_line: str, cert: bytes, cert_sig: bytes) -> bytes:
    """What a verifier remembers of a certificate it verified: bound to the roster key it was
    verified with (a rotated or removed key invalidates it) and to the exact signature."""
    h = hashlib.sha256(b"fedrec-secagg/verified-cert/v1")
    for part in (roster_line.encode(), cert, cert_sig):
        h.update(struct.pack(">I", len(part)) + part)
    return h.digest()


# ------------------------------------------------------------------ per-session Ed25519
def session_signing_keypair() -> tuple[bytes, bytes]:
    sk = ed25519.Ed25519PrivateKey.generate()
    return (sk.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            sk.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def session_sign(sk: bytes, data: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(sk).sign(data)


def session_verify(pk: bytes, signature: bytes, data: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(pk).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False
