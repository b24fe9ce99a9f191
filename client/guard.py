"""The one gate every release of an institution passes, under the institution's own policy.

API (``client/app.py`` and ``client/causal_app.py`` call it per round / per step)::

    guard = open_guard(policy, institution="hospital_03", simulated=False)   # fail closed
    share = guard.authorize(ReleaseRequest(epsilon=..., delta=..., noise_mode=..., n_min=...,
                                           round_size=...))                   # may raise Refusal
    guard.check_plan(schedule.run_events(), run_id=...)                       # before the first charge
    charge = guard.charge(event, run_id=..., round=r, task="train", model="mf")  # may raise Refusal
    ...compute the contribution with the noise of ``charge.event`` (common/privacy/release.py)...
    guard.released(charge)

Privacy contract (docs/threat-model.md). The run config is the coordinator's and untrusted;
:meth:`ReleaseGuard.authorize` compares what it asks for with the
:class:`~fedrec.common.privacy.policy.InstitutionPolicy` and refuses anything less private:

* ε = ∞ (a non-private run) unless the policy allows it, which only a simulated node's policy
  may; ε above the policy's ``max-run-epsilon``; δ above its ``delta-cap``;
* a noise mode the policy does not list; distributed noise without secure aggregation, with an
  ``n_min`` below the policy's ``min-round-size``, or with an ``n_min`` above the round's size
  (the noise each client adds, σ²/n_min, is complete only in a sum of ≥ n_min).

:meth:`ReleaseGuard.charge` then composes the whole ledger with the new event: refused if the
total would pass the cap (the stricter of the policy's and the ledger's) or this run's events
would pass ``max-run-epsilon``; otherwise the row is committed **before** any data is touched.
A :class:`Refusal` carries a generic ``code`` for the server and a ``detail`` that stays in the
institution's log: refusal texts can name private values.

The ledger is only ever opened here (:func:`open_guard`): a missing or unusable ledger refuses
every release. Creating one is an explicit institution step (``fedrec-client init``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fedrec.common.errors import BudgetExceeded, FedrecInputError, RunCeilingExceeded
from fedrec.common.privacy.accountant import Event, NonPrivateEvent, epsilon_for, epsilon_pair
from fedrec.common.privacy.ledger import Cap, PrivacyLedger, describe_event
from fedrec.common.privacy.policy import InstitutionPolicy
from fedrec.common.privacy.release import noise_share

log = logging.getLogger(__name__)

__all__ = ["Charge", "ReleaseGuard", "ReleaseRequest", "Refusal", "open_guard", "REFUSAL_CODES"]

T = TypeVar("T")

#: the only refusal texts that reach the server
REFUSAL_CODES = ("policy", "budget", "ledger", "data", "secagg", "internal")


class Refusal(Exception):
    """The institution refuses a release. ``code`` (one of :data:`REFUSAL_CODES`) is all the
    server learns; ``detail`` is for the institution's log."""

    def __init__(self, code: str, detail: str):
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Charge:
    """Handle of one charged (write-ahead) ledger row."""

    id: int
    event: Event
    run_id: str
    round: int
    task: str
    model: str


@dataclass(frozen=True)
class ReleaseRequest:
    """What the coordinator asks of this release, as the client sees it."""

    #: the run's ε (``inf`` = a non-private run)
    epsilon: float
    delta: float
    noise_mode: str = "local"
    #: distributed noise: the survivors the noise share rests on
    n_min: int = 1
    #: participants of this round per the secure-aggregation record (None: no SecAgg+)
    round_size: int | None = None


class ReleaseGuard:
    """Policy checks and write-ahead charges over one institution's ledger."""

    def __init__(self, ledger: PrivacyLedger, *, institution: str, policy: InstitutionPolicy | None = None,
                 accountant: str = "prv", simulated: bool = False):
        if ledger.institution != institution:
            raise Refusal("ledger", f"ledger {ledger.path} belongs to institution {ledger.institution!r}, "
                                    f"not {institution!r}")
        self.ledger = ledger
        self.institution = institution
        self.policy = policy
        self.accountant = accountant
        self.simulated = simulated

    # ------------------------------------------------------------ policy
    @property
    def non_private_allowed(self) -> bool:
        return bool(self.policy is not None and self.policy.allow_non_private and self.simulated)

    def authorize(self, request: ReleaseRequest) -> float:
        """Refuse (:class:`Refusal` ``policy``) what the policy does not accept; return the share
        of the accounted noise variance this client must add (1, or 1/n_min)."""
        pol = self.policy
        if pol is None:
            raise Refusal("policy", f"institution {self.institution!r}: no privacy policy; run `fedrec-client init`")
        eps = float(request.epsilon)
        if not math.isfinite(eps):
            if not self.non_private_allowed:
                raise Refusal("policy", f"{pol.source}: the run asks for a non-private release (ε = inf); this "
                                        "institution's policy does not allow it")
            return 1.0
        if not (eps > 0):
            raise Refusal("policy", f"the run asks for ε = {eps!r}; it must be positive")
        if eps > pol.max_run_epsilon:
            raise Refusal("policy", f"{pol.source}: the run asks for ε = {eps:g}, above this institution's "
                                    f"max-run-epsilon = {pol.max_run_epsilon:g}")
        if not (0 < request.delta <= pol.delta_cap):
            raise Refusal("policy", f"{pol.source}: the run asks for δ = {request.delta:g}, above this "
                                    f"institution's delta-cap = {pol.delta_cap:g}")
        if request.noise_mode not in pol.noise_modes:
            raise Refusal("policy", f"{pol.source}: noise mode {request.noise_mode!r} is not among this "
                                    f"institution's accepted modes {list(pol.noise_modes)}")
        if request.noise_mode == "distributed":
            if request.round_size is None:
                raise Refusal("policy", "distributed noise asked for a release outside secure aggregation")
            if request.n_min < pol.min_round_size:
                raise Refusal("policy", f"{pol.source}: distributed noise with n_min = {request.n_min}, below this "
                                        f"institution's min-round-size = {pol.min_round_size}")
            if request.n_min > request.round_size:
                raise Refusal("policy", f"distributed noise with n_min = {request.n_min} in a round of "
                                        f"{request.round_size} participants: the sum would carry too little noise")
        return noise_share(request.noise_mode, request.n_min)

    # ------------------------------------------------------------ budget
    def _delta(self) -> float:
        cap = self.cap
        if cap is None:
            raise Refusal("ledger", f"{self.ledger.path}: the ledger has no cap")
        return cap.delta

    @property
    def cap(self) -> Cap | None:
        """The stricter of the ledger's cap and the policy's."""
        cap = self.ledger.cap()
        pol = self.policy
        if pol is None:
            return cap
        if cap is None:
            return Cap(pol.epsilon_cap, pol.delta_cap, "policy")
        return Cap(min(cap.epsilon, pol.epsilon_cap), min(cap.delta, pol.delta_cap), cap.set_at)

    def check_plan(self, events: Sequence[Event], *, run_id: str) -> None:
        """Refuse (``budget``) a whole planned run that would not fit, before its first charge."""
        planned = list(events)
        if any(isinstance(e, NonPrivateEvent) for e in planned):
            return  # authorize() already allowed it; a non-private run is not budgeted
        self._fits(planned, run_id=str(run_id), what=f"the run's plan ({len(planned)} releases)",
                   outcome="nothing was charged")

    def charge(self, event: Event, *, run_id: str, round: int, task: str, model: str) -> Charge:
        """Check the caps and commit a ``charged`` row; raises :class:`Refusal` (nothing written).

        The stricter of the policy's and the ledger's cap and the policy's per-run ceiling are
        checked here; the ledger's own cap is checked again inside its write transaction."""
        non_private = isinstance(event, NonPrivateEvent)
        if non_private and not self.non_private_allowed:
            raise Refusal("policy", f"institution {self.institution!r}: a non-private release is not allowed")
        if not non_private and self.policy is not None:
            self._fits([event], run_id=str(run_id), what=describe_event(event), outcome="nothing was computed")
        # the caps again inside the ledger's write transaction: a concurrent charge may have
        # committed since _fits read the ledger
        cap = self.cap if not non_private and self.policy is not None else None
        try:
            row_id = self.ledger.charge(event, run_id=str(run_id), round=int(round), task=task, model=model,
                                        accountant=self.accountant, allow_non_private=non_private,
                                        cap=None if cap is None else (cap.epsilon, cap.delta),
                                        run_ceiling=None if cap is None else self.policy.max_run_epsilon)
        except RunCeilingExceeded as err:  # the policy's per-run ceiling, like _fits says it
            raise Refusal("policy", str(err)) from None
        except BudgetExceeded as err:
            raise Refusal("budget", str(err)) from None
        except FedrecInputError as err:
            raise Refusal("ledger", str(err)) from None
        log.debug("charged ledger row %d for %s/%s run %s round %d", row_id, task, model, run_id, round)
        return Charge(id=row_id, event=event, run_id=str(run_id), round=int(round), task=task, model=model)

    def _fits(self, new: list[Event], *, run_id: str, what: str, outcome: str) -> None:
        """Refuse ``new`` events unless, composed with the whole ledger, they stay within the cap
        (``budget``) and, composed with this run's rows, within the policy's max-run-epsilon
        (``policy``). One read of the ledger's rows serves both checks."""
        cap = self.cap
        if cap is None:
            raise Refusal("ledger", f"{self.ledger.path}: the ledger has no cap")
        rows = self.ledger.rows()
        history = [r.event for r in rows]
        after = epsilon_for(history + new, delta=cap.delta, accountant=self.accountant)
        if not (after <= cap.epsilon):
            before = epsilon_for(history, delta=cap.delta, accountant=self.accountant)
            raise Refusal("budget", f"institution {self.institution!r}: {what} would raise spent ε from "
                                    f"{before:.3f} to {after:.3f} at δ={cap.delta:g}, above the cap "
                                    f"ε={cap.epsilon:g}; {outcome}")
        if self.policy is not None:
            run = [r.event for r in rows if r.run_id == run_id] + new
            run_eps = epsilon_for(run, delta=cap.delta, accountant=self.accountant)
            if not (run_eps <= self.policy.max_run_epsilon * (1 + 1e-9)):
                raise Refusal("policy", f"institution {self.institution!r}: {what} in run {run_id} would spend "
                                        f"ε = {run_eps:.3f}, above max-run-epsilon = "
                                        f"{self.policy.max_run_epsilon:g}; {outcome}")

    def released(self, charge: Charge) -> None:
        """Mark the charged row released (after the release left)."""
        self.ledger.mark_released(charge.id)

    def spent(self, *, delta: float | None = None) -> tuple[float, float]:
        """``(ε_PRV, ε_RDP)`` of everything this institution ever charged, at ``delta``
        (default: the cap's δ); ``inf`` once any non-private release is recorded."""
        d = float(delta) if delta is not None else self._delta()
        return epsilon_pair(self.ledger.events(), delta=d)

    def guarded(self, event: Event, compute: Callable[[Charge], T], *, run_id: str, round: int, task: str,
                model: str) -> T:
        """Charge, then ``compute(charge)`` (which touches the data), then mark released.

        ``compute`` is never called when the charge is refused. If ``compute`` raises, the row
        stays charged (the ledger cannot know what left).
        """
        charge = self.charge(event, run_id=run_id, round=round, task=task, model=model)
        result = compute(charge)
        self.released(charge)
        return result


def open_guard(policy: InstitutionPolicy, *, institution: str, accountant: str = "prv",
               simulated: bool = False) -> ReleaseGuard:
    """The institution's guard over the ledger its policy names. Opens, never creates: a
    missing, unreadable or schema-less ledger raises :class:`Refusal` ``ledger``."""
    if policy.allow_non_private and not simulated:
        raise Refusal("policy", f"{policy.source}: allow-non-private is for simulations only; a deployed "
                                "institution cannot release without differential privacy")
    try:
        ledger = PrivacyLedger(policy.ledger, durable=not simulated)  # a simulation's ledgers are scratch files
    except FedrecInputError as err:
        raise Refusal("ledger", f"{err} (policy {policy.source}); fix: `fedrec-client init`") from None
    cap = ledger.cap()
    if cap is not None and (cap.epsilon != policy.epsilon_cap or cap.delta != policy.delta_cap):
        log.warning("ledger %s cap (ε=%g, δ=%g) differs from the policy's (ε=%g, δ=%g): the stricter applies",
                    ledger.path, cap.epsilon, cap.delta, policy.epsilon_cap, policy.delta_cap)
    return ReleaseGuard(ledger, institution=institution, policy=policy, accountant=accountant, simulated=simulated)
