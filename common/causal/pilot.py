"""The forecast's charged pilot release (issue 29, "know before spending"): the institution-side
release and the budget split. Post-processing of the released sums (item shapes, the stand-in
federation, the forecast itself) is in ``fedrec/simulations/forecast.py``.

A run first spends :data:`PILOT_SHARE` of its Gaussian budget (1/σ² terms; :func:`pilot_plan`)
on one **charged pilot release** per institution: per item and arm the count, the sum and the sum
of squares of the outcome scaled by its declared bounds (:func:`pilot_release`, sensitivity
:func:`fedrec.common.causal.sensitivity.pilot_bound`), noised like every other statistic and
added by secure aggregation. The main run is planned at what is left (``main_epsilon``), so the
pilot and the run together stay within the run's ε.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PILOT_SHARE", "PilotPlan", "pilot_terms", "pilot_release", "pilot_noise_std", "pilot_plan"]

#: the pilot's share of the run's Gaussian budget (its 1/σ² against the whole plan's)
PILOT_SHARE = 0.05


@dataclass(frozen=True)
class PilotPlan:
    """The pilot's noise multiplier and the ε left to the main run (``inf``/0: DP off)."""

    noise_multiplier: float
    main_epsilon: float
    share: float = PILOT_SHARE


def pilot_terms(data, items: Sequence[str]) -> dict[str, np.ndarray]:
    """Per item, one row per person considered for it: ``[1-T, T, (1-T) y, T y, (1-T) y^2, T y^2]``
    with ``y`` the outcome scaled to [-1, 1] by the declared bounds (clipped). Not released as is:
    :func:`pilot_release` clips, sums and noises it."""
    from fedrec.common.causal.scaling import scale_outcome

    inter = data.interactions
    ids = inter["item_id"].astype(str).to_numpy()
    out = {}
    for it in items:
        rows = inter[ids == it]
        t = rows["exposed"].to_numpy(np.float64)
        y = scale_outcome(rows["outcome"].to_numpy(np.float64), data.study.outcome_bounds)
        u = 1.0 - t
        out[it] = np.column_stack([u, t, u * y, t * y, u * y * y, t * y * y])
    return out


def pilot_release(data, items: Sequence[str], *, event, noise_share: float = 1.0,
                  generator: np.random.Generator | None = None) -> np.ndarray:
    """The institution's pilot release: (items, 6) sums of :func:`pilot_terms`, noised.

    Privacy contract: each person's row of each item is clipped to ``sqrt(3)``, so one person moves
    the release by at most :func:`~fedrec.common.causal.sensitivity.pilot_bound` (``sqrt(3 J)``
    for J items), which must not exceed the charged ``event.sensitivity`` (checked: refused
    otherwise, before any data is read). The noise is the charged ``event``'s
    (``common/privacy/release.py``): std ``σ · Δ · sqrt(noise_share)`` per coordinate; the caller
    charges the institution's ledger with ``event`` first. ``event=None``: no noise, only for a
    non-private simulation the institution's policy allowed (ε = inf)."""
    from fedrec.common.causal.sensitivity import pilot_bound
    from fedrec.common.privacy.gaussian import clip_rows
    from fedrec.common.privacy.release import gaussian_release

    sens = pilot_bound(len(items))
    if event is not None and not (sens <= event.sensitivity * (1 + 1e-9)):
        raise ValueError(f"the pilot release's sensitivity {sens:.6g} exceeds the charged {event.sensitivity:.6g}")
    terms = pilot_terms(data, items)
    sums = np.stack([clip_rows(terms[it], math.sqrt(3.0)).sum(axis=0) if len(terms[it]) else np.zeros(6)
                     for it in items])
    if event is None:
        return sums
    return gaussian_release(sums.ravel(), event=event, noise_share=noise_share, generator=generator).reshape(sums.shape)


def pilot_noise_std(plan: PilotPlan, n_items: int, institutions: int, noise_mode: str, n_min: int) -> float:
    """The public std per coordinate of the federation's summed pilot: ``institutions`` releases
    each of std ``σ · Δ · sqrt(share)`` (share 1, or 1/n_min with distributed noise)."""
    from fedrec.common.causal.sensitivity import pilot_bound
    from fedrec.common.privacy.release import noise_share

    if plan.noise_multiplier <= 0:
        return 0.0
    return plan.noise_multiplier * pilot_bound(n_items) * math.sqrt(noise_share(noise_mode, n_min) * institutions)


def pilot_plan(cfg) -> PilotPlan:
    """Split the run's budget: the pilot gets :data:`PILOT_SHARE` of the 1/σ² of one calibration of
    the pilot and the plan's steps together (``GaussianEvent(s / sqrt(PILOT_SHARE))`` and each step
    at ``s / sqrt((1 - PILOT_SHARE) w)``) composing to the run's ε at δ; ``main_epsilon`` is what
    the steps alone compose to: the main run is then planned at it (``plan_budget``), so pilot +
    main stay within the run's ε. DP off: ``PilotPlan(0, inf)``."""
    if not cfg.dp:
        return PilotPlan(0.0, math.inf)
    return _pilot_plan_cached(tuple(sorted(cfg.step_shares().items())), float(cfg.epsilon), float(cfg.delta),
                              cfg.accountant)


_PLANS: dict = {}


def _pilot_plan_cached(shares: tuple, epsilon: float, delta: float, accountant: str) -> PilotPlan:
    import warnings

    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events, epsilon_for

    key = (shares, epsilon, delta, accountant)
    if key not in _PLANS:
        f = PILOT_SHARE

        def steps(s: float) -> list:
            return [GaussianEvent(noise_multiplier=s / math.sqrt((1 - f) * w)) for _, w in shares]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = calibrate_for_events(lambda s: [GaussianEvent(noise_multiplier=s / math.sqrt(f))] + steps(s),
                                     target_epsilon=epsilon, delta=delta, accountant=accountant,
                                     sigma_bounds=(0.05, 2000.0), tolerance=0.002 * epsilon)
            main = epsilon_for(steps(s), delta=delta, accountant=accountant)
        _PLANS[key] = PilotPlan(s / math.sqrt(f), float(main))
    return _PLANS[key]
