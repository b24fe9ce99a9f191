"""SecAgg+ hides each input: the real protocol (ServerSession + SecAggClient, 10 nodes), attacked
with exactly what a curious or lying server holds.

A correct sum proves nothing about privacy: with the pairwise masks removed the sum is still
exact (they cancel anyway) and the server, which reconstructs every survivor's self seed to
unmask, reads each input; with the self masks removed (client and server) the sum is exact
too, and a server that claims a node dropped *after* receiving its masked vector gets the
node's slot mask key from the share holders, strips its pairwise masks and reads its input.
These tests run those attacks and require that what the server recovers is uniform noise,
uncorrelated with the input, while the positive controls show the attacks' arithmetic is right
(the same derivations unmask the true sums). tests/mutation/mutants.toml removes each kind of
mask and expects these tests to fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2

from fedrec.common.secagg import SecAggClient, SecAggProtocolError, ServerSession
from fedrec.common.secagg import _keys, _masking, _shamir
from fedrec.common.secagg._quantize import QuantParams
from test_secagg_harness import identities

N, DIM = 10, 2000
NODES = [1000 + 7 * i for i in range(N)]  # node ids are not the session indices
# per-check false-alarm rates around 1e-7 (a few dozen checks per run)
CHI2_LIMIT = float(chi2.isf(1e-7, 15))
CORR_LIMIT = 5.5 / np.sqrt(DIM)  # |corr| of unrelated vectors ~ N(0, 1/DIM)


def setup(nodes: list[int] = NODES, slots: int = 2) -> tuple[ServerSession, dict[int, SecAggClient]]:
    """Both setup stages over plain dicts (what secaggplus_mod/the workflow carry in records)."""
    sess = ServerSession.create(nodes, slots=slots, degree=None)
    clients = {n: SecAggClient(identity=ident) for n, ident in zip(nodes, identities(len(nodes)))}
    keys = {n: clients[n].setup_keys(rec) for n, rec in sess.setup_keys_records().items()}
    shares = {n: clients[n].setup_shares(rec) for n, rec in sess.keys_received(keys).items()}
    sess.shares_received(shares)
    return sess, clients


def open_shares(sess: ServerSession, clients: dict[int, SecAggClient], slot: int, survivors: list[int],
                dropped: list[int]) -> dict[int, dict]:
    """Consistency round (every survivor signs the survivor set), then the holders' shares."""
    recs = sess.consistency_records(slot, survivors)
    sess.signatures[slot] = {n: clients[n].consistency(r)["sig"] for n, r in recs.items()}
    return {n: clients[n].unmask(r) for n, r in sess.unmask_records(slot, survivors, dropped).items()}


def inputs(nodes: list[int], seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-1.0, 1.0, DIM) for n in nodes}


def quant(n: int) -> QuantParams:
    return ServerSession.quantization(clip_range=1.0, noise_std=None, n_clients=n, dim=DIM)


def mask_all(sess: ServerSession, clients: dict[int, SecAggClient], xs: dict[int, np.ndarray], q: QuantParams,
             rnd: int = 1) -> tuple[int, dict[int, np.ndarray]]:
    slot, rec = sess.mask_record(sorted(xs), q, rnd)
    return slot, {n: clients[n].mask(rec, xs[n]) for n in xs}


def decode(v: np.ndarray, count: int, q: QuantParams) -> np.ndarray:
    """The float values an integer vector stands for, as a sum of ``count`` contributions."""
    return ServerSession.dequantize(v, count, q)[0]


def assert_hides(view: np.ndarray, x: np.ndarray, count: int, q: QuantParams, what: str) -> None:
    """``view`` (what the attacker computed for a sum of ``count`` inputs ``x``) reveals nothing."""
    y = view[:-1].astype(np.float64)
    # not the input: a decoded coordinate lands within the rounding error of x with prob ~1e-6
    close = np.abs(decode(view, count, q) - x) <= 2 * count * q.step
    assert close.mean() < 0.01, f"{what}: {close.mean():.0%} of coordinates decode to the input"
    corr = np.corrcoef(x, y)[0, 1]
    assert abs(corr) < CORR_LIMIT, f"{what}: correlation {corr:.3f} with the input"
    counts = np.histogram(y, bins=16, range=(0, 2.0 ** q.bits))[0]
    stat = float(((counts - DIM / 16) ** 2 / (DIM / 16)).sum())
    assert stat < CHI2_LIMIT, f"{what}: not uniform over Z_2^{q.bits} (chi2 {stat:.0f})"


def self_mask(sess: ServerSession, seed: bytes, slot: int, q: QuantParams) -> np.ndarray:
    return _masking.keystream(_keys.slot_key(seed, session=sess.session, slot=slot, kind=b"self"), DIM + 1, q.bits)


def collect(replies: dict[int, dict], sess: ServerSession, kind: str) -> dict[int, dict[int, bytes]]:
    """Shares of ``kind`` per sender index, keyed by holder index (as the server collects them)."""
    out: dict[int, dict[int, bytes]] = {}
    for nid, rec in replies.items():
        for u, k, share in zip(rec["share-from"], rec["share-kind"], rec["shares"]):
            if k == kind:
                out.setdefault(int(u), {})[sess.nodes[nid]] = bytes(share)
    return out


# ----------------------------------------------------------------------------- the sum
@pytest.mark.parametrize("dropouts", [0, 2])
def test_the_sum_is_exact_with_and_without_dropouts(dropouts: int) -> None:
    sess, clients = setup()
    xs = inputs(NODES, seed=1)
    q = quant(N)
    slot, rec = sess.mask_record(NODES, q, 1)
    gone = NODES[3:3 + dropouts]  # set up, then silent from the masking stage on
    masked = {n: clients[n].mask(rec, xs[n]) for n in NODES if n not in gone}
    replies = open_shares(sess, clients, slot, sorted(masked), gone)
    total = sess.unmask(slot, masked, gone, replies)
    expect = sum(xs[n] for n in masked)
    assert np.abs(decode(total, len(masked), q) - expect).max() <= len(masked) * q.step


# ------------------------------------------------------------------ the curious server
def test_a_curious_server_learns_only_the_sum() -> None:
    """After an honest round the server holds every masked vector and every survivor's self
    seed (it reconstructs them to unmask). Stripping a node's self mask must leave the
    pairwise masks on: neither one input nor the sum of any strict subset can be read."""
    sess, clients = setup()
    xs = inputs(NODES, seed=2)
    q = quant(N)
    slot, masked = mask_all(sess, clients, xs, q)
    replies = open_shares(sess, clients, slot, NODES, [])
    total = sess.unmask(slot, masked, [], replies)
    seeds = {u: _shamir.combine(sh, sess.threshold) for u, sh in collect(replies, sess, "b").items()}
    assert sorted(seeds) == sorted(sess.nodes[n] for n in NODES)
    view = {n: masked[n] - self_mask(sess, seeds[sess.nodes[n]], slot, q) for n in NODES}  # mod 2^bits

    # positive control: the views of all nodes add up to the true (quantized) sum, as the
    # server's own unmasking finds: the self-mask derivation above is the real one
    everyone = view[NODES[0]].copy()
    for n in NODES[1:]:
        everyone += view[n]
    assert np.array_equal(everyone, total)
    assert np.abs(decode(everyone, N, q) - sum(xs.values())).max() <= N * q.step

    for n in NODES:
        assert_hides(view[n], xs[n], 1, q, f"node {n} alone")
    rng = np.random.default_rng(0)
    for size in (2, 5, N - 1):
        subset = sorted(rng.choice(NODES, size, replace=False).tolist())
        part = sum((view[n] for n in subset[1:]), view[subset[0]].copy())
        assert_hides(part, sum(xs[n] for n in subset), size, q, f"subset {subset}")


# ------------------------------------------------------------------- the lying server
def test_a_server_lying_about_a_dropout_cannot_read_its_input() -> None:
    """The server receives node v's masked vector, then tells the share holders v dropped. They
    hand over v's slot mask key (they have released no self-seed share of v in this slot),
    so the server can recompute and strip all of v's pairwise masks: v's self mask is all that
    still hides its input. And the holders refuse v's self-seed shares afterwards."""
    pair_seeds_before: dict[int, bytes] = {}
    sess, clients = setup()
    xs = inputs(NODES, seed=3)
    q = quant(N)
    for n in NODES:
        pair_seeds_before[n] = clients[n].state.pair_seeds  # the test's omniscient copy
    slot, masked = mask_all(sess, clients, xs, q)
    victim = NODES[4]
    v = sess.nodes[victim]
    others = [n for n in NODES if n != victim]
    replies = open_shares(sess, clients, slot, others, [victim])
    # the lie works on the protocol level: the others' sum comes out exactly
    rest = sess.unmask(slot, {n: masked[n] for n in others}, [victim], replies)
    assert np.abs(decode(rest, N - 1, q) - sum(xs[n] for n in others)).max() <= (N - 1) * q.step

    s_sk = _shamir.combine(collect(replies, sess, "s")[v], sess.threshold)  # v's slot-0 mask key
    strip = np.zeros(DIM + 1, dtype=masked[victim].dtype)
    for w in sess.neighbours[v]:
        seed = _keys.pair_seed(s_sk, sess.s_pks[w][slot], session=sess.session, a=v, b=w, slot=slot)
        # positive control: the attacker's seed is the one neighbour w really used
        wst = clients[sess.node_of[w]].state
        p = wst.neighbours.index(v)
        assert seed == pair_seeds_before[sess.node_of[w]][32 * (p * wst.slots + slot): 32 * (p * wst.slots + slot + 1)]
        _masking.add_into(strip, _keys.slot_key(seed, session=sess.session, slot=slot, kind=b"pair"),
                          _masking.pair_sign(v, w))
    assert_hides(masked[victim] - strip, xs[victim], 1, q, f"node {victim} after its pairwise masks were stripped")

    # and the holders will not now also open v's self seed for this slot
    holder = others[0]
    both = sess.unmask_records(slot, NODES, [], holders=[holder])[holder]
    with pytest.raises(SecAggProtocolError, match="already released|did not sign"):
        clients[holder].unmask(both)
