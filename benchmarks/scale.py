#!/usr/bin/env python
"""Scale: one MF round over SecAgg+ with 10, 100 (and 1,000) simulated institutions.

Prints one JSON object ``{"meta": {...}, "rows": [...]}``; one row per institution count:

``clients, sec_per_round`` (the server's own timing of the one training round: the SecAgg+
masked-input and unmask stages, with every node's local DP-SGD step), ``sec_per_client_round``,
``wall_s`` (the whole simulation: Ray start-up, the nodes' data loading, the catalogue query,
SecAgg+ key setup, the DP item-count release and the round), ``peak_rss_mb`` (the largest sum of resident memory over the benchmark's
process tree: the simulation process and every Ray process it started), ``status`` (``ok``,
``failed: <one line>`` or ``timeout``).

Each size runs in its own process (``fedrec-sim``'s :func:`run_simulation`: the real ServerApp
and ClientApp, health domain, 50 people per institution, ε = 8, local noise, SecAgg+ on,
evaluation off so that the round is the only stage measured) under ``--timeout`` seconds, so a
size that cannot finish is a row, not a traceback. Seeded (``seed`` and ``sim.noise-seed``).

    python benchmarks/scale.py                 # 10, 100 institutions
    python benchmarks/scale.py --sizes 10,100,1000 --timeout 900
    python benchmarks/scale.py --quick         # 10 and 30 (the tests' smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PEOPLE_PER_INSTITUTION = 50


def one(n: int, out: Path) -> None:
    """Child: one simulation of ``n`` institutions; metrics.json lands in ``out``, the SecAgg+
    timings (every setup and every secure sum, in order) in ``out/secagg_timing.json``. A failure
    is one line on stderr (``error: ...``) and exit status 1, never a traceback."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    from fedrec.common.config import RunConfig
    from fedrec.common.secagg._graph import default_degree
    from fedrec.server.secagg_workflow import SecAggPlusSum
    from fedrec.simulations.run import run_simulation

    timing: list[dict] = []
    setup, run_round = SecAggPlusSum._setup, SecAggPlusSum.run_round

    def timed_setup(self, grid, nodes, *a, **k):
        t0 = time.monotonic()
        try:
            return setup(self, grid, nodes, *a, **k)
        finally:
            timing.append({"what": "setup", "nodes": len(nodes), "seconds": round(time.monotonic() - t0, 3)})
            _dump(out, timing)

    def timed_round(self, grid, node_ids, **k):
        t0, before = time.monotonic(), self.stats["setups"]
        try:
            return run_round(self, grid, node_ids, **k)
        finally:
            row = {"what": "sum", "message_type": k.get("message_type"), "round": k.get("server_round"),
                   "nodes": len(node_ids), "seconds": round(time.monotonic() - t0, 3),
                   "with_setup": self.stats["setups"] > before}
            row.update({key: round(float(self.stats[key]), 3) for key in
                        ("mask_stage_s", "consistency_stage_s", "unmask_stage_s")})
            timing.append(row)
            _dump(out, timing)

    SecAggPlusSum._setup, SecAggPlusSum.run_round = timed_setup, timed_round
    logging.getLogger("flwr").setLevel(logging.CRITICAL)  # a failed run is our one line, not Flower's traceback
    # the server's per-node warnings (a node dropped or refused, and why): the row counts them
    out.mkdir(parents=True, exist_ok=True)
    server_log = logging.FileHandler(out / "server_warnings.log")
    server_log.setLevel(logging.WARNING)
    logging.getLogger("fedrec").addHandler(server_log)
    cfg = RunConfig().override(**{"dataset": "health", "institutions": n, "people": PEOPLE_PER_INSTITUTION * n,
                                  "rounds": 1, "seed": 0, "sim.noise-seed": 0, "privacy.epsilon": 8.0,
                                  "eval.metrics-release": "off", "secagg.neighbours": default_degree(n)})
    try:
        run_simulation(cfg, out, quiet=True)
    except Exception as err:  # noqa: BLE001 - the benchmark's row says why, in one line
        text = " ".join(str(err).split())
        (out / "error.txt").write_text(f"{type(err).__name__}: {text}\n")  # whole: the row summarises it
        print(f"error: {type(err).__name__}: {text[:300]}", file=sys.stderr, flush=True)
        sys.exit(1)


def node_cost(n: int, slots: int = 16, sample: int = 10) -> dict:
    """In-process CPU seconds (``time.process_time``, insensitive to other processes' load) of one
    node's SecAgg+ setup among ``n``: stage 1 (keys, signed advertisement) and stage 2 (roll, the
    k + committee signature checks, pair seeds, shares) for ``sample`` non-holders and 3 holders,
    with the automatic degree; the real protocol classes, no Flower."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedrec.common.secagg import SecAggClient, ServerSession, _graph
    from fedrec.common.secagg._identity import CURVE, Identity, Roster

    keys = {f"institution_{i:04d}": ec.generate_private_key(CURVE()) for i in range(n)}
    roster = Roster({name: k.public_key() for name, k in keys.items()})
    nodes = list(range(1, n + 1))
    sess = ServerSession.create(nodes, slots=slots, degree=None)
    clients = {nd: SecAggClient(identity=Identity(name=name, key=k, roster=roster))
               for nd, (name, k) in zip(nodes, keys.items())}
    t0 = time.process_time()
    adverts = {nd: clients[nd].setup_keys(r) for nd, r in sess.setup_keys_records().items()}
    stage1 = (time.process_time() - t0) / n
    recs = sess.keys_received(adverts)
    holders = [sess.node_of[i] for i in sess.committee][:3]
    others = [nd for nd in nodes if sess.nodes[nd] not in sess.committee][:sample]

    def cost(group):
        t = time.process_time()
        for nd in group:
            clients[nd].setup_shares(recs[nd])
        return (time.process_time() - t) / max(1, len(group))

    return {"institutions": n, "degree": _graph.default_degree(n), "committee": len(sess.committee), "slots": slots,
            "stage1_cpu_ms_per_node": round(1e3 * stage1, 1),
            "stage2_cpu_ms_per_non_holder": round(1e3 * cost(others), 1) if others else None,
            "stage2_cpu_ms_per_holder": round(1e3 * cost(holders), 1),
            "adverts_sent_to_a_non_holder": len(recs[others[0]]["adverts"]) if others else None}


def handler_cost(n: int, calls: int = 2) -> dict:
    """In-process wall ms of the real MF ``train`` handler (client/app.py: guard, SQLite ledger
    charge and release, Opacus DP-SGD; no Flower, no SecAgg+ masking) for ``n`` simulated health
    institutions, two ways in one process on the same data, alternating, ``calls`` passes each:

    * ``cached`` — as a simulation now runs it: the institution's data and DP plan cached per
      process (client/app.py ``_load``, client/train.py ``plan_dp``);
    * ``uncached`` — both caches emptied before every message: what each message cost when the
      institution cache held 64 entries and a round cycled through more institutions than that
      (every message reloaded the folder and recalibrated σ).

    Also the share of the cached handler's time spent in SQLite (the ledger's transactions)."""
    import cProfile
    import pstats
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrec.client import app as client_app
    from fedrec.client import train as client_train
    from fedrec.common.config import RunConfig
    from fedrec.server.aggregation import numpy_to_arrays
    from fedrec.simulations.provision import provision_institutions
    from fedrec.simulations.run import prepare_data

    import torch

    torch.set_num_threads(1)  # as in a simulation's actor (Ray gives each one CPU)
    for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity outside a run
        setattr(TaskIdentity, attr, 1)
    with tempfile.TemporaryDirectory(prefix="fedrec-handler-") as work_dir:
        work = Path(work_dir)
        cfg = RunConfig().override(**{"dataset": "health", "institutions": n, "people": PEOPLE_PER_INSTITUTION * n,
                                      "rounds": 2 * calls + 1, "seed": 0, "sim.noise-seed": 0,
                                      "privacy.epsilon": 8.0, "eval.metrics-release": "off"})
        root = prepare_data(cfg, work)
        names = [f"institution_{k:02d}" for k in range(n)]
        policies = provision_institutions(names, work / "out", epsilon=8.0, delta=cfg.privacy.delta)
        flat = cfg.override(**{"data-dir": str(root.resolve()), "sim.policy-dir": str(policies)}).to_flat()

        def ctx(k: int) -> Context:
            return Context(run_id=1, node_id=k + 1, node_config={"partition-id": k, "num-partitions": n},
                           state=RecordDict(), run_config=dict(flat))

        for k in range(n):  # the run's item-count release (and its plan check) first, as in a run
            client_app.counts(Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=k + 1,
                                      message_type="query.counts"), ctx(k))
        n_items = client_app._institution(ctx(0))[1].data.n_items
        dim = cfg.train.mf_dim

        def train(k: int, rnd: int) -> None:
            msg = Message(RecordDict({
                "arrays": numpy_to_arrays({"item_bias": np.zeros(n_items, np.float32),
                                           "item_factors": np.zeros((n_items, dim), np.float32)}),
                "precond": numpy_to_arrays({"precond": np.full(n_items, 0.1, np.float32)}),
                "config": ConfigRecord({"server-round": rnd})}), dst_node_id=k + 1, message_type="train")
            reply = client_app.train(msg, ctx(k))
            if "refusal" in reply.content.config_records:
                raise RuntimeError(f"institution {k} refused: {reply.content.config_records['refusal']['code']}")

        ms: dict[str, list[float]] = {"cached": [], "uncached": []}
        prof = cProfile.Profile()
        rnd = 0
        for _ in range(calls):
            for mode in ("uncached", "cached"):
                rnd += 1
                if mode == "cached":  # the uncached pass emptied the caches: fill them (untimed)
                    for k in range(n):
                        client_app._institution(ctx(k))
                for k in range(n):
                    if mode == "uncached":
                        client_app._load.cache_clear()
                        client_train._calibrated_schedule.cache_clear()
                    t0 = time.perf_counter()
                    if mode == "cached":
                        prof.enable()
                    train(k, rnd)
                    if mode == "cached":
                        prof.disable()
                    ms[mode].append(1e3 * (time.perf_counter() - t0))
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in stats.values())  # every function's own time
        sqlite = sum(v[2] for (f, _, name), v in stats.items() if "sqlite3" in name)

    def med(xs: list[float]) -> float:
        return round(sorted(xs)[len(xs) // 2], 1)

    return {"institutions": n, "messages_each": len(ms["cached"]),
            "cached_ms_median": med(ms["cached"]), "uncached_ms_median": med(ms["uncached"]),
            "speedup_median": round(med(ms["uncached"]) / med(ms["cached"]), 2),
            "cached_sqlite_share": round(sqlite / total, 3) if total else None}


def _dump(out: Path, timing: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg_timing.json").write_text(json.dumps(timing))


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(n: int, timeout: float) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore", "FEDREC_NO_PROGRESS": "1"}
    with tempfile.TemporaryDirectory(prefix="fedrec-scale-") as work:
        out = Path(work) / "run"
        t0, load0 = time.monotonic(), _load()
        proc = subprocess.Popen([sys.executable, __file__, "--one", str(n), "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        peak = [0]
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                stop.wait(0.5)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        status = "ok"
        try:
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
                status = f"failed: {lines[-1][:200] if lines else f'exit {proc.returncode}'}"
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)  # the child and the Ray processes it started
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            status = "timeout"
        finally:
            stop.set()
            th.join()
        wall = time.monotonic() - t0
        row = {"clients": n, "sec_per_round": None, "sec_per_client_round": None,
               "wall_s": round(wall, 1), "peak_rss_mb": round(peak[0] / 2**20, 1), "status": status,
               "load_avg_before": load0, "load_avg_after": _load()}
        timing_file = out / "secagg_timing.json"
        if timing_file.exists():
            timing = json.loads(timing_file.read_text())
            setups = [t["seconds"] for t in timing if t["what"] == "setup"]
            train = [t for t in timing if t["what"] == "sum" and t["message_type"] == "train"]
            row["setup_s"] = setups[0] if setups else None
            if train:
                t = train[0]
                after = t["seconds"] - (setups[-1] if t["with_setup"] and setups else 0.0)
                row["mf_round_after_setup_s"] = round(after, 2)
                row["mf_round_after_setup_per_client_s"] = round(after / n, 4)
                row["mf_round_stages_s"] = {k: t[k] for k in ("mask_stage_s", "consistency_stage_s",
                                                              "unmask_stage_s")}
            row["secure_sums"] = timing
        row.update(_why_nodes_dropped(out))
        metrics = out / "metrics.json"
        if metrics.exists():
            hist = json.loads(metrics.read_text())
            if hist.get("rounds"):
                r = hist["rounds"][0]
                row["sec_per_round"] = round(float(r["seconds"]), 2)
                row["sec_per_client_round"] = round(float(r["seconds"]) / n, 4)
                row["contributors"] = r.get("contributors")
        return row


def _why_nodes_dropped(out: Path) -> dict:
    """``{"node_warnings": {reason: count}, "refusal_codes": {code: count}}`` from the server's
    warnings and a failed run's error text (empty when every node contributed)."""
    import re
    from collections import Counter

    found: dict = {}
    log_file = out / "server_warnings.log"
    if log_file.exists():
        def reason(line: str) -> str:  # one node's reason, without its ids, at most 160 characters
            line = re.sub(r"\[[\d, ]*\]", "[...]", re.sub(r"node \d+", "node N", re.sub(r"round \d+: ", "", line)))
            return line[:160] + ("..." if len(line) > 160 else "")

        reasons = Counter(reason(line.strip()) for line in log_file.read_text().splitlines() if line.strip())
        if reasons:
            found["node_warnings"] = dict(reasons.most_common(8))
    err_file = out / "error.txt"
    if err_file.exists():
        m = re.search(r"refused (\{.*?\})", err_file.read_text())
        if m:
            found["refusal_codes"] = dict(Counter(re.findall(r"'([a-z-]+)'", m.group(1))))
    return found


def _institution_counts(text: str, flag: str) -> list[int] | None:
    """Comma-separated institution counts (each >= 3); None after printing a one-line error."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        print(f"error: {flag} {text!r}: give whole numbers, e.g. 10,100,1000", file=sys.stderr)
        return None
    if not counts or min(counts) < 3:
        print(f"error: {flag}: each count must be >= 3 institutions", file=sys.stderr)
        return None
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100", help="institution counts, comma-separated (default 10,100)")
    ap.add_argument("--quick", action="store_true", help="10 and 30 institutions (smoke run)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per size before it is a timeout row")
    ap.add_argument("--node-cost", default=None,
                    help="instead: CPU ms of one node's SecAgg+ setup among each of these counts (e.g. 100,1000)")
    ap.add_argument("--handler-cost", default=None,
                    help="instead: in-process ms of one MF train handler call, cached vs uncached, for each "
                         "of these institution counts (e.g. 20)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one is not None:
        one(a.one, a.out)
        return 0
    for flag, text, measure, clock in (
            ("--node-cost", a.node_cost, node_cost, "time.process_time (this process's CPU)"),
            ("--handler-cost", a.handler_cost, handler_cost, "time.perf_counter (wall: includes fsync waits)")):
        if not text:
            continue
        counts = _institution_counts(text, flag)
        if counts is None:
            return 2
        meta = {"benchmark": f"scale {flag}", "commit": _commit(), "seed": 0, "clock": clock,
                "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]), "load_avg_before": _load()}
        rows = [measure(n) for n in counts]
        print(json.dumps({"meta": meta, "rows": rows, "load_avg_after": _load()}, indent=1))
        return 0
    sizes = [10, 30] if a.quick else _institution_counts(a.sizes, "--sizes")
    if sizes is None:
        return 2
    rows = []
    for n in sizes:
        print(f"scale: {n} institutions ...", file=sys.stderr, flush=True)
        rows.append(measure(n, a.timeout))
        print(f"scale: {rows[-1]}", file=sys.stderr, flush=True)
    import platform

    meta = {"benchmark": "scale", "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
            "commit": _commit(), "seed": 0, "people_per_institution": PEOPLE_PER_INSTITUTION, "epsilon": 8.0,
            "noise_mode": "local", "secagg": True, "secagg_neighbours": "automatic: default_degree(n) = smallest "
            "even k >= 2 log2 n, complete graph up to 20", "rounds": 1, "cpus": os.cpu_count(),
            "flower_noop_reference": "Flower alone, a no-op app, 1,000 clients x 2 rounds: 35 s, about 17 ms "
                                     "per client-round (measured for the issue on this machine)",
            "python": platform.python_version(), "timeout_s": a.timeout,
            "measures": "sec_per_round = the server's timing of the one training round (SecAgg+ masked input + "
                        "unmask, local DP-SGD included; it includes the SecAgg+ setup when the round ran it); "
                        "setup_s = the SecAgg+ key setup (two stages); mf_round_after_setup_s = the MF round "
                        "without its setup; wall_s = the whole simulation; peak_rss_mb = whole process tree; "
                        "load_avg = os.getloadavg() before and after each size (the machine is shared)"}
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "common", "client", "server",
                                "simulations", "benchmarks"], capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
