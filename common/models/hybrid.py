"""The hybrid scorer: DP item popularity + DP MF + the zero-budget text prior (+ the adapter).

Each component scores a person's candidate items; per person (row) each component's scores are
z-scored and the hybrid is their weighted sum. The z-score's mean and sd come from the person's
**whole catalogue** (:func:`catalogue_moments`), never from the candidate set being ranked: a
component that only carries noise on the candidates (the popularity slot on cold items: no
interactions anywhere, so it is DP noise) keeps its small spread beside the catalogue's real
spread, instead of being blown up to unit variance by a per-candidate-set z-score; and an item's
score no longer depends on which other items were sampled beside it. Components:

- ``dp_popularity``: ``log1p`` of the released DP item counts after subtracting one noise sd
  (the same soft threshold as ``item_prior``): most catalogue items have (almost) no raters,
  and an undenoised count would call every item whose noise came out high "popular";
- ``pooled_popularity`` (:func:`pooled_popularity`, an alternative to ``dp_popularity`` in the same
  slot): the institution's own exact counts (never released) pooled with the DP sum of everyone's
  counts, each weighted by its inverse variance, from public quantities (the release's declared
  noise variance, the DP totals) and the institution's own training data only;
- ``mf``: the DP MF score (released item side, local user side);
- ``text_prior``: the cosine of the person's history profile with the item text (public
  weights, public text: no budget);
- ``adapter``: the DP LoRA adapter's score (benchmarks; not trained in a Flower hybrid run).

Weights are public constants (:data:`DEFAULT_WEIGHTS`) chosen once by ``benchmarks/adapter.py``
on a validation split of the *training* data (MovieLens, seed 0 — never a headline seed), or
fitted by :func:`fit_blend` on such a split.

Privacy contract: post-processing only. Every component is either a DP release (counts, MF
item side), public (text, weights) or the institution's own data scored locally; the blend is
computed where the person's data is and releases nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

#: a component's per-row location and scale (each ``[rows, 1]``, or broadcastable to the rows)
Moments = tuple[np.ndarray, np.ndarray]

__all__ = ["COMPONENTS", "DEFAULT_WEIGHTS", "GRID", "Moments", "catalogue_moments", "dp_popularity",
           "pooled_popularity", "standardise", "blend", "fit_blend"]

COMPONENTS = ("dp_popularity", "mf", "text_prior", "adapter")
#: the Flower hybrid's weights: the grid search's choice on the warm validation split of MovieLens'
#: training data, seed 0, ε = 8, the default plan (counts 18% of the budget, local noise), with
#: the components a Flower hybrid run has (no adapter); docs/adapter.md
#: (the popularity slot holds :func:`pooled_popularity` in the Flower hybrid: the grid's choice for it
#: on that split was popularity 1, MF 0, text prior 1 — DP MF at ε = 8 with local noise adds nothing
#: the pooled popularity and the text prior do not already rank; with the DP counts alone it was
#: popularity 1, MF 0.25, text prior 2). That choice was made with per-candidate-set z-scores; with
#: the catalogue z-scores (:func:`catalogue_moments`) the same grid on the same split makes the same
#: choice (issue 30, docs/adapter.md), so the weights were not changed
DEFAULT_WEIGHTS: dict[str, float] = {"dp_popularity": 1.0, "mf": 0.0, "text_prior": 1.0}
GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


def dp_popularity(counts: np.ndarray, count_noise_var: float) -> np.ndarray:
    """``log1p(max(counts − sd, 0))`` of the released DP counts, ``sd = √count_noise_var``
    (public). Post-processing of a DP release."""
    sd = float(np.sqrt(max(float(count_noise_var), 0.0)))
    return np.log1p(np.maximum(np.asarray(counts, np.float64) - sd, 0.0))


def pooled_popularity(counts: np.ndarray, count_noise_var: float, own_counts: np.ndarray, *,
                      mean_weight: float = 1.0) -> np.ndarray:
    """Popularity for one institution's own people: its exact counts pooled with the DP release.

    ``counts`` is the released DP sum ``S_i = Σ_k c_ki + noise`` (noise variance ``V`` =
    ``count_noise_var``, public), ``own_counts`` this institution's exact (same weighting) counts
    ``c_i``, which it holds anyway. Two estimates of the *other* institutions' counts:
    ``S_i − c_i`` (unbiased, variance ``V``) and ``r · c_i`` with ``r = max(ΣS − Σc, 0) / Σc``
    the others' total relative to ours (a function of the DP totals and our own data), whose
    sampling variance is taken as ``(r² + r) · w · (c_i + w)`` (Poisson-like, ``w`` =
    ``mean_weight``, the mean per-interaction weight of the own data; ``+ w`` keeps a zero count
    uncertain). They are combined by inverse variance, added to ``c_i`` and returned as
    ``log1p(max(·, 0))``. With ``V = 0`` (non-private) it is the exact popularity; as ``V`` grows
    it tends to the institution's own popularity, scaled.

    Privacy contract: post-processing of a DP release plus the institution's own data, used
    only to rank that institution's own people, at the institution; it releases nothing.
    """
    s = np.asarray(counts, np.float64)
    c = np.asarray(own_counts, np.float64)
    if s.shape != c.shape:
        raise ValueError(f"pooled_popularity: {s.shape} released counts vs {c.shape} own counts")
    v = max(float(count_noise_var), 0.0)
    others = s - c
    own_total = float(c.sum())
    if v == 0.0 or own_total <= 0.0:
        est = others if v == 0.0 else np.zeros_like(s)
        return np.log1p(np.maximum(c + est, 0.0))
    r = max(float(s.sum()) - own_total, 0.0) / own_total
    w = max(float(mean_weight), 1e-12)
    var_local = (r * r + r) * w * (c + w)
    if r == 0.0:
        return np.log1p(c)
    est = (others / v + r * c / var_local) / (1.0 / v + 1.0 / var_local)
    return np.log1p(np.maximum(c + est, 0.0))


def catalogue_moments(score: Callable[[np.ndarray, np.ndarray], np.ndarray], persons: np.ndarray, n_items: int,
                      *, chunk: int = 256) -> Moments:
    """Each row's mean and sd of ``score(persons, items)`` over the person's whole catalogue (all
    ``n_items`` items), each ``[len(persons), 1]``: the scale a component has among everything the
    person could be recommended, not among a sampled candidate set. Computed once per distinct
    person, ``chunk`` persons at a time (``score`` gets ``[chunk, n_items]`` item indices).

    Local computation on the institution's own scores: nothing released."""
    persons = np.asarray(persons)
    if n_items < 1:
        raise ValueError(f"catalogue_moments: n_items = {n_items}; fix: pass the catalogue's size (>= 1)")
    uniq, inverse = np.unique(persons, return_inverse=True)
    loc, sd = np.empty(len(uniq)), np.empty(len(uniq))
    for a in range(0, len(uniq), chunk):
        p = uniq[a:a + chunk]
        full = np.asarray(score(p, np.tile(np.arange(n_items), (len(p), 1))), np.float64)
        loc[a:a + chunk], sd[a:a + chunk] = full.mean(axis=1), full.std(axis=1)
    inverse = inverse.reshape(-1)
    return loc[inverse][:, None], sd[inverse][:, None]


def standardise(s: np.ndarray, moments: Moments | None = None) -> np.ndarray:
    """Z-score of each row: ``(s − mean) / sd`` with the row's ``moments`` (``(mean, sd)``, e.g.
    :func:`catalogue_moments` over the person's whole catalogue), or without them the row's own
    mean and sd (over the given candidates only). A zero sd divides by 1 (ties stay ties)."""
    s = np.asarray(s, np.float64)
    if moments is None:
        loc, sd = s.mean(axis=-1, keepdims=True), s.std(axis=-1, keepdims=True)
    else:
        loc, sd = (np.asarray(m, np.float64) for m in moments)
    return (s - loc) / np.where(sd > 0, sd, 1.0)


def blend(weights: Mapping[str, float], comps: Mapping[str, np.ndarray],
          moments: Mapping[str, Moments] | None = None) -> np.ndarray:
    """Σ_c w_c · standardise(comps[c], moments[c]) over the components with a non-zero weight. A
    weighted component that is missing (or, when ``moments`` is given, lacks its moments) is an
    error (never silently dropped). The hybrid's scorers pass the catalogue moments
    (:func:`catalogue_moments`); without them each row is z-scored over its own candidates, which
    inflates a component that is noise-only on those candidates to unit variance."""
    missing = [n for n, w in weights.items() if w and n not in comps]
    if missing:
        raise KeyError(f"hybrid: weighted component(s) {missing} not computed")
    if moments is not None:
        missing = [n for n, w in weights.items() if w and n not in moments]
        if missing:
            raise KeyError(f"hybrid: weighted component(s) {missing} have no catalogue moments")
    used = [(w, n) for n, w in weights.items() if w]
    if not used:
        raise ValueError("hybrid: every weight is 0")
    return sum(w * standardise(comps[n], None if moments is None else moments[n]) for w, n in used)


def fit_blend(components: Mapping[str, Sequence[np.ndarray]], metric: Callable[[np.ndarray, int], float],
              grid: Sequence[float] = GRID, moments: Mapping[str, Sequence[Moments]] | None = None
              ) -> dict[str, float]:
    """Weights maximising ``Σ_t metric(blend_t, t)`` over validation tasks ``t`` by grid search.

    ``components[name][t]`` are the candidate scores ``[rows, 1 + negatives]`` of task ``t``;
    ``moments[name][t]`` their rows' catalogue moments (as :func:`blend` takes them; without,
    each row is z-scored over its candidates). The first component's weight is 0 or 1 (scale
    does not change a ranking). The validation tasks must come from training data only (never
    held-out data).
    """
    names = list(components)
    n_tasks = len(next(iter(components.values())))
    if moments is not None and set(moments) != set(names):
        raise KeyError(f"fit_blend: moments for {sorted(moments)} but components {sorted(names)}")
    z = {n: [standardise(s, None if moments is None else moments[n][t]) for t, s in enumerate(components[n])]
         for n in names}
    best, best_w = -np.inf, None
    for ws in itertools.product(grid, repeat=len(names)):
        if max(ws) == 0 or ws[0] not in (0.0, 1.0):
            continue
        total = sum(metric(sum(w * z[n][t] for w, n in zip(ws, names) if w), t) for t in range(n_tasks))
        if total > best + 1e-9:
            best, best_w = total, ws
    return dict(zip(names, best_w))
