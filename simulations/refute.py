"""Placebo-treatment and random-common-cause refutations (common/causal/refute.py), run in
process as **charged** causal runs: every institution's release goes through its own
:class:`~fedrec.client.guard.ReleaseGuard` — authorize (policy) -> charge (write-ahead ledger
row, task ``refute-<kind>-<step>``) -> clipped sums + the charged event's noise -> released —
the path a causal run's client handler takes (client/causal_app.py), with the sums added in
numpy instead of SecAgg+. The refutation's budget is therefore visible in each institution's
ledger, next to the causal run's.

Privacy: a refutation is one more causal run on each institution's (transformed) data: it
costs the causal run's ε again (the guard refuses it when the cap does not allow it; nothing is
computed then). The transformation happens at the institution; only noised sums leave. A
placebo's per-person bound is 3x the causal run's (common/causal/refute.py): its releases are
charged at that bound, with three times the noise (refutation_plan), exactly as over Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedrec.common.causal.config import CausalConfig
from fedrec.common.causal.refute import REFUTATIONS, refutation_design, refute_data, verdict
from fedrec.common.datasets import InstitutionData

__all__ = ["guarded_send", "guarded_estimate", "refute_inprocess"]


def guarded_send(institutions: Sequence[InstitutionData], cfg: CausalConfig, items: Sequence[str],
                 guards: Mapping[str, object], *, run_id: str, task: str, rng: np.random.Generator | None = None,
                 factor: float = 1.0):
    """A transport for :func:`fedrec.server.causal.run_protocol` that charges each institution's
    guard before computing its release (``guards``: institution name -> ReleaseGuard).
    ``factor``: the run's per-person bound in units of the causal run's (a refutation's,
    common/causal/refute.SENSITIVITY_FACTOR): a step sent with σ' is charged as
    ``GaussianEvent(σ' / factor, factor x bound)``, as the ClientApp does."""
    from fedrec.client.guard import ReleaseRequest
    from fedrec.client.statistics import design_columns, release, step_contributions
    from fedrec.common.causal.sensitivity import release_sensitivity
    from fedrec.common.privacy.accountant import GaussianEvent, NonPrivateEvent

    request = ReleaseRequest(epsilon=cfg.epsilon, delta=cfg.delta, noise_mode=cfg.noise_mode,
                             n_min=cfg.n_min or len(institutions), round_size=len(institutions))
    p = len(design_columns(institutions[0], cfg.covariates, cfg.derived)) + 1
    cache: dict = {}
    counter = {"round": 0}

    def send(step: str, arrays: dict, config: dict):
        kind = step.split(":")[0]
        sigma = float(config["noise-multiplier"])
        counter["round"] += 1
        sens = release_sensitivity(kind, p, arrays, len(items), items)  # public: before any data is read
        total: dict[str, np.ndarray] = {}
        for d in institutions:
            guard = guards[d.name]
            share = guard.authorize(request)
            event = GaussianEvent(noise_multiplier=sigma / factor, sensitivity=sens * factor) if sigma > 0 \
                else NonPrivateEvent()
            charge = guard.charge(event, run_id=run_id, round=counter["round"], task=f"{task}-{step}", model="causal")
            blocks = step_contributions(kind, d, items, arrays, estimator=cfg.estimator, trim=cfg.trim,
                                        covariates=cfg.covariates, derived=cfg.derived, cache=cache)
            sums = release(blocks, event=charge.event if sigma > 0 else None, noise_share=share, generator=rng)
            guard.released(charge)
            for k, v in sums.items():
                total[k] = total[k] + v if k in total else v.copy()
        return total, len(institutions), {}

    return send


def guarded_estimate(institutions: Sequence[InstitutionData], cfg: CausalConfig, guards: Mapping[str, object], *,
                     run_id: str, task: str = "causal", rng: np.random.Generator | None = None, refute: str = ""):
    """A causal run (server/causal.run_protocol) whose every release is charged to ``guards``;
    ``refute``: the refutation this run is ("" none), whose bound factor the plan and the charges
    carry (common/causal/refute.refutation_plan), as over Flower."""
    from fedrec.common.causal.config import plan_budget
    from fedrec.common.causal.refute import SENSITIVITY_FACTOR, refutation_plan

    from fedrec.server.causal import run_protocol
    from fedrec.simulations.causal_cli import study_info

    cfg = cfg.resolved(len(institutions))
    info = study_info(institutions, cfg)
    items = list(cfg.items) or info.items
    factor = SENSITIVITY_FACTOR[refute] if refute else 1.0
    plan = refutation_plan(plan_budget(cfg), refute) if refute else None
    return run_protocol(guarded_send(institutions, cfg, items, guards, run_id=run_id, task=task, rng=rng,
                                     factor=factor), info, cfg, plan=plan)


def refute_inprocess(institutions: Sequence[InstitutionData], cfg: CausalConfig, kind: str, *, seed: int,
                     guards: Mapping[str, object], original: Mapping[str, Mapping], alpha: float = 0.05,
                     rng: np.random.Generator | None = None) -> dict:
    """Run refutation ``kind`` (a charged causal run on each institution's transformed data, the
    propensity refit) and compare with the ``original`` estimates (causal.json ``items``):
    :func:`fedrec.common.causal.refute.verdict`, plus the ε each institution's ledger now shows."""
    from fedrec.common.privacy.accountant import epsilon_for

    if kind not in REFUTATIONS:
        raise ValueError(f"unknown refutation {kind!r}; use one of {', '.join(REFUTATIONS)}")
    data = [refute_data(kind, d, seed) for d in institutions]
    res = guarded_estimate(data, refutation_design(cfg, kind), guards, run_id=f"refute-{kind}-{seed}", task=f"refute-{kind}", rng=rng,
                           refute=kind)
    out = verdict(kind, original, res.items, alpha=alpha)
    out["seed"] = seed
    out["epsilon_per_institution"] = {
        n: (float(epsilon_for(g.ledger.events(), delta=cfg.delta)) if math.isfinite(cfg.epsilon) else "inf")
        for n, g in guards.items()}
    return out


def check_refutations(kinds: Sequence[str]) -> tuple[str, ...]:
    """The refutations a command declares (``--refute``), checked before anything is spent:
    FedrecInputError (one line) for an unknown or repeated one."""
    from fedrec.common.errors import FedrecInputError

    out: list[str] = []
    for k in kinds:
        k = str(k).strip()
        if k not in REFUTATIONS:
            raise FedrecInputError(f"--refute {k!r}: unknown refutation; fix: use {' and/or '.join(REFUTATIONS)}")
        if k in out:
            raise FedrecInputError(f"--refute {k}: given twice; fix: name each refutation once")
        out.append(k)
    return tuple(out)


def refute_after_causal(institutions: Sequence[InstitutionData], cfg: CausalConfig, kinds: Sequence[str], *,
                        policy_dir, seed: int, original: Mapping[str, Mapping], alpha: float = 0.05) -> dict:
    """The refutations ``kinds`` after a causal run, each a charged causal run through every
    institution's own guard over its **provisioned** policy and ledger (``policy_dir``:
    ``<policy_dir>/<institution>/privacy.toml``, simulations/provision.py), so each
    institution's ledger shows the causal run and the refutations composed.

    Privacy: each refutation costs the causal run's ε again at every institution; the policy's
    cap must have been provisioned for them (``provision_institutions(runs=1 + len(kinds))``).
    A refusal by a guard (cap, policy) becomes one FedrecInputError line naming the fix;
    nothing of the refused run is computed."""
    from pathlib import Path

    from fedrec.client.guard import Refusal, open_guard
    from fedrec.common.errors import FedrecInputError
    from fedrec.common.privacy.policy import POLICY_FILE, load_policy

    guards = {d.name: open_guard(load_policy(Path(policy_dir) / d.name / POLICY_FILE), institution=d.name,
                                 accountant=cfg.accountant, simulated=True)
              for d in institutions}
    rng = np.random.default_rng([int(seed), 32])
    out: dict = {}
    for kind in check_refutations(kinds):
        try:
            out[kind] = refute_inprocess(institutions, cfg, kind, seed=seed, guards=guards, original=original,
                                         alpha=alpha, rng=rng)
        except Refusal as err:
            raise FedrecInputError(f"--refute {kind}: refused by an institution's guard ({err}); fix: declare every "
                                   "refutation with --refute on the causal command itself (its policies are "
                                   "provisioned for the causal run plus the declared refutations), into a new "
                                   "--out folder") from None
    return out
