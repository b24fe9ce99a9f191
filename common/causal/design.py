"""The nuisance models' design: which declared covariates, which derived features.

A study's causal design is public, like its bounds: the covariates the propensity and
outcome models use (default: all declared ones) and derived features (``op(covariate)`` or
``ratio(a, b[, k])``, optionally with explicit public bounds) whose bounds follow from the
declared ones. It can be declared once in ``study.toml`` (``[causal]``, read by
:mod:`fedrec.common.schema`) or given per run (``fedrec-sim causal --covariates/--derive``).

These functions only check names and derive public bounds from a :class:`Study`; they never
read data. The client's encoding (client/statistics.py) and the study parser share them, so a
design that parses is a design the clients can encode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from fedrec.common.causal.derived import DerivedFeature, derived_bounds, derived_values, parse_derived
from fedrec.common.errors import FedrecInputError

if TYPE_CHECKING:  # the schema module imports this one lazily (no import cycle at run time)
    from fedrec.common.datasets import InstitutionData
    from fedrec.common.schema import Study

__all__ = ["base_columns", "derived_specs", "design_columns_of", "raw_design"]


def base_columns(study: "Study", covariates: Sequence[str] | None,
                 where: str = "study.toml") -> list[tuple[str, float, float]]:
    """The study's design columns (name, lower, upper) of the chosen ``covariates`` (None:
    all); FedrecInputError naming an undeclared covariate."""
    cols = study.design_columns()
    if covariates is None:
        return cols
    known = set(study.covariate_names)
    for name in covariates:
        if name not in known:
            raise FedrecInputError(
                f"{where}: covariate {name!r} is not declared (declared: {', '.join(study.covariate_names)}); "
                "fix: use a declared covariate or add [covariates.NAME] with its bounds to study.toml")
    keep = set(covariates)
    return [c for c in cols if c[0].split("=", 1)[0] in keep]


def derived_specs(study: "Study", derived: Sequence[str], where: str = "causal.derived"
                  ) -> list[tuple[DerivedFeature, list[tuple[float, float]]]]:
    """(parsed feature, declared bounds of its covariates) per derived feature;
    FedrecInputError (one line, prefixed by ``where``) for a bad form, an undeclared or
    categorical covariate, or bounds the op cannot take."""
    out = []
    for spec in derived:
        try:
            feature = parse_derived(spec)
        except ValueError as err:
            raise FedrecInputError(f"{where}: {err}") from None
        bounds = []
        for name in feature.covariates:
            try:
                cov = study.covariate(name)
            except KeyError:
                raise FedrecInputError(
                    f"{where}: {spec!r} uses covariate {name!r}, which study.toml does not declare "
                    f"(declared: {', '.join(study.covariate_names)}); fix: derive from a declared covariate") from None
            if cov.kind == "category":
                raise FedrecInputError(f"{where}: {spec!r}: {name!r} is a category; fix: derive from a "
                                       "number, integer or binary covariate")
            bounds.append((cov.lower, cov.upper))
        try:
            derived_bounds(feature, bounds)
        except ValueError as err:
            fix = "use log1p" if feature.op == "log" else "divide by a covariate declared positive"
            raise FedrecInputError(f"{where}: {spec!r}: {err}; fix: {fix}") from None
        out.append((feature, bounds))
    return out


def design_columns_of(study: "Study", covariates: Sequence[str] | None = None, derived: Sequence[str] = (), *,
                      where_covariates: str = "study.toml", where_derived: str = "causal.derived"
                      ) -> list[tuple[str, float, float]]:
    """The design columns (name, lower, upper): the chosen declared columns, then one per
    derived feature (its canonical name, bounds from :func:`derived_bounds`). Errors are one
    line, prefixed by where the name came from."""
    cols = base_columns(study, covariates, where_covariates)
    for feature, bounds in derived_specs(study, derived, where_derived):
        cols.append((feature.name, *derived_bounds(feature, bounds)))
    return cols


def raw_design(data: "InstitutionData", covariates: Sequence[str] | None = None, derived: Sequence[str] = ()
               ) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Every person's raw design values (people order) and the columns with public bounds
    (an institution's own data: used to apply released CATE models and by the client's encoding)."""
    base = base_columns(data.study, covariates)
    names = [c[0] for c in data.study.design_columns()]
    idx = [names.index(c[0]) for c in base]
    full = data.covariate_matrix()
    cov = full[:, idx] if len(idx) else np.zeros((len(data.people), 0))
    extra = [derived_values(feature, [data.people[c].to_numpy(float) for c in feature.covariates], bounds)
             for feature, bounds in derived_specs(data.study, derived)]
    if extra:
        cov = np.column_stack([cov] + extra)
    return cov, design_columns_of(data.study, covariates, derived)
