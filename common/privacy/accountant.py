"""One accountant for every release kind, on Opacus' accountants.

Design (after dp_accounting): we store *mechanism events*, never ε values, and derive ε(δ)
on demand by composing all events with an Opacus accountant (PRV by default, RDP as the
cross-check). Every release an institution makes is one of two event kinds:

* :class:`DPSGDEvent` — ``steps`` Poisson-subsampled Gaussian steps with sample rate ``q``
  and noise multiplier ``σ`` (noise std = σ · clipping bound).
* :class:`GaussianEvent` — ``count`` un-subsampled Gaussian releases with noise multiplier
  ``σ`` relative to the release's L2 sensitivity (noise std = σ · sensitivity). It is the
  q = 1 case of the subsampled Gaussian, which is how it is composed.

Privacy arguments are keyword-only, as in Opacus.

Additions for the ledger and the audit (the original functions keep their signatures):

* :func:`epsilon_for` composes events in merged form — events with the same (σ, q) are one
  Opacus history entry with the summed step count, which is the same composition (and the
  same number) but costs one PRV instead of one per round — and caches results.
* :func:`epsilon_pair` — ``(ε_PRV, ε_RDP)`` side by side; PRV is primary, RDP the cross-check.
* :func:`gaussian_epsilon` — the exact ε(δ) of ``count`` un-subsampled Gaussian releases
  (analytic Gaussian mechanism, Balle & Wang 2018): a closed form the accountants are
  tested against.
* A history made **only of un-subsampled Gaussian releases** (q = 1: every causal, strategy,
  count and pilot release, and full-batch DP-SGD) is composed in closed form, without Opacus:
  such a composition *is* one Gaussian mechanism with ``1/σ² = Σ count_i/σ_i²`` (μ-GDP
  composes exactly in quadrature: the privacy-loss variables are independent normals; Dong,
  Roth & Su 2019, Cor. 3.3), so ``prv`` returns its exact ε(δ) (:func:`gaussian_epsilon`; the
  PRV accountant approximates this very number and returns an upper estimate within its
  ``eps_error`` of it: tested) and ``rdp`` the Gaussian's RDP curve ``α/(2σ²)`` with the
  conversion and orders Opacus' RDPAccountant uses (tested equal to Opacus to 1e-12). Why by
  hand: Opacus' accountants cannot be imported without its package ``__init__``, which imports
  torch and the privacy engine (~3 s of CPU); Flower's deployment runs every message in a
  fresh ClientApp process, so each charged causal release paid that import at each
  institution. Any subsampled entry (q < 1) goes to Opacus as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # opacus (and torch under it) is imported where ε is computed, not at import
    from opacus.accountants import PRVAccountant, RDPAccountant

__all__ = [
    "DPSGDEvent",
    "GaussianEvent",
    "Event",
    "NonPrivateEvent",
    "epsilon_for",
    "calibrate_noise_multiplier",
    "opacus_history",
    "calibrate_for_events",
    "merged_history",
    "epsilon_pair",
    "gaussian_epsilon",
]


@dataclass(frozen=True)
class DPSGDEvent:
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("DPSGDEvent.noise_multiplier must be positive and finite")
        if not (0 < self.sample_rate <= 1):
            raise ValueError("DPSGDEvent.sample_rate must lie in (0, 1]")
        if self.steps < 1:
            raise ValueError("DPSGDEvent.steps must be >= 1")


@dataclass(frozen=True)
class GaussianEvent:
    noise_multiplier: float
    count: int = 1
    #: recorded for the audit trail; the accountant only needs the multiplier
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("GaussianEvent.noise_multiplier must be positive and finite")
        if self.count < 1:
            raise ValueError("GaussianEvent.count must be >= 1")


@dataclass(frozen=True)
class NonPrivateEvent:
    """A release without differential privacy (ε = ∞): only in simulations whose institution
    policy explicitly allows it. It is recorded so that the ledger, ``budget`` and the audit say
    ε = ∞ for everything after it — never 0. Any composition containing one is ε = ∞."""

    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("NonPrivateEvent.count must be >= 1")


Event = DPSGDEvent | GaussianEvent | NonPrivateEvent


def opacus_history(events: Iterable[Event]) -> list[tuple[float, float, int]]:
    """Events as Opacus accountant history: ``[(noise_multiplier, sample_rate, steps)]``."""
    hist: list[tuple[float, float, int]] = []
    for ev in events:
        if isinstance(ev, DPSGDEvent):
            hist.append((float(ev.noise_multiplier), float(ev.sample_rate), int(ev.steps)))
        elif isinstance(ev, GaussianEvent):
            hist.append((float(ev.noise_multiplier), 1.0, int(ev.count)))
        else:  # refuse what cannot be accounted
            raise TypeError(f"cannot account for event of type {type(ev).__name__}")
    return hist


def merged_history(events: Iterable[Event]) -> tuple[tuple[float, float, int], ...]:
    """Opacus history with equal (σ, q) entries merged (steps summed), in a canonical order.

    Composition is commutative, so this is the same mechanism as :func:`opacus_history`.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in opacus_history(events):
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return tuple(sorted((s, q, n) for (s, q), n in steps.items()))


def epsilon_for(events: Sequence[Event], *, delta: float, accountant: str = "prv") -> float:
    """ε(δ) of the composition of ``events`` (0.0 for no events).

    ``accountant`` is ``"prv"`` (Opacus PRVAccountant, tight; its upper estimate is
    returned) or ``"rdp"`` (RDPAccountant, an upper bound; used as the cross-check).
    """
    if accountant not in ("prv", "rdp"):
        raise ValueError(f"unknown accountant {accountant!r}; use 'prv' or 'rdp'")
    if not (0 < delta < 1):
        raise ValueError("delta must lie in (0, 1)")
    if any(isinstance(ev, NonPrivateEvent) for ev in events):
        return math.inf
    hist = merged_history(events)
    if not hist:
        return 0.0
    return _epsilon_cached(hist, float(delta), accountant)


def epsilon_pair(events: Sequence[Event], *, delta: float) -> tuple[float, float]:
    """``(ε_PRV, ε_RDP)`` at ``delta``: the primary value and its cross-check."""
    return (
        epsilon_for(events, delta=delta, accountant="prv"),
        epsilon_for(events, delta=delta, accountant="rdp"),
    )


@lru_cache(maxsize=256)
def _epsilon_cached(hist: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    sigma = gaussian_composition_sigma(hist)
    if sigma is not None:  # only un-subsampled Gaussian releases: one Gaussian mechanism (module doc)
        eps = gaussian_epsilon(noise_multiplier=sigma, delta=delta) if accountant == "prv" else \
            _gaussian_rdp_epsilon(sigma, delta)
        return max(eps, 0.0)
    return opacus_epsilon(hist, delta, accountant)


def opacus_epsilon(hist: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """ε(δ) of an Opacus history by Opacus' own accountant (PRV: its upper estimate)."""
    import warnings

    acc = _make(accountant)
    acc.history = list(hist)
    with warnings.catch_warnings():
        # Opacus' PRV takes log(1 - q) = log(0) at q = 1 (un-subsampled Gaussian) and
        # handles it with np.where; the warning is noise.
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(acc.get_epsilon(delta=delta))
    if math.isnan(eps):  # inf is a valid (useless) bound; NaN is not a bound at all
        raise ArithmeticError(f"{accountant} accountant returned ε = NaN for history {hist}")
    return max(eps, 0.0)


def gaussian_epsilon(*, noise_multiplier: float, delta: float, count: int = 1) -> float:
    """Exact ε(δ) of ``count`` Gaussian releases with noise ``σ`` · sensitivity (no subsampling).

    The composition is μ-GDP with μ = √count / σ, whose privacy profile is
    δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang 2018, Thm. 8; Dong, Roth & Su
    2019); ε is found by bisection on this monotone curve.
    """
    if not (noise_multiplier > 0 and count >= 1 and 0 < delta < 1):
        raise ValueError("gaussian_epsilon needs σ > 0, count >= 1, δ in (0, 1)")
    mu = math.sqrt(count) / noise_multiplier

    def delta_of(eps: float) -> float:  # second term in log space: e^ε overflows for small σ
        return _ndtr(-eps / mu + mu / 2) - math.exp(eps + _log_ndtr(-eps / mu - mu / 2))

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return hi


def _ndtr(x: float) -> float:
    """Φ(x), the standard normal CDF (stdlib only: scipy.stats costs a ClientApp ~1 s to import)."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _log_ndtr(x: float) -> float:
    """log Φ(x), finite far into the lower tail (Φ underflows below x ≈ −38): the asymptotic
    series of Abramowitz & Stegun 26.2.12 below x = −30, where its next term is < 1e-10."""
    if x > -30.0:
        return math.log(_ndtr(x))
    x2 = x * x
    series = 1.0 - 1.0 / x2 + 3.0 / x2**2 - 15.0 / x2**3 + 105.0 / x2**4
    return -0.5 * x2 - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


#: Opacus' RDPAccountant.DEFAULT_ALPHAS (a test checks they are still equal)
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def gaussian_composition_sigma(hist: Sequence[tuple[float, float, int]]) -> float | None:
    """σ of the single Gaussian mechanism that a history of un-subsampled Gaussian releases
    (``(σ_i, q = 1, count_i)``) composes to: ``(Σ count_i / σ_i²)^(-1/2)``; ``None`` when an
    entry is subsampled (q < 1), whose composition has no such closed form."""
    if not hist or any(q != 1.0 for _, q, _ in hist):
        return None
    return 1.0 / math.sqrt(sum(n / (s * s) for s, _, n in hist))


def _gaussian_rdp_epsilon(sigma: float, delta: float) -> float:
    """What Opacus' RDPAccountant returns for one Gaussian release at ``sigma`` (q = 1): RDP
    ``α/(2σ²)`` converted as its ``get_privacy_spent`` does, minimised over its default orders."""
    best = math.inf
    for a in RDP_ORDERS:
        eps = a / (2.0 * sigma * sigma) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
) -> float:
    """Smallest σ such that ``steps`` subsampled Gaussian steps at rate q spend ≤ target ε.

    Calibrates the whole run at once (not per round), so the run's total is the target.
    """
    if not math.isfinite(target_epsilon):
        raise ValueError("calibrate_noise_multiplier: target ε is inf, DP is off")
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )


def _make(name: str) -> PRVAccountant | RDPAccountant:
    # opacus' package __init__ imports torch and the privacy engine (~1.5-5 s); the accountants
    # cannot be imported without it, so they are imported here, on the first ε computed
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown accountant {name!r}; use 'prv' or 'rdp'")


def calibrate_for_events(
    make_events: Callable[[float], Sequence[Event]],
    *,
    target_epsilon: float,
    delta: float,
    accountant: str = "prv",
    sigma_bounds: tuple[float, float] = (0.05, 500.0),
    tolerance: float = 0.01,
) -> float:
    """Smallest σ (to ``tolerance`` in ε) whose events ``make_events(σ)`` compose to ≤ target ε.

    For runs made of several release kinds sharing one σ (e.g. one count release plus R
    rounds of DP-SGD). Bisection on the composed ε, which is decreasing in σ.
    """
    lo, hi = sigma_bounds
    if epsilon_for(make_events(hi), delta=delta, accountant=accountant) > target_epsilon:
        raise ValueError(f"target ε={target_epsilon} is not reachable with σ <= {hi}")
    for _ in range(60):
        mid = (lo + hi) / 2
        eps = epsilon_for(make_events(mid), delta=delta, accountant=accountant)
        if eps > target_epsilon:
            lo = mid
        else:
            hi = mid
            if target_epsilon - eps < tolerance:
                break
    return hi
