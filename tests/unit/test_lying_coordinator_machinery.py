"""Second red-team pass: the machinery every release goes through (the SecAgg+ mod and client,
the guard and the ledger), against a coordinator that lies.

Each test plays one attack on the real components (the real ``secaggplus_mod`` over a real
SecAgg+ session with ECDSA identities, the real SQLite ledger and guard). Attacks the first
audits already cover (tests/unit/test_secagg_lying_server.py, test_breakage_secagg.py,
test_lying_coordinator_*.py) are not repeated here.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.client.secagg_mod import SECAGG_RECORD, secaggplus_mod
from test_secagg_harness import FakeGrid, train_content

DIM = 16


def _app(handler_vector) -> ClientApp:
    """A ClientApp whose train handler returns ``handler_vector(msg, context)`` (float32 ndarray)."""
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        v = np.asarray(handler_vector(msg, context), np.float32)
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(v)}),
                                   "metrics": MetricRecord({"n": 1.0})}), reply_to=msg)

    return app


def _round(grid, proto, server_round=1):
    return proto.run_round(grid, grid.get_node_ids(), message_type="train", content=train_content(server_round, DIM),
                           server_round=server_round, min_contributors=3)


# ------------------------------------------------------------------ 1. the SecAgg+ mod
def _error_texts(grid, node):
    """Every text the server received from ``node`` (secagg error records, Flower error reasons)."""
    out = []
    for r in grid.received:
        if r.metadata.src_node_id != node:
            continue
        if r.has_error():
            out.append(r.error.reason)
        elif SECAGG_RECORD in r.content.config_records and "error" in r.content.config_records[SECAGG_RECORD]:
            out.append(str(r.content.config_records[SECAGG_RECORD]["error"]))
    return out


@pytest.mark.parametrize("bad", [1, 3])
def test_a_contribution_the_quantizer_refuses_reaches_the_server_as_a_code_without_data(bad):
    """What was sent: an honest mask request; the handler's contribution holds ``bad`` non-finite
    values (data-dependent). Before the fix the mod replied ``"mask: 3 non-finite values in the
    contribution"`` — a count computed from the institution's data, in clear text, to the server
    (client/secagg_mod.py ``_mask``: ``return _error(msg, f"mask: {err}")`` after the handler ran).
    After: the node is a dropout with one fixed text, the same whatever the data."""
    from fedrec.server.secagg_workflow import SecAggPlusSum

    target = 1000

    def vec(msg, context):
        v = np.full(DIM, 0.25)
        if context.node_id == target:
            v[:bad] = np.nan
        return v

    grid = FakeGrid(_app(vec), 5)
    proto = SecAggPlusSum(clip_range=1.0)
    res = _round(grid, proto)
    assert target in res.dropped and target not in res.contributors
    texts = _error_texts(grid, target)
    assert texts, "the target's refusal must reach the server as a dropout"
    for t in texts:
        assert not re.search(r"\d", t.replace("mask:", "")), f"data-dependent text reached the server: {t!r}"
        assert "non-finite" not in t
    # the other nodes' sum still completes exactly
    assert np.allclose(res.total["w"].ravel(), 0.25 * len(res.contributors), atol=1e-3)


def _tamper_mask(**fields):
    def tamper(m: Message) -> Message:
        rec = m.content.config_records.get(SECAGG_RECORD)
        if rec is not None and str(rec.get("stage", "")) == "mask" and m.metadata.dst_node_id == 1000:
            new = ConfigRecord({k: v for k, v in rec.items() if k not in fields})
            for k, v in fields.items():
                if v is not None:
                    new[k] = v
            content = RecordDict({k: r for k, r in m.content.items() if k != SECAGG_RECORD})  # the record is
            content[SECAGG_RECORD] = new                                                     # shared: copy
            m.content = content
        return m
    return tamper


@pytest.mark.parametrize("fields", [{"slot": "first"}, {"active": 2.5}, {"active": None}, {"session": "abc"},
                                    {"q-levels": "many"}, {"q-step": None}])
def test_a_mask_record_of_the_wrong_types_is_refused_before_the_handler_runs(fields):
    """What was sent: the mask record with a string for the slot, a float for the active set, the
    active set or the quantization step missing, a text session id. Before the fix the
    ``int()``/``bytes()`` error escaped the mod (Flower sends its text to the server as an error
    reply) after — for the quantization fields — the handler had already run and charged;
    after: refused as a secagg error record before the handler runs
    (client/secagg_mod.py ``_mask``: ``except (ValueError, TypeError, KeyError)``; the
    quantization parameters are read in ``SecAggClient.check_mask_request``)."""
    from fedrec.server.secagg_workflow import SecAggPlusSum

    calls = []

    def vec(msg, context):
        calls.append(context.node_id)
        return np.full(DIM, 0.25)

    grid = FakeGrid(_app(vec), 5)
    grid.tamper = _tamper_mask(**fields)
    res = _round(grid, SecAggPlusSum(clip_range=1.0))
    assert 1000 in res.dropped and 1000 not in calls, "the handler ran (and would have charged) for a malformed record"
    replies = [r for r in grid.received if r.metadata.src_node_id == 1000]
    assert replies and not replies[-1].has_error(), "an exception escaped the mod"
    assert "error" in replies[-1].content.config_records[SECAGG_RECORD]


# ------------------------------------------------------------------ 2. the guard and the ledger
def _guard(path, *, ledger_cap: float, policy_cap: float, max_run: float):
    from fedrec.client.guard import ReleaseGuard
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.privacy.policy import InstitutionPolicy

    if not path.exists():
        PrivacyLedger.initialize(path, institution="inst", epsilon_cap=ledger_cap, delta_cap=1e-5)
    policy = InstitutionPolicy(ledger=path, epsilon_cap=policy_cap, max_run_epsilon=max_run)
    return ReleaseGuard(PrivacyLedger(path), institution="inst", policy=policy)


def _race(guards, runs):
    """Both guards read the ledger (their pre-checks) before either commits: the interleaving
    two handlers of one node (threads, or processes sharing the file) can always hit."""
    from fedrec.client.guard import Refusal
    from fedrec.common.privacy.accountant import GaussianEvent

    gate = threading.Barrier(len(guards), timeout=10)
    for g in guards:
        rows = g.ledger.rows

        def gated(*a, _rows=rows, **k):
            out = _rows(*a, **k)
            if not k and not a:  # the pre-check's read of the whole ledger
                try:
                    gate.wait()
                except threading.BrokenBarrierError:
                    pass
            return out
        g.ledger.rows = gated
    results: list = [None] * len(guards)

    def go(i):
        try:
            results[i] = guards[i].charge(GaussianEvent(noise_multiplier=1.0), run_id=runs[i], round=i, task="train",
                                          model="mf")
        except Refusal as err:
            results[i] = err
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(guards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_racing_charges_of_one_run_cannot_pass_max_run_epsilon(tmp_path):
    """What was sent: two releases of the same run at once (ε ≈ 4.4 each; max-run-epsilon 5,
    cap 50). Before the fix both passed the guard's max-run-epsilon check (client/guard.py
    ``_fits``, a read outside the ledger's write lock) and both were committed: the run spent
    ≈ 6.2 > 5. After: the ledger re-checks the run's ceiling inside its ``BEGIN IMMEDIATE``
    transaction (common/privacy/ledger.py ``charge``: ``run_ceiling``)."""
    from fedrec.client.guard import Charge, Refusal
    from fedrec.common.privacy.accountant import epsilon_for

    path = tmp_path / "ledger.db"
    guards = [_guard(path, ledger_cap=50.0, policy_cap=50.0, max_run=5.0) for _ in range(2)]
    results = _race(guards, ["r1", "r1"])
    assert sum(isinstance(r, Charge) for r in results) == 1, results
    refused = [r for r in results if isinstance(r, Refusal)]
    assert refused and refused[0].code == "policy"
    spent = epsilon_for(guards[0].ledger.events(run_id="r1"), delta=1e-5, accountant="prv")
    assert spent <= 5.0


def test_two_racing_charges_cannot_pass_a_policy_cap_stricter_than_the_ledgers(tmp_path):
    """What was sent: two releases of two runs at once (ε ≈ 4.4 each) at an institution whose
    policy lowered its cap to 5 after its ledger was made with cap 50. Before the fix the
    ledger's transaction checked only its own cap (50): both were committed, ≈ 6.2 spent > 5.
    After: the guard hands the stricter cap to the ledger's transaction (``cap=``)."""
    from fedrec.client.guard import Charge, Refusal
    from fedrec.common.privacy.accountant import epsilon_for

    path = tmp_path / "ledger.db"
    guards = [_guard(path, ledger_cap=50.0, policy_cap=5.0, max_run=5.0) for _ in range(2)]
    results = _race(guards, ["r1", "r2"])
    assert sum(isinstance(r, Charge) for r in results) == 1, results
    assert [r.code for r in results if isinstance(r, Refusal)] == ["budget"]
    assert epsilon_for(guards[0].ledger.events(), delta=1e-5, accountant="prv") <= 5.0


# ------------------------------------------------------------------ 1b. quantization in distributed mode
N_DIST, N_MIN, SIGMA, C, D_ATTACK = 10, 10, 1.0, 1.0, 2000


def _distributed_round(clip_range: float, noise_std: float | None) -> float:
    """A distributed-noise round over the real mod and protocol: every node adds N(0, s²) per
    coordinate with s = σ·C/sqrt(n_min) (so the sum of the 10 carries std σ·C); the others hold +C
    everywhere (DP must hold whatever the other institutions' data), the target holds a secret
    ±C pattern. Returns the attacker's accuracy guessing the target's signs from the secure sum
    alone. The Gaussian mechanism with σ = 1 on a ±C change allows at most Φ(1) ≈ 0.841
    (μ-GDP with μ = 2: the best test between N(-C, C²) and N(+C, C²))."""
    from fedrec.server.secagg_workflow import SecAggPlusSum

    rng = np.random.default_rng(29)
    secret = rng.choice([-1.0, 1.0], D_ATTACK)
    s = SIGMA * C / np.sqrt(N_MIN)

    def vec(msg, context):
        x = C * secret if context.node_id == 1000 else np.full(D_ATTACK, C)
        return x + np.random.default_rng(context.node_id).normal(0.0, s, D_ATTACK)

    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedrec.client.node import NOISE_RECORD, noise_record

        v = np.asarray(vec(msg, context), np.float32)
        rec = noise_record(N_MIN, share_std=s)  # the share's own noise std, as causal/strategy replies declare it
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(v)}), NOISE_RECORD: rec}), reply_to=msg)

    grid = FakeGrid(app, N_DIST, min_round_size=N_MIN)
    proto = SecAggPlusSum(clip_range=clip_range, noise_std=noise_std, noise_mode="distributed", n_min=N_MIN)
    res = proto.run_round(grid, grid.get_node_ids(), message_type="train", content=train_content(1, D_ATTACK),
                          server_round=1, min_contributors=N_DIST)
    if 1000 not in res.contributors:
        return 0.5  # refused: the attacker learns nothing
    total = res.total["w"].ravel()
    guess = np.where(total > total.mean(), 1.0, -1.0)  # the signs are balanced: the mean splits them
    return float((guess == secret).mean())


def test_an_honest_quantization_of_distributed_noise_stays_within_the_gaussian_bound():
    """Positive control for the next test: honest parameters (clip C, the per-client noise std)
    — the attacker's accuracy stays at the Gaussian mechanism's Φ(1) ≈ 0.841. Every node declares
    its share's std, so the honest step also passes each node's step check (check_share_step)."""
    acc = _distributed_round(C, SIGMA * C / np.sqrt(N_MIN))
    assert 0.80 < acc < 0.875


def test_a_clip_range_below_the_noise_cannot_turn_distributed_noise_into_a_sign_oracle():
    """What was sent: ``secagg.clip-range`` 1e-3 (no noise std) in a distributed-noise round. Each
    node's vector carries only σ²/n_min of the noise, and the quantizer clamps it to ±1e-3
    *before* the sum: every other node saturates at +1e-3, the target's value becomes
    sign(x + n) with n of std C/sqrt(10), and the sum reveals it — accuracy ≈ Φ(sqrt(10)) ≈
    0.999 against the Φ(1) ≈ 0.841 the charged σ allows (with clip-range C and no noise std,
    the honest default of MF training, 0.95). Clamping (and the clamped count the vector
    carries) is post-processing of a *fully* noised vector (local mode), never of a distributed
    share. Fix: a distributed-noise share is wrapped modulo 2^bits, not clamped
    (client/secagg_mod.py ``_mask``: ``wrap=noise is not None``; common/secagg/_quantize.py
    ``quantize``: ``if wrap:``), so the sum is the residue of the noised sum."""
    acc = _distributed_round(1e-3, None)
    assert acc < 0.875, f"the attacker read {acc:.3f} of the target's signs"


@pytest.mark.parametrize("factor", [0.0501, 1.0, 1e4])
def test_a_step_too_coarse_for_a_distributed_share_is_refused_before_masking(factor):
    """What was sent: a distributed-noise round whose ``secagg.noise-std`` makes the quantization
    step ``factor`` x each share's own noise std s (an honest coordinator's step is 0.02 s).
    Stochastic rounding of a share is not post-processing of the noised *sum* (⌊a⌋ + ⌊b⌋ is not
    a function of a + b): once the step outgrows the share's noise, the rounding residue follows
    each institution's value (common/secagg/_quantize.check_share_step). Every node refuses to
    mask — nothing of the target is summed — and the server receives a fixed text, never the
    numbers. At the honest step (previous tests) the same nodes mask and the sum is the Gaussian's."""
    from fedrec.common.secagg._quantize import MAX_SHARE_STEP, REL_ERROR
    from fedrec.server.aggregation import RoundFailed
    from fedrec.server.secagg_workflow import SecAggPlusSum

    s = SIGMA * C / np.sqrt(N_MIN)
    assert 2 * REL_ERROR < MAX_SHARE_STEP < factor  # honest passes, the lie does not
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedrec.client.node import NOISE_RECORD, noise_record

        v = np.random.default_rng(context.node_id).normal(0.0, s, D_ATTACK).astype(np.float32)
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(v)}),
                                   NOISE_RECORD: noise_record(N_MIN, share_std=s)}), reply_to=msg)

    grid = FakeGrid(app, N_DIST, min_round_size=N_MIN)
    proto = SecAggPlusSum(clip_range=C, noise_std=factor * s / (2 * REL_ERROR), noise_mode="distributed", n_min=N_MIN)
    with pytest.raises(RoundFailed):
        proto.run_round(grid, grid.get_node_ids(), message_type="train", content=train_content(1, D_ATTACK),
                        server_round=1, min_contributors=N_DIST)
    texts = _error_texts(grid, 1000)
    assert texts and all(t == "mask: contribution not masked (reason in the institution's log)" for t in texts), texts
    assert not any("masked" in r.content.array_records.get("arrays", {}) for r in grid.received
                   if not r.has_error() and "arrays" in r.content.array_records)


@pytest.mark.parametrize("bits", [32, 64])
def test_wrapped_shares_sum_exactly_where_single_values_pass_the_range(bits):
    """The wrapped representation the fix introduces: five shares whose values lie far outside
    ±L (and one below any float64 2^62) still decode to their sum within the rounding error n·Δ
    (checked against the float sum of the inputs, not against the quantizer), in both moduli."""
    from fedrec.common.secagg._quantize import QuantParams, dequantize, quantize

    p = QuantParams(step=1e-3, levels=1000, bits=bits, bound=1.0)  # values beyond ±1 would be clamped
    rng = np.random.default_rng(7)
    xs = [rng.normal(0.0, 50.0, 300) for _ in range(5)]
    xs[0][:3] = [1e6, -1e6, 0.0]
    xs[1][:3] = [-1e6, 1e6, 0.0]
    total = np.zeros(301, dtype=np.uint64)
    for x in xs:
        q = quantize(x, p, np.random.default_rng(1), wrap=True)
        assert q[-1] == 0 and q.dtype.itemsize * 8 == bits
        total = (total + q.astype(np.uint64)) & np.uint64((1 << bits) - 1)
    got, clamped = dequantize(total.astype(q.dtype), 5, p)
    assert clamped == 0
    assert np.abs(got - np.sum(xs, axis=0)).max() <= 5 * p.step
    # and the clamping path (local noise) still clamps and counts
    q = quantize(xs[0], p, np.random.default_rng(1))
    assert q[-1] == int((np.abs(xs[0]) > 1.0).sum())


def test_a_ledger_replaced_by_an_older_copy_mid_run_is_refused(tmp_path):
    """What was done: the institution's ledger file replaced, mid-run, by a copy made before the
    run's charges (a restored backup, a synced folder rolling back). Its hash chain is valid —
    the chain cannot see rows cut off its end — so before the fix the node went on charging
    the rolled-back ledger and the run's spent budget vanished. After: the node pins the
    ledger's head in ``context.state`` at each message and refuses (``ledger``) one that does
    not extend it (client/node.py ``_pin_head``)."""
    import sqlite3

    from fedrec.client.guard import Refusal
    from fedrec.client.node import node_guard
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.privacy.policy import InstitutionPolicy, write_policy

    folder = tmp_path / "inst"
    folder.mkdir()
    ledger = folder / "ledger.db"
    PrivacyLedger.initialize(ledger, institution="inst", epsilon_cap=10.0, delta_cap=1e-5)
    policy = write_policy(folder / "privacy.toml", InstitutionPolicy(ledger=ledger, max_run_epsilon=8.0))
    backup = tmp_path / "backup.db"
    with sqlite3.connect(ledger) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    ctx = Context(run_id=5, node_id=1, node_config={"policy": str(policy)}, state=RecordDict(), run_config={})
    ev = GaussianEvent(noise_multiplier=4.0)
    for r in (1, 2):
        node_guard(ctx, folder, "inst").charge(ev, run_id="5", round=r, task="train", model="mf")
    assert len(PrivacyLedger(ledger).rows()) == 2
    with sqlite3.connect(backup) as src, sqlite3.connect(ledger) as dst:  # the older copy, in place
        src.backup(dst)
    assert PrivacyLedger(ledger).rows() == [] and PrivacyLedger(ledger).verify_chain() == []
    with pytest.raises(Refusal) as err:
        node_guard(ctx, folder, "inst")
    assert err.value.code == "ledger" and "rolled back" in err.value.detail
    # a ledger that only grew is accepted, and another run's node (fresh state) starts afresh
    fresh = Context(run_id=6, node_id=1, node_config={"policy": str(policy)}, state=RecordDict(), run_config={})
    g = node_guard(fresh, folder, "inst")
    g.charge(ev, run_id="6", round=1, task="train", model="mf")
    node_guard(fresh, folder, "inst")


# ------------------------------------------------------------------ defended (kept: one line each)
def _session(n=5):
    from fedrec.common.secagg import SecAggClient, ServerSession
    from test_breakage_secagg import quant
    from test_secagg_harness import identities

    nodes = [3000 + i for i in range(n)]
    sess = ServerSession.create(nodes, slots=2, degree=None, committee=None)
    clients = {nd: SecAggClient(identity=ident, min_set=2) for nd, ident in zip(nodes, identities(n))}
    keys = {nd: clients[nd].setup_keys(r) for nd, r in sess.setup_keys_records().items()}
    return nodes, sess, clients, keys, quant(n)


def test_a_mask_request_between_key_setup_and_share_setup_is_refused():
    """What was sent: a mask request for the node's current session before it ever sent its
    shares (no committee holds its self seed: its masked vector could never be unmasked safely,
    and its self seed is not even drawn). Refused (common/secagg/_client.py
    ``check_mask_request``: ``_need(st.threshold > 0, "setup incomplete: re-key required")``)."""
    from fedrec.common.secagg import SecAggProtocolError

    nodes, sess, clients, keys, q = _session()
    late = nodes[0]
    share_recs = sess.keys_received(keys)
    sess.shares_received({nd: clients[nd].setup_shares(r) for nd, r in share_recs.items() if nd != late})
    _, rec = sess.mask_record(nodes[1:], q, 1)
    rec = dict(rec, active=sorted(list(rec["active"]) + [sess.nodes[late]]))
    with pytest.raises(SecAggProtocolError, match="setup incomplete"):
        clients[late].check_mask_request(rec)


def test_a_consistency_request_for_a_slot_the_node_never_masked_is_refused():
    """What was sent: a consistency (signing) request for slot 0 to a share holder that masked
    nothing in it. Refused (common/secagg/_client.py ``consistency``: ``_need(slot ==
    st.mask_slot, ...)``): a holder signs only the view of the round it took part in."""
    from fedrec.common.secagg import SecAggProtocolError

    nodes, sess, clients, keys, q = _session()
    share_recs = sess.keys_received(keys)
    sess.shares_received({nd: clients[nd].setup_shares(r) for nd, r in share_recs.items()})
    holder = next(nd for nd in nodes if sess.nodes[nd] in clients[nd].state.committee)
    idx = sorted(sess.nodes[nd] for nd in nodes)
    rec = {"stage": "consistency", "session": sess.session, "slot": 0, "survivors": idx}
    with pytest.raises(SecAggProtocolError, match="last masked slot -1"):
        clients[holder].consistency(rec)
