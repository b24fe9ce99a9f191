"""The institution's privacy policy: a file it keeps beside its data (``privacy.toml``).

The run config belongs to the coordinator and is untrusted on privacy. Every privacy
parameter a release depends on is therefore bounded by this file, which only the institution
writes (``fedrec-client init``); a run config may ask for something stricter, never for less::

    # privacy.toml — written by `fedrec-client init`, owned by the institution
    [privacy]
    ledger = "privacy-ledger.db"      # relative to this file; must exist (fail closed)
    epsilon-cap = 10.0                # total ε over every run, at δ = delta-cap
    delta-cap = 1e-5
    max-run-epsilon = 8.0             # the largest ε one run may spend
    noise-modes = ["local"]           # accepted noise modes; "distributed" must be opted into
    min-round-size = 3                # distributed noise: smallest round / survivor set accepted
    allow-non-private = false         # ε = ∞ releases; only ever true in a simulation
    identity-key = "identity.pem"     # optional: the institution's ECDSA P-256 private key (SecAgg+ signing)
    roster = "roster.toml"            # optional: the federation's public keys ([members] name = "ecdsa-...")

Why a file and not Flower's node config: the node config is a flat string map given on the
SuperNode command line; the policy has lists, a ledger path relative to the institution's own
folder, and must be readable by ``fedrec-client budget`` and the auditor without a running node.
A deployed node finds it at its node config's ``policy`` key or at ``<data-dir>/privacy.toml``.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common.errors import FedrecInputError

__all__ = ["POLICY_FILE", "InstitutionPolicy", "load_policy", "write_policy"]

POLICY_FILE = "privacy.toml"
NOISE_MODES = ("local", "distributed")


@dataclass(frozen=True)
class InstitutionPolicy:
    """What the institution accepts. Paths are absolute once loaded."""

    ledger: Path
    epsilon_cap: float = 10.0
    delta_cap: float = 1e-5
    max_run_epsilon: float = 8.0
    noise_modes: tuple[str, ...] = ("local",)
    min_round_size: int = 3
    allow_non_private: bool = False
    #: secure aggregation (issue 28): the institution's long-term ECDSA (P-256) private key and the
    #: federation roster its key advertisements are verified against (both or neither)
    identity_key: Path | None = None
    roster: Path | None = None
    #: the file this policy was read from (for messages)
    source: Path = field(default=Path(POLICY_FILE), compare=False)

    def __post_init__(self) -> None:
        where = str(self.source)
        if not (self.epsilon_cap > 0 and math.isfinite(self.epsilon_cap)):
            raise FedrecInputError(f"{where}: epsilon-cap must be a positive finite number, e.g. 10")
        if not (0 < self.delta_cap < 1):
            raise FedrecInputError(f"{where}: delta-cap must lie in (0, 1), e.g. 1e-5")
        if not (0 < self.max_run_epsilon <= self.epsilon_cap):
            raise FedrecInputError(
                f"{where}: max-run-epsilon must lie in (0, epsilon-cap = {self.epsilon_cap:g}]")
        bad = [m for m in self.noise_modes if m not in NOISE_MODES]
        if bad or not self.noise_modes:
            raise FedrecInputError(f"{where}: noise-modes {list(self.noise_modes)} must be a non-empty subset of "
                                   f"{list(NOISE_MODES)}")
        if (self.identity_key is None) != (self.roster is None):
            raise FedrecInputError(f"{where}: identity-key and roster go together (secure aggregation signs with "
                                   "the one and verifies against the other); give both or neither")
        if self.min_round_size < 2:
            raise FedrecInputError(f"{where}: min-round-size must be >= 2 (a round of one is one institution's "
                                   "update in the clear)")

    def to_toml(self, *, relative_to: Path | None = None) -> str:
        ledger = self.ledger
        if relative_to is not None:
            try:
                ledger = Path(os.path.relpath(self.ledger, relative_to))
            except ValueError:  # another drive (Windows)
                pass
        modes = ", ".join(f'"{m}"' for m in self.noise_modes)
        return (
            "# fedrec institution privacy policy — owned by the institution, never by the coordinator.\n"
            "# A run config may ask for less privacy spending than this, never more (docs/threat-model.md).\n"
            "[privacy]\n"
            f'ledger = "{ledger.as_posix()}"\n'
            f"epsilon-cap = {self.epsilon_cap!r}\n"
            f"delta-cap = {self.delta_cap!r}\n"
            f"max-run-epsilon = {self.max_run_epsilon!r}\n"
            f"noise-modes = [{modes}]\n"
            f"min-round-size = {self.min_round_size}\n"
            f"allow-non-private = {'true' if self.allow_non_private else 'false'}\n"
            + "".join(f'{key} = "{self._rel(p, relative_to)}"\n'
                      for key, p in (("identity-key", self.identity_key), ("roster", self.roster)) if p is not None)
        )

    @staticmethod
    def _rel(p: Path, relative_to: Path | None) -> str:
        if relative_to is not None:
            try:
                p = Path(os.path.relpath(p, relative_to))
            except ValueError:
                pass
        return p.as_posix()


_KEYS = {
    "ledger": str, "epsilon-cap": float, "delta-cap": float, "max-run-epsilon": float,
    "noise-modes": list, "min-round-size": int, "allow-non-private": bool,
    "identity-key": str, "roster": str,
}


def load_policy(path: str | os.PathLike[str]) -> InstitutionPolicy:
    """Read and check ``privacy.toml``; one-line :class:`FedrecInputError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedrecInputError(f"{path}: no institution privacy policy here; fix: run `fedrec-client init`") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FedrecInputError(f"{path}: cannot read the privacy policy ({type(err).__name__}); "
                               "fix: check the file's permissions") from None
    try:
        table = tomllib.loads(text).get("privacy")
    except tomllib.TOMLDecodeError as err:
        raise FedrecInputError(f"{path}: not valid TOML ({err}); fix: correct the file or re-run "
                               "`fedrec-client init`") from None
    if not isinstance(table, dict):
        raise FedrecInputError(f"{path}: no [privacy] table; fix: re-run `fedrec-client init`")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise FedrecInputError(f"{path}: unknown key(s) {unknown} in [privacy]; valid: {sorted(_KEYS)}")
    if "ledger" not in table:
        raise FedrecInputError(f"{path}: [privacy] ledger is missing; fix: name the ledger file")
    values: dict[str, Any] = {}
    for key, typ in _KEYS.items():
        if key not in table:
            continue
        v = table[key]
        ok = isinstance(v, typ) or (typ is float and isinstance(v, int) and not isinstance(v, bool))
        if typ is int and isinstance(v, bool):
            ok = False
        if not ok:
            raise FedrecInputError(f"{path}: [privacy] {key} = {v!r} is not a {typ.__name__}")
        values[key.replace("-", "_")] = float(v) if typ is float else v
    ledger = Path(values.pop("ledger"))
    if not ledger.is_absolute():
        ledger = (path.parent / ledger).resolve()
    for key in ("identity_key", "roster"):
        if key in values:
            p = Path(values[key])
            values[key] = p if p.is_absolute() else (path.parent / p).resolve()
    if "noise_modes" in values:
        values["noise_modes"] = tuple(str(m) for m in values["noise_modes"])
    return InstitutionPolicy(ledger=ledger, source=path, **values)


def write_policy(path: str | os.PathLike[str], policy: InstitutionPolicy) -> Path:
    """Write ``policy`` to ``path`` atomically, refusing to overwrite an existing policy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(policy.to_toml(relative_to=path.parent), encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FedrecInputError(f"{path}: a privacy policy already exists; fix: edit it, or remove it first "
                               "if you mean to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
