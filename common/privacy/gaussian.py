"""Per-person clipping and the Gaussian mechanism for statistics, noise-mode aware.

Privacy contract (unit: one person with all their records):

* :func:`clip_rows` — after clipping, each person's row has L2 norm <= ``bound``, so a sum of
  rows over persons has **L2 sensitivity ``bound``** (add/remove one person).
  :func:`clip_per_person` first sums each person's records, then clips the per-person sum.
* :func:`gaussian_mechanism` — releases ``value + N(0, std²·I)`` where the std this client
  adds is

  - ``local`` mode: ``σ · sensitivity`` — the release alone is (ε, δ)-DP for the σ the
    accountant was given (a ``GaussianEvent`` with noise multiplier σ);
  - ``distributed`` mode: ``σ · sensitivity / √n_min`` — only the *secure sum* of at least
    ``n_min`` such releases carries the accounted variance σ²·sensitivity²; valid only behind
    SecAgg+, and the server must discard a sum of fewer than n_min contributions.

Noise comes from a cryptographically seeded generator (``numpy`` PCG64 seeded with 128 bits
from :mod:`secrets`) unless a test passes an explicit ``generator``.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

__all__ = [
    "secure_generator",
    "clip_rows",
    "clip_per_person",
    "noise_std",
    "summed_noise_var",
    "gaussian_noise",
    "gaussian_mechanism",
]


def secure_generator() -> np.random.Generator:
    """A numpy Generator seeded with 128 bits from the OS CSPRNG (unpredictable to the server)."""
    return np.random.default_rng(secrets.randbits(128))


def clip_rows(rows: np.ndarray, bound: float) -> np.ndarray:
    """Scale each row (one person's contribution) to L2 norm at most ``bound``."""
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"clipping bound must be positive and finite, got {bound}")
    rows = np.asarray(rows, dtype=np.float64)
    flat = rows.reshape(rows.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    return (flat * scale[:, None]).reshape(rows.shape)


def clip_per_person(values: np.ndarray, person: np.ndarray, bound: float) -> np.ndarray:
    """Sum each person's records (rows of ``values``), clip the per-person sums, sum them.

    Returns the clipped total; its L2 sensitivity to one person is ``bound``.
    """
    values = np.asarray(values, dtype=np.float64)
    _, inv = np.unique(np.asarray(person), return_inverse=True)
    per = np.zeros((inv.max() + 1 if inv.size else 0,) + values.shape[1:])
    np.add.at(per, inv, values)
    return clip_rows(per, bound).sum(axis=0) if per.shape[0] else np.zeros(values.shape[1:])


def noise_std(*, sensitivity: float, noise_multiplier: float, noise_mode: str = "local", n_min: int = 1) -> float:
    """Std of the Gaussian noise one client adds (see module docstring)."""
    if noise_mode == "local":
        return noise_multiplier * sensitivity
    if noise_mode == "distributed":
        if n_min < 1:
            raise ValueError("distributed noise needs n_min >= 1")
        return noise_multiplier * sensitivity / math.sqrt(n_min)
    raise ValueError(f"noise_mode must be 'local' or 'distributed', got {noise_mode!r}")


def summed_noise_var(*, sensitivity: float, noise_multiplier: float, noise_mode: str, n_min: int,
                     contributors: int) -> float:
    """Public noise variance per coordinate of a sum of ``contributors`` clients' releases, each
    noised with :func:`noise_std` (0 without noise). What the server divides out or carries
    into an SE; one formula for every caller."""
    if noise_multiplier <= 0:
        return 0.0
    std = noise_std(sensitivity=sensitivity, noise_multiplier=noise_multiplier, noise_mode=noise_mode,
                    n_min=max(n_min, 1))
    return contributors * std**2


def gaussian_noise(shape, *, std: float, generator: np.random.Generator | None = None) -> np.ndarray:
    """``N(0, std²)`` of ``shape`` from a secure generator (or ``generator`` in tests)."""
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be finite and >= 0, got {std}")
    rng = generator if generator is not None else secure_generator()
    return rng.normal(0.0, std, size=shape)


def gaussian_mechanism(value: np.ndarray, *, sensitivity: float, noise_multiplier: float,
                       noise_mode: str = "local", n_min: int = 1,
                       generator: np.random.Generator | None = None) -> np.ndarray:
    """``value`` (L2 sensitivity ``sensitivity``) plus this client's share of Gaussian noise.

    ``local``: std σ·Δ; ``distributed``: std σ·Δ/√n_min (the secure sum of >= n_min carries σ·Δ).
    """
    value = np.asarray(value, dtype=np.float64)
    std = noise_std(sensitivity=sensitivity, noise_multiplier=noise_multiplier, noise_mode=noise_mode, n_min=n_min)
    return value + gaussian_noise(value.shape, std=std, generator=generator)
