#!/usr/bin/env python
"""Round time of plain FedAvg vs Flower's SecAgg+ vs fedrec's SecAgg+, in one simulation.

Prints one JSON object ``{"meta": {...}, "rows": [...]}``; rows: clients, plain_s,
flower_secagg_s, fedrec_secagg_s, fedrec_ratio (steady state), fedrec_ratio_amortized (the
setup round's extra time spread over a block of ``--block`` rounds, fedrec's default 16),
fedrec_ratio_amortized_median_setup (the median of ``--setups`` measured key setups — the first,
then fresh sessions in which every node re-keys, as every block of a long run does — spread over
the block), fedrec_setups_s (each setup's two stages), flower_ratio (ratios to plain, same run).

fedrec runs with every lying-coordinator defence on (issue 28): signed key advertisements
verified against a roster (ECDSA P-256 identities provisioned per simulated institution, as
``simulations/provision.py`` does), policy floors, the consistency round and reply validation.

One Flower simulation (Ray, ``client_resources num_cpus=1``) with ``max(clients)``
SuperNodes; for each client count the three protocols take turns round by round (so load
from other processes hits all three alike), each on the same deterministic per-node vectors
of ``--dim`` float32 parameters. The first round of each protocol is excluded (fedrec pays its
key setup there; Flower re-runs its four stages every round). Times are medians of the
steady-state rounds. The plain sums are also the reference of a cross-check: ``meta`` reports
the largest deviation of each secure sum from the plain sum.

* plain: :class:`fedrec.server.aggregation.PlainSum` (one stage);
* Flower SecAgg+: legacy API — ``SecAggPlusWorkflow`` + ``secaggplus_mod`` with a
  NumPyClient, FedAvg weights 1 (``max_weight=1``), the same neighbour count as ours;
* fedrec SecAgg+: :class:`fedrec.server.secagg_workflow.SecAggPlusSum` +
  ``fedrec.client.secagg_mod.secaggplus_mod``.

``--quick``: 5 clients, 1 000 parameters, 3 rounds (a smoke run for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def bench_vector(node_id: int, r: int, dim: int) -> np.ndarray:
    return np.random.default_rng([node_id % (2**32), r]).uniform(-1, 1, dim).astype(np.float32)


POLICY_ENV = "FEDREC_BENCH_POLICY_DIR"


def policy_mod(msg, context, call_next):
    """run_simulation takes no run config: point each simulated node at its provisioned policy."""
    root = os.environ.get(POLICY_ENV)
    if root and "sim.policy-dir" not in context.run_config:
        from flwr.app import Context

        # Flower forbids editing run_config: hand the next layer a context that carries it (same state)
        context = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                          state=context.state, run_config={**dict(context.run_config), "sim.policy-dir": root})
    return call_next(msg, context)


def provision(root, n: int) -> None:
    from pathlib import Path

    from fedrec.common.privacy.policy import InstitutionPolicy, write_policy
    from fedrec.common.secagg._identity import write_identity, write_roster

    root = Path(root)
    names = [f"institution_{i:03d}" for i in range(n)]
    keys = {nm: root / nm / "identity.pem" for nm in names}
    roster = write_roster(root / "roster.toml", {nm: write_identity(keys[nm]) for nm in names})
    for nm in names:
        write_policy(root / nm / "privacy.toml", InstitutionPolicy(
            ledger=root / nm / "ledger.db", min_round_size=2, identity_key=keys[nm], roster=roster,
            source=root / nm / "privacy.toml"))


def make_client_app(dim: int):
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod as flower_secaggplus_mod
    from flwr.clientapp import ClientApp

    from fedrec.client.secagg_mod import secaggplus_mod

    def handler(msg: Message, context: Context) -> Message:
        r = int(msg.content["config"]["server-round"])
        v = bench_vector(context.node_id, r, dim)
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(v)}), "metrics": MetricRecord({"n": 1})}),
                       reply_to=msg)

    ours = ClientApp(mods=[policy_mod, secaggplus_mod])
    ours.train()(handler)
    plain = ClientApp()
    plain.train()(handler)

    class BenchClient(NumPyClient):
        def __init__(self, node_id: int):
            self.node_id = node_id

        def fit(self, parameters, config):
            return [bench_vector(self.node_id, int(config["server-round"]), dim)], 1, {}

    legacy = ClientApp(client_fn=lambda context: BenchClient(context.node_id).to_client(),
                       mods=[flower_secaggplus_mod])

    class Dual(ClientApp):
        def __call__(self, message, context):
            c = message.content
            if "fedrec.secagg" in c.config_records:
                return ours(message, context)
            if "bench" in c.config_records:
                return plain(message, context)
            return legacy(message, context)

    return Dual()


def run(clients: list[int], dim: int, rounds: int, block: int = 16, with_flower: bool = True,
        setups: int = 1) -> dict:
    import logging

    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedrec.common.secagg._graph import default_degree
    from fedrec.server.aggregation import PlainSum
    from fedrec.server.secagg_workflow import SecAggPlusSum

    logging.getLogger("flwr").setLevel(logging.WARNING)
    total_nodes = max(clients)
    out: dict = {"rows": [], "diffs": {"fedrec": 0.0, "flower": 0.0, "fedrec_vs_flower": 0.0}, "bound": 0.0,
                 "neighbours": {}, "error": None}
    flower_clip, flower_qrange = 8.0, 1 << 22

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            self.t0 = time.perf_counter()
            res = super().configure_fit(server_round, parameters, client_manager)
            self.sampled = sorted(int(c.cid) for c, _ in res)
            return res

        def aggregate_fit(self, server_round, results, failures):
            res = super().aggregate_fit(server_round, results, failures)
            self.t1 = time.perf_counter()
            self.params = res[0]
            return res

    server = ServerApp()

    @server.main()
    def main(grid, context):
        try:
            t0 = time.monotonic()
            while len(grid.get_node_ids()) < total_nodes and time.monotonic() - t0 < 120:
                time.sleep(0.2)
            all_nodes = sorted(grid.get_node_ids())
            glob = ArrayRecord({"w": Array(np.zeros(dim, np.float32))})
            r_global = 0
            for n in clients:
                nodes = all_nodes[:n]
                k = default_degree(n)
                k_eff = (n - 1) if k == 0 else k
                out["neighbours"][str(n)] = k_eff
                plain, ours = PlainSum(), SecAggPlusSum(clip_range=1.0, neighbours=k,
                                                     rounds_per_setup=max(block, rounds + 1))  # a real block's setup
                times = {"plain": [], "flower": [], "fedrec": []}
                stages = {"mask": [], "consistency": [], "unmask": []}
                for _ in range(rounds):
                    r_global += 1
                    r = r_global
                    content = RecordDict({"arrays": glob, "config": ConfigRecord({"server-round": r}),
                                          "bench": ConfigRecord({})})
                    t = time.perf_counter()
                    res_p = plain.run_round(grid, nodes, message_type="train", content=content, server_round=r,
                                            min_contributors=n)
                    times["plain"].append(time.perf_counter() - t)
                    ref = res_p.total["w"]
                    if with_flower:  # Flower SecAgg+ (legacy API), one round per workflow call
                        strategy = TimedFedAvg(
                            fraction_fit=n / total_nodes, min_fit_clients=n, min_available_clients=total_nodes,
                            fraction_evaluate=0.0, min_evaluate_clients=0,
                            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
                            on_fit_config_fn=lambda _r, r=r: {"server-round": r},
                        )
                        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
                        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
                            num_shares=k_eff + 1, reconstruction_threshold=k_eff // 2 + 2, max_weight=1.0,
                            clipping_range=flower_clip, quantization_range=flower_qrange))(grid, legacy)
                        times["flower"].append(strategy.t1 - strategy.t0)
                        flower_sum = parameters_to_ndarrays(strategy.params)[0].astype(np.float64) * n
                        flower_ref = sum(bench_vector(s, r, dim).astype(np.float64) for s in strategy.sampled)
                    t = time.perf_counter()
                    res_o = ours.run_round(grid, nodes, message_type="train", content=content, server_round=r,
                                           min_contributors=n)
                    times["fedrec"].append(time.perf_counter() - t)
                    stages["mask"].append(ours.stats["mask_stage_s"])
                    stages["unmask"].append(ours.stats["unmask_stage_s"])
                    stages["consistency"].append(ours.stats["consistency_stage_s"])
                    d = out["diffs"]
                    d["fedrec"] = max(d["fedrec"], float(np.abs(res_o.total["w"] - ref).max()))
                    if with_flower:
                        d["flower"] = max(d["flower"], float(np.abs(flower_sum - flower_ref).max()))
                    if with_flower and strategy.sampled == nodes:
                        d["fedrec_vs_flower"] = max(d["fedrec_vs_flower"],
                                                    float(np.abs(flower_sum - res_o.total["w"]).max()))
                    out["bound"] = max(out["bound"], n * 2 * flower_clip / flower_qrange + 1e-6 * n)
                    print(f"n={n} round {r}: " + ", ".join(f"{m} {v[-1]:.3f}s" for m, v in times.items() if v)
                          + f" (fedrec stages {stages['mask'][-1]:.3f}s + {stages['consistency'][-1]:.3f}s"
                          + f" + {stages['unmask'][-1]:.3f}s)",
                          file=sys.stderr, flush=True)
                # more key setups (fresh sessions: every node re-keys), for a median setup time
                setup_times = [ours.stats["setup_s"]]
                for _ in range(setups - 1):
                    r_global += 1
                    content = RecordDict({"arrays": glob, "config": ConfigRecord({"server-round": r_global}),
                                          "bench": ConfigRecord({})})
                    ours._session = None  # the next round pays a new setup
                    res_s = ours.run_round(grid, nodes, message_type="train", content=content,
                                           server_round=r_global, min_contributors=n)
                    setup_times.append(ours.stats["setup_s"])
                    ref_s = sum(bench_vector(s, r_global, dim).astype(np.float64) for s in nodes)
                    out["diffs"]["fedrec"] = max(out["diffs"]["fedrec"], float(np.abs(res_s.total["w"] - ref_s).max()))
                    print(f"n={n} extra setup: {setup_times[-1]:.3f}s", file=sys.stderr, flush=True)
                med = {m: (statistics.median(v[1:]) if v else None) for m, v in times.items()}
                setup_med = statistics.median(setup_times)
                # amortized: the first round pays the setup once per block of `block` rounds
                amortized = med["fedrec"] + max(0.0, times["fedrec"][0] - med["fedrec"]) / block
                out["rows"].append({
                    "clients": n, "plain_s": round(med["plain"], 4), "flower_secagg_s": round(med["flower"], 4) if with_flower else None,
                    "fedrec_secagg_s": round(med["fedrec"], 4),
                    "fedrec_ratio": round(med["fedrec"] / med["plain"], 3),
                    "fedrec_ratio_amortized": round(amortized / med["plain"], 3),
                    "fedrec_first_round_s": round(times["fedrec"][0], 4),
                    "flower_ratio": round(med["flower"] / med["plain"], 3) if with_flower else None,
                    "neighbours": k_eff, "fedrec_setup_s": round(setup_times[0], 4),
                    "fedrec_setups_s": [round(x, 4) for x in setup_times],
                    "fedrec_ratio_amortized_median_setup": round((med["fedrec"] + setup_med / block) / med["plain"], 3),
                    "fedrec_mask_stage_s": round(statistics.median(stages["mask"][1:]), 4),
                    "fedrec_consistency_stage_s": round(statistics.median(stages["consistency"][1:]), 4),
                    "fedrec_unmask_stage_s": round(statistics.median(stages["unmask"][1:]), 4),
                })
        except Exception:  # noqa: BLE001 - reported in the JSON and the exit code
            import traceback

            out["error"] = traceback.format_exc()

    import tempfile

    with tempfile.TemporaryDirectory(prefix="fedrec-bench-policies-") as root:
        provision(root, total_nodes)
        os.environ[POLICY_ENV] = root
        try:
            run_simulation(server_app=server, client_app=make_client_app(dim), num_supernodes=total_nodes,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        finally:
            os.environ.pop(POLICY_ENV, None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 clients, 1k params, 3 rounds")
    ap.add_argument("--clients", type=int, nargs="*", default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="rounds per protocol (first excluded)")
    ap.add_argument("--block", type=int, default=16, help="rounds per fedrec key setup, for the amortized ratio")
    ap.add_argument("--setups", type=int, default=None,
                    help="fedrec key setups measured per client count (the first, then fresh sessions in which "
                         "every node re-keys); default 3, 1 with --quick")
    ap.add_argument("--no-flower", action="store_true",
                    help="plain vs fedrec only (Flower's SecAgg+ peer is too slow at 1,000 clients)")
    args = ap.parse_args(argv)
    clients = args.clients or ([5] if args.quick else [10, 50, 100])
    dim = args.dim or (1000 if args.quick else 100_000)
    rounds = args.rounds or (3 if args.quick else 4)
    # keep stdout for the JSON alone: Flower and Ray log to fd 1
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    t0, load0 = time.time(), [round(x, 2) for x in os.getloadavg()]
    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, val)
    setups = args.setups if args.setups is not None else (1 if args.quick else 3)
    if setups < 1:
        ap.error(f"--setups {setups}: must be >= 1")
    out = run(clients, dim, rounds, args.block, with_flower=not args.no_flower, setups=setups)
    import flwr

    result = {
        "meta": {
            "benchmark": "secagg_overhead", "dim": dim, "rounds": rounds, "steady_rounds": rounds - 1,
            "statistic": "median of steady-state rounds", "block": args.block,
            "defences": "signed adverts (Ed25519 run keys certified by ECDSA P-256 identities in a roster, each "
                        "certificate verified once per peer and run; each node verifies its neighbours' and the "
                        "committee's adverts, shares bound to the roll hash), policy floors, consistency round "
                        "with a quorum of holder signatures, reply validation",
            "command": " ".join(["benchmarks/secagg_overhead.py", *(argv if argv is not None else sys.argv[1:])]), "cpus": os.cpu_count(), "flwr": flwr.__version__,
            "backend": "flwr simulation (ray), client_resources num_cpus=1",
            "neighbours": out["neighbours"],
            "max_abs_diff_fedrec_vs_plain": out["diffs"]["fedrec"],
            "max_abs_diff_flower_vs_plain": out["diffs"]["flower"],
            "max_abs_diff_fedrec_vs_flower": out["diffs"]["fedrec_vs_flower"],
            "flower_quantization_bound": out["bound"],
            "wall_s": round(time.time() - t0, 1),
            "error": out["error"],
            "commit": _commit(),
            "seeds": "inputs: numpy default_rng([node_id, round]) per node and round (deterministic); "
                     "protocol randomness: secrets/os.urandom",
            "load_avg_before": load0, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "setups": setups,
            "amortized_median_setup_definition": "(steady median + median of the measured setups' setup_s / block) "
                                                 "/ plain median (setup_s: the two setup stages, timed by the workflow)",
            "amortized_definition": "(steady median + (first round - steady median) / block) / plain median; "
                                    "fedrec's session holds max(block, rounds + 1) slots, so the first round "
                                    "pays a full block's setup",
        },
        "rows": out["rows"],
    }
    json_out.write(json.dumps(result) + "\n")
    json_out.flush()
    return 1 if out["error"] or not out["rows"] else 0


def _commit() -> str:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "common/secagg", "client",
                                "server", "benchmarks"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
