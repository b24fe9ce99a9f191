"""The simulation harness plays every institution's IT: before a run it writes each simulated
institution's privacy policy and creates its ledger, the explicit step a real institution takes
with ``fedrec-client init``. Nodes never create either (client/guard.py fails closed).

Layout under the run's results folder ``OUT``::

    OUT/policies/<institution>/privacy.toml   # what the run config's sim.policy-dir points to
    OUT/ledgers/<institution>.db              # the ledger each policy names
    OUT/identities/<institution>.pem          # its SecAgg+ signing key (ECDSA P-256)
    OUT/identities/roster.toml                # the federation roster every policy names

The simulated institutions accept the runs they are provisioned for — their per-run ceiling is
the run's ε (plus the accountant's rounding), their cap that times the runs the command declared
up front (a causal run and its ``--refute`` refutations) — and nothing more: a second command
into the same folder is refused before anything is charged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fedrec.common.errors import FedrecInputError
from fedrec.common.privacy.ledger import PrivacyLedger
from fedrec.common.privacy.policy import POLICY_FILE, InstitutionPolicy, write_policy

__all__ = ["provision_institutions", "check_unused_out", "RUN_EPSILON_SLACK"]

#: the run's composed ε may exceed its target by the accountant's rounding (PRV's upper estimate)
RUN_EPSILON_SLACK = 1.02


def check_unused_out(out: Path) -> None:
    """Refuse a results folder that already holds a run (its ledgers would be charged twice)."""
    out = Path(out)
    used = [p for p in ("policies", "ledgers", "identities", "metrics.json", "causal.json", "causal_raw.json") if (out / p).exists()]
    if used:
        raise FedrecInputError(f"--out {out}: already holds a run ({', '.join(used)}); nothing was charged; "
                               "fix: give a new --out folder (each simulated run accounts in its own ledgers)")


def provision_institutions(names: Sequence[str], out: Path, *, epsilon: float, delta: float,
                           allow_non_private: bool = False, runs: int = 1) -> Path:
    """Write ``OUT/policies/<name>/privacy.toml`` and create ``OUT/ledgers/<name>.db`` for each
    institution; return the policy folder (the run config's ``sim.policy-dir``).

    ``runs``: how many runs of ``epsilon`` each the command declares up front (a causal run plus
    its ``--refute`` refutations): the cap is ``runs x epsilon`` (basic composition, an upper
    bound of their composed ε) and each run's ceiling stays ``epsilon``; nothing more is accepted.

    ``epsilon = inf`` needs ``allow_non_private=True`` (the explicit flag of a non-private
    simulation); the ledgers then record the run's releases as ε = ∞.
    """
    out = Path(out).resolve()
    check_unused_out(out)
    if not math.isfinite(epsilon) and not allow_non_private:
        raise FedrecInputError("--epsilon inf is a non-private run; fix: add --non-private to say so explicitly "
                               "(simulations only; a deployed institution never allows it)")
    if int(runs) < 1:
        raise FedrecInputError(f"provisioning for {runs} runs; fix: at least 1")
    if math.isfinite(epsilon):
        run_cap = epsilon * RUN_EPSILON_SLACK + 1e-6
        cap = int(runs) * run_cap
    else:
        cap = run_cap = 1.0  # never reached: a non-private release is not budgeted, and after it ε is ∞
    policy_dir = out / "policies"
    from fedrec.common.secagg._identity import write_identity, write_roster

    ids = out / "identities"
    keys = {name: ids / f"{name}.pem" for name in names}
    roster = write_roster(ids / "roster.toml", {name: write_identity(keys[name]) for name in names})
    for name in names:
        ledger = out / "ledgers" / f"{name}.db"
        policy = InstitutionPolicy(ledger=ledger, epsilon_cap=cap, delta_cap=delta, max_run_epsilon=run_cap,
                                   noise_modes=("local", "distributed"), min_round_size=2,
                                   allow_non_private=not math.isfinite(epsilon), identity_key=keys[name], roster=roster,
                                   source=policy_dir / name / POLICY_FILE)
        ledger.parent.mkdir(parents=True, exist_ok=True)
        PrivacyLedger.initialize(ledger, institution=name, epsilon_cap=cap, delta_cap=delta)
        write_policy(policy_dir / name / POLICY_FILE, policy)
    return policy_dir
