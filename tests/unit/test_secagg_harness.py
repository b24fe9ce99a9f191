"""Test-only helpers shared by the SecAgg+ tests (no tests here): an in-process grid and a
client app with controllable dropouts, also used by tests/integration/test_secagg_flower.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import Error
from flwr.clientapp import ClientApp

from fedrec.client.secagg_mod import SECAGG_RECORD, secaggplus_mod

FAIL_PLAN_ENV = "FEDREC_TEST_SECAGG_FAIL_PLAN"
POLICY_DIR_ENV = "FEDREC_TEST_SECAGG_POLICY_DIR"


def provision(root: Path, names: list[str], *, min_round_size: int = 2) -> dict[str, Path]:
    """What an institution's IT does (policy with identity key and roster), for each name:
    ``root/<name>/privacy.toml`` naming ``root/<name>/identity.pem`` and ``root/roster.toml``."""
    from fedrec.common.privacy.policy import InstitutionPolicy, write_policy
    from fedrec.common.secagg._identity import write_identity, write_roster

    root = Path(root)
    keys = {name: root / name / "identity.pem" for name in names}
    roster = write_roster(root / "roster.toml", {name: write_identity(keys[name]) for name in names})
    out = {}
    for name in names:
        pol = InstitutionPolicy(ledger=root / name / "ledger.db", min_round_size=min_round_size,
                                noise_modes=("local", "distributed"), identity_key=keys[name], roster=roster,
                                source=root / name / "privacy.toml")
        out[name] = write_policy(root / name / "privacy.toml", pol)
    return out


def identities(n: int):
    """In-memory identities and one shared roster for ``n`` institutions (protocol-level tests)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedrec.common.secagg._identity import CURVE, Identity, Roster

    # the first institution keeps a P-384 key made before P-256 became the default: every
    # protocol test then runs a mixed federation
    keys = {f"inst-{i:03d}": ec.generate_private_key(ec.SECP384R1() if i == 0 else CURVE()) for i in range(n)}
    roster = Roster({name: k.public_key() for name, k in keys.items()})
    return [Identity(name=name, key=k, roster=roster) for name, k in keys.items()]


def policy_mod(msg: Message, context: Context, call_next):
    """Simulation only: point the node at the provisioned policies (run_simulation takes no run config)."""
    root = os.environ.get(POLICY_DIR_ENV)
    if root and "sim.policy-dir" not in context.run_config:
        from flwr.app import Context

        # Flower forbids editing run_config: hand the next layer a context that carries it (same state)
        context = Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                          state=context.state, run_config={**dict(context.run_config), "sim.policy-dir": root})
    return call_next(msg, context)


def client_vector(node_id: int, server_round: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([node_id % (2**32), server_round])
    v = rng.uniform(-1, 1, dim).astype(np.float32)
    return {"w": v[: dim // 2].reshape(-1, 1), "b": v[dim // 2:]}


def _plan() -> dict:
    path = os.environ.get(FAIL_PLAN_ENV)
    if not path or not Path(path).exists():
        return {}
    return json.loads(Path(path).read_text())


def dropout_mod(msg: Message, context: Context, call_next):
    """Fails (raises) at the stage the fail plan names for this node id; or refuses ("refuse")."""
    plan = _plan()
    rec = msg.content.config_records.get(SECAGG_RECORD)
    stage = str(rec["stage"]) if rec is not None else "plain"
    action = plan.get(str(context.node_id), {}).get(stage)
    if action == "fail":
        raise RuntimeError(f"test dropout at stage {stage}")
    if action == "refuse":
        return Message(RecordDict({"refusal": ConfigRecord({"reason": "budget (test)"})}), reply_to=msg)
    return call_next(msg, context)


def make_client_app(dim: int = 64, noise=None, extra_mods=()) -> ClientApp:
    """``noise(context) -> ndarray|None``: optional client-side noise added to the vector;
    ``extra_mods``: run just outside ``secaggplus_mod`` (they see its replies)."""
    app = ClientApp(mods=[policy_mod, dropout_mod, *extra_mods, secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        r = int(msg.content["config"]["server-round"])
        d = int(msg.content["config"].get("dim", dim))
        if msg.content["config"].get("zero", False):
            arrays = {"w": np.zeros((d // 2, 1), np.float32), "b": np.zeros(d - d // 2, np.float32)}
        else:
            arrays = client_vector(context.node_id, r, d)
        std = float(msg.content["config"].get("noise-std", 0.0))
        if std > 0:
            from fedrec.common.privacy.gaussian import gaussian_noise

            arrays = {k: v + gaussian_noise(v.shape, std=std) for k, v in arrays.items()}
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"node": float(context.node_id % 1000)}),
        })
        return Message(content, reply_to=msg)

    return app


class FakeGrid:
    """In-process stand-in for Flower's Grid: calls the ClientApp per message (unit tests)."""

    def __init__(self, app, n: int, node_config: dict | None = None, *, identities: bool = True,
                 min_round_size: int = 2):
        """Each node is a deployed institution whose policy (node config ``policy``) names its
        identity key and the roster (``identities=False``: a node without them)."""
        import tempfile

        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.app = app
        self.root = Path(tempfile.mkdtemp(prefix="fedrec-secagg-test-"))
        names = [f"inst-{1000 + i}" for i in range(n)]
        policies = provision(self.root, names, min_round_size=min_round_size) if identities else {}
        self.contexts = {}
        for i in range(n):
            cfg = dict(node_config or {})
            if identities and "partition-id" not in cfg:
                cfg.setdefault("policy", str(policies[names[i]]))
            self.contexts[1000 + i] = Context(run_id=1, node_id=1000 + i, node_config=cfg, state=RecordDict(),
                                              run_config={})
        self.silent: set[int] = set()
        self.received: list[Message] = []
        self.tamper = None  # callable(msg) -> msg

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.received)}-{i}"
            nid = m.metadata.dst_node_id
            if nid in self.silent:
                continue
            if self.tamper is not None:
                m = self.tamper(m)
            try:
                r = self.app(m, self.contexts[nid])
            except Exception as err:  # noqa: BLE001 - what Flower does: an error reply
                r = Message(Error(code=0, reason=str(err)), reply_to=m)
            out.append(r)
        self.received.extend(out)
        return out


def train_content(server_round: int, dim: int = 64, **config) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros((dim // 2, 1), np.float32)),
                               "b": Array(np.zeros(dim - dim // 2, np.float32))}),
        "config": ConfigRecord({"server-round": server_round, "dim": dim, **config}),
    })


def write_plan(path: Path, plan: dict) -> None:
    path.write_text(json.dumps({str(k): v for k, v in plan.items()}))
