"""The fedrec Flower ClientApp: what runs at an institution.

Message handlers (Flower Message API):

* ``query`` ``catalogue`` — the public item catalogue's size and fingerprint, so the server
  can size the shared model and check that every institution uses the same catalogue.
* ``train`` — one round of local DP-SGD on the MF item side. Before anything touches the
  data, the round's mechanism event is charged to the institution's privacy ledger
  (write-ahead); a charge that would exceed the cap is refused and the reply says why (the
  server counts the node as dropped). The reply carries only the item-side delta (already
  noised) and public accounting metrics (ε spent so far).
* ``evaluate`` — held-out metrics as sums; only with ``eval.metrics-release = simulation``.

Privacy contract of ``train``: see ``client/train.py``; the user side never appears in any
reply (tested by inspecting payloads).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.common.config import RunConfig
from fedrec.common.errors import BudgetExceeded
from fedrec.common.metrics import sample_negatives
from fedrec.common.models.mf import PersonRatings
from fedrec.common.ratings import InstitutionRatings, load_institution_ratings
from fedrec.client.guard import ReleaseGuard, open_guard
from fedrec.client.train import DPSchedule, MFTrainer, evaluation_sums, plan_dp

log = logging.getLogger(__name__)

__all__ = ["app", "institution_folder", "catalogue_fingerprint"]


def _mods() -> list:
    try:  # secure aggregation mod (client/secagg_mod.py); see server/secagg_workflow.py
        from fedrec.client.secagg_mod import secaggplus_mod
    except ImportError:  # pragma: no cover - only while the module is absent
        return []
    return [secaggplus_mod]


app = ClientApp(mods=_mods())


# ------------------------------------------------------------------ institution state
def institution_folder(context: Context, cfg: RunConfig) -> Path:
    """This node's data folder: ``data-dir`` in the node config (deployment), else
    ``<run data-dir>/institution_<partition-id>`` (simulation)."""
    node = context.node_config
    if "data-dir" in node:
        return Path(str(node["data-dir"]))
    pid = int(node["partition-id"])
    return Path(cfg.data.data_dir) / f"institution_{pid:02d}"


def ledger_path(context: Context, cfg: RunConfig, institution: str) -> Path:
    node = context.node_config
    if "ledger" in node:
        return Path(str(node["ledger"]))
    root = Path(cfg.privacy.ledger_dir or Path(cfg.data.results_dir or ".") / "ledgers")
    return root / f"{institution}.db"


@dataclass
class Institution:
    data: InstitutionRatings
    ratings: PersonRatings
    negatives: np.ndarray
    schedule: DPSchedule | None


@lru_cache(maxsize=64)
def _load(folder: str, cfg_items: tuple) -> Institution:
    cfg = RunConfig.from_flat(dict(cfg_items))
    data = _load_ratings(Path(folder), cfg)
    ratings = PersonRatings.from_arrays(data.train_person, data.train_item, data.train_rating, data.n_persons)
    negatives = sample_negatives(
        data.rated_by_person(), data.n_items, cfg.eval.negatives, seed=cfg.data.seed + _stable_int(data.name)
    )
    return Institution(data=data, ratings=ratings, negatives=negatives, schedule=plan_dp(cfg, data.n_persons))


def _load_ratings(folder: Path, cfg: RunConfig) -> InstitutionRatings:
    """A folder in the data contract (study.toml: engagement is the signal) or a ratings folder."""
    if (folder / "study.toml").exists():
        from fedrec.common.datasets import load_institution
        from fedrec.common.ratings import institution_ratings_from_contract

        return institution_ratings_from_contract(
            load_institution(folder), test_fraction=cfg.data.test_fraction, seed=cfg.data.seed
        )
    return load_institution_ratings(folder)


def _institution(context: Context) -> tuple[RunConfig, Institution]:
    cfg = RunConfig.from_flower(context.run_config)
    folder = institution_folder(context, cfg)
    return cfg, _load(str(folder), tuple(sorted(cfg.to_flat().items())))


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _trainer(inst: Institution, cfg: RunConfig) -> MFTrainer:
    return MFTrainer(inst.ratings, inst.data.n_items, cfg)


def catalogue_fingerprint(item_ids: np.ndarray, features: np.ndarray | None = None) -> tuple[int, str]:
    """(number of items, sha256 of the item ids in catalogue order and their public features).

    Institutions that disagree on the catalogue or on its metadata would train different
    models under the same item index; the server refuses to start then.
    """
    ids = np.asarray(item_ids).astype(str)
    h = hashlib.sha256("\n".join(ids).encode())
    if features is not None and features.size:
        h.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return len(ids), h.hexdigest()


# ---------------------------------------------------------------------- handlers
@app.query("catalogue")
def catalogue(msg: Message, context: Context) -> Message:
    """Public information only: the catalogue's size, fingerprint and metadata features
    (the item table every institution shares, not anything about its people), and the
    institution's name."""
    _, inst = _institution(context)  # loads and validates the folder once (cached for later tasks)
    features = inst.data.item_features
    if features is None:
        features = np.zeros((inst.data.n_items, 0), np.float32)
    n_items, digest = catalogue_fingerprint(inst.data.item_ids, features)
    record = ConfigRecord({"n-items": n_items, "sha256": digest, "institution": inst.data.name})
    public = ArrayRecord({"item-features": _array(features.astype(np.float32))})
    return Message(RecordDict({"catalogue": record, "public": public}), reply_to=msg)


@app.query("counts")
def counts(msg: Message, context: Context) -> Message:
    """Weighted item counts N_i (Gaussian release, sensitivity 1), once per run.

    The server turns their secure sum into the public per-item step size. Charged to the
    ledger before the data is read.
    """
    cfg, inst = _institution(context)
    return _guarded_release(
        msg, context, cfg, inst, task="item-counts",
        event=None if inst.schedule is None else inst.schedule.count_event(),
        compute=lambda trainer: (
            {"counts": trainer.item_counts(inst.schedule)},
            # public: the variance of the count noise (the server denoises counts with it)
            {"count-noise-var": 0.0 if inst.schedule is None else inst.schedule.count_noise_std ** 2},
        ),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD on the item side; replies with the (noised) item-side delta."""
    cfg, inst = _institution(context)
    global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    precond = msg.content["precond"]["precond"].numpy()

    def compute(trainer: MFTrainer):
        delta, stats = trainer.train_round(global_arrays, inst.schedule, precond)
        return delta, {"clipped-fraction": stats["clipped_fraction"]}

    return _guarded_release(
        msg, context, cfg, inst, task="train",
        event=None if inst.schedule is None else inst.schedule.round_event(), compute=compute,
    )


def _guarded_release(msg: Message, context: Context, cfg: RunConfig, inst: Institution, *, task: str, event, compute) -> Message:
    """Charge (write-ahead) -> compute on the data -> reply -> mark released.

    A refused charge replies with the reason and touches no data. The reply's metrics are
    public accounting facts: ε spent (PRV and RDP), δ, and the variance of the gradient noise
    this institution adds per coordinate (the server needs it for the Wiener step size).
    """
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content.config_records else 0
    guard = _guard(context, cfg, inst.data.name)
    charge = None
    if event is not None:
        try:
            charge = guard.charge(event, run_id=str(context.run_id), round=server_round, task=task, model="mf")
        except BudgetExceeded as err:
            return Message(RecordDict({"refusal": ConfigRecord({"reason": str(err)})}), reply_to=msg)
    arrays, metrics = compute(_trainer(inst, cfg))
    eps_prv, eps_rdp = guard.spent(delta=cfg.privacy.delta)
    sched = inst.schedule
    # per-coordinate std of the gradient noise this institution adds in training (public)
    noise_sd = 0.0 if sched is None else sched.local_noise_multiplier * sched.clip_norm
    metrics.update({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": cfg.privacy.delta, "noise-var": noise_sd**2})
    reply = Message(
        RecordDict({"arrays": ArrayRecord({k: _array(v) for k, v in arrays.items()}), "metrics": MetricRecord(metrics)}),
        reply_to=msg,
    )
    if charge is not None:
        guard.released(charge)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics as additive sums (a release of institution data: simulations only)."""
    cfg, inst = _institution(context)
    if cfg.eval.metrics_release != "simulation":
        return Message(RecordDict({"refusal": ConfigRecord({"reason": "metrics release is off"})}), reply_to=msg)
    if "partition-id" not in context.node_config and context.node_config.get("metrics-release") != "simulation":
        # a deployed institution decides itself: the run config cannot switch non-DP metrics on
        reason = "this institution releases no non-DP metrics (node config metrics-release != simulation)"
        return Message(RecordDict({"refusal": ConfigRecord({"reason": reason})}), reply_to=msg)
    trainer = _trainer(inst, cfg)
    trainer.refit({k: v.numpy() for k, v in msg.content["arrays"].items()})
    d = inst.data
    sums = evaluation_sums(trainer, d.test_person, d.test_item, d.test_rating, inst.negatives, bounds=d.bounds, k=cfg.eval.k)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=msg)


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(v, dtype=np.float32))


def _guard(context: Context, cfg: RunConfig, institution: str) -> ReleaseGuard:
    """The institution's release guard over its SQLite ledger (client/guard.py)."""
    return open_guard(ledger_path(context, cfg, institution), institution=institution, cfg=cfg)


# causal-estimation handlers (query.causal-*) register on this same ClientApp
from fedrec.client import causal_app as _causal_app  # noqa: E402,F401
