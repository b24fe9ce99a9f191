"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Private to :mod:`fedrec.common.secagg`. A 256-bit secret is one field element (the
Mersenne prime 2^521 - 1 exceeds 2^256), so a share is one 66-byte field element; share
``x`` coordinates are the participants' session indices (1..n, never 0).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
SECRET_BYTES = 32


class ShamirError(ValueError):
    """Too few or inconsistent shares."""


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Shares of ``secret`` at the points ``xs``; any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} must lie in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and non-zero")
    coeffs = [int.from_bytes(secret, "big")] + _uniform(threshold - 1)
    top = coeffs[::-1]
    out = []
    for x in xs:
        acc = 0
        for c in top:  # Horner over the integers (x is a small index), one reduction at the end
            acc = acc * x + c
        out.append((acc % PRIME).to_bytes(SHARE_BYTES, "big"))
    return out


def _uniform(k: int) -> list[int]:
    """``k`` independent uniform elements of GF(PRIME) from one CSPRNG read: 521-bit draws,
    the single value 2^521 - 1 (= PRIME, outside the field) rejected and redrawn."""
    raw = secrets.token_bytes(SHARE_BYTES * k)
    out = []
    for i in range(k):
        v = int.from_bytes(raw[SHARE_BYTES * i: SHARE_BYTES * (i + 1)], "big") & PRIME  # PRIME = 2^521 - 1
        while v >= PRIME:
            v = secrets.randbelow(PRIME)
        out.append(v)
    return out


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients for interpolating at 0 from the points ``xs`` (cached: a round
    reconstructs every survivor's seed from the same holders)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``{x: share}`` (uses the first ``threshold``).

    With fewer than ``threshold`` shares the secret is information-theoretically hidden;
    this function refuses rather than return a meaningless value.
    """
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares given, {threshold} needed")
    pts = sorted(shares.items())[:threshold]
    ys = [int.from_bytes(s, "big") for _, s in pts]
    if any(y >= PRIME for y in ys):
        raise ShamirError("share out of field range")
    coeffs = _lagrange_at_zero(tuple(x for x, _ in pts))
    secret = sum(c * y for c, y in zip(coeffs, ys)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ShamirError("reconstructed value is not a 32-byte secret (wrong or corrupt shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


def combine_unchecked(shares: Mapping[int, bytes]) -> int:
    """Lagrange interpolation at 0 of all given shares, as a field element (tests only)."""
    xs = sorted(shares)
    secret = 0
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + int.from_bytes(shares[xi], "big") * num * pow(den, -1, PRIME)) % PRIME
    return secret
