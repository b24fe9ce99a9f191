"""The knobs of one causal-estimation run and its budget plan.

:class:`CausalConfig` carries the run's settings (run config keys ``causal.*``);
:func:`plan_budget` splits the run's (ε, δ) over its releases and calibrates the noise
multiplier of each under the ledger's accountant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from fedrec.common.causal.clipping import DISTRIBUTED_CLIP_MARGIN, LOCAL_CLIP_MARGIN, LOCAL_CLIP_TAIL
from fedrec.common.causal.derived import parse_derived
from fedrec.common.causal.scaling import ESTIMATORS, TRIM

__all__ = [
    "NEWTON_STEPS_NO_DP", "ANALYST_KNOBS", "EXPERT_KNOBS", "FOLD_KNOBS", "REFUTE_KNOBS", "RUN_KNOBS", "REMOVED_KNOBS",
    "CausalConfig", "BudgetPlan", "plan_budget",
]


#: Newton steps without DP (ε = inf): enough for the fit to converge to machine precision
NEWTON_STEPS_NO_DP = 8


def _flat_auto(value: float | None) -> float:
    """A knob whose None means automatic, as a run-config number: -1.0 for None
    (:meth:`CausalConfig.from_flat` reads it back as None: any value <= 0, or < 0 for the
    ridge, where 0 is a setting)."""
    return -1.0 if value is None else float(value)


#: the analyst's knobs, run config ``causal.<key>``: what to estimate and at what privacy cost
ANALYST_KNOBS = ("estimator", "epsilon", "delta", "items", "covariates", "derived", "noise-mode", "alpha")
#: the analyst's choice of what the causal ServerApp runs **after** the estimation, run config
#: ``causal.refute`` ("placebo,random-common-cause"; ``fedrec-server run causal --refute``): one
#: more charged causal run per refutation (server/causal.refute). Not in the defaults'
#: :meth:`CausalConfig.to_flat` (nothing runs after the estimation unless asked for)
RUN_KNOBS = ("refute",)
#: expert knobs, run config ``causal.expert.<key>``: budget split, clip and histogram rules,
#: whitening, floors and weights. Their defaults are the measured ones (docs/causal.md, "Expert
#: knobs"); change them to study a trade-off, never to tune on the data you report
EXPERT_KNOBS = (
    "share-moments", "share-propensity", "share-outcome-range", "share-outcome", "share-scale", "share-influence",
    "newton-steps", "newton-last", "propensity-start", "outcome-range-tail", "outcome-range-margin",
    "outcome-grid-factor", "nuisance-variance", "psi-tail", "psi-clip-tail", "psi-clip-margin", "psi-grid-factor",
    "psi-noise-ratio", "psi-square-error", "influence-count-weight", "psi-clip", "hessian-weight", "gram-weight",
    "gram-weight-min", "gram-floor-ratio", "whiten-radius", "whiten-mode", "whiten-weighted", "ridge", "floor-k",
    "newton-floor-k", "outcome-ridge-k", "trim-low", "trim-high", "n-min", "accountant",
)
#: a causal run restricted to one cross-fitting half of the people, run config
#: ``causal.expert.fold`` / ``causal.expert.fold-salt``: set by the strategy app
#: (server/strategies.py) for its fold runs, not an analyst's or a CLI's knob — the defaults'
#: :meth:`CausalConfig.to_flat` leaves them out, so ``--set`` refuses them (the in-process
#: pilot, pooled comparison and refutations of ``fedrec-sim causal`` would not apply a fold)
FOLD_KNOBS = ("fold", "fold-salt")
#: a refutation run (issue 32), run config ``causal.expert.refute-kind`` / ``refute-seed``: set
#: by the causal ServerApp (server/causal.py ``main``) on the step messages of the extra causal
#: run it makes per refutation the analyst asked for (``causal.refute``); like FOLD_KNOBS, never
#: in the defaults' :meth:`CausalConfig.to_flat`, so ``--set`` refuses them
REFUTE_KNOBS = ("refute-kind", "refute-seed")
#: knobs that are gone, with why: a run config that still sets one is refused, never ignored
REMOVED_KNOBS = {
    "share-jacobian": "the optional Jacobian release was removed (its DP noise swamped the signal at 2,500 "
                      "people per institution; no measured result supported it)",
    "jacobian-k": "the optional Jacobian release was removed",
    "outcome-anchor": "the pooled outcome anchor was removed (measured: it traded bias for RMSE in 21 of 30 "
                      "DP cells and missed the width target; docs/causal.md)",
}


def _knobs(flat: Mapping[str, object]) -> dict[str, object]:
    """``causal.<key>`` (analyst) and ``causal.expert.<key>`` (expert) -> ``{key: value}``;
    ConfigError naming the key and the fix for a removed knob, an expert knob written without
    ``expert.``, an unknown expert key and an unknown analyst key (a mistyped knob is never
    silently ignored)."""
    from fedrec.common.config import ConfigError

    d: dict[str, object] = {}
    for k, v in flat.items():
        if not k.startswith("causal."):
            continue
        key = k[len("causal."):]
        expert = key.startswith("expert.")
        key = key[len("expert."):] if expert else key
        if key in REMOVED_KNOBS:
            raise ConfigError(f"{k}: {REMOVED_KNOBS[key]}; fix: delete the key")
        if expert and key not in EXPERT_KNOBS and key not in FOLD_KNOBS + REFUTE_KNOBS:
            raise ConfigError(f"{k}: unknown expert knob; fix: one of causal.expert.{{{', '.join(EXPERT_KNOBS)}}}")
        if not expert and key in EXPERT_KNOBS:
            raise ConfigError(f"{k}: an expert knob; fix: write causal.expert.{key} (docs/causal.md, Expert knobs)")
        if not expert and key not in ANALYST_KNOBS + RUN_KNOBS:
            raise ConfigError(f"{k}: unknown causal knob; fix: one of causal.{{{', '.join(ANALYST_KNOBS)}}} "
                              "or causal.expert.<knob> (docs/causal.md)")
        d[key] = v
    return d


@dataclass(frozen=True)
class CausalConfig:
    """Knobs of one causal-estimation run (carried in run config keys ``causal.*`` and in the
    step messages' ConfigRecords).

    ``epsilon``/``delta``: the run's total per institution (``inf`` = DP off, simulations only).
    ``shares``: the split of the run's budget across steps, as fractions of the Gaussian
    "privacy loss" 1/sigma^2 (Gaussian releases compose by adding 1/sigma^2, so a step with
    share w gets sigma_step = sigma / sqrt(w)); the propensity share is split evenly over the
    Newton steps; shares of steps an estimator does not run are renormalised away.
    ``psi_clip``: |psi| bound in scaled outcome units (None = automatic: from the DP |psi|
    histogram of the ``scale`` step, ``psi_clip_tail`` / ``psi_clip_margin`` (:attr:`clip_tail`,
    :attr:`clip_margin`: by noise mode unless set) / ``psi_tail`` / ``psi_noise_ratio``;
    the worst case when DP is off).
    ``ridge``: ridge penalty of the nuisance fits (None = automatic: 0 without DP, else the
    noise sd of a released Gram coordinate x sqrt(p)).
    ``floor_k`` / ``newton_floor_k``: eigenvalue floor of the noisy Grams / Newton Hessians =
    that multiple of the spectral norm of their noise; ``outcome_ridge_k``: outcome ridge = outcome_ridge_k x 2 x the spectral norm of the
    noise on X'y (equal to the Gram's when ``gram_weight`` is 1).
    ``whiten_weighted``: bound the whitened design by fit weights instead of clipping features
    (:class:`Whitening`); ``derived``: extra nuisance features ``op(covariate)`` (``DERIVED_OPS``).
    ``nuisance_variance``: add to the AIPW variance what the DP noise in the nuisance fits adds
    (:func:`cross_fit_variance`, post-processing of public quantities, no release).

    The analyst's knobs are :data:`ANALYST_KNOBS` (run config ``causal.<key>``); every other
    field is an expert knob (:data:`EXPERT_KNOBS`, run config ``causal.expert.<key>``) whose
    default is the measured one (docs/causal.md, "Expert knobs").
    """

    estimator: str = "aipw"
    epsilon: float = 1.0
    delta: float = 1e-5
    items: tuple[str, ...] = ()
    covariates: tuple[str, ...] | None = None
    derived: tuple[str, ...] = ()
    #: Newton steps of the propensity fit under DP (one release each); from the LDA start two
    #: reach what four from zero did (docs/causal.md). Without DP (ε = inf) the fit runs at least
    #: :data:`NEWTON_STEPS_NO_DP`, which costs nothing (:attr:`newton_count`)
    newton_steps: int = 2
    #: fraction of ``share_propensity`` the last Newton step gets (the rest split evenly over the
    #: earlier ones; 0: every step the same). Newton forgets the earlier steps' gradient noise
    #: (``newton_noise_cov``), so the last step's noise is what the fitted beta carries; from the
    #: LDA start the first step has little left to do (docs/causal.md). Default 0.65.
    newton_last: float = 0.65
    #: where Newton starts: "lda" (default; :func:`lda_start` from per-item arm sums the
    #: ``moments`` release then carries) or "zero" (the moments release stays ``vech(x x')``)
    propensity_start: str = "lda"
    share_moments: float = 0.10
    share_propensity: float = 0.175
    share_outcome: float = 0.25
    share_influence: float = 0.40
    share_scale: float = 0.06
    #: share of the ``outcome-range`` step (aipw/ra under DP; 0: off, the outcome models are
    #: fitted on the declared bounds): a DP histogram of the scaled outcome from which the
    #: server picks the interval the outcome models are fitted on (:func:`outcome_range_from_histogram`)
    share_outcome_range: float = 0.03
    #: fraction of people each side of that interval (before the margin) and its widening
    outcome_range_tail: float = 0.005
    outcome_range_margin: float = 1.25
    #: ratio of consecutive edges of the public signed outcome grid (:func:`outcome_grid`)
    outcome_grid_factor: float = 2.0 ** 0.5
    nuisance_variance: bool = True
    #: fraction of people above the |psi| histogram edge from which the noise-limited rule
    #: estimates sum(psi^2) (:func:`histogram_sum_squares`)
    psi_tail: float = 0.01
    #: the clip is ``clip_margin`` x the edge above which at most ``clip_tail`` of the people lie.
    #: None = by noise mode (:attr:`clip_tail`, :attr:`clip_margin`): 1% and 2 with distributed
    #: noise; 5% and 5 with local noise, whose 1% edge is not resolvable at ε <= 1 (the count
    #: noise summed over the bins above it is as large as the 1% it is compared with)
    psi_clip_tail: float | None = None
    psi_clip_margin: float | None = None
    #: ratio of consecutive edges of the public |psi| grid of the ``scale`` histogram
    psi_grid_factor: float = 2.0
    #: the psi clip is raised (never lowered) until the influence-sum noise is this fraction of
    #: the sampling SD (:func:`noise_limited_clip`; 0: off): at large ε it removes clipping bias
    #: for at most sqrt(1 + ratio^2) - 1 more SE; at ε <= 1 it does not bind. 0.40 (1,000 runs
    #: per cell against 0.45: ε >= 2 CIs 1-2% narrower, same biases, coverage 33/33; at 0.35 the
    #: clip bias starts to return, education distributed ε = 2 -0.03 -> -0.07 SE; docs/causal.md)
    psi_noise_ratio: float = 0.40
    #: the weight of the psi^2 coordinate of the influence release is the smallest that keeps
    #: the noise on ``sum psi^2`` (which sets the SE's sampling part) within this fraction of the
    #: psi sum's variance (:func:`psi_square_weight`); 0: the fixed weight ``INFLUENCE_WEIGHTS[1]``
    psi_square_error: float = 0.2
    #: relative weight of the count coordinate of the influence release (:func:`influence_weights`);
    #: its noise only enters through ATE x the count's relative error (:func:`ate_from_sums`)
    influence_count_weight: float = 0.05
    #: weight of the Hessian coordinates in each Newton release ``[g, h vech(H)]`` (the server
    #: divides it out): < 1 moves noise from the gradient, which sets the fitted beta, to the
    #: Hessian, which only sets the step (docs/causal.md)
    hessian_weight: float = 1.0
    #: weight of the Gram coordinates in the outcome release ``[g vech(G), X'y, y'y]``: the
    #: coefficients' noise is mostly X'y's when they are small (:func:`ridge_noise_cov`).
    #: None (default): :func:`auto_gram_weight` after the propensity steps (public post-processing)
    gram_weight: float | None = None
    #: lowest automatic Gram weight, and the largest Gram-noise eigenvalue floor it may cause as
    #: a multiple of the fitted propensity Hessian's intercept entry (about the smaller arm's size
    #: times the mean e(1-e)): the floor is a shrinkage the SE does not carry (docs/causal.md)
    gram_weight_min: float = 0.3
    gram_floor_ratio: float = 1.0
    whiten_radius: float | None = None
    whiten_mode: str = "diag"
    whiten_weighted: bool = True
    psi_clip: float | None = None
    ridge: float | None = None
    floor_k: float = 1.0
    #: eigenvalue floor of the noisy Newton Hessians, in the same units as ``floor_k`` (which
    #: the Grams use). Both 1 (were 2) since the outcome models fit the ``outcome-range``
    #: interval: with accurate outcome models what is left of the small-ε bias is the floors'
    #: shrinkage of the nuisances (finance local ε = 1: +0.61 SE of nuisance bias with both at
    #: 2, +0.33 with the Newton floor at 1, +0.25 with both; docs/causal.md)
    newton_floor_k: float = 1.0
    outcome_ridge_k: float = 1.0
    trim: tuple[float, float] = TRIM
    noise_mode: str = "local"
    #: distributed noise: survivors each client's σ²/n_min share rests on (0 = automatic: the
    #: institutions minus the dropouts the secure sum tolerates; resolved where the federation's
    #: size is known, :meth:`resolved`)
    n_min: int = 0
    accountant: str = "prv"
    alpha: float = 0.05
    #: cross-fitting: -1 (default) uses every person; 0 or 1 restricts the run, at every
    #: institution, to the people of that half (``person_fold(person_id, fold_salt)`` of
    #: common/causal/ope.py; the client's filter is client/statistics.fold_subset). The salt is
    #: public and required with a fold. A fold run is a causal run like any other: charged
    #: at every institution (ledger task ``causal-fold<k>-<step>``)
    fold: int = -1
    fold_salt: str = ""
    #: the refutations (common/causal/refute.REFUTATIONS) the causal ServerApp runs after the
    #: estimation, each one more charged causal run (analyst key ``causal.refute``, a
    #: comma-separated list; ``fedrec-server run causal --refute``)
    refute: tuple[str, ...] = ()
    #: this run IS refutation ``refute_kind`` ("" = not a refutation run): every institution
    #: transforms its own data with ``refute_data(refute_kind, data, refute_seed)`` (public seed)
    #: before each step (client/causal_app.py); ledger task ``causal-refute-<kind>-<step>``
    refute_kind: str = ""
    refute_seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator {self.estimator!r}: use one of {', '.join(ESTIMATORS)}")
        if not self.epsilon > 0:
            raise ValueError("epsilon must be > 0 (inf turns DP off)")
        for spec in self.derived:
            parse_derived(spec)
        if self.newton_steps < 1:
            raise ValueError("newton_steps must be >= 1")
        if not 0.0 <= self.newton_last < 1.0:
            raise ValueError("newton_last must be in [0, 1) (0: an even split)")
        if min(self.share_moments, self.share_propensity, self.share_outcome, self.share_influence,
               self.share_scale, self.share_outcome_range) < 0:
            raise ValueError("budget shares must be >= 0")
        for name in ("hessian_weight", "gram_weight", "gram_weight_min", "gram_floor_ratio"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v}")
        if not self.psi_grid_factor > 1.0:
            raise ValueError(f"psi_grid_factor must be > 1, got {self.psi_grid_factor}")
        if not self.outcome_grid_factor > 1.0:
            raise ValueError(f"outcome_grid_factor must be > 1, got {self.outcome_grid_factor}")
        if not (self.psi_square_error >= 0 and math.isfinite(self.psi_square_error)):
            raise ValueError(f"psi_square_error must be >= 0 and finite (0: fixed weight), got {self.psi_square_error}")
        if not (self.influence_count_weight > 0 and math.isfinite(self.influence_count_weight)):
            raise ValueError(f"influence_count_weight must be positive and finite, got {self.influence_count_weight}")
        if not (self.psi_noise_ratio >= 0 and math.isfinite(self.psi_noise_ratio)):
            raise ValueError(f"psi_noise_ratio must be >= 0 and finite (0: off), got {self.psi_noise_ratio}")
        if self.fold not in (-1, 0, 1):
            raise ValueError(f"fold must be -1 (every person), 0 or 1, got {self.fold}")
        if (self.fold >= 0) != bool(self.fold_salt):
            raise ValueError("fold and fold_salt go together: a fold (0 or 1) needs a non-empty fold_salt, and a "
                             f"fold_salt needs a fold; got fold {self.fold}, fold_salt {self.fold_salt!r}")
        if self.refute or self.refute_kind:
            from fedrec.common.causal.refute import REFUTATIONS

            for k in self.refute + ((self.refute_kind,) if self.refute_kind else ()):
                if k not in REFUTATIONS:
                    raise ValueError(f"refutation {k!r}: unknown; use {' and/or '.join(REFUTATIONS)}")
            if len(set(self.refute)) != len(self.refute):
                raise ValueError(f"refutations {list(self.refute)}: one is named twice; name each once")
            if self.refute_kind and (self.refute or self.fold >= 0):
                raise ValueError("a refutation run (refute_kind) runs no further refutations and no fold")
        lo, hi = self.trim
        if not 0.0 < lo < hi < 1.0:
            raise ValueError(f"trim must be 0 < trim-low < trim-high < 1, got {self.trim}")
        for name, ok, rule in (("delta", 0.0 < self.delta < 1.0, "in (0, 1)"),
                               ("alpha", 0.0 < self.alpha < 1.0, "in (0, 1)"),
                               ("psi_tail", 0.0 < self.psi_tail < 1.0, "in (0, 1)"),
                               ("psi_clip_tail", self.psi_clip_tail is None or 0.0 < self.psi_clip_tail < 1.0,
                                "in (0, 1)"),
                               ("psi_clip_margin", self.psi_clip_margin is None or self.psi_clip_margin > 0, "> 0"),
                               ("outcome_range_tail", 0.0 < self.outcome_range_tail < 0.5, "in (0, 0.5)"),
                               ("outcome_range_margin", self.outcome_range_margin >= 1.0, ">= 1"),
                               ("floor_k", self.floor_k >= 0, ">= 0"),
                               ("newton_floor_k", self.newton_floor_k >= 0, ">= 0"),
                               ("outcome_ridge_k", self.outcome_ridge_k >= 0, ">= 0"),
                               ("n_min", self.n_min >= 0, ">= 0 (0: automatic)")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        for name, allowed in (("noise_mode", ("local", "distributed")), ("accountant", ("prv", "rdp")),
                              ("whiten_mode", ("diag", "full")), ("propensity_start", ("lda", "zero"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")

    @property
    def dp(self) -> bool:
        return math.isfinite(self.epsilon)

    def resolved(self, automatic_n_min: int) -> "CausalConfig":
        """This config with an automatic ``n_min`` (0) replaced by ``automatic_n_min``."""
        import dataclasses

        return self if self.n_min else dataclasses.replace(self, n_min=max(1, int(automatic_n_min)))

    @property
    def clip_tail(self) -> float:
        """The tail fraction of the psi clip's histogram edge: the config's, else by noise mode
        (:attr:`psi_clip_tail`)."""
        if self.psi_clip_tail is not None:
            return self.psi_clip_tail
        return LOCAL_CLIP_TAIL if self.noise_mode == "local" else self.psi_tail

    @property
    def clip_margin(self) -> float:
        """The psi clip as a multiple of that edge: the config's, else by noise mode."""
        if self.psi_clip_margin is not None:
            return self.psi_clip_margin
        return LOCAL_CLIP_MARGIN if self.noise_mode == "local" else DISTRIBUTED_CLIP_MARGIN

    @property
    def radius_factor(self) -> float | None:
        """Whitening radius / sqrt(d): the config's, else 1.0 with weighted fits (the default;
        measured on the three simulators, docs/causal.md) and, for clipped features
        (``whiten_weighted=False``), 1.0 up to ε = 2 and 1.5 above (a smaller radius clips more
        people's features — a model change, more bias — but lowers the sensitivity).
        None: DP off."""
        if not self.dp:
            return None
        if self.whiten_radius is not None:
            return self.whiten_radius
        if self.weighted_fits:
            return 1.0
        return 1.0 if self.epsilon <= 2.0 else 1.5

    @property
    def weighted_fits(self) -> bool:
        """Whether the nuisance fits use radius weights (``whiten_weighted``) rather than
        clipped features. Not for ``ra``: its ATE averages the arm models over the released
        Gram's covariate mean, which weights would tilt."""
        return bool(self.whiten_weighted) and self.estimator != "ra"

    def steps(self) -> list[str]:
        """The releases of one run, in order (``propensity:k`` per Newton step)."""
        prop = [f"propensity:{k}" for k in range(1, self.newton_count + 1)]
        # "outcome-range" only under DP: without noise the declared bounds cost nothing
        rng = ["outcome-range"] if self.dp and self.share_outcome_range > 0 else []
        if self.estimator == "ra":
            return ["moments"] + rng + ["outcome"]
        if self.estimator == "ipw":
            return ["moments"] + prop + ["scale", "influence"]
        return ["moments"] + prop + rng + ["outcome", "scale", "influence"]

    @property
    def newton_count(self) -> int:
        """Newton steps this run takes: ``newton_steps`` under DP, at least
        :data:`NEWTON_STEPS_NO_DP` without (no release costs budget; the fit converges)."""
        return self.newton_steps if self.dp else max(self.newton_steps, NEWTON_STEPS_NO_DP)

    def _newton_fraction(self, k: int) -> float:
        """Fraction of the propensity share that Newton step k (1-based) gets."""
        n = self.newton_count
        if not self.newton_last or n == 1:
            return 1.0 / n
        return self.newton_last if k == n else (1.0 - self.newton_last) / (n - 1)

    def step_shares(self) -> dict[str, float]:
        raw = {}
        for s in self.steps():
            if s == "moments":
                raw[s] = self.share_moments
            elif s.startswith("propensity"):
                raw[s] = self.share_propensity * self._newton_fraction(int(s.split(":")[1]))
            elif s == "outcome":
                raw[s] = self.share_outcome
            elif s == "scale":
                raw[s] = self.share_scale
            elif s == "outcome-range":
                raw[s] = self.share_outcome_range
            else:
                raw[s] = self.share_influence
        tot = sum(raw.values())
        if tot <= 0:
            raise ValueError("the budget shares of the steps this estimator runs sum to 0")
        return {k: v / tot for k, v in raw.items()}

    def to_flat(self) -> dict[str, object]:
        """The run-config keys of this config: ``causal.<key>`` for :data:`ANALYST_KNOBS`,
        ``causal.expert.<key>`` for :data:`EXPERT_KNOBS` (:meth:`from_flat` reads them back)."""
        import json

        flat = {
            "causal.estimator": self.estimator, "causal.epsilon": float(self.epsilon), "causal.delta": self.delta,
            "causal.items": json.dumps(list(self.items)),
            "causal.covariates": json.dumps(None if self.covariates is None else list(self.covariates)),
            "causal.derived": json.dumps(list(self.derived)),
            "causal.newton-steps": self.newton_steps,
            "causal.newton-last": float(self.newton_last),
            "causal.propensity-start": self.propensity_start,
            "causal.share-moments": self.share_moments,
            "causal.whiten-radius": _flat_auto(self.whiten_radius),
            "causal.share-propensity": self.share_propensity,
            "causal.share-scale": self.share_scale, "causal.psi-tail": self.psi_tail,
            "causal.share-outcome-range": self.share_outcome_range,
            "causal.outcome-range-tail": self.outcome_range_tail,
            "causal.outcome-range-margin": self.outcome_range_margin,
            "causal.outcome-grid-factor": self.outcome_grid_factor,
            "causal.nuisance-variance": bool(self.nuisance_variance),
            "causal.psi-clip-margin": _flat_auto(self.psi_clip_margin),
            "causal.psi-clip-tail": _flat_auto(self.psi_clip_tail),
            "causal.whiten-mode": self.whiten_mode,
            "causal.psi-grid-factor": self.psi_grid_factor, "causal.hessian-weight": self.hessian_weight,
            "causal.psi-noise-ratio": self.psi_noise_ratio,
            "causal.psi-square-error": self.psi_square_error,
            "causal.influence-count-weight": self.influence_count_weight,
            "causal.gram-weight": _flat_auto(self.gram_weight),
            "causal.gram-weight-min": self.gram_weight_min, "causal.gram-floor-ratio": self.gram_floor_ratio,
            "causal.whiten-weighted": bool(self.whiten_weighted),
            "causal.share-outcome": self.share_outcome, "causal.share-influence": self.share_influence,
            "causal.psi-clip": _flat_auto(self.psi_clip),
            "causal.ridge": _flat_auto(self.ridge),
            "causal.floor-k": self.floor_k, "causal.outcome-ridge-k": self.outcome_ridge_k,
            "causal.newton-floor-k": self.newton_floor_k,
            "causal.trim-low": self.trim[0], "causal.trim-high": self.trim[1],
            "causal.noise-mode": self.noise_mode, "causal.n-min": self.n_min,
            "causal.accountant": self.accountant, "causal.alpha": self.alpha,
        }
        if self.fold >= 0:  # a fold run only (FOLD_KNOBS): the server's step messages carry it
            flat.update({"causal.fold": int(self.fold), "causal.fold-salt": str(self.fold_salt)})
        if self.refute:  # only when asked for: the defaults' keys stay as they were
            flat["causal.refute"] = ",".join(self.refute)
        if self.refute_kind:  # a refutation run only (REFUTE_KNOBS): the server's step messages carry it
            flat.update({"causal.refute-kind": self.refute_kind, "causal.refute-seed": int(self.refute_seed)})
        # expert knobs travel as causal.expert.<key>: the analyst's table stays short
        return {(f"causal.expert.{k[len('causal.'):]}" if k[len("causal."):] in EXPERT_KNOBS + FOLD_KNOBS + REFUTE_KNOBS
                 else k): v
                for k, v in flat.items()}

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> CausalConfig:
        """The config of run-config keys ``causal.*`` (:meth:`to_flat`). ConfigError (one line
        naming the key and the fix) for a removed knob, an expert knob written without
        ``expert.`` and an unknown ``causal.expert.*`` key; ValueError for a bad value."""
        import json

        d = _knobs(flat)
        kw: dict = {}
        if "estimator" in d:
            kw["estimator"] = str(d["estimator"])
        for key, attr in (("epsilon", "epsilon"), ("delta", "delta"), ("share-propensity", "share_propensity"),
                          ("share-moments", "share_moments"),
                          ("share-scale", "share_scale"), ("psi-tail", "psi_tail"),
                          ("share-outcome-range", "share_outcome_range"),
                          ("outcome-range-tail", "outcome_range_tail"),
                          ("outcome-range-margin", "outcome_range_margin"),
                          ("outcome-grid-factor", "outcome_grid_factor"),
                          ("share-outcome", "share_outcome"), ("share-influence", "share_influence"),
                          ("alpha", "alpha"), ("floor-k", "floor_k"), ("newton-floor-k", "newton_floor_k"),
                          ("outcome-ridge-k", "outcome_ridge_k"), ("psi-grid-factor", "psi_grid_factor"),
                          ("psi-noise-ratio", "psi_noise_ratio"),
                          ("psi-square-error", "psi_square_error"),
                          ("influence-count-weight", "influence_count_weight"),
                          ("hessian-weight", "hessian_weight"), ("gram-weight-min", "gram_weight_min"),
                          ("gram-floor-ratio", "gram_floor_ratio")):
            if key in d:
                kw[attr] = float(d[key])  # type: ignore[arg-type]
        for key, attr in (("newton-steps", "newton_steps"), ("n-min", "n_min"), ("fold", "fold"),
                          ("refute-seed", "refute_seed")):
            if key in d:
                kw[attr] = int(d[key])  # type: ignore[arg-type]
        if "items" in d:
            kw["items"] = tuple(json.loads(str(d["items"])))
        if "covariates" in d:
            cov = json.loads(str(d["covariates"]))
            kw["covariates"] = None if cov is None else tuple(cov)
        if "whiten-weighted" in d:
            v = d["whiten-weighted"]
            kw["whiten_weighted"] = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        if "derived" in d:
            kw["derived"] = tuple(json.loads(str(d["derived"])) or ())
        if "nuisance-variance" in d:
            v = d["nuisance-variance"]
            kw["nuisance_variance"] = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        for key, attr in (("psi-clip-margin", "psi_clip_margin"), ("psi-clip-tail", "psi_clip_tail"),
                          ("psi-clip", "psi_clip"), ("gram-weight", "gram_weight"),
                          ("whiten-radius", "whiten_radius")):
            if key in d:  # <= 0: automatic (by noise mode, ε or data; see the field)
                v = float(d[key])  # type: ignore[arg-type]
                kw[attr] = None if v <= 0 else v
        if "newton-last" in d:
            kw["newton_last"] = max(float(d["newton-last"]), 0.0)  # type: ignore[arg-type]
        if "ridge" in d:
            v = float(d["ridge"])  # type: ignore[arg-type]
            kw["ridge"] = None if v < 0 else v
        if "trim-low" in d or "trim-high" in d:
            kw["trim"] = (float(d.get("trim-low", TRIM[0])), float(d.get("trim-high", TRIM[1])))  # type: ignore[arg-type]
        for key, attr in (("noise-mode", "noise_mode"), ("accountant", "accountant"), ("whiten-mode", "whiten_mode"),
                          ("propensity-start", "propensity_start"), ("fold-salt", "fold_salt"),
                          ("refute-kind", "refute_kind")):
            if key in d:
                kw[attr] = str(d[key])
        if "refute" in d:  # analyst: "placebo,random-common-cause" ("" = none); checked here, one line
            from fedrec.common.causal.refute import REFUTATIONS
            from fedrec.common.config import ConfigError

            names = tuple(n.strip() for n in str(d["refute"]).split(",") if n.strip())
            for n in names:
                if n not in REFUTATIONS:
                    raise ConfigError(f"causal.refute {n!r}: unknown refutation; fix: use "
                                      f"{' and/or '.join(REFUTATIONS)}, comma-separated")
            if len(set(names)) != len(names):
                raise ConfigError(f"causal.refute {d['refute']!r}: a refutation named twice; fix: name each once")
            kw["refute"] = names
        return cls(**kw)


@dataclass(frozen=True)
class BudgetPlan:
    """Noise multiplier per step (0 = DP off) and what the run spends in all."""

    sigma: dict[str, float]
    shares: dict[str, float]
    epsilon: float
    delta: float

    def events(self) -> list:
        from fedrec.common.privacy.accountant import GaussianEvent

        return [GaussianEvent(noise_multiplier=s) for s in self.sigma.values() if s > 0]

    def step_epsilon(self, accountant: str = "prv") -> dict[str, float]:
        """ε of each step alone (for the report; the run's total is their composition)."""
        from fedrec.common.privacy.accountant import GaussianEvent, epsilon_for

        if not math.isfinite(self.epsilon):
            return {k: math.inf for k in self.sigma}
        return {k: epsilon_for([GaussianEvent(noise_multiplier=s)], delta=self.delta, accountant=accountant)
                for k, s in self.sigma.items()}


def plan_budget(cfg: CausalConfig) -> BudgetPlan:
    """Calibrate one sigma so that the run's steps (sigma / sqrt(share) each) compose to the
    target ε at δ under the ledger's accountant; DP off (ε = inf) gives sigma 0 everywhere."""
    shares = cfg.step_shares()
    if not cfg.dp:
        return BudgetPlan({k: 0.0 for k in shares}, shares, math.inf, cfg.delta)
    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events

    used = {k: w for k, w in shares.items() if w > 0}
    if len(used) != len(shares):
        raise ValueError(f"every step needs a budget share > 0, got {shares}")
    sigma = _calibrate_cached(tuple(sorted(used.items())), float(cfg.epsilon), float(cfg.delta), cfg.accountant)
    return BudgetPlan({k: sigma / math.sqrt(w) for k, w in shares.items()}, shares, float(cfg.epsilon), cfg.delta)
_CAL: dict = {}


def _calibrate_cached(shares: tuple, epsilon: float, delta: float, accountant: str) -> float:
    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events

    import warnings

    key = (shares, epsilon, delta, accountant)
    if key not in _CAL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CAL[key] = calibrate_for_events(
                lambda s: [GaussianEvent(noise_multiplier=s / math.sqrt(w)) for _, w in shares],
                target_epsilon=epsilon, delta=delta, accountant=accountant, sigma_bounds=(0.05, 2000.0),
                tolerance=0.002 * epsilon)
    return _CAL[key]
