"""SecAgg+ in Flower's simulation engine (Ray): one simulation runs every scenario.

* sums equal the plain sums within the quantization bound, setup paid once;
* 30 % dropouts at each stage (key advertisement, share distribution, masked input, unmasking)
  complete correctly, and the dropped nodes re-key and rejoin;
* too many dropouts fail loudly (RoundFailed);
* distributed noise: the secure sum's noise variance is σ²;
* cross-check with Flower's own SecAgg+ (legacy API) on the same inputs: the benchmark's
  ``--quick`` run puts plain, Flower SecAgg+ and fedrec SecAgg+ in one simulation and reports
  the differences.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_secagg_harness as harness  # noqa: E402

N = 10
DIM = 2000


def _flat(total):
    return np.concatenate([total["w"].ravel(), total["b"].ravel()])


def _expected(nodes, r, dim=DIM):
    return sum(np.concatenate([v.ravel() for v in harness.client_vector(n, r, dim).values()]).astype(np.float64)
               for n in nodes)


def _scenarios(grid, plan_path: Path, out: dict) -> None:
    from fedrec.server.aggregation import RoundFailed
    from fedrec.server.secagg_workflow import SecAggPlusSum

    import time

    t0 = time.monotonic()
    while len(grid.get_node_ids()) < N and time.monotonic() - t0 < 60:
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())

    def run(proto, r, min_contributors=7, dim=DIM, **cfg):
        return proto.run_round(grid, nodes, message_type="train", content=harness.train_content(r, dim, **cfg),
                               server_round=r, min_contributors=min_contributors, timeout=120)

    def record(name, fn):
        harness.write_plan(plan_path, {})
        try:
            out[name] = fn()
        except Exception:  # noqa: BLE001 - reported by the test body
            out[name] = {"error": traceback.format_exc()}

    def clean():
        proto = SecAggPlusSum(clip_range=1.0)
        rows = []
        for r in (1, 2, 3):
            res = run(proto, r)
            rows.append({"contributors": res.contributors,
                         "err": float(np.abs(_flat(res.total) - _expected(res.contributors, r)).max())})
        return {"rows": rows, "setups": proto.stats["setups"], "nodes": nodes}

    record("clean", clean)

    def leak():
        """What the server receives from each client: uniform, unrelated to the client's vector."""
        seen = []

        class Recording:
            def get_node_ids(self):
                return grid.get_node_ids()

            def send_and_receive(self, messages, *, timeout=None):
                replies = list(grid.send_and_receive(messages, timeout=timeout))
                seen.extend(replies)
                return replies

        proto = SecAggPlusSum(clip_range=1.0)
        res = proto.run_round(Recording(), nodes, message_type="train", content=harness.train_content(7, DIM),
                              server_round=7, min_contributors=N)
        stats = []
        for m in seen:
            if m.has_error() or "arrays" not in m.content.array_records:
                continue
            y = m.content.array_records["arrays"]["masked"].numpy()[:-1].astype(np.float64)
            x = np.concatenate([v.ravel() for v in harness.client_vector(m.metadata.src_node_id, 7, DIM).values()])
            counts = np.histogram(y, bins=16, range=(0, 2.0**32))[0]
            stats.append({"corr": float(np.corrcoef(x, y)[0, 1]),
                          "chi2": float(((counts - DIM / 16) ** 2 / (DIM / 16)).sum())})
        return {"stats": stats, "err": float(np.abs(_flat(res.total) - _expected(res.contributors, 7)).max())}

    record("leak", leak)

    for stage in ("setup-keys", "setup-shares", "mask", "unmask"):
        def dropout(stage=stage):
            gone = nodes[:3]
            harness.write_plan(plan_path, {n: {stage: "fail"} for n in gone})
            proto = SecAggPlusSum(clip_range=1.0)
            res = run(proto, 1)
            err1 = float(np.abs(_flat(res.total) - _expected(res.contributors, 1)).max())
            harness.write_plan(plan_path, {})
            res2 = run(proto, 2)
            err2 = float(np.abs(_flat(res2.total) - _expected(res2.contributors, 2)).max())
            return {"gone": gone, "contributors": res.contributors, "dropped": res.dropped, "err": err1,
                    "rejoined": res2.contributors, "err2": err2, "setups": proto.stats["setups"]}

        record(f"drop-{stage}", dropout)

    def too_many():
        harness.write_plan(plan_path, {n: {"mask": "fail"} for n in nodes[:4]})
        try:
            run(SecAggPlusSum(clip_range=1.0), 1)
        except RoundFailed as err:
            return {"failed": str(err)}
        return {"failed": None}

    record("too-many", too_many)

    def distributed():
        sigma, dim = 0.5, 20_000
        per_client = sigma / np.sqrt(N)
        proto = SecAggPlusSum(clip_range=1e-3, noise_std=per_client, noise_mode="distributed", n_min=N)
        res = run(proto, 1, min_contributors=N, dim=dim, zero=True, **{"noise-std": per_client})
        v = _flat(res.total)
        return {"var": float(v.var()), "mean": float(v.mean()), "target": sigma**2, "dim": dim}

    record("distributed", distributed)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    import ray.cloudpickle as cp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    cp.register_pickle_by_value(harness)
    plan = tmp_path_factory.mktemp("secagg") / "plan.json"
    policies = tmp_path_factory.mktemp("policies")
    harness.provision(policies, [f"inst-{i:02d}" for i in range(N)])  # partition-id i -> i-th folder
    os.environ[harness.POLICY_DIR_ENV] = str(policies)
    os.environ[harness.FAIL_PLAN_ENV] = str(plan)
    harness.write_plan(plan, {})
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        _scenarios(grid, plan, out)

    try:
        run_simulation(server_app=server, client_app=harness.make_client_app(DIM), num_supernodes=N,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        os.environ.pop(harness.FAIL_PLAN_ENV, None)
        os.environ.pop(harness.POLICY_DIR_ENV, None)
    return out


def _ok(out, name):
    assert name in out, f"scenario {name} did not run: {sorted(out)}"
    assert "error" not in out[name], out[name].get("error")
    return out[name]


def test_sum_is_exact_within_quantization_and_setup_is_paid_once(simulation):
    res = _ok(simulation, "clean")
    assert res["setups"] == 1
    for row in res["rows"]:
        assert row["contributors"] == res["nodes"]
        assert row["err"] < 1e-5  # 32-bit step for clip 1.0 and 10 clients: ~2^-22 per client


def test_server_sees_only_uniform_masked_vectors(simulation):
    res = _ok(simulation, "leak")
    assert len(res["stats"]) == N and res["err"] < 1e-5
    for st in res["stats"]:
        assert abs(st["corr"]) < 4 / np.sqrt(DIM)  # ~ N(0, 1/d) when unrelated
        assert st["chi2"] < 50  # uniform over Z_2^32 (15 dof, p ~ 1e-5)


@pytest.mark.parametrize("stage", ["setup-keys", "setup-shares", "mask", "unmask"])
def test_thirty_percent_dropouts(simulation, stage):
    res = _ok(simulation, f"drop-{stage}")
    everyone = sorted(simulation["clean"]["nodes"])
    if stage == "unmask":
        assert res["contributors"] == everyone
    else:
        assert res["dropped"] == res["gone"]
        assert res["contributors"] == sorted(set(everyone) - set(res["gone"]))
    # nodes that missed the setup re-key in a new one; round dropouts use next round's keys
    assert res["setups"] == (2 if stage.startswith("setup") else 1)
    assert res["err"] < 1e-5 and res["err2"] < 1e-5
    assert res["rejoined"] == everyone


def test_too_many_dropouts_fail_loudly(simulation):
    res = _ok(simulation, "too-many")
    assert res["failed"] and "6 of 10 nodes contributed, 7 needed" in res["failed"]


def test_distributed_noise_variance_is_sigma_squared(simulation):
    res = _ok(simulation, "distributed")
    assert abs(res["var"] / res["target"] - 1) < 5 * np.sqrt(2 / res["dim"])
    assert abs(res["mean"]) < 5 * np.sqrt(res["target"] / res["dim"])


def test_matches_flower_secaggplus_on_the_same_inputs():
    """The benchmark's quick run: plain, Flower's SecAgg+ and ours in one simulation."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "secagg_overhead.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    meta = result["meta"]
    assert meta["max_abs_diff_fedrec_vs_plain"] < 1e-4
    assert meta["max_abs_diff_flower_vs_plain"] < meta["flower_quantization_bound"]
    assert meta["max_abs_diff_fedrec_vs_flower"] < meta["flower_quantization_bound"] + 1e-4
    for row in result["rows"]:
        assert {"clients", "plain_s", "flower_secagg_s", "fedrec_secagg_s", "fedrec_ratio", "flower_ratio"} <= set(row)
