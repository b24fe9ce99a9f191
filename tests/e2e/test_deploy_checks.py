"""Fast checks of the deployment pieces (no Flower processes): the proxy's allow-list, the
testing certificates, the identity key, and every refusal of `fedrec-client start`."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedrec.client.deploy import keygen, preflight
from fedrec.common.errors import BudgetExceeded, FedrecInputError
from fedrec.server.deploy import write_dev_certs
from fedrec.server.fleet_proxy import FLEET_PATHS, is_fleet_request

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ the proxy's allow-list

def test_the_proxy_forwards_every_fleet_call_and_nothing_else():
    for path in FLEET_PATHS:
        assert is_fleet_request("POST", path.encode(), b"") == path
    assert len(FLEET_PATHS) == 12
    rejected = [
        ("POST", "/v1/control/list-nodes"), ("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"),
        ("POST", "/v1/runtime/pull-messages"), ("POST", "/v1/serverappio/get-nodes"),
        ("POST", "/v1/fleet/../control/register-node"), ("POST", "/v1/fleet/%2e%2e/control/list-nodes"),
        ("POST", "//v1/fleet/get-run"), ("POST", "/v1/fleet/get-run/"), ("POST", "/v1/fleet/"), ("POST", "/v1/fleet"),
        ("POST", "/V1/FLEET/GET-RUN"), ("POST", "/v1/fleet/get-run%00"), ("GET", "/v1/fleet/get-run"),
        ("PUT", "/v1/fleet/push-messages"), ("POST", "/"), ("GET", "/docs"), ("GET", "/openapi.json"),
    ]
    for method, path in rejected:
        assert is_fleet_request(method, path.encode(), b"") is None, (method, path)
    assert is_fleet_request("POST", b"/v1/fleet/get-run", b"x=1") is None
    assert is_fleet_request("POST", "/v1/fleet/get-rün".encode(), b"") is None


def test_the_proxy_never_forwards_the_requests_own_bytes():
    raw = bytearray(b"/v1/fleet/get-run")
    out = is_fleet_request("POST", bytes(raw), b"")
    assert out in FLEET_PATHS and out is not None and isinstance(out, str)


# ------------------------------------------------------------------ certificates and keys

def test_dev_certs_verify_for_loopback_and_refuse_to_overwrite(tmp_path):
    from cryptography import x509

    paths = write_dev_certs(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    srv = x509.load_pem_x509_certificate(paths["server.crt"].read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert "TESTING" in ca.subject.rfc4514_string().upper()
    assert (paths["server.key"].stat().st_mode & 0o077) == 0 and (paths["ca.key"].stat().st_mode & 0o077) == 0
    with pytest.raises(FedrecInputError, match="already exists"):
        write_dev_certs(tmp_path / "certs")


def test_keygen_makes_the_key_flower_and_secure_aggregation_load(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    key, pub, fp = keygen(tmp_path / "id")
    sk = load_ssh_private_key(key.read_bytes(), None)  # what flower-supernode does
    assert isinstance(sk, ec.EllipticCurvePrivateKey) and isinstance(sk.curve, ec.SECP256R1)
    line = pub.read_text().strip()
    assert line.startswith("ecdsa-sha2-nistp256 ")
    assert load_ssh_public_key(line.encode()) == sk.public_key()
    assert fp.startswith("SHA256:")
    assert key.stat().st_mode & 0o777 == 0o600
    try:  # issue 28's signing identity loads the same file
        from fedrec.common.secagg._identity import load_private_key
    except ImportError:
        pass
    else:
        assert load_private_key(key).public_key() == sk.public_key()
    with pytest.raises(FedrecInputError, match="already exists"):
        keygen(tmp_path / "id")


# ------------------------------------------------------------------ `fedrec-client start` refusals

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One MovieLens institution, init-ed, with an identity in its policy and a roster; test certs."""
    from typer.testing import CliRunner

    from fedrec.client.cli import app as client_app
    from fedrec.simulations.movielens import write_movielens_federation

    root = tmp_path_factory.mktemp("site")
    folder = write_movielens_federation(root / "data", institutions=2, skew=0.5, test_fraction=0.2, seed=0)[0]
    res = CliRunner().invoke(client_app, ["init", str(folder), "--epsilon-cap", "10", "--max-run-epsilon", "4"])
    assert res.exit_code == 0, res.output
    key, pub, _ = keygen(root / "keys")
    (root / "roster.toml").write_text(f'[members]\n"{folder.name}" = "{pub.read_text().strip()}"\n')
    with open(folder / "privacy.toml", "a") as f:
        f.write(f'identity-key = "{key}"\nroster = "{root / "roster.toml"}"\n')
    certs = write_dev_certs(root / "certs")
    return {"root": root, "data": folder, "key": key, "pub": pub, "certs": certs}


def _pre(site, **kw):
    from rich.console import Console

    args = dict(data=site["data"], server="127.0.0.1:1", root_cert=site["certs"]["ca.crt"], key=site["key"],
                policy=None, console=Console(quiet=True), err_console=Console(quiet=True), probe=False)
    args.update(kw)
    return preflight(**args)


def test_a_good_site_passes_every_check(site):
    pf = _pre(site)
    assert pf.remaining == pytest.approx(10.0) and pf.institution == site["data"].name


@pytest.mark.parametrize("case, match", [
    ("bad-data", "does not meet the contract"),
    ("no-data", "--data .*no such folder"),
    ("no-root-cert", "--root-cert .*no such file"),
    ("root-cert-is-a-key", "--root-cert .*not a PEM certificate"),
    ("root-cert-is-the-server-cert", "a server certificate, not a CA"),
    ("no-key", "--key .*no such file"),
    ("key-is-the-public-key", "this is a public key"),
    ("key-readable-by-others", "chmod 600"),
    ("key-not-the-identity", "not the policy's identity-key"),
    ("no-policy", "no institution privacy policy"),
    ("bad-server", "--server .*not HOST:PORT"),
])
def test_start_refuses_with_one_line(site, tmp_path, case, match):
    kw: dict = {}
    if case == "bad-data":
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "people.csv").write_text("person_id\n1\n")
        kw["data"] = bad
    elif case == "no-data":
        kw["data"] = tmp_path / "absent"
    elif case == "no-root-cert":
        kw["root_cert"] = tmp_path / "absent.crt"
    elif case == "root-cert-is-a-key":
        kw["root_cert"] = site["certs"]["server.key"]
    elif case == "root-cert-is-the-server-cert":
        kw["root_cert"] = site["certs"]["server.crt"]
    elif case == "no-key":
        kw["key"] = tmp_path / "absent.key"
    elif case == "key-is-the-public-key":
        kw["key"] = site["pub"]
    elif case == "key-readable-by-others":
        k = tmp_path / "loose.key"
        k.write_bytes(site["key"].read_bytes())
        os.chmod(k, 0o644)
        kw["key"] = k
    elif case == "key-not-the-identity":
        kw["key"] = keygen(tmp_path / "other")[0]
    elif case == "no-policy":
        kw["policy"] = tmp_path / "privacy.toml"
    elif case == "bad-server":
        kw["server"] = "example.org"
    with pytest.raises(FedrecInputError, match=match) as err:
        _pre(site, **kw)
    assert "\n" not in str(err.value)


def test_start_refuses_a_missing_ledger_and_an_exhausted_budget(site, tmp_path):
    import shutil

    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.ledger import PrivacyLedger

    data = tmp_path / "inst"
    shutil.copytree(site["data"], data)
    policy = (data / "privacy.toml").read_text()
    ledger = data / "privacy-ledger.db"
    moved = tmp_path / "ledger.db"
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{ledger}{suffix}").exists():
            shutil.move(f"{ledger}{suffix}", f"{moved}{suffix}")
    with pytest.raises(FedrecInputError, match="no privacy ledger here"):
        _pre(site, data=data)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{moved}{suffix}").exists():
            shutil.move(f"{moved}{suffix}", f"{ledger}{suffix}")
    PrivacyLedger(ledger).charge(GaussianEvent(noise_multiplier=2.0), run_id="r1", round=1, task="train", model="mf")
    # the institution lowers its cap below what was spent: nothing may be released any more
    (data / "privacy.toml").write_text(policy.replace("epsilon-cap = 10.0", "epsilon-cap = 0.5")
                                       .replace("max-run-epsilon = 4.0", "max-run-epsilon = 0.5"))
    with pytest.raises(BudgetExceeded, match="budget is exhausted"):
        _pre(site, data=data)


def test_start_refuses_a_server_its_root_certificate_does_not_verify(site, tmp_path):
    other = write_dev_certs(tmp_path / "other-ca")  # a server certified by another CA
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(other["server.crt"], other["server.key"])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(10)
    port = srv.getsockname()[1]

    def serve():
        try:
            conn, _ = srv.accept()
            try:
                ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(FedrecInputError, match="does not verify"):
            _pre(site, server=f"127.0.0.1:{port}", probe=True)
    finally:
        srv.close()
        t.join(timeout=10)


def test_the_cli_prints_one_line_and_exits_non_zero(site, tmp_path):
    res = subprocess.run([str(BIN / "fedrec-client"), "start", "--data", str(site["data"]), "--server",
                          "127.0.0.1:1", "--root-cert", str(tmp_path / "absent.crt"), "--key", str(site["key"])],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "400", "FLWR_TELEMETRY_ENABLED": "0"})
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "--root-cert" in errors[0] and "fix:" in errors[0], res.stderr


# ------------------------------------------------------------------ the commands we start

def test_the_superlink_binds_loopback_with_tls_auth_and_a_database(tmp_path):
    from fedrec.server.deploy import Coordinator, superlink_command

    coord = Coordinator(tmp_path / "state")
    cmd = superlink_command(coord, certs=tmp_path / "certs", port=9093)
    flags = {a: b for a, b in zip(cmd, cmd[1:])}
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "9093"
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd
    assert flags["--database"] == str(coord.database)
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "server.crt"), ("--ssl-keyfile", "server.key")):
        assert flags[flag] == str((tmp_path / "certs" / name).resolve())


def test_flower_runs_with_telemetry_off_everywhere(tmp_path, monkeypatch):
    from fedrec.client.deploy import supernode_env
    from fedrec.server.deploy import Coordinator, flower_env

    for var in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(var, "1" if var != "FLWR_DISABLE_UPDATE_CHECK" else "0")
    for env in (flower_env(), Coordinator(tmp_path).env(), supernode_env()):
        assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert Coordinator(tmp_path).env()["FLWR_HOME"] == str((tmp_path / "flwr-home").resolve())


def test_the_supernode_gets_tls_its_key_and_the_institutions_policy(site, tmp_path):
    from fedrec.client.deploy import supernode_command

    policy = tmp_path / "elsewhere.toml"
    policy.write_bytes((site["data"] / "privacy.toml").read_bytes().replace(
        b'ledger = "privacy-ledger.db"', f'ledger = "{site["data"] / "privacy-ledger.db"}"'.encode())
        .replace(b'roster = "', b'roster = "'))
    pf = _pre(site, policy=policy)
    cmd = supernode_command(pf, server="127.0.0.1:9092", root_cert=site["certs"]["ca.crt"], key=site["key"],
                            runtime_port=9200)
    flags = {a: b for a, b in zip(cmd, cmd[1:])}
    assert "--insecure" not in cmd
    assert flags["--root-certificates"] == str(site["certs"]["ca.crt"].resolve())
    assert flags["--auth-supernode-private-key"] == str(site["key"].resolve())
    assert flags["--node-config"] == f'data-dir="{site["data"].resolve()}" policy="{policy.resolve()}"'
    assert flags["--host"] == "127.0.0.1"


# ------------------------------------------------------------------ registering: Flower's exit status lies

def test_register_detects_a_failure_that_flwr_reports_with_exit_code_0(tmp_path):
    """`flwr supernode register` exits 0 when it fails (here: no SuperLink on the connection's
    port); `register` must read the JSON answer, fail with Flower's reason, and not add the
    institution to the roster."""
    from fedrec.common.errors import RunFailed
    from fedrec.server.deploy import Coordinator, flower_bin, register, roster_path

    _, pub, _ = keygen(tmp_path / "id")
    certs = write_dev_certs(tmp_path / "certs")
    coord = Coordinator(tmp_path / "state")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coord.write_connection(f"127.0.0.1:{port}", certs["ca.crt"])
    raw = subprocess.run([flower_bin("flwr"), "supernode", "register", str(pub), "fedrec", "--name", "x", "--format",
                          "json"], env=coord.env(), capture_output=True, text=True, timeout=120)
    assert raw.returncode == 0 and '"success": false' in raw.stdout, (raw.returncode, raw.stdout)  # the Flower fact
    with pytest.raises(RunFailed, match="registering .* failed: .*unavailable"):
        register(coord, pub, name="institution_00", timeout=120)
    assert not roster_path(coord).exists()


def test_the_run_id_is_read_from_flwr_runs_output():
    from fedrec.server.deploy import started_run_id

    assert started_run_id("Loading project configuration...\n🎊 Successfully started run 8123456789\n") == "8123456789"
    assert started_run_id("❌ Run failed to start") is None
