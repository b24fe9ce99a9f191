"""The one gate every release of an institution passes.

API (stable; ``client/app.py`` and ``client/statistics.py`` call it per round / per step)::

    guard = open_guard(path, institution="hospital_03", cfg=run_config)   # or ReleaseGuard(ledger, institution=...)
    charge = guard.charge(event, run_id=..., round=r, task="train", model="mf")  # may raise BudgetExceeded
    ...compute the contribution on the data, reply...
    guard.released(charge)
    eps_prv, eps_rdp = guard.spent(delta=cfg.privacy.delta)   # everything ever charged, all runs

* ``event`` is a mechanism event from ``common/privacy/accountant.py``:
  ``DPSGDEvent(noise_multiplier=σ, sample_rate=q, steps=local_steps)`` for a DP-SGD round,
  ``GaussianEvent(noise_multiplier=σ, count=k, sensitivity=Δ)`` for statistics releases.
  σ is the noise multiplier of the **released aggregate** (in distributed noise mode the
  full σ, not the σ/√n_min each client adds).
* :meth:`ReleaseGuard.charge` checks the institution's cap against the composition of every
  event in the ledger (all runs, models and tasks) plus this one, writes the event as
  ``charged`` and commits **before it returns** — so call it before anything touches the
  data. Over the cap it raises :class:`~fedrec.common.errors.BudgetExceeded` with a message
  fit for the refusal reply (``content["refusal"] = ConfigRecord({"reason": str(err)})``)
  and writes nothing.
* :meth:`ReleaseGuard.released` marks the row released. If the process dies before that, the
  row stays ``charged`` and counts as spent forever (never an under-count). A task retried
  after a crash is charged again: conservative by design.
* :meth:`ReleaseGuard.spent` returns ``(ε_PRV, ε_RDP)`` at ``delta`` (default: the cap's δ).
* :meth:`ReleaseGuard.guarded` wraps the three steps for a callable:
  ``guard.guarded(event, compute, run_id=..., round=..., task=..., model=...)``.

The cap lives in the ledger and belongs to the institution. :func:`open_guard` initialises a
**new** ledger's cap from ``privacy.epsilon-cap`` / ``privacy.delta-cap`` of the run config;
an existing ledger keeps its own cap whatever a run config says (a coordinator cannot raise an
institution's cap), and a run config asking for a *different* cap is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fedrec.common.errors import BudgetExceeded
from fedrec.common.privacy.accountant import Event, epsilon_pair
from fedrec.common.privacy.ledger import Cap, PrivacyLedger

if TYPE_CHECKING:
    from fedrec.common.config import RunConfig

log = logging.getLogger(__name__)

__all__ = ["Charge", "ReleaseGuard", "open_guard", "BudgetExceeded"]

T = TypeVar("T")


@dataclass(frozen=True)
class Charge:
    """Handle of one charged (write-ahead) ledger row."""

    id: int
    event: Event
    run_id: str
    round: int
    task: str
    model: str


class ReleaseGuard:
    def __init__(self, ledger: PrivacyLedger, *, institution: str, accountant: str = "prv"):
        if ledger.institution != institution:
            raise ValueError(
                f"ledger {ledger.path} belongs to institution {ledger.institution!r}, not {institution!r}"
            )
        self.ledger = ledger
        self.institution = institution
        self.accountant = accountant

    def charge(self, event: Event, *, run_id: str, round: int, task: str, model: str) -> Charge:
        """Check the cap and commit a ``charged`` row; raises :class:`BudgetExceeded`."""
        row_id = self.ledger.charge(
            event, run_id=str(run_id), round=int(round), task=task, model=model, accountant=self.accountant
        )
        log.debug("charged ledger row %d for %s/%s run %s round %d", row_id, task, model, run_id, round)
        return Charge(id=row_id, event=event, run_id=str(run_id), round=int(round), task=task, model=model)

    def released(self, charge: Charge) -> None:
        """Mark the charged row released (after the release left)."""
        self.ledger.mark_released(charge.id)

    def spent(self, *, delta: float | None = None) -> tuple[float, float]:
        """``(ε_PRV, ε_RDP)`` of everything this institution ever charged, at ``delta``."""
        d = self.ledger._delta(delta)
        return epsilon_pair(self.ledger.events(), delta=d)

    @property
    def cap(self) -> Cap | None:
        return self.ledger.cap()

    def guarded(
        self, event: Event, compute: Callable[[], T], *, run_id: str, round: int, task: str, model: str
    ) -> T:
        """Charge, then ``compute()`` (which touches the data), then mark released.

        ``compute`` is never called when the charge is refused. If ``compute`` raises, the row
        stays charged (the ledger cannot know what left).
        """
        charge = self.charge(event, run_id=run_id, round=round, task=task, model=model)
        result = compute()
        self.released(charge)
        return result


def open_guard(
    path: str | os.PathLike[str],
    *,
    institution: str,
    cfg: RunConfig | None = None,
    epsilon_cap: float | None = None,
    delta_cap: float | None = None,
) -> ReleaseGuard:
    """The institution's guard over the ledger at ``path`` (created with its cap if new).

    The cap of a new ledger comes from ``epsilon_cap``/``delta_cap`` or else from the run
    config's ``privacy.epsilon-cap``/``privacy.delta-cap``.
    """
    if epsilon_cap is None or delta_cap is None:
        if cfg is None:
            raise ValueError("open_guard needs cfg or both epsilon_cap and delta_cap")
        epsilon_cap = cfg.privacy.epsilon_cap if epsilon_cap is None else epsilon_cap
        delta_cap = cfg.privacy.delta_cap if delta_cap is None else delta_cap
    ledger = PrivacyLedger.create(Path(path), institution=institution, epsilon_cap=epsilon_cap, delta_cap=delta_cap)
    cap = ledger.cap()
    if cap is not None and (cap.epsilon != epsilon_cap or cap.delta != delta_cap):
        log.warning(
            "ledger %s keeps its own cap (ε=%g, δ=%g); the requested (ε=%g, δ=%g) is ignored",
            ledger.path, cap.epsilon, cap.delta, epsilon_cap, delta_cap,
        )
    accountant = cfg.privacy.accountant if cfg is not None else "prv"
    return ReleaseGuard(ledger, institution=institution, accountant=accountant)
