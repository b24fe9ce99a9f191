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
from fedrec.common.ratings import CATALOGUE_FILE, InstitutionRatings, load_institution_ratings
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
    data = load_institution_ratings(Path(folder))
    ratings = PersonRatings.from_arrays(data.train_person, data.train_item, data.train_rating, data.n_persons)
    negatives = sample_negatives(
        data.rated_by_person(), data.n_items, cfg.eval.negatives, seed=cfg.data.seed + _stable_int(data.name)
    )
    return Institution(data=data, ratings=ratings, negatives=negatives, schedule=plan_dp(cfg, data.n_persons))


def _institution(context: Context) -> tuple[RunConfig, Institution]:
    cfg = RunConfig.from_flower(context.run_config)
    folder = institution_folder(context, cfg)
    return cfg, _load(str(folder), tuple(sorted(cfg.to_flat().items())))


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _trainer(inst: Institution, cfg: RunConfig) -> MFTrainer:
    lo, hi = inst.data.bounds
    return MFTrainer(inst.ratings, inst.data.n_items, cfg, global_bias=(lo + hi) / 2)


def catalogue_fingerprint(folder: Path) -> tuple[int, str]:
    """(number of items, sha256 of the sorted item ids) of the public catalogue."""
    import pandas as pd

    ids = np.sort(pd.read_parquet(folder / CATALOGUE_FILE, columns=["item_id"])["item_id"].to_numpy(np.int64))
    return len(ids), hashlib.sha256(ids.tobytes()).hexdigest()


# ---------------------------------------------------------------------- handlers
@app.query("catalogue")
def catalogue(msg: Message, context: Context) -> Message:
    """Public information only: the catalogue's size and fingerprint."""
    cfg = RunConfig.from_flower(context.run_config)
    n_items, digest = catalogue_fingerprint(institution_folder(context, cfg))
    return Message(RecordDict({"catalogue": ConfigRecord({"n-items": n_items, "sha256": digest})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, inst = _institution(context)
    server_round = int(msg.content["config"]["server-round"])
    guard = _guard(context, cfg, inst.data.name)
    charge = None
    if inst.schedule is not None and guard is not None:
        try:  # write-ahead: charged and committed before any computation touches the data
            charge = guard.charge(
                inst.schedule.round_event(), run_id=str(context.run_id), round=server_round, task="train", model="mf"
            )
        except BudgetExceeded as err:
            return Message(RecordDict({"refusal": ConfigRecord({"reason": str(err)})}), reply_to=msg)
    trainer = _trainer(inst, cfg)
    global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    delta, stats = trainer.train_round(global_arrays, inst.schedule)
    metrics = {"clipped-fraction": stats["clipped_fraction"]}
    if guard is not None:
        if charge is not None:
            guard.released(charge)
        eps_prv, eps_rdp = guard.spent(delta=cfg.privacy.delta)
        metrics.update({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": cfg.privacy.delta})
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: _array(v) for k, v in delta.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics as additive sums (a release of institution data: simulations only)."""
    cfg, inst = _institution(context)
    if cfg.eval.metrics_release != "simulation":
        return Message(RecordDict({"refusal": ConfigRecord({"reason": "metrics release is off"})}), reply_to=msg)
    trainer = _trainer(inst, cfg)
    trainer.refit({k: v.numpy() for k, v in msg.content["arrays"].items()})
    d = inst.data
    sums = evaluation_sums(trainer, d.test_person, d.test_item, d.test_rating, inst.negatives, bounds=d.bounds, k=cfg.eval.k)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=msg)


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(v, dtype=np.float32))


def _guard(context: Context, cfg: RunConfig, institution: str):
    """The institution's release guard over its SQLite ledger (client/guard.py)."""
    try:
        from fedrec.client.guard import open_guard
    except ImportError:  # TEMPORARY until the ledger lands
        return _StateGuard(context)
    return open_guard(ledger_path(context, cfg, institution), institution=institution, cfg=cfg)


class _StateGuard:  # TEMPORARY: history in context.state
    def __init__(self, context: Context):
        self.context = context

    def charge(self, event, **_):
        rec = self.context.state.config_records.setdefault("dp-history", ConfigRecord({"s": [], "q": [], "n": []}))
        rec["s"] = list(rec["s"]) + [event.noise_multiplier]
        rec["q"] = list(rec["q"]) + [event.sample_rate]
        rec["n"] = list(rec["n"]) + [event.steps]
        return None

    def released(self, charge) -> None:
        pass

    def spent(self, *, delta):
        from fedrec.common.privacy.accountant import DPSGDEvent, epsilon_for

        rec = self.context.state.config_records.get("dp-history")
        if rec is None:
            return 0.0, 0.0
        evs = [DPSGDEvent(noise_multiplier=s, sample_rate=q, steps=n) for s, q, n in zip(rec["s"], rec["q"], rec["n"])]
        return epsilon_for(evs, delta=delta, accountant="prv"), epsilon_for(evs, delta=delta, accountant="rdp")
