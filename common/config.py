"""The one place where run knobs are parsed.

Every knob has its default in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (Flower
flattens nested tables to dotted keys such as ``privacy.epsilon``) and the same default here,
so code that runs outside Flower (benchmarks, unit tests) sees identical values. A unit test
checks that the two lists agree.

Nothing else in the project reads ``context.run_config`` directly: call
:func:`RunConfig.from_flower` once and pass the typed object around.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "RunConfig", "DEFAULTS", "pyproject_defaults", "derive_seed"]


class ConfigError(ValueError):
    """A run knob has a value the run cannot use. The message names the knob and the fix."""


@dataclass(frozen=True)
class DataConfig:
    #: ``movielens``, a domain (``health``/``education``/``finance``) or a folder of
    #: institution folders in the data contract.
    dataset: str = "movielens"
    institutions: int = 10
    seed: int = 0
    #: 0 = IID split of persons across institutions; towards 1 = strongly non-IID.
    partition_skew: float = 0.5
    test_fraction: float = 0.2
    #: people per institution-domain simulation (total across institutions).
    people: int = 20000
    #: folder holding ``institution_XX`` folders (simulation); a deployed node sets its own
    #: folder in its node config (``data-dir``) instead.
    data_dir: str = ""
    #: where the ServerApp writes metrics.json / config.json ("" = do not write).
    results_dir: str = ""


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = 20
    model: str = "mf"
    #: DP-SGD steps each institution takes per round.
    local_steps: int = 1
    #: Poisson sampling rate of each DP-SGD step: each person joins a step with this probability
    #: (1 = every person in every step). A public constant: the charged event, the noise and
    #: the step's scaling never depend on how many persons an institution holds.
    sample_rate: float = 1.0
    #: the adapter's public fixed step denominator: a DP-SGD step moves by lr × (clipped sum +
    #: noise) / (sample-rate × step-persons). Set it near an institution's typical number of
    #: persons (within a factor of ~10: SecAgg+ clips each coordinate of a delta to ±10·lr, so an
    #: institution far larger than this has its steps clipped); it is never read from the data
    #: (dividing by the private count would break the charged sensitivity under add/remove-one-
    #: person neighbours).
    step_persons: float = 100.0
    lr: float = 1.0
    #: dimension of released item factors (0 = item biases only).
    mf_dim: int = 0
    #: ridge penalty for the private per-person fit (bias and factors).
    user_reg: float = 2.0
    #: ridge shrinkage of the shared item side, in units of (weighted) raters.
    item_reg: float = 1.0
    #: prior variance of item parameters; sets the Wiener step size under DP noise.
    item_prior_var: float = 0.05
    #: prior mean of item biases under DP: ``metadata`` (empirical Bayes on the public
    #: catalogue's genres/year/category and the DP counts, fitted to round 1: post-processing)
    #: or ``zero`` (the global mean).
    item_prior_mean: str = "metadata"
    #: server learning rate applied to the mean of institution updates.
    server_lr: float = 1.0


@dataclass(frozen=True)
class PrivacyConfig:
    #: total ε for the whole run per institution; ``inf`` turns DP off.
    epsilon: float = 8.0
    delta: float = 1e-5
    #: per-person L2 clipping bound on the released gradient.
    clip_norm: float = 1.0
    accountant: str = "prv"
    #: share of the run's privacy budget (of 1/σ_eff², for full-batch releases) spent on the
    #: once-per-run DP item counts; the rounds share the rest. A fixed share, not a fixed noise
    #: multiple of the per-round σ: with more rounds the counts would otherwise get noisier.
    count_budget_share: float = 0.18
    #: ``local``: each client adds the full noise. ``distributed``: each adds σ²/n_min.
    noise_mode: str = "local"
    #: survivors needed for distributed noise to be complete (0 = automatic: the
    #: institutions minus the dropouts ``secagg.max-dropout-fraction`` tolerates). Each
    #: institution checks it against its own policy and the round's size.
    n_min: int = 0
    # The ledger, the cap and every bound on what a run may ask are the institution's own
    # (its privacy.toml, common/privacy/policy.py), never the run config's.


@dataclass(frozen=True)
class SimConfig:
    #: simulations only: the folder where the harness wrote each simulated institution's
    #: ``<institution>/privacy.toml`` (and the ledger it names). A deployed node ignores it.
    policy_dir: str = ""
    #: simulations only: the seed of every release's DP noise and Poisson sampling, so that the
    #: same command gives the same numbers (``fedrec-sim run --seed`` sets it); -1 = fresh noise
    #: from the OS CSPRNG. A simulated node derives one seed per institution, task and round from
    #: it (:func:`derive_seed`); a deployed node ignores it and stays on the CSPRNG.
    noise_seed: int = -1


def derive_seed(base: int, *labels: object) -> int:
    """A 63-bit seed from ``base`` and ``labels`` (e.g. institution, task, round): SHA-256 of
    both, so different releases get unrelated streams. For simulations only (see
    ``sim.noise-seed``): a seed anyone can recompute is no protection in deployment."""
    import hashlib

    text = "\x1f".join([str(int(base))] + [str(label) for label in labels])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = True
    #: fraction of clients that may drop out with the round still completing.
    max_dropout_fraction: float = 0.3
    #: neighbours per client in the SecAgg+ graph: -1 = automatic (an O(log n) degree, Bell et al.;
    #: the complete graph up to 20 clients), 0 = complete graph, k = k neighbours.
    neighbours: int = -1
    #: seconds a round keeps waiting for the last institutions once enough have sent their input
    #: for it to complete (all but the tolerated dropouts); the late ones count as dropped.
    #: -1 = wait for every node until the stage's timeout, or until Flower declares a node
    #: offline (a SuperNode that stopped heartbeating: 30-60 s in flwr 1.41).
    straggler_grace: float = -1.0


@dataclass(frozen=True)
class EvalConfig:
    #: ``simulation``: clients report test metrics (ground truth, simulations only);
    #: ``off``: nothing computed on institution data is released.
    metrics_release: str = "simulation"
    negatives: int = 99
    k: int = 10


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    # ---------------------------------------------------------------- parsing
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flattened run config (``{"privacy.epsilon": 8.0, ...}``).

        Unknown keys are an error (a typo would otherwise silently keep a default).
        """
        known = _flat_keys()
        for key in sorted(set(flat) & set(REMOVED_KEYS)):
            raise ConfigError(f"{key}: {REMOVED_KEYS[key]}")
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {unknown}; valid keys: {sorted(known)}"
            )
        sections: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            section, attr, typ = known[key]
            sections.setdefault(section, {})[attr] = coerce_value(key, value, typ)
        parts = {
            f.name: f.default_factory()  # type: ignore[misc]
            for f in fields(cls)
        }
        for section, values in sections.items():
            parts[section] = dataclasses.replace(parts[section], **values)
        cfg = cls(**parts)
        cfg.validate()
        return cfg

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        return cls.from_flat(dict(run_config))

    def to_flat(self) -> dict[str, Any]:
        """Inverse of :meth:`from_flat`; ``inf`` stays a float."""
        out: dict[str, Any] = {}
        for key, (section, attr, _typ) in _flat_keys().items():
            out[key] = getattr(getattr(self, section), attr)
        return out

    def override(self, **flat: Any) -> RunConfig:
        """A copy with some flat keys replaced (``override(**{"privacy.epsilon": 1.0})``)."""
        merged = self.to_flat()
        merged.update(flat)
        return RunConfig.from_flat(merged)

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        p, t, d = self.privacy, self.train, self.data
        if not (p.epsilon > 0):
            raise ConfigError("privacy.epsilon must be > 0 (use inf to turn DP off)")
        if not (0 < p.delta < 1):
            raise ConfigError("privacy.delta must lie in (0, 1), e.g. 1e-5")
        if not (p.clip_norm > 0 and math.isfinite(p.clip_norm)):
            raise ConfigError("privacy.clip-norm must be a positive finite number")
        if not (0 < p.count_budget_share < 1):
            raise ConfigError("privacy.count-budget-share must lie in (0, 1), e.g. 0.18")
        if p.accountant not in ("prv", "rdp"):
            raise ConfigError("privacy.accountant must be 'prv' or 'rdp'")
        if p.noise_mode not in ("local", "distributed"):
            raise ConfigError("privacy.noise-mode must be 'local' or 'distributed'")
        if p.n_min < 0 or p.n_min > d.institutions:
            raise ConfigError("privacy.n-min must lie in [0, institutions] (0 = all)")
        if d.institutions < 1:
            raise ConfigError("institutions must be >= 1")
        if not (0 <= d.partition_skew <= 1):
            raise ConfigError("partition-skew must lie in [0, 1]")
        if not (0 < d.test_fraction < 1):
            raise ConfigError("test-fraction must lie in (0, 1)")
        if t.rounds < 1 or t.local_steps < 1:
            raise ConfigError("rounds and train.local-steps must be >= 1")
        if not all(math.isfinite(v) for v in (t.lr, t.server_lr, t.item_reg, t.user_reg)):
            raise ConfigError("lr, server-lr, item-reg and user-reg must be finite numbers, e.g. lr = 1.0 (a NaN or "
                              "infinite step makes a charged round release nothing usable)")
        if not (t.step_persons > 0 and math.isfinite(t.step_persons)):
            raise ConfigError("step-persons must be a positive number, e.g. 100 (the adapter's public step "
                              "denominator, near an institution's typical number of persons)")
        if not (0 < t.sample_rate <= 1):
            raise ConfigError("sample-rate must lie in (0, 1], e.g. 0.1 (each person joins a DP-SGD step with "
                              "this probability; 1 = every person in every step)")
        if t.item_prior_mean not in ("metadata", "zero"):
            raise ConfigError("item-prior-mean must be 'metadata' or 'zero'")
        if t.mf_dim < 0:
            raise ConfigError("train.mf-dim must be >= 0")
        if t.model not in ("mf", "adapter", "hybrid"):
            raise ConfigError(f"model = {t.model!r} is not built; fix: use 'mf', 'adapter' (the LoRA text adapter) "
                              "or 'hybrid' (DP popularity + DP MF + text prior; docs/adapter.md)")
        if self.eval.metrics_release not in ("simulation", "off"):
            raise ConfigError("eval.metrics-release must be 'simulation' or 'off'")
        if self.sim.noise_seed < -1:
            raise ConfigError("sim.noise-seed must be >= 0, or -1 for fresh noise from the OS")
        if self.secagg.neighbours < -1:
            raise ConfigError("secagg.neighbours must be -1 (automatic), 0 (complete graph) or a number of neighbours")
        if not (self.secagg.straggler_grace == -1 or self.secagg.straggler_grace >= 0):
            raise ConfigError("secagg.straggler-grace must be -1 (wait for every node) or seconds >= 0 to wait "
                              "for the last nodes once enough have answered")
        if not (0 <= self.secagg.max_dropout_fraction < 0.5):
            raise ConfigError("secagg.max-dropout-fraction must lie in [0, 0.5): unmasking needs a strict majority "
                              "of the share holders, and each node signs the tolerance into its keys")

    @property
    def dp_enabled(self) -> bool:
        return math.isfinite(self.privacy.epsilon)

    @property
    def n_min(self) -> int:
        """Survivors required for distributed noise (``privacy.n-min``; 0 = the institutions
        minus the tolerated dropouts, the same floor the server's rounds need)."""
        n = self.data.institutions
        return self.privacy.n_min or max(1, n - math.floor(self.secagg.max_dropout_fraction * n))


# Sections whose keys live at the top level of [tool.flwr.app.config] (no prefix).
_TOP_LEVEL_SECTIONS = {"data", "train"}
_TOP_LEVEL_RENAMES = {("train", "model"): "model"}


#: run-config keys that existed once; a config that still sets one is refused, never ignored
REMOVED_KEYS = {
    "persons-per-step": "removed: the sampling rate it implied (persons per step / the institution's persons) "
                        "depended on a private count; fix: set sample-rate, the public per-person probability "
                        "of joining a step (e.g. 0.1)",
}


def _flat_keys() -> dict[str, tuple[str, str, type]]:
    """Map every flat key to (section, attribute, type)."""
    keys: dict[str, tuple[str, str, type]] = {}
    for sec in fields(RunConfig):
        cls = sec.default_factory  # type: ignore[misc]
        for f in fields(cls):  # type: ignore[arg-type]
            name = f.name.replace("_", "-")
            if sec.name in _TOP_LEVEL_SECTIONS and not name.startswith("mf-"):
                flat = name
            elif sec.name == "train" and name.startswith("mf-"):
                flat = "mf." + name[3:]
            else:
                flat = f"{sec.name}.{name}"
            keys[flat] = (sec.name, f.name, type(f.default))
    return keys


def coerce_value(key: str, value: Any, typ: type) -> Any:
    """``value`` (a ``--set`` text or a TOML value) as ``typ`` (bool: true/false/1/0/yes/no/on/off;
    int: whole numbers only; float: ``inf`` allowed); ConfigError naming ``key`` otherwise. Shared by
    the run config and the causal knobs (simulations/causal_cli.py)."""
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)  # accepts "inf"
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"run-config key '{key}' = {value!r} is not a valid {typ.__name__}"
        ) from None


DEFAULTS: dict[str, Any] = RunConfig().to_flat()


def pyproject_defaults(pyproject: Path) -> dict[str, Any]:
    """Flattened ``[tool.flwr.app.config]`` of a pyproject.toml (for the sync test)."""
    data = tomllib.loads(pyproject.read_text())
    table = data["tool"]["flwr"]["app"].get("config", {})
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(f"{prefix}{k}.", v)
            else:
                flat[f"{prefix}{k}"] = v

    walk("", table)
    return flat
