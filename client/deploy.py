"""The institution's side of a deployment: its identity key and its SuperNode.

* :func:`keygen` — the institution's long-term identity: an ECDSA key pair on NIST P-256
  (:data:`fedrec.common.secagg._identity.CURVE`; P-384 keys made earlier stay accepted), the private
  key in OpenSSH's PEM-armoured format (``-----BEGIN OPENSSH PRIVATE KEY-----``, file mode 0600;
  what ``flower-supernode --auth-supernode-private-key`` loads with ``load_ssh_private_key``, and
  what the secure-aggregation key advertisements sign with) and the public key as one OpenSSH line
  (what ``flwr supernode register`` and the federation's roster take).
* :func:`preflight` — everything ``fedrec-client start`` checks before it starts Flower's
  SuperNode, each failure one line naming the file or flag and the fix: the data folder against
  the data contract, the privacy policy and its ledger (present, a cap, budget left), the root
  certificate (a PEM certificate; and, when the server answers, that it signed the server's
  certificate), the identity key (an EC private key).
* :func:`supernode_command` — ``flower-supernode`` with TLS, the key, and the node config
  ``data-dir=... policy=...`` that the ClientApp reads (client/node.py); telemetry off.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from fedrec.common.errors import BudgetExceeded, FedrecInputError

__all__ = ["KEY_FILE", "PUB_FILE", "keygen", "fingerprint", "load_identity_key", "Preflight", "preflight",
           "supernode_command", "TELEMETRY_OFF"]

KEY_FILE = "identity.key"
PUB_FILE = "identity.pub"
TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
#: budget below which a node refuses to start (nothing useful can be released)
MIN_REMAINING_EPSILON = 1e-6
#: how often the SuperNode's ``flower-superexec`` asks whether a message waits for a ClientApp
#: process (Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; its default 1 s added up to 1 s to every
#: trip of a run: a causal estimation is ~21 trips). One local HTTP request to the SuperNode's own
#: runtime API per poll; a site may set the variable itself, and its value is kept.
SUPEREXEC_POLL_S = "0.1"


def fingerprint(public_line: str) -> str:
    """``SHA256:...`` of the OpenSSH public key blob (what ``ssh-keygen -l`` prints)."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def keygen(out: Path, *, comment: str = "", overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write ``OUT/identity.key`` (0600) and ``OUT/identity.pub``; return (key, pub, fingerprint)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    key_path, pub_path = out / KEY_FILE, out / PUB_FILE
    for p in (key_path, pub_path):
        if p.exists() and not overwrite:
            raise FedrecInputError(f"{p}: already exists; nothing was written; fix: keep the institution's "
                                   "identity (it is registered with the federation) or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    from fedrec.common.secagg._identity import CURVE  # the one curve choice, with its reasons

    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    if comment:
        public = f"{public} {comment}"
    tmp = key_path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.replace(tmp, key_path)
    pub_path.write_text(public + "\n")
    return key_path, pub_path, fingerprint(public)


def load_identity_key(path: Path):
    """The EC private key at ``path`` (OpenSSH format), or one clear error."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedrecInputError(f"--key {path}: no such file; fix: `fedrec-client keygen DIR` and give "
                               f"DIR/{KEY_FILE}") from None
    except OSError as err:
        raise FedrecInputError(f"--key {path}: cannot read it ({type(err).__name__}); fix: run as the account "
                               "that owns the key") from None
    if data.lstrip().startswith(b"ecdsa-") or data.lstrip().startswith(b"ssh-"):
        raise FedrecInputError(f"--key {path}: this is a public key; fix: give the private key "
                               f"({KEY_FILE}), not the .pub file")
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise FedrecInputError(f"--key {path}: not an unencrypted OpenSSH private key; fix: use the "
                               f"{KEY_FILE} written by `fedrec-client keygen`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedrecInputError(f"--key {path}: not an EC (ECDSA) key, which Flower's node authentication "
                               "needs; fix: `fedrec-client keygen`")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise FedrecInputError(f"--key {path}: readable by other accounts; fix: chmod 600 {path}")
    return key


def check_root_cert(path: Path) -> None:
    from cryptography import x509

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FedrecInputError(f"--root-cert {path}: no such file; fix: the federation's CA certificate "
                               "(ca.crt) from the coordinator") from None
    except OSError as err:
        raise FedrecInputError(f"--root-cert {path}: cannot read it ({type(err).__name__})") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FedrecInputError(f"--root-cert {path}: not a PEM certificate; fix: give the CA certificate "
                               "(-----BEGIN CERTIFICATE-----), not a key") from None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            raise FedrecInputError(f"--root-cert {path}: a server certificate, not a CA; fix: give the CA "
                                   "certificate that signed the server's (ca.crt)")
    except x509.ExtensionNotFound:
        pass


def probe_server(server: str, root_cert: Path, *, timeout: float = 5.0) -> str | None:
    """TLS handshake with the server: None if verified, a one-line error if the certificate is
    wrong, "unreachable" if nothing answered (the SuperNode will keep retrying)."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(root_cert))
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as err:
        return (f"--root-cert {root_cert}: the server {server} presents a certificate it does not verify "
                f"({err.verify_message}); fix: get the federation's CA certificate from the coordinator, and "
                "connect by the name the server's certificate holds")
    except ssl.SSLError as err:
        return f"--server {server}: TLS handshake failed ({err.reason}); fix: is this the federation's Fleet port?"
    except OSError:
        return "unreachable"


@dataclass
class Preflight:
    data: Path
    policy_path: Path
    ledger: Path
    institution: str
    spent: float
    cap: float
    remaining: float
    server_check: str  # "verified" | "unreachable"


def preflight(*, data: Path, server: str, root_cert: Path, key: Path, policy: Path | None,
              console, err_console, probe: bool = True) -> Preflight:
    """The checks of ``fedrec-client start`` (module doc); raises on the first failure."""
    from fedrec.client.budget import budget_summary
    from fedrec.client.check_data import run_check
    from fedrec.common.privacy.ledger import PrivacyLedger
    from fedrec.common.privacy.policy import POLICY_FILE, load_policy

    data = Path(data).resolve()
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedrecInputError(f"--server {server!r}: not HOST:PORT; fix: the Fleet address the coordinator "
                               "gave you, e.g. fl.example.org:9092")
    if not data.is_dir():
        raise FedrecInputError(f"--data {data}: no such folder; fix: the institution's data folder")
    if _is_ratings_folder(data):
        # a ratings folder (ratings_train/ratings_test/items, e.g. the MovieLens benchmark's
        # institutions): the ClientApp's own loader is its check; check-data covers the contract
        from fedrec.common.ratings import load_institution_ratings

        r = load_institution_ratings(data)
        console.print(f"{data}: valid ratings folder ({r.n_persons} persons, {r.n_items} items).", markup=False,
                      highlight=False)
    elif run_check(data, console=console, err_console=err_console) != 0:
        raise FedrecInputError(f"--data {data}: the data does not meet the contract (problems above); "
                               f"fix them, then rerun `fedrec-client check-data {data}`")
    policy_path = Path(policy).resolve() if policy else data / POLICY_FILE
    pol = load_policy(policy_path)
    if pol.allow_non_private:
        raise FedrecInputError(f"{policy_path}: allow-non-private = true is for simulations only; fix: set it "
                               "to false")
    try:
        ledger = PrivacyLedger(pol.ledger)
    except FedrecInputError as err:
        raise FedrecInputError(f"{err} (named by {policy_path}); fix: `fedrec-client init` creates the policy "
                               "and its ledger together") from None
    problems = ledger.verify_chain()
    if problems:
        raise FedrecInputError(f"{pol.ledger}: the ledger's hash chain does not verify ({problems[0]}); fix: "
                               "restore it from a backup; never start on a damaged ledger")
    s = budget_summary(ledger)
    cap = min(pol.epsilon_cap, s["cap"]["epsilon"]) if s["cap"] else pol.epsilon_cap
    remaining = min(s["remaining"] if s["remaining"] is not None else cap, cap - s["spent_prv"])
    if not remaining > MIN_REMAINING_EPSILON:
        raise BudgetExceeded(f"{pol.ledger}: the privacy budget is exhausted (spent ε={s['spent_prv']:.3f} of "
                             f"{cap:g}); nothing can be released; fix: none by design — leave the federation, "
                             f"or raise epsilon-cap in {policy_path} only if your governance allows it")
    check_root_cert(root_cert)
    sk = load_identity_key(key)
    _check_identity(pol, sk, key, policy_path)
    server_check = "not checked"
    if probe:
        res = probe_server(server, root_cert)
        if res is not None and res != "unreachable":
            raise FedrecInputError(res)
        server_check = "unreachable" if res else "verified"
    return Preflight(data=data, policy_path=policy_path, ledger=pol.ledger, institution=ledger.institution,
                     spent=s["spent_prv"], cap=cap, remaining=remaining, server_check=server_check)


def _public_line(pk) -> str:
    from cryptography.hazmat.primitives import serialization

    return pk.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _check_identity(pol, sk, key: Path, policy_path: Path) -> None:
    """The key Flower authenticates the node with is the key SecAgg+ signs with, and the
    institution's roster names it: one identity, one line if not."""
    import tomllib

    if pol.identity_key is None or pol.roster is None:
        raise FedrecInputError(f"{policy_path}: no identity-key / roster: secure aggregation would refuse every "
                               f"release; fix: add identity-key = \"{Path(key).resolve()}\" and roster = "
                               "\"<the federation's roster.toml>\" in the privacy table")
    try:
        same = load_identity_key(pol.identity_key).public_key() == sk.public_key()
    except FedrecInputError as err:
        raise FedrecInputError(f"{policy_path}: identity-key: {err}") from None
    if not same:
        raise FedrecInputError(f"--key {key}: not the policy's identity-key {pol.identity_key}; fix: the node must "
                               "authenticate with the key secure aggregation signs with (one identity)")
    mine = " ".join(_public_line(sk.public_key()).split()[:2])
    try:
        members = tomllib.loads(Path(pol.roster).read_text(encoding="utf-8")).get("members", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise FedrecInputError(f"{pol.roster}: cannot read the roster ({type(err).__name__}); fix: the federation "
                               "roster.toml from the coordinator, fingerprints checked") from None
    if not any(" ".join(str(v).split()[:2]) == mine for v in members.values()):
        raise FedrecInputError(f"{pol.roster}: this institution's key ({fingerprint(mine)}) is not in the roster; "
                               "fix: get the current roster from the coordinator (after `fedrec-server register`)")


def _is_ratings_folder(folder: Path) -> bool:
    return not (folder / "study.toml").exists() and any(folder.glob("ratings_train.*"))


def flower_bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    import shutil

    found = shutil.which(name)
    if not found:
        raise FedrecInputError(f"{name}: not installed in this environment; fix: install fedrec (flwr provides it)")
    return found


def _quote(value: str) -> str:
    if '"' in value or "\\" in value:
        raise FedrecInputError(f"{value}: a path with a quote or backslash cannot go in Flower's node config; "
                               "fix: move the folder")
    return f'"{value}"'


def supernode_command(pf: Preflight, *, server: str, root_cert: Path, key: Path, runtime_port: int,
                      max_retries: int | None = None) -> list[str]:
    node_config = f"data-dir={_quote(str(pf.data))} policy={_quote(str(pf.policy_path))}"
    cmd = [flower_bin("flower-supernode"), "--superlink", server, "--root-certificates",
           str(Path(root_cert).resolve()), "--auth-supernode-private-key", str(Path(key).resolve()),
           "--node-config", node_config, "--port", str(runtime_port), "--host", "127.0.0.1",
           "--isolation", "subprocess"]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def supernode_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TELEMETRY_OFF)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    # Flower starts its helpers (flower-superexec, flwr-clientapp) by name: this environment's first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
