"""SecAgg+ primitives without Flower: Shamir, keys/AEAD, masks, quantization, graph."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest

from fedrec.common.secagg import _graph, _keys, _masking, _quantize, _shamir


# ------------------------------------------------------------------------------- Shamir
def test_shamir_any_t_of_n_reconstructs_and_t_minus_1_does_not():
    secret = os.urandom(32)
    n, t = 7, 4
    xs = list(range(1, n + 1))
    shares = dict(zip(xs, _shamir.split(secret, xs, t)))
    for subset in itertools.combinations(xs, t):
        assert _shamir.combine({x: shares[x] for x in subset}, t) == secret
    for subset in itertools.combinations(xs, t - 1):
        sub = {x: shares[x] for x in subset}
        with pytest.raises(_shamir.ShamirError):
            _shamir.combine(sub, t)
        # interpolating t-1 points gives an unrelated field element, not the secret
        assert _shamir.combine_unchecked(sub) != int.from_bytes(secret, "big")


def test_shamir_rejects_bad_parameters_and_corrupt_share():
    with pytest.raises(_shamir.ShamirError):
        _shamir.split(b"short", [1, 2], 1)
    with pytest.raises(_shamir.ShamirError):
        _shamir.split(os.urandom(32), [1, 1, 2], 2)
    secret = os.urandom(32)
    shares = dict(zip([1, 2, 3], _shamir.split(secret, [1, 2, 3], 2)))
    shares[1] = shares[1][:10] + bytes([shares[1][10] ^ 0x5A]) + shares[1][11:]
    with pytest.raises(_shamir.ShamirError):  # lands outside the 256-bit range w.h.p.
        _shamir.combine({1: shares[1], 2: shares[2]}, 2)


# ------------------------------------------------------------------------ keys / AEAD
def test_x25519_agreement_is_symmetric_and_keys_differ_by_pair():
    a_sk, a_pk = _keys.generate_keypair()
    b_sk, b_pk = _keys.generate_keypair()
    sess = os.urandom(16)
    seed = _keys.pair_seed(a_sk, b_pk, session=sess, a=1, b=2, slot=0)
    assert seed == _keys.pair_seed(b_sk, a_pk, session=sess, a=2, b=1, slot=0)
    assert seed != _keys.pair_seed(a_sk, b_pk, session=sess, a=1, b=2, slot=1)
    assert _keys.channel_key(a_sk, b_pk, session=sess, a=1, b=2) != seed
    assert _keys.slot_key(seed, session=sess, slot=0, kind=b"pair") != _keys.slot_key(seed, session=sess, slot=1, kind=b"pair")


def test_share_ciphertexts_reject_tampering_and_replay():
    key = os.urandom(32)
    sess = os.urandom(16)
    plan = os.urandom(32)
    ad = _keys.associated_data(session=sess, sender=1, receiver=2, kind="b", slot=3, plan=plan)
    ct = _keys.encrypt(key, b"share", ad)
    assert _keys.decrypt(key, ct, ad) == b"share"
    tampered = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(_keys.ShareAuthError):
        _keys.decrypt(key, tampered, ad)
    for other in (
        _keys.associated_data(session=sess, sender=2, receiver=1, kind="b", slot=3, plan=plan),  # reversed
        _keys.associated_data(session=sess, sender=1, receiver=2, kind="b", slot=4, plan=plan),  # other round
        _keys.associated_data(session=sess, sender=1, receiver=2, kind="s", slot=3, plan=plan),  # other kind
        _keys.associated_data(session=os.urandom(16), sender=1, receiver=2, kind="b", slot=3, plan=plan),  # other session
        _keys.associated_data(session=sess, sender=1, receiver=2, kind="b", slot=3, plan=os.urandom(32)),  # other roll
    ):
        with pytest.raises(_keys.ShareAuthError):
            _keys.decrypt(key, ct, other)


# ------------------------------------------------------------------------------- masks
def test_masks_use_the_full_256_bit_seed():
    base = bytearray(os.urandom(32))
    other = bytearray(base)
    other[15] ^= 0x01  # same first 4 and last 4 bytes: a 32-bit-seeded PRNG would collide
    assert base[:4] == other[:4] and base[-4:] == other[-4:]
    a = _masking.keystream(bytes(base), 1000, 32)
    b = _masking.keystream(bytes(other), 1000, 32)
    assert np.mean(a == b) < 0.01
    assert np.array_equal(a, _masking.keystream(bytes(base), 1000, 32))  # deterministic in the key


def test_keystream_is_uniform():
    ks = _masking.keystream(os.urandom(32), 200_000, 32)
    counts = np.bincount((ks >> 28).astype(np.int64), minlength=16)  # top 4 bits
    expected = ks.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 15 dof: p ~ 1e-5
    ks64 = _masking.keystream(os.urandom(32), 1000, 64)
    assert ks64.dtype == np.uint64


@pytest.mark.parametrize("bits", [32, 64])
def test_pairwise_masks_cancel(bits):
    n, d = 5, 1000
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 1000, d).astype(_masking.dtype_for(bits)) for _ in range(n)]
    seeds = {(i, j): os.urandom(32) for i in range(n) for j in range(i + 1, n)}
    total = np.zeros(d, _masking.dtype_for(bits))
    for i in range(n):
        y = xs[i].copy()
        for j in range(n):
            if j != i:
                _masking.add_into(y, seeds[(min(i, j), max(i, j))], _masking.pair_sign(i, j))
        assert not np.array_equal(y, xs[i])
        total += y
    assert np.array_equal(total, sum(x.astype(np.uint64) for x in xs).astype(total.dtype))


# ------------------------------------------------------------------------ quantization
def test_quantization_error_below_one_percent_of_noise_and_unbiased():
    s, c, n = 0.05, 1.0, 10
    p = _quantize.derive(clip_range=c, noise_std=s, n_clients=n, dim=20_000)
    assert p.bits == 32 and p.step == pytest.approx(0.02 * s)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-c, c, 20_000) + rng.normal(0, s, 20_000) for _ in range(n)]
    total = sum(_quantize.quantize(x, p, rng).astype(np.uint64) for x in xs).astype(np.uint32)
    got, clamped = _quantize.dequantize(total, n, p)
    err = got - np.sum(xs, axis=0)
    assert clamped == 0
    assert err.std() <= 0.01 * s * np.sqrt(n)  # each client's error std <= 1% of its noise std
    assert abs(err.mean()) < 5 * err.std() / np.sqrt(err.size)  # stochastic rounding: unbiased


def test_quantization_clamps_and_counts_out_of_range():
    p = _quantize.derive(clip_range=1.0, noise_std=0.01, n_clients=2)
    x = np.array([0.0, 5.0, -5.0])
    got, clamped = _quantize.dequantize(_quantize.quantize(x, p), 1, p)
    assert clamped == 2 and got[1] == pytest.approx(p.bound) and got[2] == pytest.approx(-p.bound)


def test_quantization_modulus_grows_with_range_and_clients():
    assert _quantize.derive(clip_range=1.0, noise_std=1e-3, n_clients=10).bits == 32
    assert _quantize.derive(clip_range=1.0, noise_std=1e-6, n_clients=100).bits == 64
    p = _quantize.derive(clip_range=2.0, noise_std=None, n_clients=100, dim=10)
    assert p.bits == 32 and p.step < 2.0 * 2**-20
    with pytest.raises(_quantize.QuantizationError):
        _quantize.derive(clip_range=1.0, noise_std=1e-15, n_clients=1000)
    with pytest.raises(_quantize.QuantizationError):
        _quantize.quantize(np.array([np.nan]), p)


# ------------------------------------------------------------------------------- graph
def test_harary_graph_is_regular_symmetric_and_k_connected():
    idx = list(range(1, 41))
    g = _graph.harary(idx, 10)
    assert all(len(v) == 10 for v in g.values())
    assert all(i in g[j] for i in g for j in g[i])
    r = random.Random(0)
    for _ in range(50):  # fewer than k dropouts never split the survivors
        gone = set(r.sample(idx, 9))
        assert _graph.connected([i for i in idx if i not in gone], g)
    assert _graph.harary([1, 2, 3], 0) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}
    # cutting the ring twice by k/2 consecutive nodes disconnects it: the check sees it
    ring = {i: sorted({(i + s - 1) % 12 + 1 for s in (-1, 1)}) for i in range(1, 13)}
    assert not _graph.connected([1, 2, 3, 7, 8, 9], ring)


def test_hkdf_is_rfc5869_as_cryptography_computes_it():
    """_keys.hkdf computes HKDF-SHA256 with hmac (speed); cryptography's HKDF is the reference,
    and RFC 5869's test case 1 pins both."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    ikm, salt, info = bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA))
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    assert _keys.hkdf(ikm, salt=salt, info=info, length=42) == okm  # RFC 5869, A.1 (> 32 bytes)
    assert _keys.hkdf(ikm, salt=salt, info=info, length=32) == okm[:32]
    for salt in (b"", os.urandom(16)):
        for length in (16, 32):
            secret, info = os.urandom(32), os.urandom(40)
            want = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(secret)
            assert _keys.hkdf(secret, salt=salt, info=info, length=length) == want


def test_shamir_coefficients_are_field_elements(monkeypatch):
    """The bulk coefficient draw masks to 521 bits and redraws the one value outside the field."""
    monkeypatch.setattr(_shamir.secrets, "token_bytes", lambda n: b"\xff" * n)  # every draw = 2^521 - 1
    coeffs = _shamir._uniform(3)
    assert all(0 <= c < _shamir.PRIME for c in coeffs) and len(coeffs) == 3
    secret = os.urandom(32)
    xs = [3, 7, 11]
    assert _shamir.combine(dict(zip(xs, _shamir.split(secret, xs, 3))), 3) == secret


# ------------------------------------------------------------------------------- identities
def test_identity_keys_p256_by_default_p384_accepted_other_curves_refused(tmp_path):
    """New identities are P-256 (SHA-256); P-384 keys made before stay valid (SHA-384); each
    signature verifies only under its own key and curve's hash; other curves are refused when
    loaded from a file or a roster line, with the accepted types named."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedrec.common.secagg import _identity

    pem, line = _identity.generate_identity()
    assert line.startswith("ecdsa-sha2-nistp256 ")
    msg = b"advertisement"
    for curve, digest in ((ec.SECP256R1(), hashes.SHA256()), (ec.SECP384R1(), hashes.SHA384())):
        sk = ec.generate_private_key(curve)
        ident = _identity.Identity(name="a", key=sk, roster=_identity.Roster({"a": sk.public_key()}))
        sig = ident.sign(msg)
        sk.public_key().verify(sig, msg, ec.ECDSA(digest))  # the OpenSSH pairing of curve and hash
        assert _identity.verify_identity(sk.public_key(), sig, msg)
        assert not _identity.verify_identity(sk.public_key(), sig, msg + b"!")
        other = ec.generate_private_key(curve).public_key()
        assert not _identity.verify_identity(other, sig, msg)
    p256 = ec.generate_private_key(ec.SECP256R1())
    assert not _identity.verify_identity(p256.public_key(), p256.sign(msg, ec.ECDSA(hashes.SHA384())), msg)
    for curve in (ec.SECP521R1(), ec.SECP256K1()):
        sk = ec.generate_private_key(curve)
        path = tmp_path / f"{curve.name}.pem"
        path.write_bytes(sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        with pytest.raises(_identity.IdentityError, match="P-256 or P-384"):
            _identity.load_private_key(path)
        if curve.name == "secp521r1":  # OpenSSH has no line for secp256k1
            pub = sk.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            with pytest.raises(_identity.IdentityError, match="P-256 or P-384"):
                _identity.parse_public(pub.decode())
        assert not _identity.verify_identity(sk.public_key(), sk.sign(msg, ec.ECDSA(hashes.SHA256())), msg)
