"""Strategy-evaluation message handler of the fedrec ClientApp.

Importing this module registers, on :data:`fedrec.client.app.app`, ``query.strategy_values``:
one DP release of the per-person strategy-evaluation terms (client/ope_statistics.py). Like
every causal step (client/causal_app.py ``_step``): the request is validated (items, strategy
specs, clips: before any charge), the run's request (ε, δ, noise mode, n_min against the
round's size) is checked against the institution's own policy, the ``GaussianEvent`` with the
release's public L2 sensitivity (:func:`fedrec.common.causal.ope.release_bound`, from the
number of strategies and the public second-moment weight only) is **charged** to the ledger,
then the clipped sums are noised with the charged event's σ and the reply leaves; the charge is
marked released. Refusals and errors reach the server as generic codes only.

The message's config carries the release's request (``strategies.epsilon`` (<= 0: inf),
``strategies.delta``, ``strategies.noise-mode``, ``strategies.n-min``: the coordinator's, bounded
by the institution's policy like any run config) and the public choices (strategies, items,
design, clips).

``query.strategy_plan`` — the strategy run's first message (server/strategies.py, before its
causal run): the run's whole plan — one causal run, or three with ``benefit-cf``, and the
strategy release — computed from the public run config and the message's ``strategies.*`` keys
(:func:`strategy_plan_events`), checked against the institution's budget and per-run ceiling
before anything is charged (client/causal_app.check_run_plan). Nothing is computed on data.

client/app.py registers it with one line at its bottom::

    from fedrec.client import strategy_app as _strategy_app  # noqa: E402,F401  (registers strategy handler)
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrec.client.app import app
from fedrec.client.causal_app import _load, causal_plan_events, check_run_plan, node_folder, split_config
from fedrec.client.guard import Refusal, ReleaseRequest
from fedrec.client.node import NOISE_RECORD, charge_statistics_release, noise_record, private_errors
from fedrec.client.ope_statistics import check_strategies, ope_contribution
from fedrec.client.statistics import design_columns, release
from fedrec.common.causal.config import CausalConfig
from fedrec.common.causal.ope import (DEFAULT_ESTIMATORS, Layout, OPEConfig, StrategyRun, release_bound,
                                     release_noise_multiplier, strategy_bounds)
from fedrec.common.causal.sensitivity import check_public_arrays
from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.release import release_std

__all__ = ["app", "strategy_values", "strategy_plan", "strategy_plan_events"]

#: per data folder, the encoded rows (keyed by the folder: two folders in one long-lived process
#: may hold institutions of the same name; a stale entry indexed another folder's people)
_ROWS: dict[str, dict] = {}


def strategy_plan_events(ccfg: CausalConfig, run: StrategyRun) -> list:
    """Every release a Flower strategy run (server/strategies.py ``_main``) charges, from public
    choices only: the causal run's steps (:func:`~fedrec.client.causal_app.causal_plan_events`),
    twice more with ``benefit-cf`` (the two fold runs: the same plan on half the people each,
    charged as ``causal-fold<k>-<step>``), then the strategy release at the causal run's ε and δ
    (:func:`~fedrec.common.causal.ope.release_noise_multiplier`, the server's rule). Empty without DP."""
    from fedrec.common.privacy.accountant import GaussianEvent

    if not ccfg.dp:
        return []
    causal = causal_plan_events(ccfg)
    runs = 3 if run.crossfit else 1
    return causal * runs + [GaussianEvent(noise_multiplier=release_noise_multiplier(ccfg.epsilon, ccfg.delta,
                                                                                    ccfg.accountant))]


@app.query("strategy_plan")
@private_errors
def strategy_plan(msg: Message, context: Context) -> Message:
    """Check the whole strategy run's plan before its first charge (see module doc).

    Privacy contract: releases nothing and charges nothing; a plan over the institution's
    remaining budget or its ``max-run-epsilon`` is refused (``budget`` / ``policy``) before any
    release of the run, so no budget is spent on a run that could not finish. The message's
    ``strategies.*`` keys say how many causal runs the server will ask for; a server that
    understates them gains nothing: each charge is still checked against both caps."""
    cfg, ccfg = split_config(context.run_config)
    conf = msg.content["config"]
    run = StrategyRun.from_flat({k: conf[k] for k in conf.keys() if str(k).startswith("strategies.")})
    folder = node_folder(context, cfg)
    data = _load(str(folder))
    check_run_plan(context, folder, data.name, strategy_plan_events(ccfg, run), accountant=ccfg.accountant)
    return Message(RecordDict({"plan": ConfigRecord({"checked": 1})}), reply_to=msg)


@app.query("strategy_values")
@private_errors
def strategy_values(msg: Message, context: Context) -> Message:
    """Validate -> policy -> charge -> clipped sums + the charged event's noise -> reply -> released."""
    cfg, _ = split_config(context.run_config)
    conf = msg.content["config"]
    try:
        ocfg = OPEConfig.from_flat({k: conf[k] for k in conf.keys() if str(k).startswith("strategies.")})
    except (ValueError, TypeError) as err:
        raise Refusal("policy", f"strategy release: {err}") from None
    sigma = float(conf["noise-multiplier"])
    specs = json.loads(str(conf["strategies"]))
    items = [str(i) for i in json.loads(str(conf["items"]))]
    columns = [str(c) for c in json.loads(str(conf["columns"]))]
    cov = json.loads(str(conf["covariates"]))
    derived = tuple(json.loads(str(conf["derived"])))
    clip, tau = float(conf["clip"]), float(conf["switch-tau"])
    square_clip, k = float(conf["square-clip"]), float(conf["second-moment-weight"])
    trim = tuple(float(v) for v in json.loads(str(conf["trim"])))
    estimators = tuple(str(e) for e in json.loads(str(conf["estimators"]))) if "estimators" in conf else DEFAULT_ESTIMATORS
    arrays = {key: v.numpy().astype(np.float64) for key, v in msg.content["arrays"].items()} \
        if "arrays" in msg.content.array_records else {}
    server_round = int(conf.get("server-round", 0))
    # validation before any charge
    folder = node_folder(context, cfg)
    data = _load(str(folder))
    cols = [c[0] for c in design_columns(data, None if cov is None else tuple(cov), derived)]
    if cols != columns:
        raise FedrecInputError("the server's design columns differ from this institution's study")
    known = set(data.items["item_id"].astype(str))
    missing = [i for i in items if i not in known]
    if missing:
        raise FedrecInputError(f"items {missing} are not in this institution's catalogue")
    try:
        OPEConfig(clip=clip, switch_tau=tau, square_clip=square_clip, second_moment_weight=k, trim=trim,  # type: ignore[arg-type]
                  estimators=estimators)
        check_strategies(specs, items, columns)
        for s in specs:  # each strategy's weight clip (clip x clip-factor) and bounds: finite
            strategy_bounds(s, clip, len(items))
        # beta/mu1/mu0 of every item and the whitening: present, shaped, finite (a radius under DP)
        check_public_arrays("strategies", len(columns) + 1, arrays, items, dp=ocfg.dp)
    except ValueError as err:
        raise Refusal("policy", f"strategy release: {err}") from None
    sens = release_bound(len(specs), k, Layout(estimators))  # public: the number of strategies and the public weight only
    # σ usable, policy, σ vs the run's DP, then the charge of GaussianEvent(σ, sens) (client/node.py)
    charged = charge_statistics_release(
        msg, context, folder, data.name, sigma=sigma, sensitivity=sens,
        request=ReleaseRequest(epsilon=ocfg.epsilon, delta=ocfg.delta, noise_mode=ocfg.noise_mode, n_min=ocfg.n_min),
        dp=ocfg.dp, accountant=ocfg.accountant, server_round=server_round, task="strategy-values")
    guard, share, charge = charged.guard, charged.share, charged.charge
    contrib = ope_contribution(data, specs, items, arrays, columns=columns, clip=clip, switch_tau=tau,
                               square_clip=square_clip, second_moment_weight=k, trim=trim, estimators=estimators,
                               covariates=None if cov is None else tuple(cov), derived=derived,
                               cache=_ROWS.setdefault(str(folder), {}))
    sums = release({"strategies": contrib}, event=charge.event if sigma > 0 else None, noise_share=share)
    eps_prv, eps_rdp = guard.spent(delta=ocfg.delta)
    nstd = release_std(charge.event, noise_share=share) if sigma > 0 else 0.0
    content = RecordDict({"arrays": ArrayRecord({"strategies": Array(np.ascontiguousarray(sums["strategies"]))}),
                          "metrics": MetricRecord({"epsilon": eps_prv, "epsilon-rdp": eps_rdp, "delta": ocfg.delta,
                                                   "noise-var": nstd**2, "sensitivity": sens})})
    if ocfg.noise_mode == "distributed" and sigma > 0:
        content[NOISE_RECORD] = noise_record(ocfg.n_min, share_std=nstd)
    reply = Message(content, reply_to=msg)
    guard.released(charge)
    return reply
