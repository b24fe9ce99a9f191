"""Empirical-Bayes prior mean for the shared item biases, from public item metadata.

Why: under DP most items have too few raters for their bias to rise above the noise, so
the Wiener step size (:func:`fedrec.common.models.mf.preconditioner`) leaves them at the
prior mean. With a prior mean of 0 (the global mean) a rare documentary and a rare slasher
film get the same prediction. Item metadata — genres, release year, category — is public
(it is the catalogue every institution shares), and so is the DP item count; a regression of
the first round's securely aggregated item biases on them gives each rare item a better
prior mean. Items with many raters are barely moved (their Wiener gain is close to 1).

Privacy contract: **post-processing only**. Everything here reads public catalogue metadata
and the server's DP aggregates (the summed, noised round-1 update and the summed, noised
item counts); nothing reads institution data and nothing is released, so no budget is
spent (the DP guarantee is closed under post-processing).

No library does this: it is a weighted least-squares fit (numpy) of noisy per-item
estimates whose noise variance the Wiener gain already encodes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["catalogue_features", "fit_prior_mean", "apply_prior_mean"]

#: catalogue columns read as pipe-separated categories (MovieLens ``genres``, contract ``category``)
CATEGORY_COLUMNS = ("genres", "category")
#: catalogue columns read as a number (standardised); missing values get the median
NUMERIC_COLUMNS = ("year",)


def catalogue_features(items: pd.DataFrame) -> np.ndarray:
    """Public item features in catalogue (dense index) order: category one-hots, numbers.

    Categories appearing on fewer than 2 items are dropped (they would fit single items).
    Returns a float32 array of shape ``[n_items, f]`` (``f`` may be 0).
    """
    blocks: list[np.ndarray] = []
    for col in CATEGORY_COLUMNS:
        if col in items.columns:
            dummies = items[col].fillna("").astype(str).str.get_dummies("|")
            dummies = dummies.loc[:, dummies.sum(axis=0) >= 2]
            if dummies.shape[1]:
                blocks.append(dummies.to_numpy(np.float32))
    for col in NUMERIC_COLUMNS:
        if col in items.columns:
            x = pd.to_numeric(items[col], errors="coerce")
            if x.notna().sum() >= 2 and x.std() > 0:
                x = x.fillna(x.median())
                blocks.append(((x - x.mean()) / x.std()).to_numpy(np.float32)[:, None])
    if not blocks:
        return np.zeros((len(items), 0), np.float32)
    return np.concatenate(blocks, axis=1)


def _design(features: np.ndarray, counts: np.ndarray, count_noise_var: float) -> np.ndarray:
    # the DP count, soft-thresholded by one noise sd: most catalogue items have (almost) no
    # raters, and an undenoised count would call every item whose noise came out high "popular"
    popularity = np.log1p(np.maximum(counts - np.sqrt(max(count_noise_var, 0.0)), 0.0))
    return np.column_stack([np.ones(len(counts)), popularity, popularity**2, features]).astype(np.float64)


def fit_prior_mean(
    update: np.ndarray, gain: np.ndarray, counts: np.ndarray, features: np.ndarray, *,
    count_noise_var: float, ridge: float = 1.0, min_items: int = 20,
) -> np.ndarray:
    """Prior mean ``m = X β`` of the item biases, fitted to the first round's DP update.

    ``update`` is the summed item-bias update of a Newton-type first round from 0, so
    ``update_i ≈ gain_i · b̂_i`` where ``b̂_i`` is the item's raw (unshrunk) noisy estimate and
    ``gain_i ∈ [0, 1]`` its Wiener gain: ``τ² / (τ² + v_i)`` for observation variance ``v_i``.
    The weighted least-squares fit of ``b̂`` on ``X`` with weights ``1 / (τ² + v_i) ∝ gain_i``
    is therefore ``min_β Σ gain_i (update_i / gain_i − x_i β)²`` (+ a small ridge on the
    non-intercept terms). ``X`` = [1, log1p(denoised count), its square, public features].

    Post-processing of DP releases only (see the module docstring). Returns zeros when too
    few items carry signal to fit anything.
    """
    gain = np.clip(np.asarray(gain, np.float64), 0.0, 1.0)
    x = _design(np.asarray(features, np.float64).reshape(len(gain), -1), np.asarray(counts, np.float64), count_noise_var)
    usable = gain > 1e-3
    if usable.sum() < max(min_items, x.shape[1] + 1):
        return np.zeros(len(gain), np.float32)
    # standardise the non-intercept columns so the ridge treats them alike
    scale = np.ones(x.shape[1])
    scale[1:] = np.maximum(x[usable, 1:].std(axis=0), 1e-6)
    x = x / scale
    w = gain[usable]
    raw = np.asarray(update, np.float64)[usable] / w
    xw = x[usable] * np.sqrt(w)[:, None]
    penalty = np.sqrt(ridge) * np.eye(x.shape[1])[1:]  # intercept unpenalised
    a = np.vstack([xw, penalty])
    b = np.concatenate([raw * np.sqrt(w), np.zeros(len(penalty))])
    beta = np.linalg.lstsq(a, b, rcond=None)[0]
    return (x @ beta).astype(np.float32)


def apply_prior_mean(update: np.ndarray, gain: np.ndarray, prior_mean: np.ndarray) -> np.ndarray:
    """Posterior mean from a prior centred at ``prior_mean`` instead of 0.

    With ``update = gain · b̂``: ``gain · b̂ + (1 − gain) · m``. Items with gain ≈ 1 keep their
    own estimate; items nobody (or only noise) rated take the prior mean.
    """
    gain = np.clip(gain, 0.0, 1.0)
    return (update + (1.0 - gain) * prior_mean).astype(np.float32)
