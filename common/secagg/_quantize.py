"""Quantization of a noised float contribution into Z_(2^bits), and back (private).

Derivation (see docs/secure-aggregation.md, "Quantization derivation"): with stochastic
rounding at step Δ the per-coordinate error is unbiased with variance <= Δ²/4, so
Δ = 2ρ·s keeps its standard deviation <= ρ·s, a fraction ρ (1 %) of the per-client DP noise
std s. Values are clamped to ±B, B = c + τ·s (c: bound on the noiseless coordinate, τ = 10
noise standard deviations: P(|N(0,1)| > 10) ≈ 1.5e-23 per coordinate), i.e. to the integer
range [-L, L], L = ⌈B/Δ⌉, shifted to [0, 2L]. A sum of n contributions stays below
n·(2L) + 1, so the modulus is 2^32 when that fits and 2^64 otherwise. Each vector carries one
extra coordinate, the number of its clamped coordinates, so the server learns (only) the total.

**Distributed noise (``wrap=True``).** Clamping is post-processing only of a *fully* noised
vector. A node that adds σ²/n_min of the noise must not clamp: the clamp bound is the
coordinator's choice, and a bound below the noise turns each node's share into a sign of its
barely-noised value before the sum (tests/unit/test_lying_coordinator_machinery.py). Such a node
reduces its rounded integers modulo 2^bits instead: the sum of residues is the residue of the
sum, a function of the noised sum only; :func:`dequantize` reads residues centred on 0, so a
sum whose integer stays within ±2^(bits-1) is decoded exactly even where single values passed
±L, and the clamped count it sends is 0.
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


#: the coarsest quantization step a distributed-noise share accepts, as a fraction of the noise
#: std the share itself carries (an honest coordinator's step is 2·REL_ERROR = 0.02 of it)
MAX_SHARE_STEP = 0.05


def check_share_step(p: QuantParams, share_std: float) -> None:
    """Refuse (:class:`QuantizationError`) a step too coarse for a distributed-noise share.

    Privacy contract (the rounding must not release more than the charged Gaussian sum). The
    coordinator chooses the step Δ. A node that adds only s = σ·Δ₁/√n_min of the noise rounds
    its share stochastically before the secure sum, and ⌊a⌋ + ⌊b⌋ is not a function of a + b:
    the sum of k rounded shares is the rounded noised sum plus a residue that depends on each
    share's fractional part frac(vᵢ/Δ). With Δ ≫ s those fractional parts follow the data
    (vᵢ/Δ is then nearly the value itself), a channel the charged ε does not cover. Given the
    noised sum T, the first k − 1 shares are jointly Gaussian with covariance s²(I − 11ᵀ/k)
    (smallest eigenvalue s²/k), so their fractional parts are within total variation
    Σ_(m≠0) exp(−2π² mᵀΣm/Δ²) ≤ ~2(k − 1)·exp(−2π² s²/(k Δ²)) of uniform on the torus,
    whatever the data (Poisson summation); the last one is fixed by T. The residue's law given T
    is then data-free up to that, per coordinate. At Δ ≤ MAX_SHARE_STEP·s = s/20 this is
    ≤ 2k·exp(−7896/k): ≤ 3e-15 for k ≤ 200 contributors, so d ≤ 1e6 coordinates add < 3e-9 to
    δ (at the honest step s/50: ≤ 2k·exp(−49348/k), < 1e-18 for k ≤ 1,000). Larger federations
    need a finer step for the same bound (docs/secure-aggregation.md). A share with full local
    noise is clamped and rounded after all of its noise, post-processing: not checked here.
    """
    if not (math.isfinite(share_std) and share_std > 0):
        raise QuantizationError(f"a distributed-noise share needs its noise std, got {share_std!r}")
    if not p.step <= MAX_SHARE_STEP * share_std:
        raise QuantizationError(f"quantization step {p.step:g} is coarser than {MAX_SHARE_STEP:g} x this share's "
                                f"noise std {share_std:g}: its rounding would not be hidden by the noise")


def secure_rng() -> np.random.Generator:
    return np.random.default_rng(secrets.randbits(128))


def quantize(x: np.ndarray, p: QuantParams, rng: np.random.Generator | None = None, *,
             wrap: bool = False) -> np.ndarray:
    """Clamp, stochastically round, shift: uint vector of len(x) + 1 (last = clamped count).

    Stochastic rounding: ``floor(x/Δ + U)``, U ~ Uniform[0, 1) from a secure generator, so the
    rounded value is unbiased and its error has variance <= Δ²/4. ``wrap``: no clamping; the
    shifted integers are reduced modulo 2^bits (distributed noise, see the module doc).
    """
    from fedrec.common.secagg._masking import dtype_for

    rng = rng or secure_rng()
    y = np.array(x, dtype=np.float64).ravel()  # a private float64 copy, modified in place below
    lo, hi = (float(y.min()), float(y.max())) if y.size else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise QuantizationError(f"{int((~np.isfinite(y)).sum())} non-finite values in the contribution")
    clamped = 0
    if wrap:
        with np.errstate(over="ignore", invalid="ignore"):
            y *= 1.0 / p.step
            y += rng.random(y.size, dtype=np.float32)
            np.floor(y, out=y)
        y += p.levels
        out = np.empty(y.size + 1, dtype=dtype_for(p.bits))
        out[:-1] = _residues(y, p.bits)
        out[-1] = 0
        return out
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


def _residues(y: np.ndarray, bits: int) -> np.ndarray:
    """Integer-valued float64 ``y`` modulo 2^bits, exactly (values of 2^62 or more through Python
    ints; a non-finite value, from a step so small that x/Δ overflows, gives 0, as every value of
    2^116 or more does: such a float is a multiple of 2^64)."""
    from fedrec.common.secagg._masking import dtype_for

    r = np.zeros(y.size, dtype=np.uint64)
    small = np.abs(y) < 2.0**62  # False for nan
    r[small] = y[small].astype(np.int64).astype(np.uint64)  # two's complement: modulo 2^64
    for i in np.flatnonzero(~small & np.isfinite(y)):
        r[i] = int(y[i]) % (1 << 64)
    return r.astype(dtype_for(bits))  # modulo 2^bits


def dequantize(total: np.ndarray, n_contributors: int, p: QuantParams) -> tuple[np.ndarray, int]:
    """(float64 sum of the contributions, total clamped count) from the unmasked integer sum.

    The shifted sum lies in [0, 2nL] < 2^(bits-1); its residue less nL is read centred on 0, in
    [-2^(bits-1), 2^(bits-1)): the same integer, and also the exact sum of wrapped contributions
    (``quantize(wrap=True)``) whose integer sum stays in that range.
    """
    t = total[:-1].astype(np.uint64)
    c = t - np.uint64((n_contributors * p.levels) % (1 << 64))  # modulo 2^64
    if p.bits == 32:
        c &= np.uint64(0xFFFFFFFF)
        signed = c.astype(np.int64) - np.where(c >= np.uint64(1 << 31), np.int64(1 << 32), np.int64(0))
    else:
        signed = c.view(np.int64)
    return signed.astype(np.float64) * p.step, int(total[-1])
