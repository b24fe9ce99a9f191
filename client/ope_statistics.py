"""Per-person terms of the strategy-evaluation release, and their public bound.

One release evaluates K recommendation strategies at once (common/causal/ope.py): per person
and strategy the components ``[A1, W1, A0, W0, P, D, G, S]`` computed from

* the person's own rows (exposed, scaled outcome) for the items they were considered for,
* **public** nuisances of a causal run (whitening, propensity ``beta/<item>``, per-arm outcome
  models ``mu1/<item>``, ``mu0/<item>``: the arrays the causal ``influence`` step sends), and
* **public** strategy specs (:func:`exposure_probabilities`): what each strategy would
  expose the person to, from the person's own covariates and public models only.

Privacy contract: a person's row depends only on that person's data and public values (no
model fitted on this institution's other people enters it), each component is divided by its
public bound and clipped to [-1, 1], and the row ``[z̃, k vech(z̃ z̃')]`` is clipped to
:func:`~fedrec.common.causal.ope.release_bound` by :func:`fedrec.client.statistics.release`;
so adding or removing one person moves the released sum by at most that bound (the L2
sensitivity the guard charges), whatever their data. The weight clip λ (``clip``) is what
makes the bound small: it caps the person's total importance weight.

Strategy specs (JSON-able dicts, ``name`` + ``kind``):

* ``{"kind": "rank", "coef": {item: {column: value}}, "better": "higher"|"lower"}`` — top-1 of
  the person's considered items by a public linear score on the bound-scaled design
  (``intercept`` + design columns; a causal run's ``cate_coef`` for benefit ranking, a
  public engagement model for engagement ranking); ``better = "lower"`` ranks by −score;
* ``{"kind": "crossfit", "coef": [model_0, model_1, ...], "salt": TEXT, "better": ...}`` — a
  cross-fitted rank strategy: a person of fold k (:func:`~fedrec.common.causal.ope.person_fold`
  of the person id and the public salt) is ranked by ``model_k``, a model fitted **without**
  fold k's people (benefit ranking evaluated on people its CATE model never saw);
* ``{"kind": "random"}`` — each considered item with probability 1/m;
* ``{"kind": "logging"}`` — the logging policy itself: the logged propensity (or the public
  model); exposure bound: the catalogue size; its weight clip is ``CLIP_FACTOR`` x λ;
* any spec may carry a public ``clip-factor`` (its weight clip = factor x λ);
* ``{"kind": "scorer", "scorer": NAME}`` — top-1 by a locally registered scorer
  (:func:`register_scorer`): the hook for MF (user factors stay at the institution), the
  adapter and the hybrid; the scorer must use only the person's own data and public models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedrec.client.statistics import (Contribution, design_columns, encode_item, item_arms, people_design,
                                      whitening_from_arrays)
from fedrec.common.causal.scaling import trimmed_propensity
from fedrec.common.causal.whitening import Whitening
from fedrec.common.causal.ope import (Layout, normalized_release_rows, person_components, person_fold, release_bound,
                                      strategy_bounds, strategy_clip)
from fedrec.common.datasets import InstitutionData

__all__ = ["KINDS", "register_scorer", "check_strategies", "strategy_rows",
           "exposure_probabilities", "ope_contribution", "mediation_rows", "mediation_contribution"]

KINDS = ("rank", "crossfit", "random", "logging", "scorer")
_SCORERS: dict[str, Callable[[InstitutionData, Sequence[str]], np.ndarray]] = {}


def register_scorer(name: str, fn: Callable[[InstitutionData, Sequence[str]], np.ndarray]) -> None:
    """Register a local scorer ``fn(data, items) -> (people, items)`` scores (people order):
    the hook for MF / adapter / hybrid strategies. It may read only each person's own data and
    public models (a score depending on other people's data breaks the release's bound)."""
    _SCORERS[str(name)] = fn


def check_strategies(specs: Sequence[Mapping], items: Sequence[str], columns: Sequence[str]) -> None:
    """ValueError (one line) for a spec the client cannot evaluate; checked before any charge."""
    names = [str(s.get("name", "")) for s in specs]
    if not specs:
        raise ValueError("no strategy to evaluate")
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"strategy names must be distinct and non-empty, got {names}")
    for s in specs:
        kind = s.get("kind")
        if kind not in KINDS:
            raise ValueError(f"strategy {s.get('name')!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind in ("rank", "crossfit"):
            if s.get("better", "higher") not in ("higher", "lower"):
                raise ValueError(f"strategy {s['name']!r}: better must be higher or lower")
            models = s.get("coef", []) if kind == "crossfit" else [s.get("coef", {})]
            if kind == "crossfit" and (not isinstance(models, list) or len(models) < 2 or not str(s.get("salt", ""))):
                raise ValueError(f"strategy {s['name']!r}: a crossfit strategy needs coef = [model per fold] (>= 2) "
                                 "and a salt")
            for coef in models:
                for it in items:
                    if it not in coef:
                        raise ValueError(f"strategy {s['name']!r}: no score model for item {it!r}")
                    missing = [c for c in ["intercept", *columns] if c not in coef[it]]
                    if missing:
                        raise ValueError(f"strategy {s['name']!r}, item {it!r}: coefficients missing for {missing}")
                    try:  # numbers, or the charged release would fail half-way (exposure_probabilities)
                        [float(coef[it][c]) for c in ["intercept", *columns]]
                    except (TypeError, ValueError):
                        raise ValueError(f"strategy {s['name']!r}, item {it!r}: coefficients must be numbers") from None
        strategy_clip(s, 1.0)  # a usable clip-factor
        if kind == "scorer" and str(s.get("scorer")) not in _SCORERS:
            raise ValueError(f"strategy {s['name']!r}: no scorer {s.get('scorer')!r} registered at this institution")


def strategy_rows(data: InstitutionData, items: Sequence[str], arrays: Mapping[str, np.ndarray], *,
                  covariates: Sequence[str] | None = None, derived: Sequence[str] = (),
                  trim: tuple[float, float] = (0.05, 0.95), cache: dict | None = None,
                  use_logged: bool = True) -> dict[str, np.ndarray]:
    """Every (person, item considered) row of ``items`` with the public nuisances applied:
    ``person`` (people order), ``item`` (index into items), ``t``, ``y`` (scaled), ``e``,
    ``m1``, ``m0`` (scaled, clipped to [-1, 1]); and ``x`` the people's bound-scaled design.

    ``e`` is the institution's **logged propensity** (an interactions column ``propensity``:
    the probability its own logger gave the exposure, as OBP's ``pscore``) where it has one and
    ``use_logged``, else the causal run's pooled model. Several loggers need the logged one:
    an institution whose logger exposes every item more often makes the exposures of different
    items dependent given x (the institution is a common cause), which biases the pooled model's
    weights and the outcome models; with each row's own logging propensity IPS and DR are
    unbiased again (measured in simulations/strategies.py)."""
    cache = {} if cache is None else cache
    x_people = people_design(data, covariates, derived)
    wh = whitening_from_arrays(arrays) or Whitening.identity(x_people.shape[1])
    xw = wh.apply(x_people)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("person", "item", "t", "y", "e", "m1", "m0")}
    for j, it in enumerate(items):
        key = ("ope", data.name, it, None if covariates is None else tuple(covariates), tuple(derived))
        if key not in cache:
            cache[key] = (item_arms(data, it), encode_item(data, it, covariates, derived).y)
        (take, t), y = cache[key]
        xr = xw[take]
        parts["person"].append(take)
        parts["item"].append(np.full(len(take), j, dtype=np.int64))
        parts["t"].append(t)
        parts["y"].append(y)
        e_model = trimmed_propensity(xr, np.asarray(arrays[f"beta/{it}"]), trim)
        logged = _logged_propensity(data, it) if use_logged else None
        parts["e"].append(e_model if logged is None else np.clip(logged, trim[0], trim[1]))
        parts["m1"].append(np.clip(xr @ np.asarray(arrays[f"mu1/{it}"]), -1.0, 1.0))
        parts["m0"].append(np.clip(xr @ np.asarray(arrays[f"mu0/{it}"]), -1.0, 1.0))
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    out["person"] = out["person"].astype(np.int64)
    out["item"] = out["item"].astype(np.int64)
    out["x"] = x_people
    return out


def _logged_propensity(data: InstitutionData, item: str) -> np.ndarray | None:
    """The logged propensities of ``item``'s rows (item_arms order), or None without the column."""
    inter = data.interactions
    if "propensity" not in inter.columns:
        return None
    return inter.loc[inter["item_id"] == item, "propensity"].to_numpy(np.float64)


def _top1(person: np.ndarray, row_score: np.ndarray) -> np.ndarray:
    """1 on each person's highest-scoring row (first in row order on ties), else 0."""
    order = np.lexsort((-row_score, person))
    first = np.ones(len(order), dtype=bool)
    first[1:] = person[order][1:] != person[order][:-1]
    p = np.zeros(len(person))
    p[order[first]] = 1.0
    return p


def exposure_probabilities(spec: Mapping, rows: Mapping[str, np.ndarray], items: Sequence[str],
                           columns: Sequence[str], data: InstitutionData | None = None) -> np.ndarray:
    """The strategy's exposure probability for every row of :func:`strategy_rows`."""
    person, item = rows["person"], rows["item"]
    kind = spec["kind"]
    if kind == "random":
        counts = np.bincount(person, minlength=len(rows["x"]))
        return 1.0 / counts[person]
    if kind == "logging":
        return rows["e"].copy()
    if kind in ("rank", "crossfit"):
        names = ["intercept", *columns]

        def linear(model: Mapping) -> np.ndarray:
            return rows["x"] @ np.column_stack([[float(model[it][c]) for c in names] for it in items])

        if kind == "rank":
            scores = linear(spec["coef"])
        else:  # each person ranked by the model fitted without their fold
            assert data is not None, "a crossfit strategy needs the institution's person ids"
            fold = person_fold(data.people["person_id"].astype(str).to_numpy(), str(spec["salt"]), len(spec["coef"]))
            scores = np.zeros((len(rows["x"]), len(items)))
            for k, model in enumerate(spec["coef"]):
                scores[fold == k] = linear(model)[fold == k]
        if spec.get("better", "higher") == "lower":
            scores = -scores
    elif kind == "scorer":
        assert data is not None, "a scorer strategy needs the institution's data"
        scores = np.asarray(_SCORERS[str(spec["scorer"])](data, items), dtype=np.float64)
    else:
        raise ValueError(f"unknown strategy kind {kind!r}")
    return _top1(person, scores[person, item])


def ope_contribution(data: InstitutionData, specs: Sequence[Mapping], items: Sequence[str],
                     arrays: Mapping[str, np.ndarray], *, columns: Sequence[str], clip: float, switch_tau: float,
                     square_clip: float = 3.0, second_moment_weight: float = 0.5,
                     estimators: Sequence[str] | None = None, trim: tuple[float, float] = (0.05, 0.95),
                     covariates: Sequence[str] | None = None, derived: Sequence[str] = (),
                     cache: dict | None = None, use_logged: bool = True) -> Contribution:
    """The institution's per-person release rows for ``specs`` (see module doc) and their
    public L2 bound :func:`~fedrec.common.causal.ope.release_bound`."""
    rows = strategy_rows(data, items, arrays, covariates=covariates, derived=derived, trim=trim, cache=cache,
                         use_logged=use_logged)
    n = len(rows["x"])
    comps, bounds = [], []
    for spec in specs:
        p = exposure_probabilities(spec, rows, items, columns, data)
        comps.append(person_components(rows["person"], n, rows["t"], rows["y"], rows["e"], rows["m1"], rows["m0"],
                                       p, clip=strategy_clip(spec, clip), switch_tau=switch_tau))
        bounds.append(strategy_bounds(spec, clip, len(items)))
    layout = Layout(tuple(estimators)) if estimators else Layout()
    terms = normalized_release_rows(comps, bounds, square_clip=square_clip, second_moment_weight=second_moment_weight,
                                    layout=layout)
    return Contribution(terms, release_bound(len(specs), second_moment_weight, layout))


# --------------------------------------------------------------------------- mediation Gram
def mediation_rows(data: InstitutionData, item: str, *, covariates: Sequence[str] | None = None,
                   derived: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """Per person considered for ``item`` the row ``v = [1, z..., T, M, Y]``: the bound-scaled
    covariates (each in [-1, 1]), exposure, the mediator ``M = T (engagement − lo)/(hi − lo)``
    (in [0, 1]; 0 when not exposed: no engagement with an item not shown) and the scaled outcome
    (in [-1, 1]); and the names (``"1"`` first)."""
    rows = encode_item(data, item, covariates, derived)
    inter = data.interactions[data.interactions["item_id"] == item]
    lo, hi = data.study.engagement_bounds
    eng = np.nan_to_num(inter["engagement"].to_numpy(np.float64), nan=lo)
    m = rows.t * np.clip((eng - lo) / (hi - lo), 0.0, 1.0)
    v = np.column_stack([rows.x, rows.t, m, rows.y])
    names = ["1"] + [c[0] for c in design_columns(data, covariates, derived)] + ["exposed", "engagement", "outcome"]
    return v, names


def mediation_contribution(data: InstitutionData, item: str, *, covariates: Sequence[str] | None = None,
                           derived: Sequence[str] = ()) -> Contribution:
    """Per person ``vech(v v')`` of :func:`mediation_rows`. Privacy contract: every coordinate of
    v is in [-1, 1], so a row's L2 norm is at most ``||v||² <= p`` (:func:`~fedrec.common.causal.graph.gram_bound`),
    whatever the person's data; one row per person (one per item, the data contract)."""
    from fedrec.common.causal.graph import gram_bound, gram_rows

    v, _ = mediation_rows(data, item, covariates=covariates, derived=derived)
    return Contribution(gram_rows(v), gram_bound(v.shape[1]))
