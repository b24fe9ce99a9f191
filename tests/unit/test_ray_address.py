"""``--ray-address`` (issue 33): a simulation attaches to an existing Ray cluster through
Flower's Ray backend ``init_args``; a bad address is one line naming the flag, fast, before
anything is written.

The attach-to-a-real-cluster check (``ray start --head`` started by the test, then
``fedrec-sim run --ray-address``) takes 1-2 minutes on 2 loaded cores (the head's start-up plus
a Flower run whose actors import torch in the cluster's workers), so it runs only with
``FEDREC_TEST_RAY_CLUSTER=1``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrec.common.errors import FedrecInputError
from fedrec.simulations import ray_cluster
from fedrec.simulations.cli import app as sim_cli

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_inherited_address(monkeypatch):
    monkeypatch.setenv(ray_cluster.RAY_ADDRESS_ENV, "local")  # recorded, so whatever a test sets is undone
    monkeypatch.delenv(ray_cluster.RAY_ADDRESS_ENV)


@pytest.fixture
def fake_head(monkeypatch):
    """A port that accepts connections and a GCS probe that says a head answers there."""
    monkeypatch.setattr(ray_cluster, "_probe_gcs", lambda address, timeout: None)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    yield f"127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


def test_an_unreachable_address_is_one_line_fast_and_writes_nothing(tmp_path):
    addr = f"127.0.0.1:{_free_port()}"  # nothing listens there
    out = tmp_path / "run"
    t0 = time.monotonic()
    res = subprocess.run([str(Path(sys.executable).with_name("fedrec-sim")), "run", "--domain", "health", "-k", "2",
                          "-r", "1", "--ray-address", addr, "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env=ENV)
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--ray-address {addr}" in lines[0] and "ray start --head" in lines[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert not out.exists()
    assert took < 60, took  # Ray's own connect would retry for a minute, then Flower waits for nodes


@pytest.mark.parametrize("command", [
    ["sweep", "--domains", "health", "--epsilon", "1", "--seeds", "1", "--institutions", "2", "--rounds", "1"],
    ["causal", "--data", "DATA", "--epsilon", "1"],
    ["demo"],
])
def test_every_simulation_command_checks_the_address_before_it_writes(tmp_path, command):
    addr = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "out"
    args = [str(tmp_path) if a == "DATA" else a for a in command]
    res = CliRunner().invoke(sim_cli, [*args, "--ray-address", addr, "--out", str(out)])
    assert isinstance(res.exception, FedrecInputError), res.output
    assert f"--ray-address {addr}" in str(res.exception) and "\n" not in str(res.exception)
    assert not out.exists()


@pytest.mark.parametrize("bad", ["nonsense", "127.0.0.1", "host:0", "host:99999", "ray://h:1/x", ":6379"])
def test_a_malformed_address_names_the_flag_and_the_form(bad):
    with pytest.raises(FedrecInputError, match=r"--ray-address .*HOST:PORT"):
        ray_cluster.check_ray_address(bad)


def test_a_port_that_is_not_a_ray_head_is_refused():
    """Something accepts the connection but does not answer as Ray's GCS (here: it hangs up)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(FedrecInputError, match="not a Ray cluster's head"):
            ray_cluster.check_ray_address(f"127.0.0.1:{srv.getsockname()[1]}", gcs_timeout=4)
    finally:
        srv.close()


def test_local_is_the_default_and_adds_no_address(monkeypatch):
    assert ray_cluster.check_ray_address(None) is None
    assert ray_cluster.check_ray_address("local") is None
    assert "address" not in ray_cluster.ray_init_args(None)
    monkeypatch.setenv(ray_cluster.RAY_ADDRESS_ENV, "local")
    assert ray_cluster.current_ray_address() is None


def test_the_address_reaches_flowers_ray_backend_init_args(tmp_path, monkeypatch, fake_head):
    """launch_flower hands the checked address to Flower's Ray backend (``init_args`` ->
    ``ray.init(address=...)``), and nothing that would size the cluster (ray.init refuses it)."""
    import importlib

    from fedrec.simulations.run import launch_flower

    flwr_sim = importlib.import_module("flwr.simulation.run_simulation")  # the module, not the function
    seen: dict = {}
    monkeypatch.setenv("FEDREC_NO_PROGRESS", "1")  # launch_flower(quiet=True) sets it: restored after the test
    monkeypatch.setattr(flwr_sim, "_run_simulation", lambda **kw: seen.update(kw))
    ray_cluster.use_ray_address(fake_head)
    assert os.environ[ray_cluster.RAY_ADDRESS_ENV] == fake_head  # what the sweep's workers inherit
    launch_flower({}, tmp_path, num_supernodes=2, quiet=True)
    init = seen["backend_config"]["init_args"]
    assert init["address"] == fake_head and "num_cpus" not in init and "num_gpus" not in init
    ray_cluster.use_ray_address("local")
    assert ray_cluster.RAY_ADDRESS_ENV not in os.environ
    seen.clear()
    launch_flower({}, tmp_path / "again", num_supernodes=2, quiet=True)
    assert "address" not in seen["backend_config"]["init_args"]  # default: Flower starts a local Ray


def test_a_sweep_on_a_cluster_runs_one_cell_at_a_time(tmp_path, fake_head):
    """Flower sizes each run's actor pool to the whole cluster: parallel cells would wait on each
    other's actors, so --jobs > 1 with --ray-address is refused (one line) before anything runs."""
    out = tmp_path / "sweep"
    res = CliRunner().invoke(sim_cli, ["sweep", "--domains", "health", "--epsilon", "1", "--seeds", "1",
                                       "--institutions", "2", "--rounds", "1", "--people", "200", "--jobs", "2",
                                       "--ray-address", fake_head, "--out", str(out)])
    assert isinstance(res.exception, FedrecInputError), res.output
    assert "--jobs 2 with --ray-address" in str(res.exception) and not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEDREC_TEST_RAY_CLUSTER") != "1",
                    reason="1-2 minutes on 2 cores (a Ray head + a Flower run); set FEDREC_TEST_RAY_CLUSTER=1")
def test_a_simulation_runs_on_a_cluster_the_test_started(tmp_path):
    import shutil
    import tempfile

    port = _free_port()
    ray = Path(sys.executable).with_name("ray")
    # its own temp dir, so no other ray.init() on the machine joins it; short, for Ray's socket paths
    ray_tmp = tempfile.mkdtemp(prefix="fr-ray-")
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--port", str(port), "--node-ip-address",
                             "127.0.0.1", "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                             "--temp-dir", ray_tmp], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                addr = ray_cluster.check_ray_address(f"127.0.0.1:{port}", gcs_timeout=10)
                break
            except FedrecInputError:
                assert time.monotonic() < deadline and head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
                time.sleep(2)
        out = tmp_path / "run"
        res = subprocess.run([str(Path(sys.executable).with_name("fedrec-sim")), "run", "--domain", "health", "-k",
                              "2", "-r", "1", "--epsilon", "1", "--set", "people=200", "--plain-aggregation",
                              "--quiet", "--ray-address", addr, "--out", str(out)],
                             capture_output=True, text=True, timeout=400, env=ENV)
        assert res.returncode == 0, res.stdout + res.stderr
        assert (out / "metrics.json").exists()
    finally:
        head.terminate()  # `ray start --block` stops the head's processes on SIGTERM
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
