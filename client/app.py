"""The fedrec Flower ClientApp: what runs at an institution.

Message handlers (Flower Message API):

* ``query`` ``catalogue`` — the public item catalogue's size and fingerprint, so the server
  can size the shared model and check that every institution uses the same catalogue.
* ``query`` ``counts`` — the DP item counts, once per run; the whole run's plan is checked
  against the institution's budget and policy first (refused up front, nothing charged).
* ``train`` — one round of local DP-SGD on the MF item side. What the run config asks for is
  first checked against the institution's own policy (client/guard.py: ε, δ, noise mode,
  n_min against the round's size); then the round's mechanism event is charged to the
  institution's ledger (write-ahead); the noise added is the charged event's
  (common/privacy/release.py). A refusal reaches the server as a generic code (the server
  counts the node as dropped); the detail stays in the institution's log. The reply carries
  only the item-side delta (already noised) and public accounting metrics (ε spent so far).
* ``evaluate`` — held-out metrics as sums; only with ``eval.metrics-release = simulation``.

Privacy contract of ``train``: see ``client/train.py``; the user side never appears in any
reply (tested by inspecting payloads).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec.common.config import RunConfig, derive_seed
from fedrec.common.metrics import sample_negatives
from fedrec.common.privacy.accountant import NonPrivateEvent
from fedrec.common.ratings import InstitutionRatings, load_institution_ratings
from fedrec.client.guard import Refusal, ReleaseGuard, ReleaseRequest
from fedrec.client.node import NOISE_RECORD, is_simulated, node_guard, noise_record, private_errors, secagg_round_size

if TYPE_CHECKING:  # torch and opacus load in the handlers that train, not at import (docs/deploy.md:
    # a deployed node starts one process per message; SecAgg+ stages need neither)
    from fedrec.client.train import DPSchedule, MFTrainer
    from fedrec.common.models.mf import PersonRatings

log = logging.getLogger(__name__)

__all__ = ["app", "institution_folder", "catalogue_fingerprint", "simulation_seed"]


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


@dataclass
class Institution:
    data: InstitutionRatings
    ratings: PersonRatings
    negatives: np.ndarray
    schedule: DPSchedule | None


def _load(folder: str, cfg_items: tuple) -> Institution:
    """The institution's loaded data and DP plan, cached per process on the folder, the run
    config and the folder's files (:func:`_folder_signature`): a changed, added or removed
    file, or a changed config, is a new key and reloads — never a stale entry. A deployed
    node's process holds only its own institution; in simulation one process plays every
    institution, so this cache holds all of theirs (the simulation harness owns that data)."""
    return _load_cached(folder, cfg_items, _folder_signature(Path(folder)))


@lru_cache(maxsize=2048)  # a simulation's every institution (one process plays them all; docs/simulate.md)
def _load_cached(folder: str, cfg_items: tuple, files: tuple) -> Institution:
    from fedrec.client.train import plan_dp
    from fedrec.common.models.mf import PersonRatings

    cfg = RunConfig.from_flat(dict(cfg_items))
    data = _load_ratings(Path(folder), cfg)
    ratings = PersonRatings.from_arrays(data.train_person, data.train_item, data.train_rating, data.n_persons)
    negatives = sample_negatives(
        data.rated_by_person(), data.n_items, cfg.eval.negatives, seed=cfg.data.seed + _stable_int(data.name)
    )
    return Institution(data=data, ratings=ratings, negatives=negatives, schedule=plan_dp(cfg))


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


#: what the loaders read in an institution folder: its tables (CSV or Parquet) and study.toml
_DATA_SUFFIXES = (".csv", ".parquet")
_STUDY_FILE = "study.toml"


def _folder_signature(folder: Path) -> tuple:
    """(name, size, mtime_ns, inode) of every data file in the institution folder (the tables
    and study.toml the loaders read): the cache key's part that changes whenever the data does.
    The node's own files there (privacy.toml, the ledger and its -wal/-shm, keys) are left out:
    the ledger changes with every release, and would otherwise make every message a new entry.
    ``()`` for a missing folder (the loader then raises its own one-line error)."""
    try:
        with os.scandir(folder) as it:
            stats = [(e.name, e.stat()) for e in it
                     if e.name == _STUDY_FILE or e.name.lower().endswith(_DATA_SUFFIXES)]
    except OSError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats))


_load.cache_clear = _load_cached.cache_clear  # type: ignore[attr-defined]  # tests reset the cache


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _trainer(inst: Institution, cfg: RunConfig, seed: int | None = None) -> MFTrainer:
    from fedrec.client.train import MFTrainer

    # the public, declared rating scale sets the MF global offset (never the data's mean)
    return MFTrainer(inst.ratings, inst.data.n_items, cfg, bounds=inst.data.bounds, seed=seed)


def simulation_seed(context: Context, cfg: RunConfig, *labels: object) -> int | None:
    """The seed of one release's noise in a **simulation**, else None (the OS CSPRNG).

    ``sim.noise-seed`` (>= 0) makes a simulation reproducible: each release gets its own seed,
    derived from it and ``labels`` (institution, task, round). Only a simulated node (Flower
    simulation's ``partition-id``, :func:`~fedrec.client.node.is_simulated`) honours it: a
    deployed node ignores the knob — a coordinator who could fix an institution's noise could
    subtract it — and draws every release's noise from the CSPRNG.
    """
    base = cfg.sim.noise_seed
    if base < 0:
        return None
    if not is_simulated(context):
        log.warning("ignored sim.noise-seed from the run config: a deployed node's noise comes from the OS CSPRNG")
        return None
    return derive_seed(base, *labels)


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
@private_errors
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
@private_errors
def counts(msg: Message, context: Context) -> Message:
    """Weighted item counts N_i (Gaussian release, sensitivity 1), once per run, before round 1.

    The whole run's plan (this release and every round) is checked against the institution's
    remaining budget and per-run ceiling first: a run that cannot finish is refused here,
    before anything is charged. The server turns the counts' secure sum into the public
    per-item step size.
    """
    cfg, inst = _institution(context)
    guard, share = _authorized(msg, context, cfg, inst)
    sched = inst.schedule
    if sched is not None:
        guard.check_plan(sched.run_events(), run_id=str(context.run_id))
    event = sched.count_event() if sched is not None else NonPrivateEvent()

    def compute(charge):
        seed = simulation_seed(context, cfg, inst.data.name, "item-counts", 0)
        counts = _trainer(inst, cfg, seed).item_counts(charge.event if sched is not None else None, noise_share=share)
        # public: the variance of the count noise (the server denoises counts with it)
        return {"counts": counts}, {"count-noise-var": 0.0 if sched is None else sched.count_noise_std(share) ** 2}

    return _release(msg, context, cfg, inst, guard, share, task="item-counts", event=event, compute=compute)


@app.train()
@private_errors
def train(msg: Message, context: Context) -> Message:
    """One round of local DP-SGD on the item side; replies with the (noised) item-side delta."""
    cfg, inst = _institution(context)
    guard, share = _authorized(msg, context, cfg, inst)
    global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    if cfg.train.model == "adapter":
        return _adapter_train(msg, context, cfg, inst, guard, share, global_arrays)
    precond = msg.content["precond"]["precond"].numpy() if "precond" in msg.content.array_records else None
    sched = inst.schedule
    event = sched.round_event() if sched is not None else NonPrivateEvent()
    seed = simulation_seed(context, cfg, inst.data.name, "train", int(msg.content["config"]["server-round"]))
    trainer = _trainer(inst, cfg, seed)
    _check_public_model(global_arrays, {k: v.shape for k, v in trainer.item_side.to_numpy().items()}, precond,
                        n_items=trainer.item_side.n_items)

    def compute(charge):
        charged = charge.event if sched is not None else None
        return trainer.train_round(global_arrays, precond, event=charged, noise_share=share), {}

    return _release(msg, context, cfg, inst, guard, share, task="train", event=event, compute=compute)


def _check_public_model(global_arrays: dict[str, np.ndarray], shapes: dict[str, tuple], precond: np.ndarray | None,
                        *, n_items: int) -> None:
    """The coordinator's item side and step sizes, checked before the charge
    (common/privacy/public_inputs.py: a NaN or a huge value would make the release say, without
    noise, whose records touch it; a wrong shape would fail after the charge)."""
    from fedrec.common.privacy.public_inputs import check_model_arrays

    try:
        check_model_arrays(global_arrays, shapes, what="global MF item side")
        if precond is None:
            raise ValueError("no per-item step sizes (precond) in the training message")
        check_model_arrays({"precond": precond}, {"precond": (n_items,)}, what="per-item step sizes")
    except ValueError as err:
        raise Refusal("policy", str(err)) from None


def _authorized(msg: Message, context: Context, cfg: RunConfig, inst: Institution) -> tuple[ReleaseGuard, float]:
    """The institution's guard, and the noise share its policy accepts for this request."""
    guard = node_guard(context, institution_folder(context, cfg), inst.data.name, accountant=cfg.privacy.accountant)
    p = cfg.privacy
    share = guard.authorize(ReleaseRequest(epsilon=p.epsilon, delta=p.delta, noise_mode=p.noise_mode,
                                           n_min=cfg.n_min, round_size=secagg_round_size(msg)))
    return guard, share


def _release(msg: Message, context: Context, cfg: RunConfig, inst: Institution, guard: ReleaseGuard, share: float,
             *, task: str, event, compute) -> Message:
    """Charge (write-ahead) -> compute on the data with the charged event's noise -> reply ->
    mark released. A refused charge raises :class:`Refusal` before any data is touched.

    The reply's metrics are public accounting facts only: ε spent (PRV and RDP), δ, and the
    variance of the gradient noise this institution adds per coordinate (a function of the
    charged σ, the public clip and the noise share; the server needs it for the Wiener step).
    Nothing data-dependent (no clipped fraction, no count, no error text) is in it.
    """
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content.config_records else 0
    charge = guard.charge(event, run_id=str(context.run_id), round=server_round, task=task, model="mf")
    arrays, metrics = compute(charge)
    eps_prv, eps_rdp = guard.spent(delta=cfg.privacy.delta)
    sched = inst.schedule
    noise_sd = 0.0 if sched is None else sched.noise_std(share)
    metrics.update({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": cfg.privacy.delta, "noise-var": noise_sd**2})
    content = RecordDict({"arrays": ArrayRecord({k: _array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    if cfg.privacy.noise_mode == "distributed" and sched is not None:
        content[NOISE_RECORD] = noise_record(cfg.n_min)
    reply = Message(content, reply_to=msg)
    guard.released(charge)
    return reply


@app.evaluate()
@private_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Held-out metrics as additive sums: a release of institution data without DP, so only a
    simulated node (ground truth is the simulation's own) or a deployed node whose node config
    says ``metrics-release = simulation`` answers; the run config cannot switch it on."""
    cfg, inst = _institution(context)
    if cfg.eval.metrics_release != "simulation":
        raise Refusal("policy", "metrics release is off")
    if "partition-id" not in context.node_config and context.node_config.get("metrics-release") != "simulation":
        raise Refusal("policy", "this institution releases no non-DP metrics (node config metrics-release != "
                                "simulation)")
    if cfg.train.model == "adapter":
        return _adapter_evaluate(msg, context, cfg, inst)
    from fedrec.client.train import evaluation_sums

    trainer = _trainer(inst, cfg)
    trainer.refit({k: v.numpy() for k, v in msg.content["arrays"].items()})
    d = inst.data
    sums = evaluation_sums(trainer, d.test_person, d.test_item, d.test_rating, inst.negatives, bounds=d.bounds, k=cfg.eval.k)
    if cfg.train.model == "hybrid":  # ranking by the hybrid (client/adapter_round.py); rating error stays MF's
        sums.update(_hybrid_ranking_sums(msg, cfg, inst, trainer, institution_folder(context, cfg)))
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=msg)


def _hybrid_ranking_sums(msg: Message, cfg: RunConfig, inst: Institution, trainer, folder: Path) -> dict[str, float]:
    """The hybrid's held-out ranking sums from the server's public DP counts, the refitted MF and
    the text prior (no new release of training data: post-processing, scored locally)."""
    import torch

    from fedrec.client.adapter_round import hybrid_eval_sums
    from fedrec.common.models.mf import score_items, weighted_item_counts

    if "hybrid" not in msg.content.array_records:
        raise Refusal("data", "hybrid evaluation needs the released DP item counts from the server")
    counts = msg.content["hybrid"]["counts"].numpy()
    noise_var = float(msg.content["hybrid-config"]["count-noise-var"])

    def mf_score(persons: np.ndarray, cands: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return score_items(trainer.item_side, trainer.user, torch.as_tensor(persons), torch.as_tensor(cands)).numpy()

    # popularity for the institution's own people: its exact counts (never released; the same
    # weighting as the released ones) pooled with the DP counts (common/models/hybrid.py)
    own = weighted_item_counts(trainer.ratings, trainer.item_side.n_items).numpy().astype(np.float64)
    rows = int(trainer.ratings.item.numel())
    d = inst.data
    return hybrid_eval_sums(folder, cfg, mf_score, counts, noise_var, d.test_person, d.test_item, inst.negatives,
                            k=cfg.eval.k, own_counts=own, mean_weight=float(own.sum()) / max(rows, 1))


def _adapter_train(msg: Message, context: Context, cfg: RunConfig, inst: Institution, guard: ReleaseGuard,
                   share: float, global_arrays: dict[str, np.ndarray]) -> Message:
    """One adapter round (client/adapter_round.py): charged, noised with the charged event,
    only LoRA + head deltas in the reply, public accounting metrics."""
    from fedrec.client.adapter_round import adapter_state, adapter_train_release

    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content.config_records else 0
    state = adapter_state(institution_folder(context, cfg), cfg, inst.data.n_persons)
    seed = simulation_seed(context, cfg, inst.data.name, "adapter-train", server_round)  # None outside simulation
    delta, metrics, charge = adapter_train_release(state, guard, cfg, share=share, run_id=str(context.run_id),
                                                   server_round=server_round, global_arrays=global_arrays, seed=seed)
    eps_prv, eps_rdp = guard.spent(delta=cfg.privacy.delta)
    metrics.update({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": cfg.privacy.delta})
    content = RecordDict({"arrays": ArrayRecord({k: _array(v) for k, v in delta.items()}),
                          "metrics": MetricRecord(metrics)})
    if cfg.privacy.noise_mode == "distributed" and state.schedule is not None:
        content[NOISE_RECORD] = noise_record(cfg.n_min)
    reply = Message(content, reply_to=msg)
    guard.released(charge)
    return reply


def _adapter_evaluate(msg: Message, context: Context, cfg: RunConfig, inst: Institution) -> Message:
    from fedrec.client.adapter_round import adapter_eval_sums, adapter_state

    state = adapter_state(institution_folder(context, cfg), cfg, inst.data.n_persons)
    d = inst.data
    sums = adapter_eval_sums(state, {k: v.numpy() for k, v in msg.content["arrays"].items()}, d.test_person,
                             d.test_item, inst.negatives, k=cfg.eval.k)
    return Message(RecordDict({"metrics": MetricRecord(sums)}), reply_to=msg)


def _array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(v, dtype=np.float32))


# causal-estimation handlers (query.causal-*) register on this same ClientApp
from fedrec.client import causal_app as _causal_app  # noqa: E402,F401
