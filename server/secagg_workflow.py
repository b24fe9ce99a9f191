"""fedrec's SecAgg+ on Flower's Message API: the server side of every secure sum.

:class:`SecAggPlusSum` implements :class:`fedrec.server.aggregation.SumProtocol`. Per run it
pays the key setup once (two stages, sent with the round's own message type and answered by
``client/secagg_mod.py`` without calling the handler): key advertisement, then encrypted
Shamir shares of each node's mask key and of fresh self-mask seeds for a block of
``rounds_per_setup`` rounds. A steady-state round is then two stages:

1. **mask** — the round's own message (``content`` plus the SecAgg record); the reply carries
   the quantized, masked contribution instead of the float arrays;
2. **unmask** — small, and only to the share-holder committee (every node up to 32 nodes,
   else 32 random ones): they open the share ciphertexts the server forwards (self-seed
   shares of survivors, this round's mask-key shares of dropouts).

Dropouts: too few answers at any stage, too few shares, a split survivor graph, or (in
``distributed`` noise mode) fewer than ``n_min`` survivors raise :class:`RoundFailed` with
the reason — a round never silently keeps the old model. Mask keys are per round (one key
pair per slot, all advertised at setup): removing a dropout's masks reveals its key for that
round only, so it rejoins next round under keys the server has never seen. A node that
missed the setup (or a new node) triggers a fresh setup in which every node re-keys.
Security argument: docs/secure-aggregation.md.

Wiring::

    protocol = SecAggPlusSum.from_config(cfg, clip_range=..., noise_std=...)
    res = protocol.run_round(grid, nodes, message_type="train", content=content,
                             server_round=r, min_contributors=m)

``clip_range`` (bound on each noiseless coordinate of one contribution) and ``noise_std``
(the DP noise std one client adds per coordinate) set the quantization; a round can override
both through ``content["config"]`` keys ``secagg.clip-range`` / ``secagg.noise-std``.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrec.common.secagg import SecAggError, ServerSession
from fedrec.server.aggregation import RoundFailed, RoundResult, reply_metrics
from fedrec.server.exchange import send_and_receive

log = logging.getLogger(__name__)

__all__ = ["SecAggPlusSum", "SECAGG_RECORD"]

SECAGG_RECORD = "fedrec.secagg"  # same name as in client/secagg_mod.py (the wire contract)


class SecAggPlusSum:
    """SecAgg+ sums over Flower's Message API (see module doc).

    Parameters (keyword-only):
      clip_range: bound on each noiseless coordinate of one contribution (contribution units).
      noise_std: DP noise std one client adds per coordinate (None: DP off; finest 32-bit step).
      neighbours: neighbours per node in the SecAgg+ graph; 0 = complete graph (SecAgg);
        None = automatic (complete up to 20 nodes, else the smallest even k >= 2 log2 n).
      noise_mode / n_min: in ``distributed`` mode a round with fewer than ``n_min`` survivors
        is discarded (RoundFailed): the sum would carry less than the accounted noise.
      rounds_per_setup: rounds (slots) prepared per setup (a new setup follows when used up).
      committee: share holders per session (None: every node up to 32, else 32 random ones;
        majority threshold); the unmask stage asks ``threshold + spare_holders`` of them, and the
        others only if too few answer.
      setup_timeout: seconds for each setup stage; None (default) = :meth:`stage_timeout` of the
        node count: 300 s plus 0.5 s per node (on one machine a simulation runs the nodes one
        after another, so a stage's wall time grows with n even though each node's work grows
        with log n; in deployment the nodes run in parallel and answer well within it).
    """

    def __init__(self, *, clip_range: float, noise_std: float | None = None, neighbours: int | None = None,
                 noise_mode: str = "local", n_min: int = 0, rounds_per_setup: int = 16,
                 committee: int | None = None, spare_holders: int = 2, setup_timeout: float | None = None,
                 max_dropout: float = 0.3, straggler_grace: float | None = None):
        if noise_mode not in ("local", "distributed"):
            raise ValueError("noise_mode must be 'local' or 'distributed'")
        if rounds_per_setup < 1:
            raise ValueError("rounds_per_setup must be >= 1")
        if not 0 <= max_dropout < 0.5:
            raise ValueError("max_dropout must lie in [0, 0.5): unmasking needs a strict majority")
        self.max_dropout = float(max_dropout)
        if straggler_grace is not None and not straggler_grace >= 0:
            raise ValueError("straggler_grace must be seconds >= 0 (or None: wait for every node)")
        self.straggler_grace = straggler_grace
        self.clip_range = float(clip_range)
        self.noise_std = noise_std
        self.neighbours = neighbours
        self.noise_mode = noise_mode
        self.n_min = int(n_min)
        self.rounds_per_setup = int(rounds_per_setup)
        self.committee = committee
        self.spare_holders = int(spare_holders)
        if setup_timeout is not None and not setup_timeout > 0:
            raise ValueError("setup_timeout must be positive seconds (or None: scaled with the node count)")
        self.setup_timeout = None if setup_timeout is None else float(setup_timeout)
        self._session: ServerSession | None = None
        #: number of setups, seconds of the last setup and of the last round's two stages,
        #: clamped coordinates in the last round
        self.stats: dict[str, float] = {"setups": 0, "setup_s": 0.0, "mask_stage_s": 0.0,
                                        "consistency_stage_s": 0.0, "unmask_stage_s": 0.0, "clamped": 0}
        #: node id -> why its last reply was not used (validation, refusal, protocol error)
        self.rejected: dict[int, str] = {}

    @classmethod
    def from_config(cls, cfg, *, clip_range: float | None = None, noise_std: float | None = None,
                    **kwargs) -> SecAggPlusSum:
        """From a :class:`fedrec.common.config.RunConfig`.

        ``clip_range`` defaults to ``2 · lr · clip-norm · local-steps`` (a clipped DP-SGD mean
        step moves a coordinate by at most lr·C per step; ×2 for Poisson batch fluctuation); the
        clamped count the server learns warns when it was too small.
        """
        if clip_range is None:
            clip_range = 2.0 * cfg.train.lr * cfg.privacy.clip_norm * cfg.train.local_steps
        # -1 = automatic: ServerSession.create picks the O(log n) degree for the round's nodes
        kwargs.setdefault("neighbours", None if cfg.secagg.neighbours < 0 else cfg.secagg.neighbours)
        kwargs.setdefault("max_dropout", cfg.secagg.max_dropout_fraction)
        kwargs.setdefault("straggler_grace", None if cfg.secagg.straggler_grace < 0 else cfg.secagg.straggler_grace)
        return cls(clip_range=clip_range, noise_std=noise_std, noise_mode=cfg.privacy.noise_mode,
                   n_min=cfg.n_min if cfg.privacy.noise_mode == "distributed" else 0, **kwargs)

    # ------------------------------------------------------------------ round
    def run_round(self, grid: Grid, node_ids: list[int], *, message_type: str, content: RecordDict,
                  server_round: int, min_contributors: int, timeout: float | None = None) -> RoundResult:
        """One secure sum over ``node_ids`` (a setup first when the session cannot serve them).
        ``timeout``: seconds each stage waits; None = 600 s plus 0.5 s per node (a simulation
        runs the nodes' handlers one after another)."""
        nodes = sorted(int(n) for n in node_ids)
        if timeout is None:
            timeout = 600.0 + 0.5 * len(nodes)
        if self._session is None or not self._session.usable_for(nodes):
            self._setup(grid, nodes, message_type, min_contributors)
        sess = self._session
        assert sess is not None
        participants = [n for n in nodes if n in sess.nodes and sess.nodes[n] in sess.members]
        not_set_up = sorted(set(nodes) - set(participants))
        quant = self._quantization(content, len(participants))
        dim = self._dim(content)
        self.rejected = {}
        slot, mrec = sess.mask_record(participants, quant, server_round)
        out = RecordDict()
        for key, record in content.items():
            out[key] = record
        out[SECAGG_RECORD] = ConfigRecord(mrec)
        msgs = [Message(content=out, dst_node_id=n, message_type=message_type) for n in participants]
        t_mask = time.monotonic()
        # with a straggler deadline: once all but the tolerated dropouts have sent their input (and
        # at least what the round needs), the others get straggler_grace more seconds
        enough = max(min_contributors, self.n_min if self.noise_mode == "distributed" else 0,
                     len(participants) - math.floor(self.max_dropout * len(participants)))
        replies = list(send_and_receive(grid, msgs, timeout=timeout, enough=enough, grace_s=self.straggler_grace))
        self.stats["mask_stage_s"] = time.monotonic() - t_mask

        masked: dict[int, np.ndarray] = {}
        layout: dict[int, tuple[list[str], list[list[int]]]] = {}
        metrics: dict[int, dict[str, float]] = {}
        refusals: dict[int, str] = {}
        for m in replies:
            node = m.metadata.src_node_id
            if m.has_error():
                log.warning("round %s: node %s failed: %s", server_round, node, m.error.reason)
                continue
            c = m.content
            if "refusal" in c.config_records:
                rec = c.config_records["refusal"]  # a generic code from the institution (client/node.py)
                refusals[node] = str(rec.get("code", rec.get("reason", "refused")))
                continue
            srec = c.config_records.get(SECAGG_RECORD)
            if srec is None or "error" in srec or "arrays" not in c.array_records:
                why = srec.get("error") if srec is not None and "error" in srec else "no masked vector"
                log.warning("round %s: node %s dropped: %s", server_round, node, why)
                if srec is not None and "error" in srec:  # lost or stale protocol state: re-key it
                    sess.members.discard(sess.nodes[node])
                continue
            checked: list[np.ndarray] = []
            why = self._invalid(c, srec, slot, quant, dim, checked)
            if why is not None:
                self.rejected[node] = why
                log.warning("round %s: node %s dropped: invalid masked reply (%s)", server_round, node, why)
                continue
            masked[node] = checked[0]  # deserialized once, by the validation
            layout[node] = (list(srec["names"]), json.loads(str(srec["shapes"])))
            metrics[node] = reply_metrics(m)
        if masked:  # every contribution must have the same layout, else it cannot be summed
            ref = max(set(map(json.dumps, layout.values())), key=lambda s: sum(
                json.dumps(v) == s for v in layout.values()))
            for node in [n for n, lay in layout.items() if json.dumps(lay) != ref]:
                log.warning("round %s: node %s sent a different array layout; dropped", server_round, node)
                masked.pop(node), metrics.pop(node)
        survivors = sorted(masked)
        dropped_now = sorted(set(participants) - set(survivors))
        dropped = sorted(set(dropped_now) | set(not_set_up))
        self._check_enough(server_round, survivors, nodes, min_contributors, refusals, dropped)
        if not survivors:
            raise RoundFailed(f"round {server_round}: no node contributed (dropped {dropped}, refused {refusals})")
        try:
            sess.check_survivors(survivors)
        except SecAggError as err:
            raise RoundFailed(f"round {server_round}: {err}") from err

        # consistency: surviving share holders sign the survivor set they were told; holders
        # reveal shares only for a set a quorum of holders signed (two views cannot both get one).
        # A quorum (plus spares) is asked first, the other holders only when too few sign, or when
        # holders refuse to unmask for want of signatures (a holder's own floor, e.g. its
        # distributed-noise n_min, can raise its quorum above the server's estimate).
        try:
            holders = sess.holders_among(survivors)
        except SecAggError as err:
            raise RoundFailed(f"round {server_round}: secure aggregation could not unmask: {err}") from err
        quorum_sigs = sess.signature_quorum()
        t_cons = time.monotonic()
        signatures: dict[int, bytes] = {}
        asked = holders[:max(quorum_sigs, min(self.n_min, len(holders))) + self.spare_holders]
        self._sign(grid, sess, slot, survivors, asked, signatures, message_type, timeout, server_round)
        if len(signatures) < quorum_sigs and len(asked) < len(holders):
            self._sign(grid, sess, slot, survivors, holders[len(asked):], signatures, message_type, timeout,
                       server_round)
            asked = holders
        self.stats["consistency_stage_s"] = time.monotonic() - t_cons
        sess.signatures[slot] = signatures
        if len(signatures) < quorum_sigs:
            raise RoundFailed(f"round {server_round}: secure aggregation could not unmask: {len(signatures)} "
                              f"share holders signed the survivor set, {quorum_sigs} needed")

        # unmask: share holders open shares of survivors' self seeds and dropouts' slot keys.
        # Ask a quorum first (threshold + spare), the other holders only if too few answer.
        share_replies: dict[int, ConfigRecord] = {}
        failed: set[int] = set()  # holders that failed (not refused) in unmasking: never asked again
        t_unmask = time.monotonic()
        self._open(grid, sess, slot, survivors, dropped_now, [n for n in holders if n in signatures], signatures,
                   share_replies, failed, message_type, timeout, server_round)
        if len(share_replies) < sess.threshold and len(asked) < len(holders):
            self._sign(grid, sess, slot, survivors, holders[len(asked):], signatures, message_type, timeout,
                       server_round)
            self._open(grid, sess, slot, survivors, dropped_now,
                       [n for n in holders if n in signatures and n not in share_replies and n not in failed],
                       signatures, share_replies, failed, message_type, timeout, server_round)
        self.stats["unmask_stage_s"] = time.monotonic() - t_unmask
        try:
            total_int = sess.unmask(slot, masked, dropped_now, share_replies)
        except (SecAggError, ValueError) as err:
            raise RoundFailed(f"round {server_round}: secure aggregation could not unmask: {err}") from err
        flat, clamped = ServerSession.dequantize(total_int, len(survivors), quant)
        self.stats["clamped"] = clamped
        if clamped:
            log.warning("round %s: %d coordinates were clamped to ±%.3g before masking; raise clip_range",
                        server_round, clamped, quant.bound)
        names, shapes = json.loads(ref)
        total, pos = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape)) if shape else 1
            total[name] = flat[pos:pos + size].reshape(shape)
            pos += size
        if pos != flat.size:
            raise RoundFailed(f"round {server_round}: unmasked vector has {flat.size} values, layout {pos}")
        return RoundResult(total=total, contributors=survivors, dropped=dropped, metrics=metrics, refusals=refusals)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _sign(grid: Grid, sess: ServerSession, slot: int, survivors: list[int], holders: list[int],
              signatures: dict[int, bytes], message_type: str, timeout: float, server_round: int) -> None:
        """Consistency round with ``holders``: their signatures of the survivor set go into ``signatures``."""
        if not holders:
            return
        crecs = sess.consistency_records(slot, survivors, holders=holders)
        cmsgs = [Message(RecordDict({SECAGG_RECORD: ConfigRecord(r)}), dst_node_id=n, message_type=message_type)
                 for n, r in crecs.items()]
        for m in send_and_receive(grid, cmsgs, timeout=timeout):
            node = m.metadata.src_node_id
            srec = None if m.has_error() else m.content.config_records.get(SECAGG_RECORD)
            if srec is None or "sig" not in srec or int(srec.get("slot", -1)) != slot:
                why = m.error.reason if m.has_error() else (None if srec is None else srec.get("error"))
                log.warning("round %s: holder %s did not sign the survivor set: %s", server_round, node, why)
                continue
            signatures[node] = bytes(srec["sig"])

    def _open(self, grid: Grid, sess: ServerSession, slot: int, survivors: list[int], dropped: list[int],
              holders: list[int], signatures: dict[int, bytes], share_replies: dict[int, ConfigRecord],
              failed: set[int], message_type: str, timeout: float, server_round: int) -> None:
        """Unmask requests to ``holders`` that signed: ``threshold + spare_holders`` of them first,
        the others only if too few answer; their share replies go into ``share_replies``."""
        quorum = min(len(holders), max(0, sess.threshold - len(share_replies)) + self.spare_holders)
        for batch in (holders[:quorum], holders[quorum:]):
            if not batch or len(share_replies) >= sess.threshold:
                break
            urecs = sess.unmask_records(slot, survivors, dropped, holders=batch, signatures=signatures)
            umsgs = [Message(RecordDict({SECAGG_RECORD: ConfigRecord(r)}), dst_node_id=n,
                             message_type=message_type) for n, r in urecs.items()]
            for m in send_and_receive(grid, umsgs, timeout=timeout):
                node = m.metadata.src_node_id
                if m.has_error():
                    log.warning("round %s: node %s failed in unmasking: %s", server_round, node, m.error.reason)
                    failed.add(node)
                    continue
                srec = m.content.config_records.get(SECAGG_RECORD)
                if srec is None or "error" in srec:
                    log.warning("round %s: node %s refused to unmask: %s", server_round, node,
                                None if srec is None else srec.get("error"))
                    continue
                share_replies[node] = srec

    def _check_enough(self, server_round, survivors, nodes, min_contributors, refusals, dropped) -> None:
        if self.noise_mode == "distributed" and len(survivors) < self.n_min:
            raise RoundFailed(
                f"round {server_round} discarded: distributed noise needs n_min={self.n_min} contributors, "
                f"{len(survivors)} survived (dropped {dropped}, refused {sorted(refusals)}); the sum would "
                "carry less than the accounted noise. Clients' budgets stay charged.")
        if len(survivors) < min_contributors:
            raise RoundFailed(
                f"round {server_round}: {len(survivors)} of {len(nodes)} nodes contributed, {min_contributors} "
                f"needed (dropped {dropped}, refused {refusals})")

    @staticmethod
    def _dim(content: RecordDict) -> tuple[list[str], int] | None:
        """The arrays the round sent and their total size (None when it sent none). A reply that
        names the same arrays (a model delta: MF, the adapter) must have that size; a reply of
        other arrays (causal sums) is checked for the layout all contributors share instead."""
        if "arrays" not in content.array_records:
            return None
        arrays = content.array_records["arrays"]
        return sorted(arrays.keys()), sum(int(np.prod(a.shape)) for a in arrays.values())

    @staticmethod
    def _invalid(c: RecordDict, srec, slot: int, quant, dim: tuple[list[str], int] | None,
                 checked: list[np.ndarray] | None = None) -> str | None:
        """Why a masked reply cannot be summed (None: it can): record layout, slot, dtype and
        modulus, length. A bad reply is one dropout, never a silent wrong sum. A valid reply's
        masked vector is appended to ``checked``."""
        arrays = c.array_records["arrays"]
        if list(arrays.keys()) != ["masked"]:
            return f"array record holds {list(arrays.keys())}, expected ['masked']"
        for key in ("names", "shapes", "slot"):
            if key not in srec:
                return f"secagg record lacks {key!r}"
        try:
            if int(srec["slot"]) != slot:
                return f"masked for slot {srec['slot']}, this round is slot {slot}"
            names, shapes = list(srec["names"]), json.loads(str(srec["shapes"]))
            if (len(names) != len(shapes) or len(set(names)) != len(names)
                    or not all(isinstance(sh, list) and all(isinstance(d, int) and d >= 0 for d in sh) for sh in shapes)):
                return "malformed array layout"
            size = sum(int(np.prod(sh)) if sh else 1 for sh in shapes)
            y = arrays["masked"].numpy()
        except (ValueError, TypeError, KeyError) as err:
            return f"unreadable reply ({type(err).__name__})"
        want = np.dtype("<u4") if quant.bits == 32 else np.dtype("<u8")
        if y.dtype != want:
            return f"dtype {y.dtype}, the modulus 2^{quant.bits} needs {want}"
        if y.ndim != 1 or y.size != size + 1:
            return f"{y.size} values in shape {y.shape}, the layout needs {size} + 1"
        if dim is not None and sorted(names) == dim[0] and size != dim[1]:
            return f"layout of {size} values, the round's arrays have {dim[1]}"
        if checked is not None:
            checked.append(y)
        return None

    def _quantization(self, content: RecordDict, n: int):
        clip, std = self.clip_range, self.noise_std
        cfg = content.config_records.get("config")
        if cfg is not None:
            clip = float(cfg.get("secagg.clip-range", clip))
            std = cfg.get("secagg.noise-std", std)
            std = None if std is None else float(std)
        dim = 0
        if "arrays" in content.array_records:
            dim = sum(int(np.prod(a.shape)) for a in content.array_records["arrays"].values())
        return ServerSession.quantization(clip_range=clip, noise_std=std, n_clients=n, dim=dim)

    def _setup(self, grid: Grid, nodes: list[int], message_type: str, min_contributors: int) -> None:
        t0 = time.monotonic()
        sess = ServerSession.create(nodes, slots=self.rounds_per_setup, degree=self.neighbours,
                                    committee=self.committee, max_dropout=self.max_dropout)
        degree = sess.degree
        self._session = None
        recs = sess.setup_keys_records()
        ok1 = self._stage(grid, recs, message_type, "key advertisement")
        if len(ok1) < max(min_contributors, 2):
            raise RoundFailed(f"secagg setup: {len(ok1)} of {len(nodes)} nodes advertised keys, "
                              f"{max(min_contributors, 2)} needed (missing {sorted(set(nodes) - set(ok1))})")
        try:
            recs2 = sess.keys_received(ok1)
            for node, why in sess.rejected.items():
                log.warning("secagg key advertisement: node %s dropped: %s", node, why)
            ok2 = self._stage(grid, recs2, message_type, "share distribution")
            if len(ok2) < max(min_contributors, 2):
                raise RoundFailed(f"secagg setup: {len(ok2)} of {len(nodes)} nodes distributed shares, "
                                  f"{max(min_contributors, 2)} needed (missing {sorted(set(nodes) - set(ok2))})")
            sess.shares_received(ok2)
        except SecAggError as err:
            raise RoundFailed(f"secagg setup failed: {err}") from err
        self._session = sess
        self.stats["setups"] += 1
        self.stats["setup_s"] = time.monotonic() - t0
        log.info("secagg setup: %d/%d nodes, degree %s, %d slots, %.2f s", len(sess.members), len(nodes),
                 degree or "complete", sess.slots, self.stats["setup_s"])

    def stage_timeout(self, n: int) -> float:
        """Seconds one setup stage waits for ``n`` nodes (see ``setup_timeout``)."""
        return self.setup_timeout if self.setup_timeout is not None else 300.0 + 0.5 * n

    def _stage(self, grid: Grid, recs: dict[int, dict], message_type: str, what: str) -> dict[int, ConfigRecord]:
        msgs = [Message(RecordDict({SECAGG_RECORD: ConfigRecord(r)}), dst_node_id=n, message_type=message_type)
                for n, r in recs.items()]
        ok = {}
        for m in send_and_receive(grid, msgs, timeout=self.stage_timeout(len(msgs))):
            node = m.metadata.src_node_id
            if m.has_error():
                log.warning("secagg %s: node %s failed: %s", what, node, m.error.reason)
                continue
            srec = m.content.config_records.get(SECAGG_RECORD)
            if srec is None or "error" in srec:
                refusal = m.content.config_records.get("refusal")
                why = srec.get("error") if srec is not None else (
                    f"refusal code {refusal.get('code', refusal.get('reason'))}" if refusal is not None else "no reply")
                log.warning("secagg %s: node %s refused: %s", what, node, why)
                continue
            ok[node] = srec
        return ok
