"""Small linear algebra for the causal protocol: ``vech``/``unvech`` of symmetric matrices and
solves with eigenvalue floors (DP noise can make a summed Gram or Hessian indefinite).

Pure math, no data, no release.
"""

from __future__ import annotations

import numpy as np

__all__ = ["vech_len", "vech", "unvech", "solve_pd", "inv_pd", "psd_part"]


def vech_len(p: int) -> int:
    return p * (p + 1) // 2


def vech(m: np.ndarray) -> np.ndarray:
    """Upper triangle (with diagonal) of the last two axes, row-major: (..., p, p) -> (..., p(p+1)/2)."""
    p = m.shape[-1]
    iu = np.triu_indices(p)
    return m[..., iu[0], iu[1]]


def unvech(v: np.ndarray, p: int) -> np.ndarray:
    """Symmetric (p, p) matrix from its :func:`vech`."""
    out = np.zeros((p, p))
    iu = np.triu_indices(p)
    out[iu] = v
    out[(iu[1], iu[0])] = v
    return out


def solve_pd(a: np.ndarray, b: np.ndarray, floor: float) -> np.ndarray:
    """Solve with a symmetric matrix whose eigenvalues are floored (DP noise can break PD)."""
    a = (a + a.T) / 2
    w, v = np.linalg.eigh(a)
    w = np.maximum(w, floor)
    return v @ ((v.T @ b) / w if b.ndim == 1 else (v.T @ b) / w[:, None])


def inv_pd(a: np.ndarray, floor: float) -> np.ndarray:
    return solve_pd(a, np.eye(a.shape[0]), floor)


def psd_part(a: np.ndarray) -> np.ndarray:
    """The positive semi-definite part of a (noisy) symmetric matrix: negative eigenvalues set to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.maximum(w, 0.0)) @ v.T
