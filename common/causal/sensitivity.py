"""The privacy-critical L2 bounds: one person's largest contribution to each release.

Everything here is a function of public values only (the declared bounds through ``r2``, the
public bound on a design row's squared norm, and the public arrays the server sends with a
step). The client clips every person's row to exactly these bounds and charges its ledger
with :func:`release_sensitivity`; the server sizes SecAgg+ with the same function. A value
below the true bound breaks the (ε, δ) guarantee: change nothing here without a test that
breaks it (tests/unit/test_causal.py, tests/mutation/mutants.toml).

The readers of public step arrays (:func:`release_weight`, :func:`influence_relative_weights`,
:func:`influence_clip`, :func:`outcome_map`, :func:`histogram_edges`) live here too: each value
either sets a bound or must be refused before the client charges anything.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from fedrec.common.causal.scaling import TRIM

__all__ = [
    "INFLUENCE_WEIGHTS", "psi_worst_case", "moments_bound", "propensity_bound", "outcome_bound",
    "influence_weights", "influence_bound", "step_bound", "release_weight", "influence_relative_weights",
    "influence_clip", "outcome_map", "HISTOGRAM_EDGES", "histogram_edges", "moments_carry_arms",
    "release_sensitivity", "pilot_bound", "NUISANCES", "check_public_arrays",
]


#: default relative weights ``(count, square)`` of the influence release (see :func:`influence_weights`)
INFLUENCE_WEIGHTS = (0.25, 0.5)


def psi_worst_case(estimator: str, trim: tuple[float, float] = TRIM) -> float:
    """Largest |psi| the scaled outcome and the trimming band allow (no data involved)."""
    w = 1.0 / min(trim[0], 1.0 - trim[1])
    if estimator == "ra":
        return 2.0
    if estimator == "ipw":
        return w
    return 2.0 + 2.0 * w


def moments_bound(p: int, arm_items: int = 0) -> float:
    """L2 bound of ``vech(x x')`` for a bound-scaled design row (|x_k| <= 1, p coordinates):
    ``||vech(x x')||^2 = (||x||^4 + sum x_k^4)/2 <= (p^2 + p)/2``; with the per-item arm sums
    ``[T x, (1-T) x]`` of ``arm_items`` items (the propensity's LDA start), each adds
    ``||x||^2 <= p`` (a person is in one arm per item)."""
    return math.sqrt((p * p + p) / 2.0 + arm_items * p)


def propensity_bound(r2: float, hessian_weight: float = 1.0) -> float:
    """L2 bound of one person's propensity Newton terms ``[(T - e) w, h vech(e(1-e) w w')]`` for
    design rows with ``||w||^2 <= r2`` and Hessian weight ``h``: ``sqrt(r2 + h^2 r2^2/16)``.
    Gradient: norm <= sqrt(r2); Hessian with ``e(1-e) <= 1/4``: ``||vech|| <= ||w||^2 / 4``."""
    return math.sqrt(r2 + (hessian_weight * r2 / 4.0) ** 2)


def outcome_bound(r2: float, gram_weight: float = 1.0) -> float:
    """L2 bound of one person's outcome terms ``[g vech(w w'), w y, y^2]`` for rows with
    ``||w||^2 <= r2``, |y| <= 1 and Gram weight ``g``: ``sqrt(g^2 r2^2 + r2 + 1)``
    (``||vech(w w')|| <= ||w||^2``, ``||w y|| <= ||w||``, ``y^2 <= 1``; the person is in one
    arm's block only)."""
    return math.sqrt((gram_weight * r2) ** 2 + r2 + 1.0)


def influence_weights(clip: float, rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> tuple[float, float, float]:
    """Coordinate weights ``(w_n, w_psi, w_2) = (a, 1 / clip, k / clip^2)`` of the influence
    release's row ``[w_n, w_psi psi, w_2 psi^2]`` for an item whose psi is clipped to
    ``[-clip, clip]``, with relative weights ``rel = (a, k)``: the row is ``[a, u, k u^2]`` with
    ``u = psi / clip`` in [-1, 1], so its bound (:func:`influence_bound`) does not depend on
    the clip, and relative to psi's the count and the square get ``a^2`` and ``k^2`` of the
    noise budget (default 1/16 and 1/4). The server divides the weights out, so item ``i``'s
    psi sum carries noise in proportion to its own clip.

    Why per item: with one clip for every item of a release (the largest item's), one item
    whose noisy histogram tail jumped set every item's noise (8 items, ε = 1: CI widths 5-6x
    pooled against 1.2-1.3x for one item, docs/causal.md)."""
    a, k = rel
    return a, 1.0 / clip, k / (clip * clip)


def influence_bound(rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> float:
    """Per-item L2 bound of the influence row ``[a, u, k u^2]`` with ``|u| = |psi| / clip <= 1``
    (:func:`influence_weights`): ``sqrt(a^2 + 1 + k^2)`` (``1.146`` at the default weights),
    whatever each item's clip."""
    a, k = rel
    return math.sqrt(a * a + 1.0 + k * k)


def step_bound(step: str, p: int, *, r2: float | None = None,
               hessian_weight: float = 1.0, gram_weight: float = 1.0, arm_items: int = 0,
               influence_rel: tuple[float, float] = INFLUENCE_WEIGHTS) -> float:
    """Per-item L2 bound of one person's contribution to ``step`` (r2 defaults to p); for
    ``moments``, the whole release's bound (``arm_items`` items' arm sums included)."""
    r2 = float(p) if r2 is None else r2
    if step == "moments":
        return moments_bound(p, arm_items)
    if step.startswith("propensity"):
        return propensity_bound(r2, hessian_weight)
    if step == "outcome":
        return outcome_bound(r2, gram_weight)
    if step == "influence":  # the row is [a, psi/clip, k (psi/clip)^2]: the clip cancels
        return influence_bound(influence_rel)
    if step in ("scale", "outcome-range"):  # one-hot histogram rows
        return 1.0
    raise ValueError(f"unknown causal step {step!r}")


def release_weight(arrays: Mapping[str, np.ndarray], key: str) -> float:
    """A public coordinate weight the server sent with a step (``hessian-weight``,
    ``gram-weight``); 1 when absent. Must be positive and finite: it sets the sensitivity."""
    if key not in arrays:
        return 1.0
    v = float(np.asarray(arrays[key]).reshape(-1)[0])
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{key} must be positive and finite, got {v}")
    return v


def influence_relative_weights(arrays: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """The public relative weights ``(a, k)`` the server sent with the ``influence`` step as
    ``influence-weights`` (:data:`INFLUENCE_WEIGHTS` when absent). Both must be positive and
    finite: they set the sensitivity."""
    if "influence-weights" not in arrays:
        return INFLUENCE_WEIGHTS
    v = np.asarray(arrays["influence-weights"], dtype=np.float64).reshape(-1)
    if v.shape != (2,) or not (np.all(v > 0) and np.all(np.isfinite(v))):
        raise ValueError(f"influence-weights must be two positive finite numbers, got {v.tolist()}")
    return float(v[0]), float(v[1])


def influence_clip(arrays: Mapping[str, np.ndarray], item: str) -> float:
    """The public psi clip the server sent for ``item`` with the ``influence`` step
    (``clip/<item>``): positive and finite, or ValueError naming it (checked before the client
    charges anything). It does not enter the release's bound (:func:`influence_bound`)."""
    key = f"clip/{item}"
    if key not in arrays:
        raise ValueError(f"{key} (the psi clip of item {item!r}) is missing")
    v = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
    if v.shape != (1,) or not (v[0] > 0 and math.isfinite(v[0])):
        raise ValueError(f"{key} must be one positive finite number, got {v.tolist()}")
    return float(v[0])


def outcome_map(arrays: Mapping[str, np.ndarray], item: str) -> tuple[float, float]:
    """The public ``(centre, half)`` of ``item``'s outcome models (``outcome-map/<item>``, sent
    with the ``outcome`` step); ``(0, 1)`` — the declared bounds — when absent. The client fits
    on ``clip((y - centre) / half, -1, 1)``, so the release's bound does not depend on it; it
    must still be usable: finite, ``|centre| <= 1`` and ``0 < half <= 1`` (else ValueError)."""
    key = f"outcome-map/{item}"
    if key not in arrays:
        return 0.0, 1.0
    v = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
    if v.shape != (2,) or not np.all(np.isfinite(v)) or not 0.0 < v[1] <= 1.0 or abs(v[0]) > 1.0:
        raise ValueError(f"{key} must be [centre, half] with |centre| <= 1 and 0 < half <= 1, got {v.tolist()}")
    return float(v[0]), float(v[1])
#: the public grid each histogram step is sent with
HISTOGRAM_EDGES = {"scale": "edges", "outcome-range": "outcome-edges"}


def histogram_edges(arrays: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """The public grid of a histogram step: finite and strictly ascending, or ValueError
    (checked before the client charges anything)."""
    if key not in arrays:
        raise ValueError(f"{key} (the histogram's grid) is missing")
    e = np.asarray(arrays[key], dtype=np.float64).reshape(-1)
    if e.size < 2 or not np.all(np.isfinite(e)) or not np.all(np.diff(e) > 0):
        raise ValueError(f"{key} must be at least two finite, strictly ascending numbers")
    return e


def moments_carry_arms(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether the server asked the ``moments`` step for the per-item arm sums (public flag)."""
    return "moments/arms" in arrays and float(np.asarray(arrays["moments/arms"]).reshape(-1)[0]) > 0


def release_sensitivity(step: str, p: int, arrays: Mapping[str, np.ndarray], n_items: int,
                        items: Sequence[str] | None = None) -> float:
    """L2 sensitivity of one protocol release, from public values only.

    ``arrays`` are the public arrays the server sends with the step (whitening radius, psi
    clips and influence weights, Hessian and Gram weights); a release carrying
    ``n_items`` items has ``sqrt(n_items)`` x the per-item bound (a person can be considered
    for every item), except ``moments`` (each person once). The client charges its ledger with
    this and the server sizes SecAgg+ with it: one function, so the two cannot disagree.
    ``items`` (the release's items): when given, each item's public inputs that do not enter
    the bound but that the client needs (the ``influence`` step's per-item psi clips) are
    checked too, so a bad one is refused before any charge. ValueError on anything unusable.
    """
    radius = float(arrays["whiten/radius"][0]) if "whiten/radius" in arrays else -1.0
    r2 = 1.0 + radius**2 if radius > 0 else float(p)
    if step == "outcome":  # the outcome maps must be usable (they do not enter the bound)
        for key in arrays:
            if key.startswith("outcome-map/"):
                outcome_map(arrays, key[len("outcome-map/"):])
    if step == "influence" and items is not None:
        for it in items:
            influence_clip(arrays, it)
    if step in HISTOGRAM_EDGES:
        histogram_edges(arrays, HISTOGRAM_EDGES[step])
    per_item = step_bound(step, p, r2=r2,
                          hessian_weight=release_weight(arrays, "hessian-weight"),
                          gram_weight=release_weight(arrays, "gram-weight"),
                          arm_items=n_items if moments_carry_arms(arrays) else 0,
                          influence_rel=influence_relative_weights(arrays) if step == "influence" else INFLUENCE_WEIGHTS)
    return per_item * (1.0 if step == "moments" else math.sqrt(n_items))


def pilot_bound(n_items: int) -> float:
    """L2 sensitivity of the forecast's pilot release (``common/causal/pilot.py``).

    Per item a person has one row ``[1-T, T, (1-T) y, T y, (1-T) y^2, T y^2]`` with the outcome
    ``y`` scaled to [-1, 1] by its declared bounds: squared norm ``1 + y^2 + y^4 <= 3``. A person
    can be considered for every item of the release: ``sqrt(3 n_items)``."""
    if int(n_items) < 1:
        raise ValueError(f"a pilot release needs at least one item, got {n_items}")
    return math.sqrt(3.0 * int(n_items))


#: the per-item public coefficients each use reads: a propensity Newton step needs ``beta``;
#: the influence terms (``scale``, ``influence``) by estimator; the strategy release all three
NUISANCES = {"propensity": ("beta",), "ra": ("mu1", "mu0"), "ipw": ("beta",), "aipw": ("beta", "mu1", "mu0"),
             "strategies": ("beta", "mu1", "mu0")}


def check_public_arrays(use: str, p: int, arrays: Mapping[str, np.ndarray], items: Sequence[str], *,
                        dp: bool) -> None:
    """ValueError (one line naming the array) for a public array of the server's that the
    client could not use as its bound assumes — checked **before** the charge, so a lying
    coordinator can neither make a charged release crash half-way (budget spent, nothing sent)
    nor feed non-finite values into the per-person rows (a NaN row survives clipping, and
    whether one appears depends on the data: an un-noised bit; ``clipped_sum`` zeroes such rows
    too, for overflow from huge finite values).

    ``use``: a key of :data:`NUISANCES` (``propensity``, an influence estimator, ``strategies``):
    each item's coefficients it reads must be present, ``p`` finite numbers. A whitening
    (``whiten/*``) must be whole — ``a`` (p-1, p-1), ``b`` (p-1,), ``radius`` and optional
    ``weighted`` one number each, all finite — and, in a DP release, have a positive radius:
    without one a whitened row has no public bound (the release could not be noised)."""
    for it in items:
        for kind in NUISANCES.get(use, ()):
            key = f"{kind}/{it}"
            v = np.asarray(arrays[key], dtype=np.float64) if key in arrays else None
            if v is None or v.shape != (p,) or not np.all(np.isfinite(v)):
                raise ValueError(f"public coefficients {key} missing, misshapen or not finite (need {p} finite numbers)")
    if not any(str(k).startswith("whiten/") for k in arrays):
        return
    q = p - 1
    shapes = {"whiten/a": (q, q), "whiten/b": (q,), "whiten/radius": (1,), "whiten/weighted": (1,)}
    for key, shape in shapes.items():
        v = np.asarray(arrays[key], dtype=np.float64) if key in arrays else None
        if key == "whiten/weighted" and v is None:
            continue
        if v is None or v.shape != shape or not np.all(np.isfinite(v)):
            raise ValueError(f"public whitening {key} missing, misshapen or not finite (need shape {shape})")
    if dp and not float(np.asarray(arrays["whiten/radius"]).reshape(-1)[0]) > 0:
        raise ValueError("public whitening without a radius (whiten/radius <= 0) in a DP release: a whitened row "
                         "would have no public bound")
