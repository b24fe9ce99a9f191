"""End-to-end harness: real SuperLink, fleet proxy and SuperNodes on 127.0.0.1.

Every process is started here in its own process group (``start_new_session``) and stopped by a
finalizer (SIGTERM to the group, SIGKILL after a grace period), also when a test fails. Ports
are picked free on 127.0.0.1; Flower and Ray telemetry are off; each process has its own
``FLWR_HOME`` under the test's temporary folder (nothing is written to ~/.flwr).

Time (issue 31: the suite stays under ~4 minutes on a loaded 2-core machine): the set-up
commands that need no Flower process (dev-certs, init, keygen, register) run in-process through
the same Typer apps the console scripts run; every wait polls a cheap condition (a port, a
SQLite row) often, and ``flwr supernode list`` (one Python process per call) every 1.5 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
N_INSTITUTIONS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(home: Path, **extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(TELEMETRY_OFF)
    e["FLWR_HOME"] = str(home)
    e["PATH"] = os.pathsep.join([str(BIN), e.get("PATH", "")])
    e.update(extra)
    return e


def cli(*args: str, cwd: Path, home: Path, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, env=env(home), capture_output=True, text=True,
                         timeout=timeout, start_new_session=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def run_bounded(args: list[str], *, home: Path, log: Path, timeout: float) -> tuple[int, str]:
    """Run a process to its exit (output to ``log``, not a pipe: Flower's helpers inherit pipes and
    outlive their parent), then kill whatever remains of its process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        p = subprocess.Popen(args, env=env(home), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()
    text = log.read_text(errors="replace")
    if code is None:
        raise AssertionError(f"{args[0]} still running after {timeout:.0f} s:\n{text[-2000:]}")
    return code, text


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=30)
            except ProcessLookupError:
                pass
        # the group may hold children that outlived the leader (Flower's app subprocesses)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.popen.returncode

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@dataclass
class Processes:
    root: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], *, home: Path, cwd: Path | None = None) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            p = subprocess.Popen(args, cwd=cwd or self.root, env=env(home), stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        proc = Proc(name, p, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def invoke(app, *args: str) -> str:
    """Run one of our Typer CLIs in-process (the code the console script runs, without a new
    interpreter); its output, or AssertionError with it on a non-zero exit."""
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, list(args))
    if res.exit_code != 0:
        raise AssertionError(f"{' '.join(args)} -> {res.exit_code}\n{res.output}\n{res.exception!r}")
    return res.output


def wait_for(cond, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Federation:
    root: Path
    procs: Processes
    certs: Path
    state: Path
    public_port: int
    superlink_port: int
    institutions: list[Path]
    keys: list[Path]
    server: Proc | None = None
    nodes: list[Proc] = field(default_factory=list)

    @property
    def coord_home(self) -> Path:
        return self.state / "flwr-home"

    def start_server(self) -> Proc:
        self.server = self.procs.start(
            "server", [str(BIN / "fedrec-server"), "start", "--certs", str(self.certs), "--listen",
                       f"127.0.0.1:{self.public_port}", "--superlink-port", str(self.superlink_port),
                       "--state-dir", str(self.state)], home=self.root / "home-server")
        wait_for(lambda: port_open(self.public_port) or not self.server.alive(), 60, "the fleet proxy")
        assert self.server.alive(), self.server.tail()
        return self.server

    def start_node(self, k: int) -> Proc:
        inst = self.institutions[k]
        node = self.procs.start(
            f"node{k}", [str(BIN / "fedrec-client"), "start", "--data", str(inst), "--server",
                         f"127.0.0.1:{self.public_port}", "--root-cert", str(self.certs / "ca.crt"), "--key",
                         str(self.keys[k]), "--runtime-port", str(free_port())],
            home=self.root / f"home-node{k}")
        return node

    def wait_online(self, n: int, timeout: float, what: str) -> list[dict]:
        """Poll ``flwr supernode list`` (a process per call: every 1.5 s) until ``n`` nodes are
        online; fail early if one of our SuperNode processes died."""
        def check():
            if not all(p.alive() for p in self.nodes):
                return "dead"
            online = [x for x in self.nodes_online() if x["status"] == "online"]
            return online if len(online) == n else None

        found = wait_for(check, timeout, what, poll=1.5)
        for p in self.nodes:
            assert p.alive(), p.tail()
        return found

    def nodes_online(self) -> list[dict]:
        import json

        res = cli("flwr", "supernode", "list", "fedrec", "--format", "json", cwd=self.root, home=self.coord_home,
                  check=False)
        try:
            return [n for n in json.loads(res.stdout[res.stdout.find("{"):]).get("nodes", [])]
        except ValueError:
            return []


#: the simulated study the institutions hold (the health domain of `fedrec-sim generate`): MF
#: trains on its engagement, the causal run estimates its items' effects; ground truth beside it
STUDY = {"domain": "health", "people": 3000, "seed": 7, "skew": 0.4}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, request):
    """3 institutions of a simulated health study in the data contract (each `fedrec-client
    init`-ed, with an identity key registered and the roster in its policy; the simulator's
    ground truth in data/ground_truth), the server running, 3 SuperNodes connected."""
    from fedrec.client.cli import app as client_cli
    from fedrec.common.datasets import GROUND_TRUTH_DIR, write_ground_truth, write_institution
    from fedrec.server.cli import app as server_cli
    from fedrec.simulations.domains import domain_federation

    root = tmp_path_factory.mktemp("e2e")
    procs = Processes(root)
    request.addfinalizer(procs.stop_all)
    t0 = time.monotonic()
    insts, truth = domain_federation(STUDY["domain"], institutions=N_INSTITUTIONS, people=STUDY["people"],
                                     seed=STUDY["seed"], skew=STUDY["skew"])
    folders = []
    for d in insts:
        write_institution(root / "data" / d.name, d)
        folders.append(root / "data" / d.name)
    write_ground_truth(root / "data" / GROUND_TRUTH_DIR, truth)
    invoke(server_cli, "dev-certs", str(root / "certs"))
    keys = []
    for k, folder in enumerate(folders):
        # --min-round-size 2: with 3 institutions, the default floor of 3 survivors tolerates no dropout
        invoke(client_cli, "init", str(folder), "--epsilon-cap", "10", "--max-run-epsilon", "4",
               "--min-round-size", "2")
        invoke(client_cli, "keygen", str(root / "keys" / folder.name))
        keys.append(root / "keys" / folder.name / "identity.key")
    fed = Federation(root=root, procs=procs, certs=root / "certs", state=root / "coordinator",
                     public_port=free_port(), superlink_port=free_port(), institutions=folders, keys=keys)
    print(f"[e2e] data, certs, policies, keys: {time.monotonic() - t0:.1f} s")
    fed.start_server()
    print(f"[e2e] server up: {time.monotonic() - t0:.1f} s")
    for folder, key in zip(folders, keys):  # one at a time: each adds itself to the roster file
        invoke(server_cli, "register", str(key.with_suffix(".pub")), "--name", folder.name, "--state-dir",
               str(fed.state))
    roster = fed.state / "roster.toml"
    for folder, key in zip(folders, keys):
        # the institution keeps its own copy of the roster (fingerprints checked out of band)
        (folder / "roster.toml").write_bytes(roster.read_bytes())
        with open(folder / "privacy.toml", "a") as f:
            f.write(f'identity-key = "{key}"\nroster = "roster.toml"\n')
    print(f"[e2e] registered: {time.monotonic() - t0:.1f} s")
    for k in range(N_INSTITUTIONS):
        fed.nodes.append(fed.start_node(k))
    fed.wait_online(N_INSTITUTIONS, 90, "3 SuperNodes online")
    print(f"federation up in {time.monotonic() - t0:.1f} s")
    yield fed
