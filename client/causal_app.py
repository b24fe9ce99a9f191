"""Causal-estimation message handlers of the fedrec ClientApp (one per protocol step).

Importing this module registers, on :data:`fedrec.client.app.app`:

* ``query.causal_study`` — the public study declaration (design columns with their declared
  bounds, outcome bounds, better direction, item ids). Nothing computed on data; no charge.
* ``query.causal_moments`` / ``query.causal_propensity`` / ``query.causal_outcome_range`` /
  ``query.causal_outcome`` / ``query.causal_scale`` /
  ``query.causal_influence`` — one
  DP release each (client/statistics.py): the study is validated, the run's request (ε, δ,
  noise mode, n_min against the round's size) is checked against the institution's own policy
  (client/guard.py), the step's ``GaussianEvent`` is **charged** to the institution's ledger
  (write-ahead; over the cap or the per-run ceiling: refused), then the clipped sums are
  computed and noised with the charged event's σ (common/privacy/release.py), the reply
  leaves, and the charge is marked released. Refusals and errors reach the server as generic
  codes only.

client/app.py registers it with one line at its bottom::

    from fedrec.client import causal_app as _causal_app  # noqa: E402,F401  (registers causal handlers)

(``fedrec.client.causal_app:app`` is the same ClientApp object, so a simulation can also name
this module as its client app.)
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.client.app import app, simulation_seed
from fedrec.client.guard import Refusal, ReleaseRequest
from fedrec.client.node import NOISE_RECORD, charge_statistics_release, node_guard, noise_record, private_errors
from fedrec.client.statistics import design_columns, fold_subset, release, step_contributions
from fedrec.common.causal.config import CausalConfig, plan_budget
from fedrec.common.causal.sensitivity import check_public_arrays, release_sensitivity
from fedrec.common.config import RunConfig
from fedrec.common.datasets import InstitutionData, load_institution
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.release import release_std
from fedrec.common.schema import STUDY_FILE

log = logging.getLogger(__name__)

__all__ = ["app", "node_folder", "split_config", "causal_plan_events", "check_run_plan"]


def split_config(run_config) -> tuple[RunConfig, CausalConfig]:
    """(RunConfig, CausalConfig) from a run config that also carries ``causal.*`` keys and,
    in a strategy run (server/strategies.py), ``strategies.*`` keys: those are the server's
    choices (what to evaluate; each release's message carries what the client computes), and
    are parsed here too (:class:`~fedrec.common.causal.ope.StrategyRun`), so that a mistyped one
    is an error at every node, never ignored. Any other unknown key: ConfigError (RunConfig)."""
    from fedrec.common.causal.ope import StrategyRun

    flat = {k: v for k, v in dict(run_config).items()}
    StrategyRun.from_flat(flat)
    return (RunConfig.from_flat({k: v for k, v in flat.items()
                                 if not k.startswith("causal.") and not k.startswith("strategies.")}),
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


#: encoded rows per (institution, item), reused across a run's steps; one table per run variant
#: (fold, fold salt, refutation kind, refutation seed): a fold's or a refutation's rows are not the study's
#: per (data folder, fold, salt, refutation) the encoded rows: keyed by the folder, not the
#: institution's name, which two folders in one long-lived process (a simulation's actor) can share
_ROWS: dict[tuple, dict] = {}


@lru_cache(maxsize=16)
def _load(folder: str) -> InstitutionData:
    return load_institution(Path(folder))


@lru_cache(maxsize=16)
def _load_fold(folder: str, fold: int, salt: str) -> InstitutionData:
    """The institution's people of one cross-fitting fold (client/statistics.fold_subset)."""
    return fold_subset(_load(folder), salt, fold)


def _step_variant(conf, ccfg: CausalConfig) -> tuple[int, str, str, int]:
    """Which run this causal step belongs to: ``(fold, fold salt, refutation kind, refutation
    seed)`` from the message's ``causal.expert.fold`` / ``fold-salt`` / ``refute-kind`` /
    ``refute-seed`` (the server's config travels with every step and carries them in a fold or
    refutation run only: the strategy app's fold runs and the causal app's refutation runs share
    the main run's run config), else the run config's; ``(-1, "", "", 0)`` is the study itself.
    Public: which half of the people a run uses, or how the institution transforms its own data;
    each such run is charged like any run. Refused (before any charge) when unusable: a fold
    without its salt, an unknown refutation, a refutation combined with a fold."""
    fold = int(conf["causal.expert.fold"]) if "causal.expert.fold" in conf else ccfg.fold
    salt = str(conf["causal.expert.fold-salt"]) if "causal.expert.fold-salt" in conf else ccfg.fold_salt
    kind = str(conf["causal.expert.refute-kind"]) if "causal.expert.refute-kind" in conf else ccfg.refute_kind
    seed = int(conf["causal.expert.refute-seed"]) if "causal.expert.refute-seed" in conf else ccfg.refute_seed
    seed = seed if kind else 0  # a seed means nothing outside a refutation run
    try:
        CausalConfig(fold=fold, fold_salt=salt, refute_kind=kind, refute_seed=seed)
    except ValueError as err:
        raise Refusal("policy", f"causal step: {err}") from None
    return fold, salt, kind, seed


@lru_cache(maxsize=8)
def _load_refute(folder: str, kind: str, seed: int) -> InstitutionData:
    """The institution's data as refutation ``kind`` sees it (common/causal/refute.refute_data,
    the function the in-process path runs too), transformed here, at the institution.

    Privacy: the transform runs on this institution's rows only and only noised sums of the
    result leave, each charged. Random common cause: a person's new covariate comes from the
    public seed and their own id, cut to its declared public bounds, so the release's
    per-person bound (computed from the declared bounds) is unchanged. Placebo: one person's
    exposure moves into one other person's row per item, so a release can move by up to 3x the
    causal run's bound: :func:`_step` charges it at that bound (refute.SENSITIVITY_FACTOR;
    common/causal/refute.py, module doc)."""
    from fedrec.common.causal.refute import refute_data

    return refute_data(kind, _load(folder), seed)


def _declaration(data: InstitutionData, ccfg: CausalConfig) -> str:
    cols = design_columns(data, ccfg.covariates, ccfg.derived)
    st = data.study
    decl = {"columns": [list(c) for c in cols], "outcome_bounds": list(st.outcome_bounds), "better": st.outcome_better,
            "items": sorted(data.items["item_id"].astype(str).tolist())}
    if st.causal_graph is not None:  # public: the server checks identifiability before any step
        decl.update(graph=st.causal_graph, declared=list(st.covariate_names))
    return json.dumps(decl, sort_keys=True)


def causal_plan_events(ccfg: CausalConfig) -> list:
    """The releases one causal run of ``ccfg`` will charge, from the public run config alone:
    one ``GaussianEvent(σ_step)`` per step of :func:`~fedrec.common.causal.config.plan_budget`
    (the very plan the server runs). A charged step's event is ``GaussianEvent(σ_step,
    sensitivity)`` (:func:`~fedrec.client.node.charge_statistics_release`): the noise scales with
    the sensitivity, so its ε depends on σ alone and these events compose to the charged rows' ε.
    The ``scale`` step runs only when no fixed ``psi_clip`` is set (server/causal.run_protocol).
    Empty without DP (nothing is budgeted)."""
    if not ccfg.dp:
        return []
    from fedrec.common.privacy.accountant import GaussianEvent

    plan = plan_budget(ccfg)
    # ``causal.refute``: the ServerApp runs one more causal run, the same plan, per refutation
    return [GaussianEvent(noise_multiplier=s) for step, s in plan.sigma.items()
            if s > 0 and not (step == "scale" and ccfg.psi_clip is not None)] * (1 + len(ccfg.refute))


def check_run_plan(context: Context, folder: Path, institution: str, events: list, *, accountant: str) -> None:
    """Refuse (:class:`Refusal` ``budget`` / ``policy``, nothing charged) a run whose whole plan
    ``events`` would pass the institution's cap or its ``max-run-epsilon``: at the run's first
    message, before its first charge, like MF's ``counts`` query. Once the run has charged rows
    the plan was checked at its first message (the guard composes the run's rows with the
    planned events: checking again would count the spent part twice); each charge is still
    checked against both caps (client/guard.py). Public inputs only; touches no data."""
    if not events:
        return
    guard = node_guard(context, folder, institution, accountant=accountant)
    run_id = str(context.run_id)
    if guard.ledger.rows(run_id=run_id):
        return
    guard.check_plan(events, run_id=run_id)


@app.query("causal_study")
@private_errors
def causal_study(msg: Message, context: Context) -> Message:
    """Public declarations only (no data values): nothing to charge. A folder this node cannot
    load is refused with the code ``data`` (the detail stays in the institution's log).

    Before the run's first charge the whole run's plan (:func:`causal_plan_events`, from the
    public run config) is checked against the institution's budget and per-run ceiling
    (:func:`check_run_plan`): a run that cannot finish is refused here, with nothing spent."""
    cfg, ccfg = split_config(context.run_config)
    folder = node_folder(context, cfg)
    data = _load(str(folder))
    check_run_plan(context, folder, data.name, causal_plan_events(ccfg), accountant=ccfg.accountant)
    cov = json.loads(str(msg.content["config"]["covariates"])) if "config" in msg.content.config_records else None
    ccfg = CausalConfig(**{**ccfg.__dict__, "covariates": None if cov is None else tuple(cov)})
    if "config" in msg.content.config_records:  # a refutation run declares its transformed design
        _, _, rkind, rseed = _step_variant(msg.content["config"], CausalConfig())
        if rkind:
            data = _load_refute(str(folder), rkind, rseed)
    decl = _declaration(data, ccfg)
    return Message(RecordDict({"study": ConfigRecord({"declaration": decl})}), reply_to=msg)


def _step(msg: Message, context: Context, kind: str) -> Message:
    """Validate -> policy -> charge -> clipped sums + the charged event's noise -> reply -> released.

    Every refusal and error reaches the server as a generic code (``private_errors``)."""
    cfg, ccfg = split_config(context.run_config)
    ccfg = ccfg.resolved(cfg.n_min)  # the automatic n_min the server resolves too
    conf = msg.content["config"]
    step = str(conf["step"])
    if step.split(":")[0] != kind:  # the ledger's task label is the release actually made
        raise Refusal("policy", f"step {step!r} sent as a {kind} release")
    items = [str(i) for i in json.loads(str(conf["items"]))]
    sigma = float(conf["noise-multiplier"])
    server_round = int(conf["server-round"])
    arrays = {k: v.numpy().astype(np.float64) for k, v in msg.content["arrays"].items()} \
        if "arrays" in msg.content.array_records else {}
    # validation before any charge
    folder = node_folder(context, cfg)
    fold, salt, rkind, rseed = _step_variant(conf, ccfg)
    data = _load(str(folder)) if fold < 0 else _load_fold(str(folder), fold, salt)
    task = f"causal-{step}" if fold < 0 else f"causal-fold{fold}-{step}"  # a fold run's rows are its own
    if rkind:  # a refutation run (server/causal.py main): this institution's own data, transformed here
        from fedrec.common.causal.refute import refutation_design

        data, task = _load_refute(str(folder), rkind, rseed), f"causal-refute-{rkind}-{step}"
        ccfg = refutation_design(ccfg, rkind)
    p = len(design_columns(data, ccfg.covariates, ccfg.derived)) + 1
    known = set(data.items["item_id"].astype(str))
    missing = [i for i in items if i not in known]
    if missing:
        raise FedrecInputError(f"items {missing} are not in this institution's catalogue")
    try:  # the server's public choices (radius, clips, coordinate weights) must give a bound
        sens = release_sensitivity(kind, p, arrays, len(items), items)
        check_public_arrays("propensity" if kind == "propensity" else ccfg.estimator
                            if kind in ("scale", "influence") else kind, p, arrays, items, dp=ccfg.dp)
    except ValueError as err:
        raise Refusal("policy", f"step {step}: {err}") from None
    if rkind:  # a refutation's own per-person bound, f x the causal run's (placebo: 3; refute.py doc):
        # charged as GaussianEvent(σ'/f, f·sens) — the planned ε, noise std σ'·sens, which is what
        # the server planned with (common/causal/refute.refutation_plan)
        from fedrec.common.causal.refute import SENSITIVITY_FACTOR

        sigma, sens = sigma / SENSITIVITY_FACTOR[rkind], sens * SENSITIVITY_FACTOR[rkind]
    # σ usable, policy, σ vs the run's DP, then the charge of GaussianEvent(σ, sens): the release's
    # L2 sensitivity (public: declared bounds + the server's public choices)
    request = ReleaseRequest(epsilon=ccfg.epsilon, delta=ccfg.delta, noise_mode=ccfg.noise_mode, n_min=ccfg.n_min)
    charged = charge_statistics_release(msg, context, folder, data.name, sigma=sigma, sensitivity=sens,
                                        request=request, dp=ccfg.dp, accountant=ccfg.accountant,
                                        server_round=server_round, task=task)
    guard, share, charge = charged.guard, charged.share, charged.charge
    blocks = step_contributions(kind, data, items, arrays, estimator=ccfg.estimator, trim=ccfg.trim,
                                covariates=ccfg.covariates, derived=ccfg.derived,
                                cache=_ROWS.setdefault((str(folder), fold, salt, rkind, rseed), {}))
    seed = simulation_seed(context, cfg, data.name, task, server_round)  # None: OS CSPRNG
    sums = release(blocks, event=charge.event if sigma > 0 else None, noise_share=share,
                   generator=None if seed is None else np.random.default_rng(seed))
    eps_prv, eps_rdp = guard.spent(delta=ccfg.delta)
    nstd = release_std(charge.event, noise_share=share) if sigma > 0 else 0.0
    metrics = MetricRecord({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": ccfg.delta,
                            "noise-var": nstd**2, "sensitivity": sens})
    from flwr.app import Array

    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sums.items()}),
                          "metrics": metrics})
    if ccfg.noise_mode == "distributed" and sigma > 0:
        content[NOISE_RECORD] = noise_record(ccfg.n_min, share_std=nstd)
    reply = Message(content, reply_to=msg)
    guard.released(charge)
    return reply


@app.query("causal_moments")
@private_errors
def causal_moments(msg: Message, context: Context) -> Message:
    return _step(msg, context, "moments")


@app.query("causal_propensity")
@private_errors
def causal_propensity(msg: Message, context: Context) -> Message:
    return _step(msg, context, "propensity")


@app.query("causal_outcome")
@private_errors
def causal_outcome(msg: Message, context: Context) -> Message:
    return _step(msg, context, "outcome")


@app.query("causal_scale")
@private_errors
def causal_scale(msg: Message, context: Context) -> Message:
    return _step(msg, context, "scale")


@app.query("causal_outcome_range")
@private_errors
def causal_outcome_range(msg: Message, context: Context) -> Message:
    return _step(msg, context, "outcome-range")


@app.query("causal_influence")
@private_errors
def causal_influence(msg: Message, context: Context) -> Message:
    return _step(msg, context, "influence")


# the strategy-value handler (issue 32) builds on this module's loaders: registered here, once
# this module is complete, so that whichever of app / causal_app loads first, no import is circular
from fedrec.client import strategy_app as _strategy_app  # noqa: E402,F401
