"""``fedrec-sim causal``: federated causal estimation on any study in the data contract.

:func:`causal_command` validates the study at the boundary (before any budget is spent),
runs the real Flower simulation (one SuperNode per institution folder; ServerApp
``fedrec.server.causal:app``, ClientApp ``fedrec.client.causal_app:app``), prints a table and
writes ``causal.json``: estimate, SE, CI per item, ε spent per institution, the budget split,
and — with ``--compare-pooled`` — a non-private pooled AIPW on the union (statsmodels), and —
when ``ground_truth/`` is beside the institution folders — the true ATEs and the causal
recommendations' policy value.

:func:`inprocess_send` runs the same client statistics functions on in-memory institutions and
adds the releases in numpy: the benchmark and unit tests use it with the same server code.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from fedrec.common.jsonio import write_json
from fedrec.common.causal.config import CausalConfig
from fedrec.common.causal.influence import ate_from_sums, influence_terms
from fedrec.common.causal.scaling import half_range
from fedrec.common.causal.recommend import shrinkage_caveat
from fedrec.common.datasets import GROUND_TRUTH_DIR, InstitutionData, load_federation, read_ground_truth
from fedrec.common.errors import FedrecInputError

__all__ = ["causal_command", "resolve_config", "parse_settings", "inprocess_send", "study_info", "validate_study",
           "pooled_estimate", "estimate_inprocess", "pilot_forecast_charged"]


# --------------------------------------------------------------------------- in-process
def study_info(institutions: Sequence[InstitutionData], cfg: CausalConfig):
    from fedrec.client.statistics import design_columns
    from fedrec.server.causal import StudyInfo

    d = institutions[0]
    return StudyInfo(columns=design_columns(d, cfg.covariates, cfg.derived), outcome_bounds=d.study.outcome_bounds,
                     better=d.study.outcome_better, items=sorted(d.items["item_id"].astype(str).tolist()))


def inprocess_send(institutions: Sequence[InstitutionData], cfg: CausalConfig, items: Sequence[str],
                   *, rng: np.random.Generator | None = None, cache: dict | None = None, secagg: bool = False):
    """A transport for :func:`fedrec.server.causal.run_protocol`: each institution computes its
    release with client/statistics.py (clip + noise), the sums are added in numpy.

    ``secagg``: quantise each institution's release on the grid the Flower run asks SecAgg+ for
    (:func:`fedrec.server.causal.secagg_sizing`), add the integers modulo 2^bits and dequantise,
    as the SecAgg+ round does (the masks cancel and are left out)."""
    from fedrec.client.statistics import design_columns, release, release_bound, step_contributions
    from fedrec.common.privacy.accountant import GaussianEvent
    from fedrec.common.privacy.release import noise_share

    cache = {} if cache is None else cache
    # in-process there are no dropouts: automatic n_min (0) is every institution
    share = noise_share(cfg.noise_mode, cfg.n_min or len(institutions))
    p = len(design_columns(institutions[0], cfg.covariates, cfg.derived)) + 1

    def send(step: str, arrays: dict, config: dict):
        kind = step.split(":")[0]
        sigma = float(config["noise-multiplier"])
        parts: list[dict[str, np.ndarray]] = []
        for d in institutions:
            blocks = step_contributions(kind, d, items, arrays, estimator=cfg.estimator, trim=cfg.trim,
                                        covariates=cfg.covariates, derived=cfg.derived, cache=cache)
            event = GaussianEvent(noise_multiplier=sigma, sensitivity=release_bound(blocks)) if sigma > 0 else None
            parts.append(release(blocks, event=event, noise_share=share, generator=rng))
        if secagg:
            return _secagg_sum(parts, cfg, step, p, arrays, items, sigma), len(institutions), {}
        totals: dict[str, np.ndarray] = {}
        for sums in parts:
            for k, v in sums.items():
                totals[k] = totals[k] + v if k in totals else v.copy()
        return totals, len(institutions), {}

    return send


def _secagg_sum(parts: list[dict[str, np.ndarray]], cfg: CausalConfig, step: str, p: int, arrays: dict,
                items: Sequence[str], sigma: float) -> dict[str, np.ndarray]:
    """The sum SecAgg+ unmasks: each part quantised on the Flower run's grid, added mod 2^bits."""
    from fedrec.common.causal.sensitivity import release_sensitivity

    keys = list(parts[0])
    sizes = [parts[0][k].size for k in keys]
    sens = release_sensitivity(step, p, arrays, len(items), items)
    flat = _secagg_total([np.concatenate([np.ravel(part[k]) for k in keys]) for part in parts], cfg, sens, sigma)
    out, pos = {}, 0
    for k, n in zip(keys, sizes):
        out[k] = flat[pos:pos + n].reshape(parts[0][k].shape)
        pos += n
    return out


def estimate_inprocess(institutions: Sequence[InstitutionData], cfg: CausalConfig, *,
                       rng: np.random.Generator | None = None, plan=None, cache: dict | None = None,
                       secagg: bool = False):
    """The protocol with sums added in numpy (same client and server code as the Flower run;
    ``secagg``: on SecAgg+'s quantisation grid, :func:`inprocess_send`)."""
    from fedrec.server.causal import run_protocol

    if cfg.fold >= 0:  # a fold run (causal.expert.fold): that half's people, as the Flower client filters
        from fedrec.client.statistics import fold_subset

        institutions = [fold_subset(d, cfg.fold_salt, cfg.fold) for d in institutions]  # idempotent
        cache = None  # rows cached for every person are not the fold's
    cfg = cfg.resolved(len(institutions))  # in-process: no dropouts
    info = study_info(institutions, cfg)
    items = list(cfg.items) or info.items
    return run_protocol(inprocess_send(institutions, cfg, items, rng=rng, cache=cache, secagg=secagg), info, cfg,
                        plan=plan)


# --------------------------------------------------------------------------- validation
def validate_study(institutions: Sequence[InstitutionData], cfg: CausalConfig) -> list[str]:
    """Check the study at the boundary; raise a one-line FedrecInputError. Returns the items."""
    from fedrec.client.statistics import design_columns

    first = institutions[0]
    design_columns(first, cfg.covariates, cfg.derived)  # unknown covariate -> FedrecInputError
    catalogue = sorted(first.items["item_id"].astype(str).tolist())
    items = list(cfg.items) or catalogue
    for it in items:
        if it not in catalogue:
            raise FedrecInputError(f"--item {it!r}: not in the catalogue ({', '.join(catalogue)}); "
                                   "fix: give an item_id from items.csv")
        arms: set[int] = set()
        for d in institutions:
            e = d.interactions.loc[d.interactions["item_id"] == it, "exposed"]
            arms |= set(int(v) for v in e.unique())
        if arms != {0, 1}:
            only = "nobody considered" if not arms else f"exposed = {arms.pop()} for everyone"
            raise FedrecInputError(f"treatment exposed for item {it!r} has one arm only at every institution "
                                   f"({only}); fix: choose an item with both exposed and unexposed people")
    return items


# --------------------------------------------------------------------------- pooled peer
def pooled_estimate(institutions: Sequence[InstitutionData], item: str, cfg: CausalConfig) -> dict:
    """Non-private AIPW on the union with statsmodels (Logit propensity, per-arm OLS), the same
    scaling and trimming; SE from the influence terms. The peer the benchmark compares with."""
    import statsmodels.api as sm

    from fedrec.client.statistics import encode_item

    rows = [encode_item(d, item, cfg.covariates, cfg.derived) for d in institutions]
    x = np.vstack([r.x for r in rows])
    t = np.concatenate([r.t for r in rows])
    y = np.concatenate([r.y for r in rows])
    prop = sm.Logit(t, x).fit(disp=0, maxiter=100).params
    c1 = sm.OLS(y[t == 1], x[t == 1]).fit().params
    c0 = sm.OLS(y[t == 0], x[t == 0]).fit().params
    est = cfg.estimator
    psi = influence_terms(x, t, y, estimator=est if est != "ra" else "aipw", prop_coef=prop, coef1=c1,
                          coef0=c0, trim=cfg.trim)
    scale = half_range(institutions[0].study.outcome_bounds)
    r = ate_from_sums(len(psi), psi.sum(), (psi**2).sum(), scale=scale)
    lo, hi = r.interval(cfg.alpha)
    return {"ate": r.ate, "se": r.se, "ci_low": lo, "ci_high": hi, "n": int(len(psi)),
            "estimator": "aipw" if est == "ra" else est}


# --------------------------------------------------------------------------- the command
def resolve_config(institutions: Sequence[InstitutionData], *, estimator: str = "aipw", epsilon: float = 1.0,
                   item: str | None = None, overrides: dict | None = None, settings: Sequence[str] = ()
                   ) -> tuple[CausalConfig, str]:
    """The run's :class:`CausalConfig` and where its nuisance design came from.

    The design is the study's (``study.toml [causal]``) unless ``overrides`` names
    ``covariates`` or ``derived``; then those replace it. ``settings`` (``KEY=VALUE``) set
    tuning knobs (:func:`parse_settings`). FedrecInputError (one line) for a bad value,
    before any budget is spent."""
    overrides = dict(overrides or {})
    knobs = parse_settings(settings)
    study = institutions[0].study
    if "covariates" in overrides or "derived" in overrides:
        source = "--covariates/--derive"
    elif study.causal_covariates is not None or study.causal_derived:
        overrides.update(covariates=study.causal_covariates, derived=study.causal_derived)
        source = "study.toml [causal]"
    else:
        source = "all declared covariates"
    try:
        ccfg = CausalConfig(estimator=estimator, epsilon=float(epsilon), items=(item,) if item else (), **overrides)
        if knobs:
            ccfg = CausalConfig.from_flat({**ccfg.to_flat(), **knobs})
    except ValueError as err:  # a bad --derive spec or setting: one line, before any budget is spent
        raise FedrecInputError(f"{err}; fix: see fedrec-sim causal --help") from None
    return ccfg, source


#: knobs with a flag of their own (--epsilon, --item, ...): --set may not change them
_FLAGGED = {"causal.estimator": "--estimator", "causal.epsilon": "--epsilon", "causal.items": "--item",
            "causal.covariates": "--covariates", "causal.derived": "--derive", "causal.noise-mode": "--noise-mode"}


def parse_settings(settings: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings -> run-config knobs of :class:`CausalConfig` (``causal.`` prefix
    optional). FedrecInputError (one line) for a malformed setting, an unknown key (with the
    nearest known one) or a knob that has its own flag. Values are checked by
    :meth:`CausalConfig.from_flat` and the config's own validation."""
    import difflib

    known = CausalConfig().to_flat()
    out: dict[str, object] = {}
    for text in settings:
        key, sep, value = str(text).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise FedrecInputError(f"--set {text!r}: not KEY=VALUE; fix: e.g. --set causal.expert.psi-noise-ratio=0.3")
        key = key if key.startswith("causal.") else f"causal.{key}"
        if key in _FLAGGED:
            raise FedrecInputError(f"--set {text!r}: {key} has its own flag; fix: use {_FLAGGED[key]}")
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise FedrecInputError(f"--set {text!r}: unknown knob {key}; fix: {hint}the knobs are listed in "
                                   "docs/causal.md (Expert knobs)")
        out[key] = _typed(text, key, value, known[key])
    return out


def _typed(text: str, key: str, value: str, default: object) -> object:
    """``value`` as the type of the knob's default (:func:`~fedrec.common.config.coerce_value`,
    the run config's coercion); one-line error naming the setting."""
    from fedrec.common.config import ConfigError, coerce_value

    try:
        typed = coerce_value(key, value, type(default))
    except ConfigError:
        if isinstance(default, bool):
            raise FedrecInputError(f"--set {text!r}: {key} is true or false; "
                                   f"fix: write {key}=true or {key}=false") from None
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise FedrecInputError(f"--set {text!r}: {key} is {kind}; fix: e.g. {key}={default}") from None
    if isinstance(typed, float) and not math.isfinite(typed):
        raise FedrecInputError(f"--set {text!r}: {key} must be finite; fix: give a finite number")
    return typed


def causal_command(data: Path, item: str | None, epsilon: float, estimator: str, compare_pooled: bool,
                   out: Path | None, seed: int, console, *, plain: bool = False,
                   causal_overrides: dict | None = None, settings: Sequence[str] = (),
                   non_private: bool = False, force: bool = False, status_quo: str = "none",
                   num_cpus_per_client: float = 1.0, refute: Sequence[str] = ()) -> int:
    """Run federated causal estimation on the institution folders under ``data``.

    ``refute``: refutations (placebo, random-common-cause) run after the causal run, each a
    charged causal run through every institution's guard (simulations/refute.py); declared up
    front, so the provisioned caps cover the causal run and them.

    The nuisance design is the study's (``study.toml [causal]``) unless ``causal_overrides``
    names ``covariates`` or ``derived`` (then those replace it); ``settings`` are
    ``causal.KEY=VALUE`` tuning knobs (:func:`parse_settings`)."""
    import time

    if estimator not in ("aipw", "ipw", "ra"):
        raise FedrecInputError(f"--estimator {estimator!r}: fix: use aipw, ipw or ra")
    if not epsilon > 0:
        raise FedrecInputError(f"--epsilon {epsilon}: fix: give a positive number (inf turns DP off)")
    institutions = load_federation(Path(data))  # bad study.toml (missing bounds...) -> one line
    ccfg, design_source = resolve_config(institutions, estimator=estimator, epsilon=epsilon, item=item,
                                         overrides=causal_overrides, settings=settings)
    items = validate_study(institutions, ccfg)
    # the declared graph (study.toml [causal.graph]): not identifiable -> refused naming the open
    # back-door path, before any ledger exists (issue 32)
    from fedrec.common.causal.graph import check_study_graph

    study0 = institutions[0].study
    graph_adjust = check_study_graph(study0.causal_graph, study0.covariate_names,
                                     design=ccfg.covariates if ccfg.covariates is not None else study0.covariate_names)
    from fedrec.common.causal.config import plan_budget

    plan_budget(ccfg)  # fails loudly before anything runs
    out = Path(out) if out else Path("results") / f"causal-{time.strftime('%Y%m%d-%H%M%S')}"
    names = [d.name for d in institutions]
    from fedrec.simulations.provision import check_unused_out, provision_institutions

    check_unused_out(out)  # a used folder's ledgers would be charged twice: refused, nothing spent
    from fedrec.common.causal.recommend import check_status_quo

    check_status_quo(status_quo)
    from fedrec.simulations.refute import check_refutations

    refute = check_refutations(refute)  # before anything is spent
    # know before spending: a small charged pilot (each institution's ledger), then each item's
    # forecast CI half-width; a refused run has spent the pilot only (docs/causal.md)
    from dataclasses import replace as _replace

    from fedrec.common.causal.pilot import PILOT_SHARE
    from fedrec.simulations.forecast import answerable, refusal_message

    policy_dir = provision_institutions(names, out, epsilon=ccfg.epsilon, delta=ccfg.delta,
                                        allow_non_private=non_private, runs=1 + len(refute))
    fc, pilot = pilot_forecast_charged(institutions, ccfg.resolved(len(institutions)), items, policy_dir, seed=seed)
    unit = institutions[0].study.outcome_unit or ""
    console.print(f"forecast after the pilot ({PILOT_SHARE:.0%} of the budget), before the run's budget is spent: "
                  f"95% CI about ±{max(fc.half_width.values()):.3g} {unit} per item (largest possible effect "
                  f"±{fc.limit:.3g}; docs/causal.md, Know before spending)", markup=False)
    if not answerable(fc) and not force:
        raise FedrecInputError(refusal_message(fc, unit) + f" (only the pilot, {PILOT_SHARE:.0%} of the budget, "
                               f"was spent, recorded in {out / 'ledgers'}; a re-run needs a new --out)")
    run_cfg = _replace(ccfg, epsilon=pilot.main_epsilon) if ccfg.dp else ccfg  # the pilot's share is spent
    raw = _run_flower(Path(data), run_cfg, len(institutions), out, seed=seed, plain=plain, policy_dir=policy_dir,
                      num_cpus_per_client=num_cpus_per_client)
    report = dict(raw)
    report["institutions"] = names
    # per-institution ε: the ledgers (one per institution folder name) are the source of truth
    report["epsilon_per_institution"] = _ledger_epsilon(out / "ledgers", names, ccfg)
    report["epsilon_requested"] = epsilon if math.isfinite(epsilon) else "inf"
    report["forecast"] = {**fc.to_json(), "forced": bool(force and not answerable(fc)),
                          "run_epsilon_after_pilot": pilot.main_epsilon if ccfg.dp else "inf"}
    report["delta"] = ccfg.delta
    if graph_adjust is not None:
        report["graph"] = {"adjustment_set": graph_adjust, "declared": study0.causal_graph}
    report["nuisance_design"] = {"covariates": None if ccfg.covariates is None else list(ccfg.covariates),
                                 "derived": list(ccfg.derived), "source": design_source}
    if compare_pooled:
        report["pooled"] = {it: pooled_estimate(institutions, it, ccfg) for it in items}
    gt = Path(data) / GROUND_TRUTH_DIR
    if gt.is_dir():
        truth = read_ground_truth(gt)
        for it in items:
            report["items"][it]["true_ate"] = float(truth.ate[it])
        if len(items) == len(truth.item_ids) and all("cate_coef" in report["items"][it] for it in items):
            from fedrec.server.causal_recommend import policy_values

            report["recommendations"] = policy_values(institutions, truth, report["items"], ccfg.covariates,
                                                     ccfg.derived, status_quo=status_quo)
    write_json(out / "causal.json", report)
    _print_table(console, report, items)
    if refute:  # causal.json already holds the causal run; rewritten with the refutations added
        from fedrec.simulations.refute import refute_after_causal

        report["refutations"] = refute_after_causal(institutions, ccfg, refute, policy_dir=policy_dir, seed=seed,
                                                    original=report["items"])
        report["epsilon_per_institution"] = _ledger_epsilon(out / "ledgers", names, ccfg)
        write_json(out / "causal.json", report)
        for kind, r in report["refutations"].items():
            console.print(f"refutation {kind}: {'FLAGGED — ' if r['flagged'] else ''}{r['message']}", markup=False)
    d = report["nuisance_design"]
    console.print(f"nuisance design ({d['source']}): "
                  + ", ".join((d["covariates"] or ["all declared covariates"]) + d["derived"]), markup=False)
    console.print(f"causal.json -> {out / 'causal.json'}")
    return 0


def pilot_forecast_charged(institutions: Sequence[InstitutionData], cfg: CausalConfig, items: Sequence[str],
                           policy_dir: Path, *, seed: int):
    """The forecast's pilot (``common/causal/pilot.py``) through each institution's guard:
    its policy authorises the request, its ledger is **charged** ``GaussianEvent(σ_pilot,
    pilot_bound(J))`` (``NonPrivateEvent`` at ε = ∞, where the policy allows it) before its data is
    read, the release is clipped and noised with the charged event, marked released, and the
    releases are added on SecAgg+'s quantisation grid as :func:`inprocess_send` does (the masks,
    which cancel, are left out). Returns the forecast of the main run (at the ε the pilot left)
    and the :class:`~fedrec.common.causal.pilot.PilotPlan`. A refusal raises FedrecInputError
    naming the institution (nothing of the pilot is released)."""
    from dataclasses import replace

    from fedrec.client.guard import Refusal, ReleaseRequest, open_guard
    from fedrec.common.causal.pilot import pilot_noise_std, pilot_plan, pilot_release
    from fedrec.simulations.forecast import declared_people_per_item, forecast_half_widths, pilot_shapes
    from fedrec.common.causal.sensitivity import pilot_bound
    from fedrec.common.privacy.accountant import GaussianEvent, NonPrivateEvent
    from fedrec.common.privacy.policy import POLICY_FILE, load_policy

    plan = pilot_plan(cfg)
    sens = pilot_bound(len(items))
    k = len(institutions)
    rng = np.random.default_rng([int(seed), 2929])  # simulation: the pilot's noise follows --seed
    parts = []
    for d in institutions:
        try:
            guard = open_guard(load_policy(policy_dir / d.name / POLICY_FILE), institution=d.name,
                               accountant=cfg.accountant, simulated=True)
            share = guard.authorize(ReleaseRequest(epsilon=cfg.epsilon, delta=cfg.delta, noise_mode=cfg.noise_mode,
                                                   n_min=cfg.n_min or k, round_size=k))
            event = (GaussianEvent(noise_multiplier=plan.noise_multiplier, sensitivity=sens)
                     if plan.noise_multiplier > 0 else NonPrivateEvent())
            charge = guard.charge(event, run_id="forecast-pilot", round=0, task="causal-pilot", model="causal")
        except Refusal as err:
            raise FedrecInputError(f"institution {d.name!r} refused the forecast's pilot: {err.detail}; fix: see its "
                                   "privacy policy") from None
        parts.append(pilot_release(d, items, event=charge.event if plan.noise_multiplier > 0 else None,
                                   noise_share=share, generator=rng))
        guard.released(charge)
    total = _secagg_total([p.ravel() for p in parts], cfg, sens, plan.noise_multiplier).reshape(parts[0].shape)
    shapes = pilot_shapes(total, items, institutions[0].study.outcome_bounds,
                          noise_std=pilot_noise_std(plan, len(items), k, cfg.noise_mode, cfg.n_min or k))
    main_cfg = replace(cfg, epsilon=plan.main_epsilon) if cfg.dp else cfg
    fc = forecast_half_widths(institutions[0].study, main_cfg, items, declared_people_per_item(institutions, items),
                              shapes=shapes)
    return fc, plan


def _secagg_total(flats: list[np.ndarray], cfg: CausalConfig, sens: float, sigma: float) -> np.ndarray:
    """The sum SecAgg+ unmasks of equal-length float releases (quantised, added mod 2^bits)."""
    from fedrec.common.secagg import ServerSession
    from fedrec.common.secagg._quantize import quantize
    from fedrec.server.causal import secagg_sizing

    req = secagg_sizing(cfg, sens, sigma, len(flats))
    q = ServerSession.quantization(clip_range=req["secagg.clip-range"], noise_std=req["secagg.noise-std"],
                                   n_clients=len(flats), dim=flats[0].size)
    total = None
    for f in flats:  # a distributed-noise share is wrapped, not clamped, as the SecAgg+ mod does
        y = quantize(f, q, wrap=cfg.dp and cfg.noise_mode == "distributed")
        total = y if total is None else total + y  # unsigned: wraps modulo 2^bits like the masks
    return ServerSession.dequantize(total, len(flats), q)[0]


def _ledger_epsilon(folder: Path, names: list[str], ccfg: CausalConfig) -> dict[str, float | str]:
    from fedrec.common.privacy.accountant import epsilon_for
    from fedrec.common.privacy.ledger import PrivacyLedger

    out: dict[str, float | str] = {}
    for n in names:
        path = folder / f"{n}.db"
        if not path.exists():
            out[n] = 0.0
            continue
        events = PrivacyLedger(path).events()
        out[n] = epsilon_for(list(events), delta=ccfg.delta) if events else 0.0
    return out


def _run_flower(data: Path, ccfg: CausalConfig, n_inst: int, out: Path, *, seed: int, plain: bool,
                policy_dir: Path, num_cpus_per_client: float = 1.0) -> dict:
    from fedrec.common.config import RunConfig
    from fedrec.common.errors import RunFailed
    from fedrec.simulations.run import launch_flower

    # simulation: --seed also fixes every release's DP noise (sim.noise-seed; a deployed node ignores it)
    cfg = RunConfig().override(**{"institutions": n_inst, "seed": seed, "sim.noise-seed": seed,
                                  "data-dir": str(Path(data).resolve()),
                                  "results-dir": str(out.resolve()), "sim.policy-dir": str(policy_dir),
                                  "privacy.delta": ccfg.delta, "secagg.enabled": not plain})
    work = Path(tempfile.mkdtemp(prefix="fedrec-causal-"))
    try:
        causal_flat = ccfg.to_flat()
        launch_flower({**cfg.to_flat(), **causal_flat}, work, num_supernodes=n_inst,
                      server_app="fedrec.server.causal:app", client_app="fedrec.client.causal_app:app",
                      extra_config=causal_flat, quiet=True, num_cpus_per_client=num_cpus_per_client)
        raw = out / "causal_raw.json"
        failure = out / "failure.json"
        if failure.exists():
            raise RunFailed(json.loads(failure.read_text()).get("reason", "the run failed"))
        if not raw.exists():
            raise RunFailed(f"the causal simulation ended without writing {raw} (see the log above)")
        return json.loads(raw.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_table(console, report: dict, items: list[str]) -> None:
    from rich.table import Table

    tab = Table(title=f"{report['config'].get('causal.estimator', '')} ATE per item "
                      f"(ε per institution {report['epsilon_requested']})")
    for col in ("item", "ATE", "SE", "95% CI", "verdict", "true ATE", "pooled ATE (non-private)"):
        tab.add_column(col)
    for it in items:
        r = report["items"][it]
        pooled = report.get("pooled", {}).get(it)
        verdict = r.get("verdict", "-") + (" (cut to the possible range)" if r.get("cut_to_possible_range") else "")
        tab.add_row(it, f"{r['ate']:.4g}", f"{r['se']:.3g}", f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]", verdict,
                    f"{r['true_ate']:.4g}" if "true_ate" in r else "-",
                    f"{pooled['ate']:.4g} ± {1.96 * pooled['se']:.3g}" if pooled else "-")
    console.print(tab)
    eps = report["epsilon_per_institution"]
    console.print("ε spent per institution: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in eps.items()))
    if len(items) > 1 and report["epsilon_requested"] != "inf":
        # the mechanism, not measured widths: those live in docs/causal.md and would drift here
        console.print(f"{len(items)} items shared this run's ε: a person counts once per item, so each release's "
                      f"noise is sqrt({len(items)}) = {math.sqrt(len(items)):.1f}x one item's at the same ε and the "
                      "CIs are wider than one item's (measured on the simulators: docs/causal.md, 'Every item in "
                      "one run'); --item estimates only the items you need.", markup=False)
    caveat = shrinkage_caveat({it: report["items"][it]["cate_shrinkage"] for it in items
                               if "cate_shrinkage" in report["items"][it]})
    if caveat:
        console.print(caveat, markup=False)
    if "recommendations" in report:
        rec = report["recommendations"]
        safe = rec.get("causal_safe")
        if safe:
            share = safe["share_of_oracle_gain"]
            console.print(f"following the recommendations (status quo: {safe['status_quo']}): {safe['share_recommended']:.0%} "
                          f"of people get one, mean true gain {safe['gain']:.4g} vs the oracle's {safe['oracle_gain']:.4g}"
                          + (f" ({share:.0%})" if share is not None else ""), markup=False)
        for key, what in (("policy_value", "top-1"), ("policy_value_top_k", f"top-{rec['k']} total")):
            console.print(f"policy value (mean true benefit, {what}): "
                          + ", ".join(f"{name} {rec[name][key]:.4g}" for name in ("causal", "engagement", "oracle", "random")))


