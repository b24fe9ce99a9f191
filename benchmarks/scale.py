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
    """Child: one simulation of ``n`` institutions; metrics.json lands in ``out``."""
    import warnings

    warnings.filterwarnings("ignore")
    from fedrec.common.config import RunConfig
    from fedrec.simulations.run import run_simulation

    cfg = RunConfig().override(**{"dataset": "health", "institutions": n, "people": PEOPLE_PER_INSTITUTION * n,
                                  "rounds": 1, "seed": 0, "sim.noise-seed": 0, "privacy.epsilon": 8.0,
                                  "eval.metrics-release": "off"})
    run_simulation(cfg, out, quiet=True)


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
        t0 = time.monotonic()
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
               "wall_s": round(wall, 1), "peak_rss_mb": round(peak[0] / 2**20, 1), "status": status}
        metrics = out / "metrics.json"
        if metrics.exists():
            hist = json.loads(metrics.read_text())
            if hist.get("rounds"):
                r = hist["rounds"][0]
                row["sec_per_round"] = round(float(r["seconds"]), 2)
                row["sec_per_client_round"] = round(float(r["seconds"]) / n, 4)
                row["contributors"] = r.get("contributors")
        return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100", help="institution counts, comma-separated (default 10,100)")
    ap.add_argument("--quick", action="store_true", help="10 and 30 institutions (smoke run)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per size before it is a timeout row")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one is not None:
        one(a.one, a.out)
        return 0
    try:
        sizes = [10, 30] if a.quick else [int(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        print(f"error: --sizes {a.sizes!r}: give whole numbers, e.g. 10,100,1000", file=sys.stderr)
        return 2
    if not sizes or min(sizes) < 3:
        print("error: --sizes: each size must be >= 3 institutions", file=sys.stderr)
        return 2
    rows = []
    for n in sizes:
        print(f"scale: {n} institutions ...", file=sys.stderr, flush=True)
        rows.append(measure(n, a.timeout))
        print(f"scale: {rows[-1]}", file=sys.stderr, flush=True)
    import platform

    meta = {"benchmark": "scale", "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
            "commit": _commit(), "seed": 0, "people_per_institution": PEOPLE_PER_INSTITUTION, "epsilon": 8.0,
            "noise_mode": "local", "secagg": True, "rounds": 1, "cpus": os.cpu_count(),
            "python": platform.python_version(), "timeout_s": a.timeout,
            "measures": "sec_per_round = the server's timing of the one training round (SecAgg+ masked input + "
                        "unmask, local DP-SGD included); wall_s = the whole simulation; peak_rss_mb = whole process tree"}
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
