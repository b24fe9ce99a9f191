"""Causal-estimation message handlers of the fedrec ClientApp (one per protocol step).

Importing this module registers, on :data:`fedrec.client.app.app`:

* ``query.causal_study`` — the public study declaration (design columns with their declared
  bounds, outcome bounds, better direction, item ids). Nothing computed on data; no charge.
* ``query.causal_moments`` / ``query.causal_propensity`` / ``query.causal_outcome_range`` /
  ``query.causal_outcome`` / ``query.causal_scale`` /
  ``query.causal_jacobian`` / ``query.causal_influence`` — one
  DP release each (client/statistics.py): the study is validated, then the step's
  ``GaussianEvent`` is **charged** to the institution's ledger (write-ahead; a charge over the
  cap is refused with the reason), then the clipped sums are computed and noised, the reply
  leaves, and the charge is marked released.

The lead wires it with one line at the bottom of client/app.py::

    from fedrec.client import causal_app as _causal_app  # noqa: E402,F401  (registers causal handlers)

(``fedrec.client.causal_app:app`` is the same ClientApp object, so a simulation can also name
this module as its client app.)
"""

from __future__ import annotations

import json
import logging
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.client.app import app, ledger_path
from fedrec.client.guard import open_guard
from fedrec.client.statistics import design_columns, release, step_contributions
from fedrec.common.causal.estimators import CausalConfig, release_sensitivity
from fedrec.common.config import RunConfig
from fedrec.common.datasets import InstitutionData, load_institution
from fedrec.common.errors import BudgetExceeded, FedrecInputError
from fedrec.common.privacy.accountant import GaussianEvent
from fedrec.common.schema import STUDY_FILE

log = logging.getLogger(__name__)

__all__ = ["app", "node_folder", "split_config"]


def split_config(run_config) -> tuple[RunConfig, CausalConfig]:
    """(RunConfig, CausalConfig) from a run config that also carries ``causal.*`` keys."""
    flat = {k: v for k, v in dict(run_config).items()}
    return (RunConfig.from_flat({k: v for k, v in flat.items() if not k.startswith("causal.")}),
            CausalConfig.from_flat(flat))


def node_folder(context: Context, cfg: RunConfig) -> Path:
    """This node's institution folder: ``data-dir`` of the node config (deployment), else
    the ``partition-id``-th institution folder (sub-folder with study.toml, name order) of the
    run's ``data-dir`` (simulation)."""
    node = context.node_config
    if "data-dir" in node:
        return Path(str(node["data-dir"]))
    root = Path(cfg.data.data_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / STUDY_FILE).is_file())
    return folders[int(node["partition-id"])]


_ROWS: dict = {}  # encoded rows per (institution, item), reused across the run's steps


@lru_cache(maxsize=16)
def _load(folder: str) -> InstitutionData:
    return load_institution(Path(folder))


def _declaration(data: InstitutionData, ccfg: CausalConfig) -> str:
    cols = design_columns(data, ccfg.covariates, ccfg.derived)
    st = data.study
    return json.dumps({"columns": [list(c) for c in cols], "outcome_bounds": list(st.outcome_bounds),
                       "better": st.outcome_better,
                       "items": sorted(data.items["item_id"].astype(str).tolist())}, sort_keys=True)


def _refusal(msg: Message, reason: str) -> Message:
    return Message(RecordDict({"refusal": ConfigRecord({"reason": reason})}), reply_to=msg)


@app.query("causal_study")
def causal_study(msg: Message, context: Context) -> Message:
    """Public declarations only (no data values): nothing to charge."""
    cfg, ccfg = split_config(context.run_config)
    try:
        data = _load(str(node_folder(context, cfg)))
        cov = json.loads(str(msg.content["config"]["covariates"])) if "config" in msg.content.config_records else None
        ccfg = CausalConfig(**{**ccfg.__dict__, "covariates": None if cov is None else tuple(cov)})
        decl = _declaration(data, ccfg)
    except FedrecInputError as err:
        return _refusal(msg, str(err))
    return Message(RecordDict({"study": ConfigRecord({"declaration": decl})}), reply_to=msg)


def _step(msg: Message, context: Context, kind: str) -> Message:
    """Validate -> charge -> compute clipped sums + noise -> reply -> released."""
    cfg, ccfg = split_config(context.run_config)
    conf = msg.content["config"]
    step = str(conf["step"])
    items = [str(i) for i in json.loads(str(conf["items"]))]
    sigma = float(conf["noise-multiplier"])
    server_round = int(conf["server-round"])
    arrays = {k: v.numpy().astype(np.float64) for k, v in msg.content["arrays"].items()} \
        if "arrays" in msg.content.array_records else {}
    try:  # validation before any charge
        data = _load(str(node_folder(context, cfg)))
        p = len(design_columns(data, ccfg.covariates, ccfg.derived)) + 1
        known = set(data.items["item_id"].astype(str))
        missing = [i for i in items if i not in known]
        if missing:
            raise FedrecInputError(f"items {missing} are not in this institution's catalogue")
        if not (sigma >= 0 and math.isfinite(sigma)):
            raise FedrecInputError(f"noise multiplier {sigma} is not usable")
        if sigma == 0 and ccfg.dp:
            raise FedrecInputError("the server asked for a release without noise while DP is on")
        try:  # the server's public choices (radius, clips, coordinate weights) must give a bound
            sens = release_sensitivity(kind, p, arrays, len(items), items)
        except ValueError as err:
            raise FedrecInputError(f"step {step}: {err}") from None
    except FedrecInputError as err:
        return _refusal(msg, str(err))
    guard = open_guard(ledger_path(context, cfg, data.name), institution=data.name, cfg=cfg)
    charge = None
    event = None
    if sigma > 0:
        # the release's L2 sensitivity (public: declared bounds + the server's public choices,
        # computed above), recorded for the audit; released() below once the reply is built
        event = GaussianEvent(noise_multiplier=sigma, sensitivity=sens)
        try:
            charge = guard.charge(event, run_id=str(context.run_id), round=server_round, task=f"causal-{step}",
                                  model="causal")
        except BudgetExceeded as err:
            return _refusal(msg, str(err))
    blocks = step_contributions(kind, data, items, arrays, estimator=ccfg.estimator, trim=ccfg.trim,
                                covariates=ccfg.covariates, derived=ccfg.derived, cache=_ROWS)
    sums, sens = release(blocks, noise_multiplier=sigma, noise_mode=ccfg.noise_mode, n_min=max(ccfg.n_min, 1))
    eps_prv, eps_rdp = guard.spent(delta=ccfg.delta)
    from fedrec.common.privacy.gaussian import noise_std

    nstd = 0.0 if sigma == 0 else noise_std(sensitivity=sens, noise_multiplier=sigma, noise_mode=ccfg.noise_mode,
                                            n_min=max(ccfg.n_min, 1))
    metrics = MetricRecord({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": ccfg.delta,
                            "noise-var": nstd**2, "sensitivity": sens})
    from flwr.app import Array

    reply = Message(RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sums.items()}),
                                "metrics": metrics}), reply_to=msg)
    if charge is not None:
        guard.released(charge)
    return reply


@app.query("causal_moments")
def causal_moments(msg: Message, context: Context) -> Message:
    return _step(msg, context, "moments")


@app.query("causal_propensity")
def causal_propensity(msg: Message, context: Context) -> Message:
    return _step(msg, context, "propensity")


@app.query("causal_outcome")
def causal_outcome(msg: Message, context: Context) -> Message:
    return _step(msg, context, "outcome")


@app.query("causal_scale")
def causal_scale(msg: Message, context: Context) -> Message:
    return _step(msg, context, "scale")


@app.query("causal_outcome_range")
def causal_outcome_range(msg: Message, context: Context) -> Message:
    return _step(msg, context, "outcome-range")


@app.query("causal_jacobian")
def causal_jacobian(msg: Message, context: Context) -> Message:
    return _step(msg, context, "jacobian")


@app.query("causal_influence")
def causal_influence(msg: Message, context: Context) -> Message:
    return _step(msg, context, "influence")
