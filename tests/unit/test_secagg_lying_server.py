"""SecAgg+ against a lying coordinator (issue 28): attacks A-D, forged and replayed
advertisements, split views, and malformed replies, each played on the real protocol
(SecAggClient + ServerSession with real ECDSA P-256/P-384 identities, X25519, AES, Shamir).

Every attack test (1) shows the targeted client refuses, and (2) runs the attacker's
reconstruction on everything the server received and requires it to recover nothing (a view
of the target's input that is uniform modulo 2^bits, uncorrelated with the input), with a
positive control: the same arithmetic with the true seeds does recover the input, so the
attack code is right and only the refusal stops it. tests/mutation/mutants.toml removes each
defence and expects these tests to fail.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedrec.common.secagg import SecAggClient, SecAggProtocolError, ServerSession
from fedrec.common.secagg import _identity, _keys, _masking, _shamir, _wire
from test_breakage_secagg import assert_hides, decode, quant
from test_secagg_harness import FakeGrid, identities, make_client_app, train_content

DIM = 2000


def setup(n: int, degree: int | None, *, slots: int = 2, committee: int | None = None, min_set: int = 2):
    nodes = [2000 + 3 * i for i in range(n)]
    sess = ServerSession.create(nodes, slots=slots, degree=degree, committee=committee)
    ids = identities(n)
    clients = {nd: SecAggClient(identity=ident, min_set=min_set) for nd, ident in zip(nodes, ids)}
    keys = {nd: clients[nd].setup_keys(r) for nd, r in sess.setup_keys_records().items()}
    shares = {nd: clients[nd].setup_shares(r) for nd, r in sess.keys_received(keys).items()}
    sess.shares_received(shares)
    return nodes, sess, clients, ids


def masked_round(sess, clients, nodes, seed=0):
    rng = np.random.default_rng(seed)
    xs = {nd: rng.uniform(-1, 1, DIM) for nd in nodes}
    q = quant(len(nodes))
    truth = {nd: (clients[nd].state.self_seeds, clients[nd].state.pair_seeds) for nd in nodes}  # omniscient copy
    slot, rec = sess.mask_record(nodes, q, 1)
    ys = {nd: clients[nd].mask(rec, xs[nd]) for nd in nodes}
    return slot, xs, ys, q, truth


def attacker_view(sess, slot, target, y, q, b_shares, s_shares):
    """The server's best reconstruction of ``target``'s input from the shares it holds: the
    self seed from ``b_shares`` of the target, the pairwise masks from each neighbour's slot
    key (``s_shares`` per neighbour). With fewer than t shares it interpolates what it has
    (uniformly random secrets: information-theoretically hidden)."""
    t, u = sess.threshold, sess.nodes[target]

    def secret(sh):
        if len(sh) >= t:
            return _shamir.combine(sh, t)
        return (_shamir.combine_unchecked(sh) % (1 << 256)).to_bytes(32, "big") if sh else bytes(32)

    view = y.copy()
    _masking.add_into(view, _keys.slot_key(secret(b_shares), session=sess.session, slot=slot, kind=b"self"), -1)
    for w in sess.neighbours[u]:
        s_sk = secret(s_shares.get(w, {}))
        seed = _keys.pair_seed(s_sk, sess.s_pks[u][slot], session=sess.session, a=w, b=u, slot=slot)
        _masking.add_into(view, _keys.slot_key(seed, session=sess.session, slot=slot, kind=b"pair"),
                          -_masking.pair_sign(u, w))  # remove what u added
    return view


def true_view(sess, clients, truth, slot, target, y):
    """Positive control: strip the target's masks with its true seeds -> its quantized input."""
    self_seeds, pair_seeds = truth[target]
    st = clients[target].state
    view = y.copy()
    _masking.add_into(view, _keys.slot_key(self_seeds[32 * slot:32 * (slot + 1)], session=sess.session, slot=slot,
                                           kind=b"self"), -1)
    for p, w in enumerate(st.neighbours):
        seed = pair_seeds[32 * (p * st.slots + slot): 32 * (p * st.slots + slot + 1)]
        _masking.add_into(view, _keys.slot_key(seed, session=sess.session, slot=slot, kind=b"pair"),
                          -_masking.pair_sign(st.index, w))
    return view


def try_all(clients, recs, call):
    """Send each record; keep the replies of those that answer, count the refusals."""
    out, refused = {}, {}
    for nd, r in recs.items():
        try:
            out[nd] = getattr(clients[nd], call)(r)
        except SecAggProtocolError as err:
            refused[nd] = str(err)
    return out, refused


def reroll(rec):
    """What a consistent lying server sends: the session roll rebuilt from the (possibly forged)
    advertisements in ``rec`` (with n <= 32 every node is a share holder and gets them all)."""
    ads = sorted(((a := _wire.decode_advert(bytes(b))).index, a.name, _wire.advert_hash(bytes(b)))
                 for b in rec["adverts"])
    return dict(rec, **{"roll-index": [e[0] for e in ads], "roll-name": [e[1] for e in ads],
                        "roll-hash": [e[2] for e in ads]})


def collect(sess, replies, kind):
    got: dict[int, dict[int, bytes]] = {}
    for nd, rec in replies.items():
        for u, k, share in zip(rec["share-from"], rec["share-kind"], rec["shares"]):
            if k == kind:
                got.setdefault(int(u), {})[sess.nodes[nd]] = bytes(share)
    return got


# ------------------------------------------------------------------ attack A
@pytest.mark.parametrize("n,degree", [(8, 0), (30, 4)])
def test_a_reporting_the_targets_neighbours_dropped_is_refused_and_reveals_nothing(n, degree):
    nodes, sess, clients, _ = setup(n, degree)
    slot, xs, ys, q, truth = masked_round(sess, clients, nodes)
    target = nodes[2]
    u = sess.nodes[target]
    nbrs = [sess.node_of[w] for w in sess.neighbours[u]]
    survivors = [nd for nd in nodes if nd not in nbrs]
    # positive control: the attack's arithmetic is right
    got = decode(true_view(sess, clients, truth, slot, target, ys[target]), 1, q)
    assert np.abs(got - xs[target]).max() <= 2 * q.step

    sigs, refused = try_all(clients, sess.consistency_records(slot, survivors), "consistency")
    assert target in refused  # the target itself will not vouch for its isolation
    assert not sigs or len(sigs) < sess.signature_quorum()
    sess.signatures[slot] = {nd: r["sig"] for nd, r in sigs.items()}
    holders = [sess.node_of[v] for v in sess.committee if sess.node_of[v] in survivors]
    replies, refused = try_all(clients, sess.unmask_records(slot, survivors, nbrs, holders=holders), "unmask")
    assert not replies and set(refused) == set(holders)
    view = attacker_view(sess, slot, target, ys[target], q, collect(sess, replies, "b").get(u, {}),
                         collect(sess, replies, "s"))
    assert_hides(view, xs[target], 1, q, "attack A")


def test_a_holder_refuses_a_view_that_isolates_a_node_even_with_signatures():
    """The holder checks the view itself, whatever signatures come with it."""
    nodes, sess, clients, _ = setup(30, 4)
    slot, *_ = masked_round(sess, clients, nodes)
    target = sess.node_of[sess.committee[0]]
    u = sess.nodes[target]
    nbrs = [sess.node_of[w] for w in sess.neighbours[u]]
    holder = next(sess.node_of[v] for v in sess.committee if sess.node_of[v] not in nbrs + [target])
    survivors = [nd for nd in nodes if nd not in nbrs]
    # forge: make the holder believe it signed this view (bypass its own consistency check)
    clients[holder].state.signed_slot, clients[holder].state.signed_survivors = slot, sorted(
        sess.nodes[nd] for nd in survivors)
    with pytest.raises(SecAggProtocolError, match="split|neighbours reported dropped"):
        clients[holder].unmask(sess.unmask_records(slot, survivors, nbrs, holders=[holder])[holder])


# ------------------------------------------------------------------ attack B
@pytest.mark.parametrize("n,degree", [(8, 0), (30, 4)])
def test_b_an_active_set_of_one_or_without_the_targets_neighbours_is_refused(n, degree):
    nodes, sess, clients, _ = setup(n, degree)
    target = nodes[1]
    u = sess.nodes[target]
    q = quant(n)
    slot, rec = sess.mask_record(nodes, q, 1)
    alone = dict(rec, active=[u])
    with pytest.raises(SecAggProtocolError, match="below this node's floor"):
        clients[target].mask(alone, np.zeros(DIM))
    from fedrec.common.secagg._graph import min_live_neighbours

    keep = sess.neighbours[u][:min_live_neighbours(len(sess.neighbours[u])) - 1]  # one too few
    no_nbrs = dict(rec, active=sorted(v for v in sess.nodes.values() if v not in sess.neighbours[u] or v in keep))
    with pytest.raises(SecAggProtocolError, match="neighbours are active"):
        clients[target].mask(no_nbrs, np.zeros(DIM))
    # nothing was masked: the slot is still usable for the honest request
    y = clients[target].mask(rec, np.zeros(DIM))
    assert y.size == DIM + 1


def test_b_a_policy_floor_above_the_active_set_is_refused():
    nodes, sess, clients, _ = setup(8, 0, min_set=6)
    q = quant(8)
    slot, rec = sess.mask_record(nodes, q, 1)
    five = sorted(sess.nodes[nd] for nd in nodes[:5])
    with pytest.raises(SecAggProtocolError, match="active set of 5, below this node's floor 6"):
        clients[nodes[0]].check_mask_request(dict(rec, active=five))


# ------------------------------------------------------------------ attack C / replay
def _setup_records(n=8, degree=0):
    nodes = [3000 + i for i in range(n)]
    sess = ServerSession.create(nodes, slots=2, degree=degree)
    ids = identities(n)
    clients = {nd: SecAggClient(identity=ident) for nd, ident in zip(nodes, ids)}
    keys = {nd: clients[nd].setup_keys(r) for nd, r in sess.setup_keys_records().items()}
    return nodes, sess, clients, ids, keys


def test_c_substituted_holder_keys_are_refused_and_shares_stay_sealed():
    nodes, sess, clients, ids, keys = _setup_records()
    recs = sess.keys_received(keys)
    target = nodes[0]
    # the server makes its own key pairs for every other node, signed with a key of its own
    mallory = identities(1)[0]
    forged_keys = {}
    rec = dict(recs[target], adverts=list(recs[target]["adverts"]), sigs=list(recs[target]["sigs"]))
    for p, blob in enumerate(rec["adverts"]):
        a = _wire.decode_advert(bytes(blob))
        if a.index == sess.nodes[target]:
            continue
        c_sk, c_pk = _keys.generate_keypair()
        forged_keys[a.index] = c_sk
        fake = _wire.encode_advert(_wire.Advert(**{**a.__dict__, "c_pk": c_pk}))
        rec["adverts"][p], rec["sigs"][p] = fake, mallory.sign(fake)
    with pytest.raises(SecAggProtocolError, match="invalid signature"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(reroll(rec))
    # the server's own key under a name it invents (a Sybil): not in the roster
    a = _wire.decode_advert(bytes(rec["adverts"][1]))
    sybil = _wire.encode_advert(_wire.Advert(**{**a.__dict__, "name": "mallory"}))
    rec2 = dict(recs[target], adverts=list(recs[target]["adverts"]) + [sybil],
                sigs=list(recs[target]["sigs"]) + [mallory.sign(sybil)])
    with pytest.raises(SecAggProtocolError, match="not in this node's roster"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(reroll(rec2))
    # reconstruction attempt: the target produced no ciphertext; with the honest records the
    # shares it encrypts to the holders do not open under the server's forged channel keys
    out = clients[target].setup_shares(recs[target])
    v = sess.committee[0] if sess.committee[0] != sess.nodes[target] else sess.committee[1]
    ct = out["ct-b"][sess.committee.index(v) * sess.slots]
    ad = _keys.associated_data(session=sess.session, sender=sess.nodes[target], receiver=v, kind="b", slot=0,
                               plan=sess.plan)
    guess = _keys.hkdf(_keys.agree(forged_keys[v], sess.c_pks[sess.nodes[target]]), salt=sess.session,
                       info=b"fedrec-secagg/channel" + __import__("struct").pack(">II", *sorted((v, sess.nodes[target]))))
    with pytest.raises(_keys.ShareAuthError):
        _keys.decrypt(guess, bytes(ct), ad)


def _forge_under(rec, p, name, run_key_of_server, cert_signer, *, not_after=None):
    """The server's own keys in position ``p`` of ``rec``: a fresh channel key, signed with the
    server's run key, certified for ``name`` by ``cert_signer`` (an identity the server holds)."""
    import time

    a = _wire.decode_advert(bytes(rec["adverts"][p]))
    c_sk, c_pk = _keys.generate_keypair()
    fake = _wire.encode_advert(_wire.Advert(**{**a.__dict__, "c_pk": c_pk}))
    sk, pk = run_key_of_server
    now = int(time.time())
    cert = _identity.encode_run_cert(name, pk, now - 60, not_after or now + 3600)
    for key, value in (("adverts", fake), ("sigs", _identity.session_sign(sk, fake)), ("certs", cert),
                       ("cert-sigs", cert_signer.sign(cert))):
        rec[key] = list(rec[key])
        rec[key][p] = value
    return rec


def test_c_a_run_key_certificate_the_server_makes_is_refused():
    """The server certifies a run key of its own under a member's name (signed with a key it
    holds, not the member's): every advertisement it signs with that run key is refused."""
    nodes, sess, clients, ids, keys = _setup_records()
    recs = sess.keys_received(keys)
    target = nodes[0]
    mallory, server_run_key = identities(1)[0], _identity.session_signing_keypair()
    rec = dict(recs[target])
    for p, blob in enumerate(rec["adverts"]):
        a = _wire.decode_advert(bytes(blob))
        if a.index != sess.nodes[target]:
            rec = _forge_under(rec, p, a.name, server_run_key, mallory)
    with pytest.raises(SecAggProtocolError, match="certificate .* invalid signature"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(reroll(rec))


def test_the_identity_cache_verifies_each_certificate_once_and_stays_bound():
    """A re-key verifies no ECDSA signature (every certificate was verified in the first
    session); a certificate for another name, an expired one, or a cached one whose roster key
    changed is refused."""
    from cryptography.hazmat.primitives.asymmetric import ec

    nodes, sess, clients, ids, keys = _setup_records()
    target = nodes[0]
    first = sess.keys_received(keys)
    calls: list[int] = []
    real = _identity.verify_identity
    _identity.verify_identity = lambda *a: calls.append(1) or real(*a)
    try:
        clients[target].setup_shares(first[target])
        assert len(calls) == len(nodes) - 1  # complete graph: every peer's certificate, once
        sess2 = ServerSession.create(nodes, slots=2, degree=0)
        keys2 = {nd: clients[nd].setup_keys(r) for nd, r in sess2.setup_keys_records().items()}
        assert all(keys2[nd]["cert"] == keys[nd]["cert"] for nd in nodes)  # one run key per day
        recs2 = sess2.keys_received(keys2)
        calls.clear()
        probe = SecAggClient(clients[target].state.__class__.from_dict(clients[target].state.to_dict()),
                             identity=ids[0])
        probe.setup_shares(recs2[target])
        assert calls == []  # the re-key verified Ed25519 advertisements only
    finally:
        _identity.verify_identity = real
    p = next(p for p, b in enumerate(recs2[target]["adverts"]) if _wire.decode_advert(bytes(b)).index == 2)
    member = ids[[sess2.nodes[nd] for nd in nodes].index(2)]
    # the member's genuine certificate and run key, but the advertisement names another member
    swapped = dict(recs2[target])
    for key in ("certs", "cert-sigs"):
        swapped[key] = list(swapped[key])
    q = next(q for q, b in enumerate(recs2[target]["adverts"]) if _wire.decode_advert(bytes(b)).index == 3)
    swapped["certs"][p], swapped["cert-sigs"][p] = swapped["certs"][q], swapped["cert-sigs"][q]
    client = lambda: SecAggClient(clients[target].state.__class__.from_dict(clients[target].state.to_dict()),  # noqa: E731
                                  identity=ids[0])
    with pytest.raises(SecAggProtocolError, match="run-key certificate"):
        client().setup_shares(swapped)
    # an expired certificate, genuinely signed by the member
    expired = _forge_under(dict(recs2[target]), p, member.name, _identity.session_signing_keypair(), member,
                           not_after=int(__import__("time").time()) - 1)
    with pytest.raises(SecAggProtocolError, match="expired"):
        client().setup_shares(reroll(expired))
    # the roster now lists another key for the member: its cached certificate is verified again, and fails
    from fedrec.common.secagg._identity import Identity, Roster

    members = dict(ids[0].roster.members)
    members[member.name] = ec.generate_private_key(ec.SECP256R1()).public_key()
    rotated = Identity(name=ids[0].name, key=ids[0].key, roster=Roster(members))
    with pytest.raises(SecAggProtocolError, match="certificate .* invalid signature"):
        SecAggClient(clients[target].state.__class__.from_dict(clients[target].state.to_dict()),
                     identity=rotated).setup_shares(recs2[target])


def test_replayed_advertisements_and_sessions_are_refused():
    nodes, sess, clients, ids, keys = _setup_records()
    old_recs = sess.keys_received(keys)
    target = nodes[0]
    # a new session: the server replays the old session's genuine, signed advertisements
    sess2 = ServerSession.create(nodes, slots=2, degree=0)
    keys2 = {nd: clients[nd].setup_keys(r) for nd, r in sess2.setup_keys_records().items()}
    recs2 = sess2.keys_received(keys2)
    mixed = dict(recs2[target], adverts=list(recs2[target]["adverts"]), sigs=list(recs2[target]["sigs"]))
    mixed["adverts"][3], mixed["sigs"][3] = old_recs[target]["adverts"][3], old_recs[target]["sigs"][3]
    with pytest.raises(SecAggProtocolError, match="another session"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(reroll(mixed))
    # the server reuses a session id: the node refuses to key it again
    with pytest.raises(SecAggProtocolError, match="keyed before"):
        clients[target].setup_keys(sess2.setup_keys_records()[target])
    # an advertisement re-signed by its genuine owner but hours old: stale
    a = _wire.decode_advert(bytes(recs2[target]["adverts"][3]))
    old = _wire.encode_advert(_wire.Advert(**{**a.__dict__, "time": a.time - 2 * _wire.ADVERT_MAX_AGE_S}))
    owner = clients[sess2.node_of[a.index]]  # signs with its own (certified) run key
    stale = dict(recs2[target], adverts=list(recs2[target]["adverts"]), sigs=list(recs2[target]["sigs"]))
    stale["adverts"][3], stale["sigs"][3] = old, _identity.session_sign(owner.state.run_sk, old)
    with pytest.raises(SecAggProtocolError, match="stale"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(reroll(stale))
    # the genuine records work
    assert len(clients[target].setup_shares(recs2[target])["ct-s"]) > 0


def test_a_node_without_identity_refuses_with_code_secagg(caplog):
    grid = FakeGrid(make_client_app(), 3, identities=False)
    node = grid.get_node_ids()[0]
    sess = ServerSession.create(grid.get_node_ids(), slots=1, degree=0)
    from flwr.app import ConfigRecord

    msg = Message(RecordDict({"fedrec.secagg": ConfigRecord(sess.setup_keys_records()[node])}), dst_node_id=node,
                  message_type="train")
    with caplog.at_level(logging.WARNING):
        out = grid.send_and_receive([msg])[0].content
    assert dict(out.config_records["refusal"]) == {"code": "secagg"}
    assert "fedrec.secagg" not in out.config_records
    assert "no institution policy" in caplog.text
    with pytest.raises(SecAggProtocolError, match="never advertises unsigned keys"):
        SecAggClient().setup_keys(sess.setup_keys_records()[node])


# ------------------------------------------------------------------ attack D
def test_d_a_committee_of_one_or_a_minority_threshold_is_refused():
    nodes, sess, clients, ids, keys = _setup_records()
    recs = sess.keys_received(keys)
    target = nodes[0]
    with pytest.raises(SecAggProtocolError, match="committee of 1 share holders, below this node's floor 2"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(dict(recs[target], **{"committee-size": 1}))
    with pytest.raises(SecAggProtocolError, match="not the strict majority"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(dict(recs[target], threshold=1))
    with pytest.raises(SecAggProtocolError, match="degree 2 below"):
        SecAggClient(clients[target].state, identity=ids[0]).setup_shares(dict(recs[target], degree=2))
    # the committee is not the server's to choose: every node derives the same one
    shares = {nd: clients[nd].setup_shares(r) for nd, r in recs.items()}
    sess.shares_received(shares)
    assert all(clients[nd].state.committee == sess.committee for nd in nodes)
    assert all(clients[nd].state.threshold == len(sess.committee) // 2 + 1 for nd in nodes)


def test_a_dropout_tolerance_of_one_half_is_refused_everywhere():
    from fedrec.common.config import ConfigError, RunConfig
    from fedrec.server.secagg_workflow import SecAggPlusSum

    with pytest.raises(ConfigError, match="max-dropout-fraction"):
        RunConfig.from_flat({"secagg.max-dropout-fraction": 0.6})
    with pytest.raises(ConfigError, match="max-dropout-fraction"):
        RunConfig.from_flat({"secagg.max-dropout-fraction": 0.5})
    with pytest.raises(ValueError, match="strict majority"):
        SecAggPlusSum(clip_range=1.0, max_dropout=0.5)
    sess = ServerSession.create([1, 2, 3], slots=1, degree=0)
    rec = dict(sess.setup_keys_records()[1], **{"max-dropout-permille": 600})
    with pytest.raises(SecAggProtocolError, match="strict majority"):
        SecAggClient(identity=identities(1)[0]).setup_keys(rec)


# ------------------------------------------------------------------ consistency
def test_split_views_get_no_quorum_and_a_node_signs_one_view_per_slot():
    """The server shows half the nodes 'v survived' and the other half 'v dropped', to collect
    v's self-seed shares from the first half and its slot key from the second: neither view
    gathers the signature quorum, so no holder opens anything."""
    nodes, sess, clients, _ = setup(10, 0)
    slot, xs, ys, q, truth = masked_round(sess, clients, nodes, seed=5)
    victim = nodes[4]
    v = sess.nodes[victim]
    view1, view2 = nodes, [nd for nd in nodes if nd != victim]
    half1 = [nd for nd in nodes if nd != victim][:5]
    half2 = [nd for nd in nodes if nd not in half1]
    sig1 = {nd: clients[nd].consistency(sess.consistency_records(slot, view1)[nd])["sig"] for nd in half1}
    sig2 = {nd: clients[nd].consistency(sess.consistency_records(slot, view2)[nd])["sig"] for nd in half2
            if nd != victim}
    # a signer will not sign the other view too
    with pytest.raises(SecAggProtocolError, match="different survivor set"):
        clients[half1[0]].consistency(sess.consistency_records(slot, view2)[half1[0]])
    got_b, got_s = {}, {}
    for view, sigs, dropped, into, kind in ((view1, sig1, [], got_b, "b"), (view2, sig2, [victim], got_s, "s")):
        sess.signatures[slot] = sigs
        for nd, rec in sess.unmask_records(slot, view, dropped, holders=list(sigs)).items():
            with pytest.raises(SecAggProtocolError, match="holders signed this survivor set"):
                into[nd] = clients[nd].unmask(rec)
    view = attacker_view(sess, slot, victim, ys[victim], q, collect(sess, got_b, "b").get(v, {}),
                         {w: collect(sess, got_s, "s").get(v, {}) for w in sess.neighbours[v]})
    assert_hides(view, xs[victim], 1, q, "split view")
    # positive control: with honest signatures everyone's view matches and the sum opens
    assert np.abs(decode(true_view(sess, clients, truth, slot, victim, ys[victim]), 1, q) - xs[victim]).max() \
        <= 2 * q.step


# ------------------------------------------------------------------ reply validation
def _corrupt(kind):
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id != 1000 or "arrays" not in reply.content.array_records:
            return reply
        y = reply.content.array_records["arrays"]["masked"].numpy()
        bad = {"short": y[:1], "dtype": y.astype(np.int64), "long": np.concatenate([y, y[:3]]),
               "extra": None}[kind]
        arrays = ArrayRecord({"masked": Array(bad if bad is not None else y)})
        if kind == "extra":
            arrays["more"] = Array(y[:2])
        content = RecordDict({k: r for k, r in reply.content.items() if k != "arrays"})
        content["arrays"] = arrays
        return Message(content, reply_to=msg)
    return mod


@pytest.mark.parametrize("kind,why", [("short", "values in shape"), ("long", "values in shape"),
                                      ("dtype", "dtype int64"), ("extra", "expected ['masked']")])
def test_a_malformed_masked_reply_is_one_dropout_with_a_logged_reason(kind, why, caplog):
    from fedrec.server.secagg_workflow import SecAggPlusSum
    from test_secagg_harness import client_vector

    grid = FakeGrid(make_client_app(extra_mods=[_corrupt(kind)]), 6)
    proto = SecAggPlusSum(clip_range=1.0)
    with caplog.at_level(logging.WARNING):
        res = proto.run_round(grid, grid.get_node_ids(), message_type="train", content=train_content(1),
                              server_round=1, min_contributors=4)
    assert res.dropped == [1000] and why in proto.rejected[1000] and why in caplog.text
    expect = sum(np.concatenate([a.ravel() for a in client_vector(n, 1, 64).values()]) for n in res.contributors)
    got = np.concatenate([res.total["w"].ravel(), res.total["b"].ravel()])
    assert np.abs(got - expect).max() < 1e-6


def test_policy_identity_keys_parse_and_go_together(tmp_path):
    from fedrec.common.errors import FedrecInputError
    from fedrec.common.privacy.policy import load_policy
    from test_secagg_harness import provision

    path = provision(tmp_path, ["a", "b"])["a"]
    pol = load_policy(path)
    assert pol.identity_key == (tmp_path / "a" / "identity.pem").resolve() and pol.roster.name == "roster.toml"
    assert _identity.Identity.load(pol.identity_key, pol.roster).name == "a"
    text = path.read_text().replace('roster = "../roster.toml"\n', "")
    (tmp_path / "half.toml").write_text(text)
    with pytest.raises(FedrecInputError, match="identity-key and roster go together"):
        load_policy(tmp_path / "half.toml")
