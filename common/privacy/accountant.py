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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = [
    "DPSGDEvent",
    "GaussianEvent",
    "Event",
    "epsilon_for",
    "calibrate_noise_multiplier",
    "opacus_history",
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


Event = DPSGDEvent | GaussianEvent


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


def epsilon_for(events: Sequence[Event], *, delta: float, accountant: str = "prv") -> float:
    """ε(δ) of the composition of ``events`` (0.0 for no events).

    ``accountant`` is ``"prv"`` (Opacus PRVAccountant, tight) or ``"rdp"`` (RDPAccountant,
    an upper bound; used as the cross-check).
    """
    hist = opacus_history(events)
    if not hist:
        return 0.0
    acc = _make(accountant)
    acc.history = list(hist)
    if accountant == "prv":
        # PRV accuracy needs an ε-error; Opacus' default is fine for ε >= 0.1.
        return float(acc.get_epsilon(delta=delta))
    return float(acc.get_epsilon(delta=delta))


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
    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ValueError(f"unknown accountant {name!r}; use 'prv' or 'rdp'")
