"""Where a simulation's Ray runs: a local Ray (the default) or an existing cluster.

``fedrec-sim run|sweep|causal|demo --ray-address HOST:PORT`` attaches every Flower simulation of
the command to a Ray cluster started beforehand (``ray start --head`` prints its ``HOST:PORT``).
The address travels to Flower's simulation engine the library's way — the Ray backend's
``init_args`` (``backend_config["init_args"]["address"]``), which Flower passes to ``ray.init``
— and never by starting Ray ourselves.

The address is also kept in the environment (``FEDREC_RAY_ADDRESS``) so the sweep's worker
processes, and every simulation one command starts, attach to the same cluster. A bad address is
one line naming ``--ray-address`` and the fix, before anything is written or charged: the port
must accept a TCP connection within a few seconds and a Ray head's GCS must give its cluster id
(Ray itself would retry for a minute, and Flower would then run the ServerApp against no nodes
for minutes more, ending in a traceback).
"""

from __future__ import annotations

import os
import socket

from fedrec.common.errors import FedrecInputError

__all__ = ["RAY_ADDRESS_ENV", "LOCAL", "parse_ray_address", "check_ray_address", "use_ray_address",
           "current_ray_address", "ray_init_args"]

#: the environment variable that carries ``--ray-address`` to every simulation of one command
RAY_ADDRESS_ENV = "FEDREC_RAY_ADDRESS"
#: the default: Flower starts a Ray on this machine for the simulation
LOCAL = "local"
#: how long a cluster's port may take to accept a TCP connection
CONNECT_TIMEOUT_S = 3.0
#: how long a Ray head's GCS may take to give its cluster id (Ray's client gives up after 5 s + 30 s)
GCS_TIMEOUT_S = 20.0

_FIX = "fix: start a cluster with `ray start --head` and pass the HOST:PORT it prints, or leave --ray-address out (local Ray)"


def parse_ray_address(address: str | None) -> tuple[str, int] | None:
    """``None`` for a local Ray (``None``, ``""`` or ``"local"``), else ``(host, port)`` of ``HOST:PORT``.

    Raises :class:`FedrecInputError` (one line) on anything else."""
    text = (address or "").strip()
    if text in ("", LOCAL):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise FedrecInputError(f"--ray-address {text!r}: expected HOST:PORT (e.g. 127.0.0.1:6379) or 'local'; {_FIX}")
    return host.strip("[]"), int(port)


def check_ray_address(address: str | None, *, timeout: float = CONNECT_TIMEOUT_S,
                      gcs_timeout: float | None = None) -> str | None:
    """The address Ray should attach to (``None``: a local Ray), after checking that it answers.

    One line naming ``--ray-address`` when it is malformed or nothing listens there."""
    parsed = parse_ray_address(address)
    if parsed is None:
        return None
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, (socket.timeout, TimeoutError)) else (err.strerror or type(err).__name__)
        raise FedrecInputError(f"--ray-address {address}: no Ray cluster answers there ({reason}); {_FIX}") from None
    checked = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    problem = _probe_gcs(checked, GCS_TIMEOUT_S if gcs_timeout is None else gcs_timeout)
    if problem:
        raise FedrecInputError(f"--ray-address {address}: something listens there but it is not a Ray cluster's "
                               f"head ({problem}); {_FIX}")
    return checked


def _probe_gcs(address: str, timeout: float = GCS_TIMEOUT_S) -> str | None:
    """``None`` when a Ray head's GCS answers at ``address``, else why not (short).

    Asks for the cluster id with Ray's own GCS client, in a child process: its C++ retry log
    stays out of this one's output, and a port that accepts but never answers costs
    ``timeout`` seconds, not Ray's minute of retries and a traceback."""
    import subprocess
    import sys

    code = "import sys; from ray._raylet import GcsClient; GcsClient(address=sys.argv[1]).cluster_id"
    try:
        res = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no answer from a Ray GCS within {timeout:g} s"
    if res.returncode == 0:
        return None
    last = [ln for ln in (res.stderr or "").strip().splitlines() if ln.strip()]
    return (last[-1].strip() if last else f"exit code {res.returncode}")[:160]


def use_ray_address(address: str | None) -> str | None:
    """Check ``address`` and make it the one every simulation of this command attaches to
    (this process and the workers it spawns). ``None``/``"local"``: a local Ray."""
    checked = check_ray_address(address)
    if checked is None:
        os.environ.pop(RAY_ADDRESS_ENV, None)
    else:
        os.environ[RAY_ADDRESS_ENV] = checked
    return checked


def current_ray_address() -> str | None:
    """The cluster this process's simulations attach to (checked again: it may have gone away)."""
    return check_ray_address(os.environ.get(RAY_ADDRESS_ENV))


def ray_init_args(address: str | None) -> dict:
    """Flower's ``backend_config["init_args"]`` (passed to ``ray.init``) for this address.

    A local Ray is quiet (errors only, worker logs not forwarded); attaching to a cluster adds
    ``address`` and nothing that sizes the cluster (``ray.init`` refuses ``num_cpus`` then)."""
    args: dict = {"logging_level": "ERROR", "log_to_driver": False}
    if address:
        args["address"] = address
    return args

