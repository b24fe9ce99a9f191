"""SecAgg+ setup in O(k + committee) signature checks per node (issues 28 and 33): a node
verifies only the advertisements whose keys it uses (its neighbours' and the committee's);
the rest of the session is bound by the roll's hash (the plan hash) that every share
ciphertext carries. Each test plays the lying server on the real protocol (SecAggClient +
ServerSession, real ECDSA P-256/P-384 identities, X25519, AES-GCM, Shamir) and shows the defence
refuses; tests/mutation/mutants.toml removes each defence and expects these tests to fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.common.secagg import SecAggClient, SecAggProtocolError, ServerSession
from fedrec.common.secagg import _identity, _keys, _masking, _shamir, _wire
from test_breakage_secagg import DIM, assert_hides, decode, quant
from test_secagg_harness import identities



def _keys_round(n, degree, committee=None, slots=1):
    nodes = [5000 + i for i in range(n)]
    sess = ServerSession.create(nodes, slots=slots, degree=degree, committee=committee)
    ids = identities(n)
    clients = {nd: SecAggClient(identity=ident) for nd, ident in zip(nodes, ids)}
    keys = {nd: clients[nd].setup_keys(r) for nd, r in sess.setup_keys_records().items()}
    return nodes, sess, clients, ids, keys


def test_a_node_verifies_only_its_neighbours_and_the_committee_and_the_sum_is_exact(monkeypatch):
    nodes, sess, clients, _, keys = _keys_round(40, 4, committee=8)
    recs = sess.keys_received(keys)
    calls: list[int] = []
    real = _identity.verify_identity
    monkeypatch.setattr(_identity, "verify_identity", lambda *a: calls.append(1) or real(*a))
    shares = {}
    for nd in nodes:
        calls.clear()
        shares[nd] = clients[nd].setup_shares(recs[nd])
        u = sess.nodes[nd]
        expect = (set(sess.neighbours[u]) | set(sess.committee)) - {u}
        assert len(calls) == len(expect) <= 4 + 8  # not the 39 other members
        if u not in sess.committee:  # a non-holder is sent only what it uses
            assert len(recs[nd]["adverts"]) == len(expect) + 1
    sess.shares_received(shares)
    rng = np.random.default_rng(3)
    xs = {nd: rng.uniform(-1, 1, DIM) for nd in nodes}
    q = quant(len(nodes))
    slot, rec = sess.mask_record(nodes, q, 1)
    ys = {nd: clients[nd].mask(rec, xs[nd]) for nd in nodes}
    holders = sess.holders_among(nodes)
    sigs = {nd: clients[nd].consistency(r)["sig"] for nd, r in sess.consistency_records(slot, nodes, holders).items()}
    got = {nd: clients[nd].unmask(r) for nd, r in sess.unmask_records(slot, nodes, [], holders, sigs).items()}
    total = sess.unmask(slot, ys, [], got)
    flat, _ = ServerSession.dequantize(total, len(nodes), q)
    assert np.abs(flat[:DIM] - sum(xs.values())).max() < len(nodes) * q.step


def test_a_forged_member_is_refused_by_its_neighbours_and_cannot_join_the_survivors():
    """The server replaces a non-holder's advertisement by its own keys (signed by a key of its
    own), with a consistent roll: nodes that do not use that member's keys accept the session,
    every neighbour of the forged member refuses it, and the holders refuse any survivor set that
    counts the forged member (it has no surviving neighbour)."""
    nodes, sess, clients, ids, keys = _keys_round(40, 4, committee=8)
    mallory = identities(1)[0]
    # pick a victim slot: a member that will be neither a holder nor a holder's neighbour
    for victim in nodes[::-1]:
        blob = bytes(keys[victim]["advert"])
        a = _wire.decode_advert(blob)
        c_sk, c_pk = _keys.generate_keypair()
        fake = _wire.encode_advert(_wire.Advert(**{**a.__dict__, "c_pk": c_pk}))
        forged = {**keys, victim: {**keys[victim], "advert": fake, "sig": mallory.sign(fake)}}
        recs = sess.keys_received(forged)
        v = sess.nodes[victim]
        if v not in sess.committee and not set(sess.neighbours[v]) & set(sess.committee):
            break
    else:
        pytest.skip("no suitable victim position")  # pragma: no cover - 40 nodes, 8 holders
    shares, refused = {}, {}
    for nd in nodes:
        if nd == victim:
            continue
        try:
            shares[nd] = clients[nd].setup_shares(recs[nd])
        except SecAggProtocolError as err:
            refused[sess.nodes[nd]] = str(err)
    assert set(refused) == set(sess.neighbours[v])
    assert all("invalid signature" in why for why in refused.values())
    # the server completes the setup with the rest and plays the forged member itself
    sess.shares_received(shares)
    alive = [nd for nd in nodes if sess.nodes[nd] not in refused]  # includes the forged member
    slot, rec = sess.mask_record(alive, quant(len(alive)), 1)
    for nd in alive:
        if nd != victim:
            clients[nd].mask(rec, np.zeros(DIM))
    for nd, r in sess.consistency_records(slot, alive, sess.holders_among(alive)).items():
        with pytest.raises(SecAggProtocolError, match="split|neighbours reported dropped"):
            clients[nd].consistency(r)


def test_a_node_shown_another_roll_has_its_shares_sealed():
    """Split roll: the target is shown a roll without one member (it does not use that
    member's keys, so it notices nothing), hence another graph; the server then reports the
    target's neighbours *in its graph* dropped while the holders check the survivor set in the
    honest graph, where the target keeps live neighbours. The target's shares are bound to its
    plan hash: no holder can open them, its self seed stays hidden."""
    n = 24
    nodes, sess, clients, ids, keys = _keys_round(n, 4)  # everyone holds shares (committee = n)
    recs = sess.keys_received(keys)
    rng = np.random.default_rng(11)
    for target, omit in ((nodes[i], nodes[j]) for i in range(n) for j in range(n) if i != j):
        t, m = sess.nodes[target], sess.nodes[omit]
        rec_t = dict(recs[target])
        keep = [p for p, i in enumerate(rec_t["roll-index"]) if i != m]
        for key in ("roll-index", "roll-name", "roll-hash"):
            rec_t[key] = [rec_t[key][p] for p in keep]
        rec_t["threshold"] = (n - 1) // 2 + 1  # consistent with the target's smaller committee
        ads = [p for p, b in enumerate(rec_t["adverts"]) if _wire.decode_advert(bytes(b)).index != m]
        for key in ("adverts", "sigs", "certs", "cert-sigs"):
            rec_t[key] = [rec_t[key][p] for p in ads]
        probe = SecAggClient(clients[target].state.__class__.from_dict(clients[target].state.to_dict()),
                             identity=clients[target].identity)
        try:
            probe.setup_shares(rec_t)
        except SecAggProtocolError:
            continue
        n1 = probe.state.neighbours  # the target's neighbours in its (split) graph
        survivors = [nd for nd in nodes if sess.nodes[nd] not in n1]
        s_idx = {sess.nodes[nd] for nd in survivors}
        from fedrec.common.secagg import _graph

        ok = _graph.connected(s_idx, sess.neighbours) and all(
            len(set(sess.neighbours[w]) & s_idx) >= _graph.min_live_neighbours(len(sess.neighbours[w]))
            for w in s_idx) and m not in n1
        if ok:
            break
    else:
        pytest.skip("no split-roll position passes the honest view")  # pragma: no cover
    out_t = clients[target].setup_shares(rec_t)
    shares = {nd: clients[nd].setup_shares(recs[nd]) for nd in nodes if nd != target}
    shares[target] = out_t
    committee_t = clients[target].state.committee  # the target's holders (all but the omitted one)
    sess.shares_received({nd: r for nd, r in shares.items() if nd != target})
    for p, j in enumerate(committee_t):  # file the target's ciphertexts under the right holders
        sess._ct[("b", t, j, 0)] = bytes(out_t["ct-b"][p])
        sess._ct[("s", t, j, 0)] = bytes(out_t["ct-s"][p])
    sess.members.add(t)
    xs = {nd: rng.uniform(-1, 1, DIM) for nd in nodes}
    q = quant(n)
    slot, rec = sess.mask_record(nodes, q, 1)
    ys = {nd: clients[nd].mask(rec, xs[nd]) for nd in nodes if nd != target}
    ys[target] = clients[target].mask(dict(rec, active=[i for i in rec["active"] if i != m]), xs[target])
    dropped = [sess.node_of[w] for w in n1]
    holders = [nd for nd in survivors if nd not in (target, omit)]
    sigs = {}
    for nd, r in sess.consistency_records(slot, survivors, holders).items():
        sigs[nd] = clients[nd].consistency(r)["sig"]  # the honest view passes every check
    got_b, got_s = {}, {}
    for nd, r in sess.unmask_records(slot, survivors, dropped, holders, sigs).items():
        v = sess.nodes[nd]
        ask_s = dict(r, **{"ct-from": list(n1), "ct-kind": ["s"] * len(n1),
                           "ct": [sess._ct[("s", w, v, 0)] for w in n1]})
        ask_b = dict(r, **{"ct-from": [t], "ct-kind": ["b"], "ct": [sess._ct[("b", t, v, 0)]]})
        for ask in (ask_s, ask_b):
            try:
                rep = clients[nd].unmask(ask)
            except (SecAggProtocolError, _keys.ShareAuthError):
                continue
            for u, kind, share in zip(rep["share-from"], rep["share-kind"], rep["shares"]):
                (got_b if kind == "b" else got_s).setdefault(int(u), {})[v] = bytes(share)
    thr = sess.threshold

    def secret(sh):
        if len(sh) >= thr:
            return _shamir.combine(sh, thr)
        return (_shamir.combine_unchecked(sh) % (1 << 256)).to_bytes(32, "big") if sh else bytes(32)

    view = ys[target].copy()
    _masking.add_into(view, _keys.slot_key(secret(got_b.get(t, {})), session=sess.session, slot=slot,
                                           kind=b"self"), -1)
    for w in n1:
        seed = _keys.pair_seed(secret(got_s.get(w, {})), sess.s_pks[t][slot], session=sess.session, a=w, b=t,
                               slot=slot)
        _masking.add_into(view, _keys.slot_key(seed, session=sess.session, slot=slot, kind=b"pair"),
                          -_masking.pair_sign(t, w))
    # the neighbours' slot keys did open (the honest view allows it): only the plan binding stops this
    assert len(got_s) == len(n1) and all(len(sh) >= thr for sh in got_s.values())
    assert_hides(view, xs[target], 1, q, "split roll")
