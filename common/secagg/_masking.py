"""Mask generation and modular arithmetic for SecAgg+ (private).

The mask generator is AES-256 in counter mode keyed with a full 256-bit seed (a fresh
per-round self-mask seed, or a per-round key derived by HKDF from the pairwise X25519
secret): never a 32-bit-seeded PRNG. Key uniqueness per (seed, slot) makes a fixed zero
nonce safe. Keystream bytes are read as little-endian uint32/uint64, so masks are uniform
modulo 2^bits and all modular arithmetic is numpy's wrap-around on unsigned integers.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ZERO_NONCE = bytes(16)


def dtype_for(bits: int) -> np.dtype:
    if bits == 32:
        return np.dtype("<u4")
    if bits == 64:
        return np.dtype("<u8")
    raise ValueError(f"modulus must be 2^32 or 2^64, got 2^{bits}")


def keystream(key: bytes, n: int, bits: int) -> np.ndarray:
    """``n`` uniform integers mod 2^bits from AES-256-CTR under the 32-byte ``key``."""
    if len(key) != 32:
        raise ValueError("mask keys are 256-bit")
    dt = dtype_for(bits)
    out = np.empty(n, dtype=dt)
    enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()
    buf = memoryview(out).cast("B")
    zeros = _zeros(buf.nbytes)
    enc.update_into(zeros, buf)  # the keystream is AES-CTR of zeros
    enc.finalize()
    return out


_ZEROS = bytearray(0)


def _zeros(nbytes: int) -> memoryview:
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = bytearray(nbytes)
    return memoryview(_ZEROS)[:nbytes]


def add_into(acc: np.ndarray, key: bytes, sign: int) -> None:
    """``acc += sign * keystream(key)`` modulo 2^bits, in place."""
    ks = keystream(key, acc.size, acc.dtype.itemsize * 8)
    if sign > 0:
        acc += ks
    else:
        acc -= ks


def pair_sign(me: int, other: int) -> int:
    """The smaller index adds the pairwise mask, the larger subtracts it: they cancel."""
    return 1 if me < other else -1
