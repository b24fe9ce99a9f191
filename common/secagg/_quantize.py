"""Quantization of a noised float contribution into Z_(2^bits), and back (private).

Derivation (see docs/secure-aggregation.md, "Quantization derivation"): with stochastic
rounding at step Δ the per-coordinate error is unbiased with variance <= Δ²/4, so
Δ = 2ρ·s keeps its standard deviation <= ρ·s, a fraction ρ (1 %) of the per-client DP noise
std s. Values are clamped to ±B, B = c + τ·s (c: bound on the noiseless coordinate, τ = 10
noise standard deviations: P(|N(0,1)| > 10) ≈ 1.5e-23 per coordinate), i.e. to the integer
range [-L, L], L = ⌈B/Δ⌉, shifted to [0, 2L]. A sum of n contributions stays below
n·(2L) + 1, so the modulus is 2^32 when that fits and 2^64 otherwise. Each vector carries one
extra coordinate, the number of its clamped coordinates, so the server learns (only) the total.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

REL_ERROR = 0.01
TAIL = 10.0
_MAX_LEVELS = 1 << 52  # float64 represents every integer of the range exactly


class QuantizationError(ValueError):
    """Parameters that cannot be represented (range too wide for 64-bit sums)."""


@dataclass(frozen=True)
class QuantParams:
    step: float  #: Δ
    levels: int  #: L: the integer range is [-L, L]
    bits: int  #: modulus 2^bits
    bound: float  #: B = L·Δ: values are clamped to [-B, B]

    def to_record(self) -> dict:
        return {"q-step": float(self.step), "q-levels": int(self.levels), "q-bits": int(self.bits),
                "q-bound": float(self.bound)}

    @classmethod
    def from_record(cls, rec) -> QuantParams:
        step, levels, bits = float(rec["q-step"]), int(rec["q-levels"]), int(rec["q-bits"])
        bound = float(rec["q-bound"])
        if not (step > 0 and levels >= 1 and bits in (32, 64) and 0 < bound <= step * levels * (1 + 1e-9)):
            raise QuantizationError(f"invalid quantization parameters {step}, {levels}, {bits}, {bound}")
        return cls(step=step, levels=levels, bits=bits, bound=bound)


def derive(*, clip_range: float, noise_std: float | None, n_clients: int, dim: int = 0,
           rel_error: float = REL_ERROR, tail: float = TAIL) -> QuantParams:
    """Quantization step, range and modulus for ``n_clients`` contributions.

    ``clip_range``: bound c on each noiseless coordinate of one contribution. ``noise_std``:
    std s of the DP noise one client adds per coordinate (None/0 when DP is off: then the
    step is the finest a 32-bit modulus allows, ~c·2^-22 or better).
    """
    if not (clip_range > 0 and math.isfinite(clip_range)):
        raise QuantizationError(f"clip_range must be positive and finite, got {clip_range}")
    n = max(1, int(n_clients))
    if noise_std and noise_std > 0:
        step = 2.0 * rel_error * noise_std
        bound = clip_range + tail * noise_std
        levels = math.ceil(bound / step)
        need = n * (2 * levels) + 1
        bits = 32 if need < (1 << 31) and n * dim < (1 << 31) else 64
        if levels > _MAX_LEVELS or need >= (1 << 63):
            raise QuantizationError(
                f"range ±{bound:g} at step {step:g} for {n} clients does not fit a 64-bit sum"
            )
    else:
        bits = 32 if n < 512 and n * dim < (1 << 31) else 64
        levels = min(_MAX_LEVELS, ((1 << (bits - 1)) - 1) // (2 * n) - 1)
        step = clip_range / levels
        return QuantParams(step=step, levels=levels, bits=bits, bound=clip_range)
    return QuantParams(step=step, levels=levels, bits=bits, bound=step * levels)


def secure_rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def quantize(x: np.ndarray, p: QuantParams, rng: np.random.Generator | None = None) -> np.ndarray:
    """Clamp, stochastically round, shift: uint vector of len(x) + 1 (last = clamped count).

    Stochastic rounding: ``floor(x/Δ + U)``, U ~ Uniform[0, 1) from a secure generator, so the
    rounded value is unbiased and its error has variance <= Δ²/4.
    """
    from fedrec.common.secagg._masking import dtype_for

    rng = rng or secure_rng()
    y = np.array(x, dtype=np.float64).ravel()  # a private float64 copy, modified in place below
    lo, hi = (float(y.min()), float(y.max())) if y.size else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise QuantizationError(f"{int((~np.isfinite(y)).sum())} non-finite values in the contribution")
    clamped = 0
    if -lo > p.bound or hi > p.bound:
        clamped = int(np.count_nonzero(np.abs(y) > p.bound))
        np.clip(y, -p.bound, p.bound, out=y)
    y *= 1.0 / p.step
    y += rng.random(y.size, dtype=np.float32)
    np.floor(y, out=y)
    np.clip(y, -p.levels, p.levels, out=y)  # guards float rounding at ±L
    y += p.levels
    out = np.empty(y.size + 1, dtype=dtype_for(p.bits))
    out[:-1] = y
    out[-1] = clamped
    return out


def dequantize(total: np.ndarray, n_contributors: int, p: QuantParams) -> tuple[np.ndarray, int]:
    """(float64 sum of the contributions, total clamped count) from the unmasked integer sum.

    The shifted sum lies in [0, 2nL] < 2^(bits-1), so the unmasked residue *is* that integer.
    """
    shifted = total[:-1].astype(np.int64)
    return (shifted - n_contributors * p.levels).astype(np.float64) * p.step, int(total[-1])
