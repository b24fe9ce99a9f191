"""The coordinator's side of a deployment on Flower's deployment engine (flwr 1.41).

Layout (docs/deploy.md)::

    SuperNodes --TLS--> [fleet proxy, public HOST:PORT] --TLS--> [SuperLink, 127.0.0.1:PORT]
                          forwards POST /v1/fleet/* only           Fleet + Control + Runtime APIs

* :func:`write_dev_certs` — a throw-away CA and a server certificate for 127.0.0.1/localhost
  (testing only; real deployments use the site's PKI).
* :class:`Coordinator` — the coordinator's state folder: the SuperLink database (registrations
  and runs survive restarts), the ``FLWR_HOME`` that ``flwr`` commands use (its config.toml names
  the loopback SuperLink and the CA; the project's pyproject.toml is never touched), generated
  app folders and run results.
* :func:`superlink_command` / :func:`start` — the SuperLink with TLS, ``--enable-supernode-auth``,
  ``--database``, no runtime dependency installation, bound to loopback; then the fleet proxy
  (server/fleet_proxy.py) on the public address, in the foreground until interrupted.
* :func:`register` — ``flwr supernode register KEY.pub <federation> --name NAME``.
* :func:`run` — ``flwr run <generated app folder> <federation> --run-config overrides.toml --stream``.

Flower and Ray telemetry and update checks are off in every environment built here
(:func:`flower_env`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.common.errors import FedrecInputError, RunFailed

__all__ = ["TELEMETRY_OFF", "flower_env", "flower_bin", "write_dev_certs", "Coordinator", "superlink_command",
           "start", "register", "run", "write_app_dir", "wait_for_port", "CONNECTION"]

TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
#: seconds between the SuperLink superexec's polls for a run to launch (a local request each)
SUPEREXEC_POLL_S = "0.2"
#: name of the SuperLink connection in the managed FLWR_HOME
CONNECTION = "fedrec"
CERT_FILES = ("ca.crt", "server.crt", "server.key")

TRAIN_APPS = ("fedrec.server.app:app", "fedrec.client.app:app")
CAUSAL_APPS = ("fedrec.server.causal:app", "fedrec.client.app:app")
STRATEGY_APPS = ("fedrec.server.strategies:app", "fedrec.client.app:app")
#: what each kind of run is, and the JSON its ServerApp writes into the results folder
RUN_KINDS = {"train": (TRAIN_APPS, "metrics.json"), "causal": (CAUSAL_APPS, "causal_raw.json"),
             "strategies": (STRATEGY_APPS, "strategies.json")}


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment with Flower's and Ray's telemetry and update checks off."""
    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    # the SuperLink's flower-superexec polls for a run to launch every second by default (Flower's
    # FLWR_SUPEREXEC_TASK_POLL_INTERVAL): up to 1 s more per run; a value the operator set is kept
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    # Flower starts its helpers (flower-superexec, flwr-serverapp) by name: this environment's first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def flower_bin(name: str) -> str:
    """A console script of this environment (flower-superlink, flwr, ...): next to the running
    Python first, then PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which(name)
    if not found:
        raise FedrecInputError(f"{name}: not installed in this environment; fix: install fedrec with its "
                               "dependencies (flwr provides it)")
    return found


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FedrecInputError(f"{flag} {text!r}: not HOST:PORT; fix: e.g. {flag} 0.0.0.0:9092")
    return host.strip("[]"), int(port)


def wait_for_port(host: str, port: int, timeout: float, *, proc: subprocess.Popen | None = None) -> bool:
    """True once ``host:port`` accepts TCP connections (False on timeout or if ``proc`` exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.2)
    return False


# ---------------------------------------------------------------- certificates (testing only)

def write_dev_certs(out: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30,
                    overwrite: bool = False) -> dict[str, Path]:
    """A test CA (``ca.crt``, ``ca.key``) and a server certificate (``server.crt``, ``server.key``)
    for ``hosts``, valid ``days`` days. FOR TESTING ONLY: the CA key sits next to the certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    paths = {name: out / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FedrecInputError(f"{existing[0]}: already exists; nothing was written; fix: choose an empty "
                               "folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrec TESTING ONLY"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedrec development CA (testing only)")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(ca_name).public_key(srv_key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    for key, path in ((ca_key, paths["ca.key"]), (srv_key, paths["server.key"])):
        data = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(pem))
    paths["server.crt"].write_bytes(srv_cert.public_bytes(pem))
    (out / "README.txt").write_text(
        "TESTING ONLY - written by `fedrec-server dev-certs`.\n"
        "ca.crt: give it to each institution (fedrec-client start --root-cert ca.crt).\n"
        "server.crt/server.key: the federation server's certificate for " + ", ".join(hosts) + ".\n"
        "ca.key can sign any certificate: never use these files in a real federation (docs/deploy.md).\n")
    return paths


def check_certs(certs: Path) -> tuple[Path, Path, Path]:
    """``ca.crt``, ``server.crt``, ``server.key`` in ``certs``, readable and parseable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = Path(certs)
    if not certs.is_dir():
        raise FedrecInputError(f"--certs {certs}: no such folder; fix: `fedrec-server dev-certs {certs}` for a "
                               "test, or put the site's ca.crt, server.crt, server.key there")
    paths = tuple(certs / n for n in CERT_FILES)
    for p in paths:
        if not p.is_file():
            raise FedrecInputError(f"{p}: missing; fix: --certs must hold {', '.join(CERT_FILES)}")
    try:
        x509.load_pem_x509_certificate(paths[0].read_bytes())
        x509.load_pem_x509_certificate(paths[1].read_bytes())
    except ValueError:
        raise FedrecInputError(f"{certs}: ca.crt or server.crt is not a PEM certificate; fix: convert to PEM") from None
    try:
        serialization.load_pem_private_key(paths[2].read_bytes(), password=None)
    except (ValueError, TypeError):
        raise FedrecInputError(f"{paths[2]}: not an unencrypted PEM private key; fix: export the key without "
                               "a passphrase (readable by the server's account only)") from None
    return paths  # type: ignore[return-value]


# ---------------------------------------------------------------- the coordinator's state folder

@dataclass(frozen=True)
class Coordinator:
    """Everything the coordinator keeps, under one folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def database(self) -> Path:
        return self.root / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def apps(self) -> Path:
        return self.root / "apps"

    def env(self) -> dict[str, str]:
        return flower_env({"FLWR_HOME": str(self.flwr_home.resolve())})

    def write_connection(self, address: str, ca_cert: Path) -> Path:
        """FLWR_HOME/config.toml: the one connection ``flwr`` uses (the loopback SuperLink)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            "# written by `fedrec-server start`; the SuperLink's Control API, reachable on loopback only\n"
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{address}"\nroot-certificates = "{Path(ca_cert).resolve().as_posix()}"\n')
        return path

    def connection_file(self) -> Path:
        path = self.flwr_home / "config.toml"
        if not path.is_file():
            raise FedrecInputError(f"{path}: no federation connection here; fix: run `fedrec-server start "
                                   f"--state-dir {self.root}` first (or pass the same --state-dir)")
        return path


def superlink_command(coord: Coordinator, *, certs: Path, port: int) -> list[str]:
    ca, cert, key = (Path(certs).resolve() / n for n in CERT_FILES)
    return [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--enable-supernode-auth", "--database", str(coord.database.resolve()),
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
            "--isolation", "subprocess"]


def start(coord: Coordinator, *, certs: Path, listen: str, superlink_port: int, echo=print,
          ready_timeout: float = 60.0, pull_hold: float | None = None) -> int:
    """Run the SuperLink (loopback) and the fleet proxy (``listen``) until interrupted."""
    from fedrec.server.fleet_proxy import MAX_PULL_HOLD_S, PULL_HOLD_S, serve

    pull_hold = PULL_HOLD_S if pull_hold is None else float(pull_hold)
    if not 0.0 <= pull_hold <= MAX_PULL_HOLD_S:  # FleetProxy's own rule, as a one-line error before any process
        raise FedrecInputError(f"--pull-hold {pull_hold}: must be in [0, {MAX_PULL_HOLD_S:g}] seconds (a SuperNode "
                               "gives up on a request after 30 s); fix: e.g. --pull-hold 10, or 0 to turn the long poll off")

    ca, cert, key = check_certs(certs)
    host, port = parse_address(listen, "--listen")
    if port == superlink_port:
        raise FedrecInputError(f"--listen port {port} equals --superlink-port; fix: choose two ports")
    coord.root.mkdir(parents=True, exist_ok=True)
    coord.runs.mkdir(exist_ok=True)
    (coord.root / "logs").mkdir(exist_ok=True)
    coord.write_connection(f"127.0.0.1:{superlink_port}", ca)
    log_path = coord.root / "logs" / "superlink.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(superlink_command(coord, certs=certs, port=superlink_port), env=coord.env(),
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(coord.root))
    try:
        if not wait_for_port("127.0.0.1", superlink_port, ready_timeout, proc=proc):
            tail = log_path.read_text(errors="replace")[-600:].strip().splitlines()[-3:]
            raise RunFailed(f"the SuperLink did not start on 127.0.0.1:{superlink_port} (see {log_path}: "
                            f"{' | '.join(tail)})")
        echo(f"SuperLink on 127.0.0.1:{superlink_port} (state {coord.database}, log {log_path}); "
             f"Fleet API proxy on {host}:{port}; FLWR_HOME {coord.flwr_home}")
        _stop = {"signal": False}

        def _term(signum, frame):  # uvicorn installs its own handlers while serving; this covers start-up
            _stop["signal"] = True
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _term)
        serve(listen_host=host, listen_port=port, upstream=f"https://127.0.0.1:{superlink_port}",
              certfile=str(cert), keyfile=str(key), ca_cert=str(ca), alive=lambda: proc.poll() is None,
              pull_hold=pull_hold)
    except KeyboardInterrupt:
        pass
    finally:
        died = proc.poll()
        _stop_process(proc)
    if died is not None:
        raise RunFailed(f"the SuperLink exited with code {died}; see {log_path}")
    return 0


def _stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------- registering institutions

def check_public_key(path: Path) -> str:
    """The OpenSSH public key text (EC), or one clear error."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
        key = load_ssh_public_key(text.encode())
    except FileNotFoundError:
        raise FedrecInputError(f"{path}: no such file; fix: the institution sends the .pub file that "
                               "`fedrec-client keygen` wrote") from None
    except (ValueError, UnicodeDecodeError):
        raise FedrecInputError(f"{path}: not an OpenSSH public key; fix: send the .pub file of "
                               "`fedrec-client keygen`, never the private key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedrecInputError(f"{path}: not an EC (ECDSA) key; fix: `fedrec-client keygen` makes one")
    return text


def fingerprint(public_line: str) -> str:
    """``SHA256:...`` of the OpenSSH public key blob (what ``ssh-keygen -l`` and `fedrec-client keygen` print)."""
    import base64
    import hashlib

    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _flwr(coord: Coordinator, args: list[str], *, timeout: float, capture: bool = True) -> subprocess.CompletedProcess:
    coord.connection_file()
    try:
        return subprocess.run([flower_bin("flwr"), *args], env=coord.env(), capture_output=capture, text=True,
                              timeout=timeout, cwd=str(coord.root), start_new_session=True)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"`flwr {args[0]}` did not finish within {timeout:.0f} s; fix: check that "
                        f"`fedrec-server start --state-dir {coord.root}` is running") from None


def roster_path(coord: Coordinator) -> Path:
    return coord.root / "roster.toml"


def add_to_roster(coord: Coordinator, name: str, public_line: str) -> Path:
    """Add ``name = "<key>"`` to STATE/roster.toml, the federation roster the coordinator hands to
    every institution (each verifies the fingerprints it holds; SecAgg+ trusts only its own copy)."""
    import tomllib

    path = roster_path(coord)
    members: dict[str, str] = {}
    if path.exists():
        members = dict(tomllib.loads(path.read_text()).get("members", {}))
    key = " ".join(public_line.split()[:2])
    if name in members and members[name] != key:
        raise FedrecInputError(f"{path}: {name} is already in the roster with another key; fix: choose another "
                               "--name, or remove the old entry after unregistering it")
    members[name] = key
    lines = ["# fedrec federation roster: institution = long-term public key (OpenSSH).",
             "# Written by `fedrec-server register`; every institution keeps its own verified copy.", "[members]"]
    lines += [f"{json.dumps(n)} = {json.dumps(k)}" for n, k in sorted(members.items())]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def register(coord: Coordinator, public_key: Path, *, name: str, timeout: float = 60.0) -> str:
    """Allow-list one institution's key on the SuperLink and add it to the roster; returns
    Flower's answer (node id)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise FedrecInputError(f"--name {name!r}: use letters, digits, '_', '-', '.' (at most 64); fix: e.g. "
                               "--name institution_00")
    line = check_public_key(public_key)
    res = _flwr(coord, ["supernode", "register", str(Path(public_key).resolve()), CONNECTION, "--name", name,
                        "--format", "json"], timeout=timeout)
    answer = _json_answer(res.stdout)
    if res.returncode != 0 or not answer.get("success", False):
        detail = str(answer.get("error-message") or _last_line(res.stdout + "\n" + res.stderr))
        detail = " ".join(detail.replace("Using SuperLink: fedrec", "").split())
        raise RunFailed(f"registering {public_key} failed: {detail[:300]}; fix: is `fedrec-server start "
                        f"--state-dir {coord.root}` running, and is the key not registered already?")
    add_to_roster(coord, name, line)
    return ", ".join(f"{k} {v}" for k, v in answer.items() if k != "success") or "ok"


def _json_answer(text: str) -> dict:
    start = text.find("{")
    try:
        value = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def list_nodes(coord: Coordinator, *, timeout: float = 60.0) -> list[dict]:
    """The SuperLink's registered SuperNodes (``flwr supernode list``)."""
    res = _flwr(coord, ["supernode", "list", CONNECTION, "--format", "json"], timeout=timeout)
    answer = _json_answer(res.stdout)
    if res.returncode != 0 or not answer.get("success", False):
        raise RunFailed(f"listing SuperNodes failed: {_last_line(str(answer.get('error-message', '')) or res.stderr)}"
                        f"; fix: is `fedrec-server start --state-dir {coord.root}` running?")
    return list(answer.get("nodes", []))


def unregister(coord: Coordinator, node_id: str, *, timeout: float = 60.0) -> None:
    """Remove a SuperNode from the allow-list (it can no longer connect)."""
    if not str(node_id).isdigit():
        raise FedrecInputError(f"{node_id!r}: not a node id; fix: the number `fedrec-server nodes` lists")
    res = _flwr(coord, ["supernode", "unregister", str(node_id), CONNECTION, "--format", "json"], timeout=timeout)
    answer = _json_answer(res.stdout)
    if res.returncode != 0 or not answer.get("success", False):
        detail = " ".join(str(answer.get("error-message") or _last_line(res.stdout + res.stderr)).split())
        raise RunFailed(f"unregistering node {node_id} failed: {detail[:300]}")


# ---------------------------------------------------------------- launching runs

def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))


def write_app_dir(path: Path, *, server_app: str, client_app: str, config: dict[str, Any]) -> Path:
    """A Flower app folder holding only a pyproject.toml: components + every knob's default. It
    has no ``[tool.flwr.federations]``, so ``flwr run`` has nothing of it to rewrite; the
    project's own pyproject.toml is never used."""
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "fedrec-deploy-app"', 'version = "0.1.0"', "dependencies = []", "",
             "[tool.flwr.app]", 'publisher = "fedrec"', "", "[tool.flwr.app.components]",
             f'serverapp = "{server_app}"', f'clientapp = "{client_app}"', "", "[tool.flwr.app.config]"]
    lines += [f'"{k}" = {_toml(v)}' for k, v in config.items()]
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return path


def defaults(kind: str) -> dict[str, Any]:
    from fedrec.common.config import DEFAULTS

    base = dict(DEFAULTS)
    base["eval.metrics-release"] = "off"  # deployed institutions release no non-DP metrics
    if kind in ("causal", "strategies"):
        from fedrec.common.causal.config import CausalConfig

        base.update(CausalConfig().to_flat())
    if kind == "causal":  # refutations after the estimation (server/causal.py; `run causal --refute`)
        base["causal.refute"] = ""
    if kind == "strategies":
        from fedrec.common.causal.ope import StrategyRun

        base.update(StrategyRun().to_flat())
    return base


def check_run_settings(kind: str, config: dict[str, Any]) -> None:
    """Refuse (FedrecInputError, one line naming the key and the fix) a strategy run's settings
    the ServerApp would refuse (server/strategies.read_run_config: unknown strategy, estimator,
    key, a ``causal.expert.fold``), before ``flwr run`` and before any folder is written."""
    if kind != "strategies":
        return
    from fedrec.common.config import ConfigError
    from fedrec.server.strategies import read_run_config

    try:
        read_run_config(config)
    except (ConfigError, ValueError) as err:
        raise FedrecInputError(" ".join(str(err).split())) from None


def parse_settings(settings: list[str], known: dict[str, Any]) -> dict[str, Any]:
    """``KEY=VALUE`` strings typed like the knob's default; unknown keys refused."""
    out: dict[str, Any] = {}
    for s in settings:
        key, sep, value = s.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FedrecInputError(f"--set {s!r}: not KEY=VALUE; fix: e.g. --set rounds=2")
        if key not in known:
            raise FedrecInputError(f"--set {key}: unknown knob; fix: one of the keys of tool.flwr.app.config "
                                   "in pyproject.toml (or docs/causal.md for causal.*)")
        default = known[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise FedrecInputError(f"--set {key}={value}: expected a {type(default).__name__}") from None
    return out


def run(coord: Coordinator, kind: str, *, institutions: int, settings: dict[str, Any], results: Path | None,
        timeout: float, echo=print) -> tuple[Path, dict]:
    """Launch one run with ``flwr run`` and wait for it; returns (results folder, its JSON)."""
    if kind not in RUN_KINDS:
        raise FedrecInputError(f"run {kind!r}: unknown kind; fix: one of {', '.join(RUN_KINDS)}")
    (server_app, client_app), made_name = RUN_KINDS[kind]
    config = defaults(kind)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = Path(results) if results else coord.runs / f"{kind}-{stamp}"
    if results.exists() and any(results.iterdir()):
        raise FedrecInputError(f"--results {results}: not empty; fix: choose a new folder")
    overrides = {**settings, "institutions": int(institutions), "results-dir": str(results.resolve())}
    check_run_settings(kind, {**config, **overrides})  # bad input: one line, nothing written
    results.mkdir(parents=True, exist_ok=True)
    app_dir = write_app_dir(coord.apps / f"{kind}-{stamp}-{os.getpid()}", server_app=server_app,
                            client_app=client_app, config=config)
    override_file = app_dir / "run-config.toml"
    override_file.write_text("".join(f'"{k}" = {_toml(v)}\n' for k, v in overrides.items()))
    echo(f"launching a {kind} run over {institutions} institutions; results in {results}")
    res = _flwr(coord, ["run", str(app_dir), CONNECTION, "--run-config", str(override_file), "--stream"],
                timeout=timeout)
    (results / "flwr-run.log").write_text(res.stdout + "\n" + res.stderr)
    failure = results / "failure.json"
    if failure.exists():
        reason = json.loads(failure.read_text()).get("reason", "?")
        raise RunFailed(f"the run failed: {reason} (log: {results / 'flwr-run.log'})")
    # the ServerApp writes metrics.json (train), causal_raw.json (causal: the coordinator has no
    # institution data, so causal.json is the raw result plus the run's identity) or
    # strategies.json (strategies: rewritten below with the run's identity)
    made = results / made_name
    if res.returncode != 0 or not made.exists():
        raise RunFailed(f"`flwr run` ended with code {res.returncode} and no {made.name}: "
                        f"{_last_line(res.stdout + chr(10) + res.stderr)} (log: {results / 'flwr-run.log'})")
    if kind == "train":
        return results, json.loads(made.read_text())
    run_id = started_run_id(res.stdout)
    if not (results / "config.json").exists():  # the run id every ledger row of this run carries (audit)
        _write_json(results / "config.json", {**config, **overrides, "run-id": run_id})
    report = {**json.loads(made.read_text()), "run-id": run_id}
    _write_json(results / ("strategies.json" if kind == "strategies" else "causal.json"), report)
    return results, report


def started_run_id(flwr_output: str) -> str | None:
    """The run id in ``flwr run``'s "Successfully started run N" line (None if absent)."""
    import re

    found = re.search(r"Successfully started run (\d+)", flwr_output)
    return found.group(1) if found else None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
