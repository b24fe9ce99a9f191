"""Off-policy evaluation of recommendation strategies from released sums (IPS, SNIPS, DM, DR,
switch-DR), with CIs that include the DP noise.

The question: "if people were recommended by strategy π instead of the logging policy, how
would their outcome change?". A **strategy** gives, for every (person, item the person was
considered for), the probability ``p`` that it exposes the person to the item (top-1 ranking:
1 for the chosen item, 0 for the others; random: ``1/m``; the logging policy: its propensity).
Its **value** is the mean outcome change against exposing nothing,

    V(π) = E_x[ Σ_j p_j(x) τ_j(x) ]    (outcome units; the simulators' outcome adds the
                                         effects of every item a person is exposed to)

Each (person, item) row is a binary-action bandit (action = exposed, logging propensity
``e``); the contrast between the row policy "expose with probability p" and "never expose" is,
for every estimator of the Open Bandit Pipeline (OBP, Saito et al. 2021), written with the
weights ``w_p(a) = π_p(a|x)/π_b(a|x)`` of the logged action:

* IPS   ``Σ_j (w_p − w_0) Y  = Σ_j p [T Y/e − (1−T) Y/(1−e)]``
* DM    ``Σ_j p (q1 − q0)``
* DR    ``DM + Σ_j p [T (Y − q1)/e − (1−T)(Y − q0)/(1−e)]``
* switch-DR: DR whose correction is kept only where the contrast weight ``p/e_T ≤ τ``
  (identical to OBP's ``SwitchDoublyRobust`` for deterministic strategies, p ∈ {0, 1})
* SNIPS: the Hájek form ``P̄ (Σ A1/Σ W1 − Σ A0/Σ W0)`` with ``A1 = Σ_j p T Y/e``,
  ``W1 = Σ_j p T/e`` (and the control arm alike), ``P̄`` the mean of ``Σ_j p``.

**Sufficient statistics.** Per person and strategy the 8 components :data:`COMPONENTS`
``[A1, W1, A0, W0, P, D, G, S]`` (D the DM term, G and S the DR and switch-DR corrections)
determine every estimator; with a leading 1, ``z̃ = [1, z_1, ..., z_K]`` for K strategies,
the released first moments ``Σ z̃`` give the estimates (and, through each estimate's gradient
:func:`estimator_coefficients`, what the DP noise moves it by). The sampling variances come
from released sums of squares of each estimator's per-person term and of each pair of
strategies' term differences (:data:`SQUARE_TERMS`, :data:`PAIR_TERMS`), winsorized at a
public ``square_clip`` much smaller than the components' worst case: a full Gram of ``z̃``
normalized by the worst-case bounds was tried first and its noise swamped the variance
(it is divided by N² but scaled by the bound², ~1,600 here, against a true variance of a few
1e-6 in scaled units).

**Privacy contract.** Y, q1, q0 are scaled to [-1, 1] (the study's declared outcome bounds),
e is a public model trimmed to ``[trim, 1 − trim]``. The **weight clip** λ caps each person's
total realized contrast weight ``Σ_j p_j / e_{T,j}`` (the person's weights are scaled down
together when it is larger), which bounds every component (:func:`component_bounds`):
``|A1|, W1, |A0|, W0 ≤ λ``, ``|G|, |S| ≤ 2λ``, ``P ≤ P_max``, ``|D| ≤ 2 P_max`` with
``P_max`` the strategy's public bound on ``Σ_j p`` (1 for a top-1 or random strategy). The
release carries each component divided by its bound (so in [-1, 1], clipped there) and,
weighted by ``k``, the squares (each in [0, 1]); one person moves it by at most
:func:`release_bound` ``sqrt(d + k² Q)`` with ``d = 1 + 8K`` and Q squares — whatever their data. So the
weight clip doubles as the sensitivity bound: a smaller λ means less noise and (when it binds)
some bias. Pure functions: no I/O, no state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import NormalDist

import numpy as np

__all__ = ["COMPONENTS", "ESTIMATORS", "MAIN_ESTIMATOR", "DEFAULT_ESTIMATORS", "OPEConfig", "component_bounds", "person_components",
           "release_bound", "release_dim", "n_squares", "terms_of", "SQUARE_TERMS", "PAIR_TERMS",
           "TERM_WEIGHTS", "NEEDS", "Layout", "CLIP_FACTOR", "strategy_clip", "strategy_exposure_bound", "strategy_bounds",
           "estimator_coefficients", "normalized_release_rows",
           "StrategyEstimate", "OPEResult", "evaluate_sums", "person_fold", "crossfit_partitions", "in_sample_strategies",
           "IN_SAMPLE_NOTE", "FLOWER_STRATEGIES",
           "StrategyRun", "parse_estimators", "release_noise_multiplier"]

#: per-strategy components of a person's term (see module doc)
COMPONENTS = ("a1", "w1", "a0", "w0", "p", "d", "g", "s")
#: estimators reported for every strategy; DR is the main one
ESTIMATORS = ("ips", "snips", "dm", "dr", "switch-dr")
MAIN_ESTIMATOR = "dr"
#: what a release carries unless the coordinator opts in to the comparison estimators: DR only
#: (about half the noise on DR at the same ε; the comparison estimators cost budget: noise)
DEFAULT_ESTIMATORS: tuple[str, ...] = (MAIN_ESTIMATOR,)
_C = {name: i for i, name in enumerate(COMPONENTS)}


@dataclass(frozen=True)
class OPEConfig:
    """Knobs of one strategy-evaluation release (public; the coordinator's, checked by the
    institution's policy like every run's).

    ``clip``: the weight clip λ (per person, see module doc; also the sensitivity's scale);
    ``switch_tau``: switch-DR's threshold on the contrast weight; ``second_moment_weight``: k
    relative to ``1/d`` (the Gram part's share of the bound); ``epsilon``/``delta``: the
    release's budget (ε = inf: no DP, simulation only)."""

    epsilon: float = 1.0
    delta: float = 1e-5
    noise_mode: str = "local"
    n_min: int = 0
    clip: float = 8.0
    switch_tau: float = 10.0
    second_moment_weight: float = 0.5
    square_clip: float = 3.0
    #: estimators the release carries (:class:`Layout`): DR only by default; every estimator
    #: (:data:`ESTIMATORS`) is an opt-in for comparison that costs noise on DR at the same ε
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    trim: tuple[float, float] = (0.05, 0.95)
    alpha: float = 0.05
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if not (self.epsilon > 0):
            raise ValueError(f"strategy evaluation: epsilon must be positive (inf turns DP off), got {self.epsilon}")
        if not (0 < self.delta < 1):
            raise ValueError(f"strategy evaluation: delta must lie in (0, 1), got {self.delta}")
        if self.noise_mode not in ("local", "distributed"):
            raise ValueError(f"strategy evaluation: noise mode must be local or distributed, got {self.noise_mode!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"strategy evaluation: the weight clip must be positive and finite, got {self.clip}")
        if not (self.switch_tau > 0):
            raise ValueError(f"strategy evaluation: switch-DR's threshold must be positive, got {self.switch_tau}")
        Layout(tuple(self.estimators))  # a usable selection
        if not (self.square_clip > 0 and math.isfinite(self.square_clip)):
            raise ValueError(f"strategy evaluation: the square clip must be positive and finite, got {self.square_clip}")
        if not (0 < self.second_moment_weight <= 1):
            raise ValueError("strategy evaluation: second_moment_weight must lie in (0, 1], "
                             f"got {self.second_moment_weight}")
        if not (0 < self.trim[0] < self.trim[1] < 1):
            raise ValueError(f"strategy evaluation: trim must satisfy 0 < lo < hi < 1, got {self.trim}")

    @property
    def dp(self) -> bool:
        return math.isfinite(self.epsilon)

    @property
    def layout(self) -> "Layout":
        return Layout(tuple(self.estimators))

    #: the release request's keys in a strategy message's config (:meth:`from_flat`)
    REQUEST_KEYS = ("strategies.epsilon", "strategies.delta", "strategies.noise-mode", "strategies.n-min")

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> "OPEConfig":
        """From the release request's ``strategies.*`` keys of a strategy message
        (:data:`REQUEST_KEYS`; ``epsilon`` <= 0 means inf; defaults otherwise): the one parser
        the ServerApp and every ClientApp use. ValueError for any other ``strategies.*`` key
        (a request the client would not honour is refused, never ignored)."""
        unknown = sorted(k for k in flat if str(k).startswith("strategies.") and k not in cls.REQUEST_KEYS)
        if unknown:
            raise ValueError(f"unknown strategy release key(s) {unknown}; the request carries "
                             f"{', '.join(cls.REQUEST_KEYS)}")
        eps = float(flat.get("strategies.epsilon", 1.0))  # type: ignore[arg-type]
        return cls(epsilon=eps if eps > 0 else math.inf, delta=float(flat.get("strategies.delta", 1e-5)),  # type: ignore[arg-type]
                   noise_mode=str(flat.get("strategies.noise-mode", "local")),
                   n_min=int(flat.get("strategies.n-min", 0)))  # type: ignore[arg-type]


@lru_cache(maxsize=64)
def release_noise_multiplier(epsilon: float, delta: float, accountant: str = "prv") -> float:
    """σ of the strategy release at the run's (ε, δ): the one Gaussian event calibrated to ε with
    ``accountant`` (the run's ``causal.accountant``); 0 when ε = inf. The one rule the server's
    release (server/strategies.noise_multiplier) and the institutions' plan check
    (client/strategy_app.strategy_plan_events) share. Public values only."""
    if not math.isfinite(epsilon):
        return 0.0
    from fedrec.common.privacy.accountant import GaussianEvent, calibrate_for_events

    return calibrate_for_events(lambda s: [GaussianEvent(noise_multiplier=s)], target_epsilon=float(epsilon),
                                delta=float(delta), accountant=accountant)


def parse_estimators(text: str, *, key: str = "--estimators") -> tuple[str, ...]:
    """``dr`` | ``all`` | a comma list of :data:`ESTIMATORS` -> the tuple a release carries;
    ValueError (one line naming ``key`` and the fix) for an unknown, repeated or empty choice."""
    text = str(text).strip()
    chosen = ESTIMATORS if text == "all" else tuple(e.strip() for e in text.split(",") if e.strip())
    bad = [e for e in chosen if e not in ESTIMATORS]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        what = f"unknown estimator(s) {bad}" if bad else ("no estimator" if not chosen else "an estimator repeated")
        raise ValueError(f"{key} {text!r}: {what}; fix: dr (the default), all, or a comma list of "
                         f"{', '.join(ESTIMATORS)}")
    return chosen


#: the strategies the Flower strategy app (server/strategies.py) can evaluate: each needs only
#: what that app's own causal runs release (``engagement`` needs a public engagement model and
#: the ``scorer`` hooks a registered local scorer, which a run config cannot carry)
FLOWER_STRATEGIES = ("benefit", "benefit-cf", "random", "logging")


@dataclass(frozen=True)
class StrategyRun:
    """The run-config keys ``strategies.*`` of the Flower strategy app (what to evaluate; the
    release's ε, δ and noise mode are the causal run's):

    * ``strategies.names`` — comma list of :data:`FLOWER_STRATEGIES` (default
      ``benefit,random,logging``); ``benefit-cf`` adds two fold-restricted causal runs
      (``causal.expert.fold`` 0 and 1 with the salt below), each charged at every institution;
    * ``strategies.estimators`` — ``dr`` (default), ``all`` or a comma list (:func:`parse_estimators`);
    * ``strategies.crossfit-salt`` — the public salt of the folds (``""``: ``crossfit-<seed>``
      from the run's ``seed``, the convention of ``fedrec-sim evaluate-strategies``); set
      without ``benefit-cf`` it is refused (it would change nothing).

    Public choices of the coordinator; no data. Parsed by the ServerApp before anything is
    sent and by every client (client/causal_app.split_config): an unknown key, strategy or
    estimator is one line naming the key and the fix (ConfigError)."""

    names: tuple[str, ...] = ("benefit", "random", "logging")
    estimators: tuple[str, ...] = DEFAULT_ESTIMATORS
    crossfit_salt: str = ""

    KEYS = ("strategies.names", "strategies.estimators", "strategies.crossfit-salt")

    @property
    def crossfit(self) -> bool:
        return "benefit-cf" in self.names

    def salt(self, seed: int) -> str:
        """The folds' public salt: the configured one, else ``crossfit-<seed>``."""
        return self.crossfit_salt or f"crossfit-{int(seed)}"

    def to_flat(self) -> dict[str, str]:
        return {"strategies.names": ",".join(self.names), "strategies.estimators": ",".join(self.estimators),
                "strategies.crossfit-salt": self.crossfit_salt}

    @classmethod
    def from_flat(cls, flat: Mapping[str, object]) -> "StrategyRun":
        from fedrec.common.config import ConfigError

        mine = {k: v for k, v in flat.items() if str(k).startswith("strategies.")}
        unknown = sorted(set(mine) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown strategy key; fix: one of {', '.join(cls.KEYS)} "
                              "(docs/strategies.md, Transports)")
        out = cls()
        if "strategies.names" in mine:
            text = str(mine["strategies.names"]).strip()
            names = tuple(n.strip() for n in text.split(",") if n.strip())
            bad = [n for n in names if n not in FLOWER_STRATEGIES]
            if bad or not names or len(set(names)) != len(names):
                why = (f"unknown strategy {bad[0]!r}" if bad else
                       "no strategy" if not names else "a strategy repeated")
                extra = (" (engagement needs a public engagement model: fedrec-sim evaluate-strategies has it)"
                         if "engagement" in bad else "")
                raise ConfigError(f"strategies.names {text!r}: {why}{extra}; fix: a comma list of "
                                  f"{', '.join(FLOWER_STRATEGIES)}")
            out = cls(names=names)
        est = out.estimators
        if "strategies.estimators" in mine:
            try:
                est = parse_estimators(str(mine["strategies.estimators"]), key="strategies.estimators")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        salt = str(mine.get("strategies.crossfit-salt", "")).strip()
        if salt and "benefit-cf" not in out.names:
            raise ConfigError(f"strategies.crossfit-salt {salt!r}: set without benefit-cf in strategies.names, it "
                              "would change nothing; fix: add benefit-cf to strategies.names or delete the key")
        return cls(names=out.names, estimators=est, crossfit_salt=salt)


def component_bounds(clip: float, exposures: float) -> np.ndarray:
    """Public bound of each of :data:`COMPONENTS` for weight clip λ and a strategy whose
    ``Σ_j p_j ≤ exposures`` per person: ``[λ, λ, λ, λ, P, 2P, 2λ, 2λ]``."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"weight clip must be positive and finite, got {clip}")
    if not (exposures > 0 and math.isfinite(exposures)):
        raise ValueError(f"a strategy's exposure bound must be positive and finite, got {exposures}")
    lam, pm = float(clip), float(exposures)
    return np.array([lam, lam, lam, lam, pm, 2 * pm, 2 * lam, 2 * lam])


#: default multiple of the weight clip per strategy kind: the logging policy exposes several
#: items per person with weights ``e/(1-e)`` on the unexposed ones, so λ binds for it far more
#: often than for a top-1 strategy (measured: health, ε = inf, λ = 8: DR bias -3 SE; 4λ: none).
#: A larger clip only raises that strategy's own noise (each component is normalized by its bound).
CLIP_FACTOR = {"logging": 4.0}


def strategy_clip(spec: Mapping, clip: float) -> float:
    """The weight clip of one strategy: ``clip`` x the spec's public ``clip-factor`` (default
    :data:`CLIP_FACTOR` by kind, else 1). ValueError for a factor that is not positive and finite."""
    factor = float(spec.get("clip-factor", CLIP_FACTOR.get(str(spec.get("kind")), 1.0)))
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"strategy {spec.get('name')!r}: clip-factor must be positive and finite, got {factor}")
    return clip * factor


def strategy_exposure_bound(spec: Mapping, n_items: int) -> float:
    """Public bound on a person's ``Σ_j p_j`` under ``spec``: the number of items for the
    logging policy (it may expose every considered item), 1 for top-1 and random strategies."""
    return float(n_items) if spec.get("kind") == "logging" else 1.0


def person_fold(person_ids: Sequence[object], salt: str, folds: int = 2) -> np.ndarray:
    """Each person's cross-fitting fold, ``0 .. folds-1``: SHA-256 of ``salt`` and the person id
    (a public, seeded, process-independent split; the same at every institution and in every
    run with the same salt). Cross-fitted strategies (kind ``crossfit``) rank a person of fold
    k by the model fitted without fold k."""
    import hashlib

    if folds < 2:
        raise ValueError(f"person_fold needs at least 2 folds, got {folds}")
    out = np.empty(len(person_ids), dtype=np.int64)
    for i, pid in enumerate(person_ids):
        h = hashlib.sha256(f"{salt}\x1f{pid}".encode()).digest()
        out[i] = int.from_bytes(h[:8], "big") % folds
    return out


def strategy_bounds(spec: Mapping, clip: float, n_items: int) -> np.ndarray:
    """:func:`component_bounds` of one strategy (its own clip and exposure bound)."""
    return component_bounds(strategy_clip(spec, clip), strategy_exposure_bound(spec, n_items))


def crossfit_partitions(specs: Sequence[Mapping]) -> dict[str, tuple[str, int]]:
    """The public fold partition ``(salt, folds)`` of each cross-fitted strategy (kind
    ``crossfit``) in ``specs``: what :class:`OPEResult` needs for the cross-fold bound of its
    sampling variance. Public spec fields only."""
    return {str(s["name"]): (str(s.get("salt", "")), len(s.get("coef", []))) for s in specs
            if s.get("kind") == "crossfit"}


def in_sample_strategies(specs: Sequence[Mapping]) -> frozenset[str]:
    """The strategies whose ranking models were fitted on the people they are evaluated on
    (spec field ``in_sample``: the in-sample benefit ranking). Their values are optimistic, so
    :class:`OPEResult` reports them without a confidence interval. Public spec fields only."""
    return frozenset(str(s["name"]) for s in specs if s.get("in_sample"))


#: why an in-sample strategy's value has no CI (every output that leaves its CI out says this)
IN_SAMPLE_NOTE = ("in-sample: ranked by models fitted on the same people it is evaluated on, so the value is "
                  "optimistic and value ± z·SE is not a valid CI (it covered the simulated A/B truth in 0.76-0.88 "
                  "of runs at ε = ∞, docs/strategies.md); for a CI use benefit-cf (cross-fitted)")


#: per-strategy terms whose (winsorized) squares are released: their sampling variances
SQUARE_TERMS = ("ips", "dm", "dr", "switch-dr")
#: terms whose differences between every pair of strategies have their squares released
PAIR_TERMS = ("ips", "dr", "switch-dr")
#: each term as a combination of COMPONENTS
TERM_WEIGHTS = {"ips": {"a1": 1.0, "a0": -1.0}, "dm": {"d": 1.0}, "dr": {"d": 1.0, "g": 1.0},
                "switch-dr": {"d": 1.0, "s": 1.0}}


#: the components each estimator needs
NEEDS = {"ips": ("a1", "a0"), "snips": ("a1", "w1", "a0", "w0", "p"), "dm": ("d",), "dr": ("d", "g"),
         "switch-dr": ("d", "s")}


@dataclass(frozen=True)
class Layout:
    """Which estimators a release carries, hence which components and squares (public).

    ``("dr",)`` (:data:`DEFAULT_ESTIMATORS`, what :class:`OPEConfig` releases unless told
    otherwise) carries only the DR components ``[D, G]`` and their squares; every estimator
    (this class's own default, :data:`ESTIMATORS`) is the comparison opt-in: at the same ε it
    puts about twice the noise on DR (4 strategies: sensitivity² 41.5 against 11.5)."""

    estimators: tuple[str, ...] = ESTIMATORS

    def __post_init__(self) -> None:
        bad = [e for e in self.estimators if e not in ESTIMATORS]
        if bad or not self.estimators:
            raise ValueError(f"estimators must be a non-empty subset of {', '.join(ESTIMATORS)}, got {self.estimators}")

    @property
    def components(self) -> tuple[str, ...]:
        need = {c for e in self.estimators for c in NEEDS[e]}
        return tuple(c for c in COMPONENTS if c in need)

    @property
    def square_terms(self) -> tuple[str, ...]:
        want = set(self.estimators) | ({"ips"} if "snips" in self.estimators else set())
        return tuple(t for t in SQUARE_TERMS if t in want)

    @property
    def pair_terms(self) -> tuple[str, ...]:
        return tuple(t for t in PAIR_TERMS if t in self.estimators)

    def dim(self, n_strategies: int) -> int:
        """``d = 1 + |components| K``: length of ``z̃``."""
        return 1 + len(self.components) * int(n_strategies)

    def n_squares(self, n_strategies: int) -> int:
        k = int(n_strategies)
        return k * len(self.square_terms) + k * (k - 1) // 2 * len(self.pair_terms)


def n_squares(n_strategies: int, layout: Layout = Layout()) -> int:
    """Length of the squares block: ``K |square terms| + K(K-1)/2 |pair terms|``."""
    return layout.n_squares(n_strategies)


def release_dim(n_strategies: int, layout: Layout = Layout()) -> int:
    """``d = 1 + 8K`` (every estimator) for K strategies: length of ``z̃``."""
    return layout.dim(n_strategies)


def release_bound(n_strategies: int, second_moment_weight: float = 0.5, layout: Layout = Layout()) -> float:
    """L2 bound of one person's release row ``[z̃_n, k q]``: ``z̃_n`` the normalized components
    (each in [-1, 1], a leading 1: ``||z̃_n||² ≤ d``) and ``q`` the squares of the winsorized,
    normalized terms (each in [0, 1]: ``||q||² ≤`` :func:`n_squares`), ``k`` the public
    ``second_moment_weight``: ``sqrt(d + k² n_squares)``. This is the release's L2
    sensitivity (add/remove one person), whatever their data."""
    return math.sqrt(layout.dim(n_strategies) + second_moment_weight**2 * layout.n_squares(n_strategies))


def terms_of(components: np.ndarray) -> dict[str, np.ndarray]:
    """Per person the estimators' terms (:data:`TERM_WEIGHTS`) from one strategy's components."""
    return {t: sum(w * components[:, _C[c]] for c, w in ws.items()) for t, ws in TERM_WEIGHTS.items()}


def person_components(person: np.ndarray, n_people: int, t: np.ndarray, y: np.ndarray, e: np.ndarray,
                      m1: np.ndarray, m0: np.ndarray, p: np.ndarray, *, clip: float,
                      switch_tau: float) -> np.ndarray:
    """Per person the 8 :data:`COMPONENTS` of one strategy (unnormalized, see module doc).

    Rows are (person, item considered): ``person`` the person's index in ``range(n_people)``,
    ``t`` exposed, ``y`` the person's scaled outcome, ``e`` the public trimmed propensity,
    ``m1``/``m0`` the public outcome models' predictions (scaled, in [-1, 1]), ``p`` the
    strategy's exposure probability. The weight clip λ scales a person's contrast weights
    ``p/e_T`` down together when their sum exceeds λ (so every component obeys
    :func:`component_bounds`)."""
    t = np.asarray(t, dtype=np.float64)
    e_t = np.where(t > 0, e, 1.0 - e)
    r = np.asarray(p, dtype=np.float64) / e_t  # contrast weight |w_p - w_0| of the logged action
    total = np.bincount(person, weights=r, minlength=n_people)
    scale = np.minimum(1.0, clip / np.maximum(total, 1e-300))
    rw = r * scale[person]  # the weight clip
    w1, w0 = t * rw, (1.0 - t) * rw
    corr = w1 * (y - m1) - w0 * (y - m0)
    keep = (r <= switch_tau).astype(np.float64)
    cols = [w1 * y, w1, w0 * y, w0, p, p * (m1 - m0), corr, keep * corr]
    out = np.zeros((n_people, len(COMPONENTS)))
    for k, v in enumerate(cols):
        out[:, k] = np.bincount(person, weights=v, minlength=n_people)
    return out


def estimator_coefficients(first: np.ndarray, strategy: int, estimator: str) -> tuple[float, np.ndarray]:
    """``(estimate, c)`` of one estimator of strategy number ``strategy`` from the first-moment
    sums ``first = Σ z̃`` (unnormalized, ``first[0] = N``): the estimate (scaled outcome units)
    and the coefficients ``c`` over ``z̃`` of its linearized influence ``φ_i = c' z̃_i``
    (``Σ φ = 0`` at the estimate). The gradient of the estimate with respect to ``first`` is
    ``c / N`` (what the DP noise in ``first`` moves it by)."""
    n = max(float(first[0]), 1.0)
    off = 1 + len(COMPONENTS) * strategy
    z = first[off:off + len(COMPONENTS)] / n  # means
    c = np.zeros_like(first, dtype=np.float64)

    def at(name: str) -> int:
        return off + _C[name]

    if estimator in ("ips", "dm", "dr", "switch-dr"):
        weights = TERM_WEIGHTS[estimator]
        value = sum(w * z[_C[k]] for k, w in weights.items())
        for k, w in weights.items():
            c[at(k)] = w
        c[0] = -value
        return float(value), c
    if estimator == "snips":
        w1, w0 = z[_C["w1"]], z[_C["w0"]]
        r1 = z[_C["a1"]] / w1 if w1 > 0 else 0.0
        r0 = z[_C["a0"]] / w0 if w0 > 0 else 0.0
        pbar = z[_C["p"]]
        value = pbar * (r1 - r0)
        if w1 > 0:
            c[at("a1")], c[at("w1")] = pbar / w1, -pbar * r1 / w1
        if w0 > 0:
            c[at("a0")], c[at("w0")] = -pbar / w0, pbar * r0 / w0
        c[at("p")] = r1 - r0
        c[0] = -value
        return float(value), c
    raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")


@dataclass(frozen=True)
class StrategyEstimate:
    """One estimator's value of one strategy (or a difference of two), outcome units."""

    value: float
    se: float
    sampling_se: float
    noise_se: float
    alpha: float = 0.05
    #: the estimate involves an in-sample strategy (:func:`in_sample_strategies`): no valid CI
    in_sample: bool = False

    @property
    def naive_ci(self) -> tuple[float, float]:
        """``value ± z·SE``: the 95% CI where the strategies were fixed before the data were
        seen; for an in-sample strategy too narrow and shifted (the yardstick reports its
        coverage to show by how much)."""
        z = NormalDist().inv_cdf(1 - self.alpha / 2)  # stdlib: no scipy.stats in a ClientApp's imports
        return self.value - z * self.se, self.value + z * self.se

    @property
    def ci(self) -> tuple[float, float]:
        """The CI: :attr:`naive_ci`, or ``(nan, nan)`` for an in-sample estimate (none is valid)."""
        return (math.nan, math.nan) if self.in_sample else self.naive_ci

    def to_json(self) -> dict:
        if self.in_sample:
            return {"value": self.value, "se": self.se, "ci_low": None, "ci_high": None, "in_sample": True,
                    "note": IN_SAMPLE_NOTE, "sampling_se": self.sampling_se, "noise_se": self.noise_se}
        lo, hi = self.ci
        return {"value": self.value, "se": self.se, "ci_low": lo, "ci_high": hi,
                "sampling_se": self.sampling_se, "noise_se": self.noise_se}


@dataclass
class OPEResult:
    """Every strategy's value by every estimator, and differences on demand (post-processing).

    ``first``: unnormalized ``Σ z̃`` (``first[0] = N``); ``squares[(s, t)]``: ``Σ term²`` of
    strategy s's term t, ``pair_squares[(a, b, t)]``: ``Σ (term_a − term_b)²`` (winsorized at
    the public square clip); ``noise_var``: the DP noise variance of each ``first``
    coordinate. The SE is ``sqrt(sampling + noise)``: sampling ``(Σ term²/N − value²)/N``,
    noise ``Σ_k (c_k/N)² noise_var_k`` through the estimate's gradient. SNIPS's sampling part
    is IPS's (its square terms are not released; IPS's is the larger in the simulators).

    **Cross-fitted strategies** (``crossfit``: name -> the public ``(salt, K)`` of its fold
    partition, :func:`crossfit_partitions`): a person of fold k is ranked by a policy learned
    on the other folds, so fold k's terms are i.i.d. given the other folds' data, but the folds'
    errors ``e_k`` are correlated — fold A's noise chose the policy fold B is evaluated with and
    vice versa (positive where the learned ranking is unstable, e.g. near-tied items: 1/π for
    two tied items, where the error's SD is 1.15x the i.i.d. SE and its 95% CI covers 0.91), a
    covariance the i.i.d. variance lacks. The sampling variance of any estimate
    involving one is multiplied by the number of cells K of the involved partitions: with fold
    shares ``w_k``, ``Var(Σ w_k e_k) ≤ (Σ w_k sd_k)² ≤ K Σ w_k² sd_k² ≤ K x`` the i.i.d.
    variance (Cauchy–Schwarz; a bound whatever the dependence, conservative where the ranking
    is stable). The DP noise part is unchanged."""

    strategies: list[str]
    first: np.ndarray
    squares: dict
    pair_squares: dict
    noise_var: np.ndarray
    scale: float
    alpha: float = 0.05
    estimators: tuple[str, ...] = ESTIMATORS
    crossfit: dict = field(default_factory=dict)
    in_sample: frozenset = frozenset()

    @property
    def n(self) -> float:
        return max(float(self.first[0]), 1.0)

    def fold_factor(self, *strategies: str) -> int:
        """The cross-fold factor of an estimate involving ``strategies`` (class doc): the
        number of cells of their cross-fitting partitions, 1 without a cross-fitted one."""
        parts = {tuple(self.crossfit[s]) for s in strategies if s in self.crossfit}
        return math.prod(int(k) for _, k in parts) if parts else 1

    def _estimate(self, value: float, c: np.ndarray, sum_sq: float, centre: float, folds: int = 1,
                  in_sample: bool = False) -> StrategyEstimate:
        n = self.n
        sampling = folds * max(sum_sq / n - centre**2, 0.0) / n
        noise = float(np.sum(c**2 * self.noise_var)) / n**2
        s = self.scale
        return StrategyEstimate(value=s * value, se=s * math.sqrt(sampling + noise), sampling_se=s * math.sqrt(sampling),
                                noise_se=s * math.sqrt(noise), alpha=self.alpha, in_sample=in_sample)

    def estimate(self, strategy: str, estimator: str = MAIN_ESTIMATOR) -> StrategyEstimate:
        if estimator not in self.estimators:
            raise ValueError(f"the release carried {', '.join(self.estimators)}, not {estimator!r}")
        i = self.strategies.index(strategy)
        value, c = estimator_coefficients(self.first, i, estimator)
        own = strategy in self.in_sample
        if estimator == "snips":
            ips, _ = estimator_coefficients(self.first, i, "ips")
            return self._estimate(value, c, self.squares[(strategy, "ips")], ips, self.fold_factor(strategy), own)
        return self._estimate(value, c, self.squares[(strategy, estimator)], value, self.fold_factor(strategy), own)

    def difference(self, a: str, b: str, estimator: str = MAIN_ESTIMATOR) -> StrategyEstimate:
        """V(a) − V(b) with its CI (the two share the people: the squares of the per-person
        differences carry their covariance). Estimators of :data:`PAIR_TERMS` only."""
        if estimator not in PAIR_TERMS or estimator not in self.estimators:
            raise ValueError(f"differences are released for {', '.join(t for t in PAIR_TERMS if t in self.estimators)}, "
                             f"not {estimator!r}")
        va, ca = estimator_coefficients(self.first, self.strategies.index(a), estimator)
        vb, cb = estimator_coefficients(self.first, self.strategies.index(b), estimator)
        key, sign = ((a, b, estimator), 1.0) if (a, b, estimator) in self.pair_squares else ((b, a, estimator), -1.0)
        return self._estimate(va - vb, ca - cb, self.pair_squares[key], va - vb, self.fold_factor(a, b),
                              bool({a, b} & self.in_sample))

    def to_json(self) -> dict:
        return {s: {e: self.estimate(s, e).to_json() for e in self.estimators} for s in self.strategies}


def _square_keys(strategies: Sequence[str], layout: Layout) -> tuple[list[tuple], list[tuple]]:
    sq = [(s, t) for s in strategies for t in layout.square_terms]
    pairs = [(a, b, t) for i, a in enumerate(strategies) for b in strategies[i + 1:] for t in layout.pair_terms]
    return sq, pairs


def evaluate_sums(total: np.ndarray, strategies: Sequence[str], bounds: Sequence[np.ndarray], *,
                  noise_var: float, scale: float, square_clip: float = 3.0, second_moment_weight: float = 0.5,
                  alpha: float = 0.05, layout: Layout = Layout(),
                  crossfit: Mapping[str, tuple[str, int]] | None = None,
                  in_sample: Sequence[str] = ()) -> OPEResult:
    """Estimates from one summed release (post-processing, no budget).

    ``crossfit``: the cross-fitted strategies' public fold partitions
    (:func:`crossfit_partitions` of the specs; their SEs carry the cross-fold bound,
    :class:`OPEResult`). ``in_sample``: the strategies fitted on the evaluated people
    (:func:`in_sample_strategies` of the specs): their values, and every difference involving
    one, are reported without a CI.

    ``total``: the secure sum of the institutions' releases (:func:`normalized_release_rows`
    with the same ``layout``); ``bounds[s]``: strategy s's :func:`component_bounds`;
    ``noise_var``: the public noise variance per coordinate of ``total``; ``scale``: the
    outcome's half range. Components the layout leaves out are zero with zero noise (their
    estimators are not reported)."""
    K = len(strategies)
    d, q = layout.dim(K), layout.n_squares(K)
    if total.shape != (d + q,):
        raise ValueError(f"strategy release has {total.shape} coordinates, expected {d + q}")
    sel = [_C[c] for c in layout.components]
    full = np.zeros(1 + len(COMPONENTS) * K)
    nv = np.zeros_like(full)
    full[0], nv[0] = total[0], noise_var
    for s in range(K):
        b = np.asarray(bounds[s], dtype=np.float64)
        for j, c in enumerate(sel):
            full[1 + len(COMPONENTS) * s + c] = total[1 + len(sel) * s + j] * b[c]
            nv[1 + len(COMPONENTS) * s + c] = noise_var * b[c] ** 2
    sq_vals = total[d:] / second_moment_weight * square_clip**2
    sq_keys, pair_keys = _square_keys(list(strategies), layout)
    squares = dict(zip(sq_keys, sq_vals[:len(sq_keys)]))
    pairs = dict(zip(pair_keys, sq_vals[len(sq_keys):]))
    cf = {str(k): (str(v[0]), int(v[1])) for k, v in (crossfit or {}).items()}
    bad = [k for k, (_, folds) in cf.items() if k not in strategies or folds < 1]
    if bad:
        raise ValueError(f"crossfit {bad[0]!r}: not one of the released strategies or fewer than 1 fold")
    own = frozenset(str(x) for x in in_sample)
    if own - set(strategies):
        raise ValueError(f"in_sample {sorted(own - set(strategies))[0]!r}: not one of the released strategies")
    return OPEResult(strategies=list(strategies), first=full, squares=squares, pair_squares=pairs, noise_var=nv,
                     scale=scale, alpha=alpha, estimators=tuple(layout.estimators), crossfit=cf, in_sample=own)


def normalized_release_rows(components: Sequence[np.ndarray], bounds: Sequence[np.ndarray], *,
                            square_clip: float = 3.0, second_moment_weight: float = 0.5,
                            layout: Layout = Layout()) -> np.ndarray:
    """Per person ``[z̃_n, k q]``: each strategy's components (those the ``layout`` carries)
    divided by their bounds and clipped to [-1, 1] (so a wrong bound can only lose signal,
    never privacy) after a leading 1; then the squares of each term and of each pair's term
    differences, winsorized at the public ``square_clip`` (scaled outcome units) and divided by
    its square (so in [0, 1]), weighted by ``k``. Row norms obey :func:`release_bound`."""
    n = components[0].shape[0] if components else 0
    sel = [_C[c] for c in layout.components]
    parts = [np.ones((n, 1))]
    for comp, bnd in zip(components, bounds):
        parts.append(np.clip(comp[:, sel] / np.asarray(bnd)[None, sel], -1.0, 1.0))
    terms = [terms_of(c) for c in components]

    def sq(v: np.ndarray) -> np.ndarray:
        return np.clip(v / square_clip, -1.0, 1.0) ** 2

    cols = [sq(tm[t]) for tm in terms for t in layout.square_terms]
    cols += [sq(terms[i][t] - terms[j][t]) for i in range(len(terms)) for j in range(i + 1, len(terms))
             for t in layout.pair_terms]
    q = np.column_stack(cols) if cols else np.zeros((n, 0))
    return np.hstack(parts + [second_moment_weight * q])
