"""Simulated domains (health, education, finance) on one :class:`Domain` contract.

``domain_federation`` draws a federation in memory, in the institution data contract, with
its ground truth. It lives here rather than in ``fedrec.common.datasets`` because ``common/``
imports nothing from ``simulations/`` (the architecture's one-way data flow); the types it
returns (``InstitutionData``, ``GroundTruth``) are the common ones.
"""

from __future__ import annotations

from fedrec.common.datasets import GroundTruth, InstitutionData
from fedrec.common.errors import FedrecInputError
from fedrec.simulations.domains.base import POLICIES, Domain, ItemSpec, Linear, Simulation, simulate

__all__ = ["CATALOGUES", "DOMAINS", "POLICIES", "Domain", "ItemSpec", "Linear", "Simulation", "get_domain",
           "domain_federation", "simulate"]

#: Domain names accepted by ``fedrec-sim generate --domain`` and ``run --dataset``.
DOMAINS = ("health", "education", "finance")
#: Generated ranking catalogues (``simulations/domains/catalogue.py``: 20,000+ people, hundreds of
#: items with text; not causal :class:`Domain` s): ``benchmarks/adapter.py --dataset catalogue``.
CATALOGUES = ("catalogue",)


def get_domain(name: str) -> Domain:
    """The :class:`Domain` called ``name`` (FedrecInputError for an unknown name)."""
    if name == "health":
        from fedrec.simulations.domains.health import DOMAIN
    elif name == "education":
        from fedrec.simulations.domains.education import DOMAIN
    elif name == "finance":
        from fedrec.simulations.domains.finance import DOMAIN
    elif name in CATALOGUES:
        raise FedrecInputError(f"--domain {name!r} is a ranking catalogue, not a causal domain; fix: use one of "
                               f"{', '.join(DOMAINS)}, or benchmarks/adapter.py --dataset {name}")
    else:
        raise FedrecInputError(f"--domain {name!r}: unknown domain; fix: use one of {', '.join(DOMAINS)}")
    return DOMAIN


def domain_federation(domain: str, *, institutions: int, people: int, seed: int, skew: float,
                      policy: str = "confounded", hidden_confounder: float = 0.0
                      ) -> tuple[list[InstitutionData], GroundTruth]:
    """Generate a simulated federation in memory (no files): one :class:`InstitutionData` per
    institution, exactly as :func:`fedrec.common.datasets.load_federation` would read them
    back from ``fedrec-sim generate``'s output, and the :class:`GroundTruth`. ``hidden_confounder``:
    an unobserved institution-level common cause (:func:`~fedrec.simulations.domains.base.simulate`)."""
    sim = simulate(get_domain(domain), institutions=institutions, people=people, seed=seed, skew=skew,
                   policy=policy, hidden_confounder=hidden_confounder)
    return sim.institutions, sim.truth
