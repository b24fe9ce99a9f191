"""The noise of every release, derived from the event the ledger was charged for.

Every release an institution makes passes through one of two functions here, and both take the
**charged** mechanism event itself, not a noise level chosen elsewhere:

* :func:`dp_sgd_optimizer` — Opacus' ``DPOptimizerFastGradientClipping`` for DP-SGD steps
  (MF item side; the adapter's per-person clipped sums use :func:`gaussian_release`), its
  noise multiplier taken from the charged :class:`~fedrec.common.privacy.accountant.DPSGDEvent`;
* :func:`gaussian_release` — a clipped statistic plus Gaussian noise with std
  ``σ · Δ · √share``, σ and Δ (the L2 sensitivity) taken from the charged
  :class:`~fedrec.common.privacy.accountant.GaussianEvent`.

So the noise a client adds and the σ its ledger records cannot drift apart in a handler: the
only way to add less noise is to change this module, and the audit's empirical check
(``server/audit.py``) drives these same two functions with canaries.

``noise_share`` is the part of the accounted variance this client adds: 1 in ``local`` mode
(the release alone is (ε, δ)-DP), ``1 / n_min`` in ``distributed`` mode (only the secure sum of
at least n_min such releases carries the accounted variance; the caller must have verified the
round's size, see ``client/policy.py``). Why by hand: Opacus adds noise inside its optimizer for
DP-SGD (used here), but has no mechanism for a statistic released once; ``gaussian_release``
is that mechanism, with the sensitivity checked rather than assumed.
"""

from __future__ import annotations

import math

import numpy as np

from fedrec.common.privacy.accountant import DPSGDEvent, GaussianEvent
from fedrec.common.privacy.gaussian import gaussian_noise

__all__ = ["noise_share", "dp_sgd_optimizer", "gaussian_release", "release_std", "check_clip_norm",
           "check_sample_rate", "realizable_rate", "CLIP_NORM_RANGE", "MIN_SAMPLE_RATE"]

#: the per-person clip bounds a training release accepts. MF's DP-SGD runs in float32: below
#: ~1e-38 a clipped contribution lives on float32's subnormal lattice and rounding moves it past
#: the clip (measured: one person moved the release by 1.37·C at C = 1e-44), above ~1e37 the noise
#: overflows to ±inf (charged, nothing usable released) or crashes after the charge. This range is
#: far from both and from every clip in use (0.25-1).
CLIP_NORM_RANGE = (1e-6, 1e6)

#: the smallest Poisson sample rate a training release accepts: MF's sampler (Opacus'
#: DPDataLoader) compares a float32 ``torch.rand`` — a multiple of 2^-24 — with the rate, so it
#: cannot sample any person with a probability below 2^-24 (it sampled at 2^-24 ≈ 6e-8 a run
#: charged at 1e-8: ε 45.7 spent against 1.995 charged, see realizable_rate)
MIN_SAMPLE_RATE = 2.0**-24


def noise_share(noise_mode: str, n_min: int) -> float:
    """The share of the accounted noise variance one client adds: 1 (local) or 1/n_min."""
    if noise_mode == "local":
        return 1.0
    if noise_mode == "distributed":
        if n_min < 1:
            raise ValueError("distributed noise needs n_min >= 1")
        return 1.0 / n_min
    raise ValueError(f"noise mode must be 'local' or 'distributed', got {noise_mode!r}")


def check_clip_norm(clip_norm: float) -> float:
    """``clip_norm`` if it lies in :data:`CLIP_NORM_RANGE`, else ValueError naming the knob."""
    lo, hi = CLIP_NORM_RANGE
    if not (lo <= clip_norm <= hi):
        raise ValueError(f"privacy.clip-norm = {clip_norm!r} is outside [{lo:g}, {hi:g}], where float32 DP-SGD "
                         "clips and noises exactly; fix: use a clip norm such as 1.0")
    return float(clip_norm)


def check_sample_rate(sample_rate: float) -> float:
    """``sample_rate`` if in [:data:`MIN_SAMPLE_RATE`, 1], else ValueError naming the knob."""
    if not (MIN_SAMPLE_RATE <= sample_rate <= 1):
        raise ValueError(f"sample-rate = {sample_rate!r} is outside [2^-24 ≈ {MIN_SAMPLE_RATE:.2g}, 1]: the Poisson "
                         "sampler draws float32 uniforms and cannot sample at a smaller rate; fix: e.g. 0.1")
    return float(sample_rate)


def realizable_rate(sample_rate: float, *, bits: int) -> float:
    """The rate to hand a Poisson sampler whose mask is ``uniform < rate`` with ``uniform`` a
    multiple of 2^-bits (``torch.rand`` float32: 24; numpy ``Generator.random``: 53): the largest
    multiple of 2^-bits not above ``sample_rate``. Such a sampler includes each person with
    probability exactly that rate, never more than the charged ``sample_rate`` (compared with
    ``sample_rate`` itself it includes with ``ceil(q·2^bits)/2^bits`` — above q: at q = 1e-8 and
    24 bits, 6x q). A smaller rate only adds privacy (the subsampled Gaussian's privacy profile
    grows with q)."""
    rate = math.floor(float(sample_rate) * 2.0**bits) / 2.0**bits
    if not rate > 0:
        raise ValueError(f"sample-rate = {sample_rate!r} is below 2^-{bits}, the sampler's resolution")
    return rate


def _check_share(share: float) -> float:
    if not (0 < share <= 1 and math.isfinite(share)):
        raise ValueError(f"noise share must lie in (0, 1], got {share}")
    return float(share)


def release_std(event: GaussianEvent, *, noise_share: float) -> float:
    """Std of the noise :func:`gaussian_release` adds per coordinate for ``event`` (public)."""
    return event.noise_multiplier * event.sensitivity * math.sqrt(_check_share(noise_share))


def gaussian_release(value: np.ndarray, *, event: GaussianEvent, noise_share: float,
                     generator: np.random.Generator | None = None) -> np.ndarray:
    """``value + N(0, (σ·Δ)² · noise_share · I)`` with σ, Δ from the charged ``event``.

    Privacy contract: the caller guarantees that ``value`` is a sum over persons of
    contributions each clipped to L2 norm ``event.sensitivity`` (jointly over the whole
    release); then the release (local) or the secure sum of ≥ 1/noise_share such releases
    (distributed) is the Gaussian mechanism the ledger charged. One event covers one release
    (``event.count`` must be 1). Noise comes from a CSPRNG-seeded generator unless a test
    passes one.
    """
    if not isinstance(event, GaussianEvent):
        raise TypeError(f"gaussian_release needs the charged GaussianEvent, got {type(event).__name__}")
    if event.count != 1:
        raise ValueError("one gaussian_release is one release: charge a GaussianEvent with count=1")
    value = np.asarray(value, dtype=np.float64)
    return value + gaussian_noise(value.shape, std=release_std(event, noise_share=noise_share), generator=generator)


def dp_sgd_optimizer(optimizer, *, event: DPSGDEvent, clip_norm: float, noise_share: float,
                     expected_batch_size: int, generator=None, loss_reduction: str = "sum"):
    """Opacus' fast-gradient-clipping DP optimizer whose noise is the charged ``event``'s σ.

    Privacy contract: the caller puts into each ``p.grad`` the sum of per-person gradients
    clipped jointly to ``clip_norm`` (``common/privacy/person_clipping.py``) and runs
    ``event.steps`` steps with Poisson sampling at ``event.sample_rate``; the optimizer adds
    ``N(0, (σ·C)² · noise_share)`` per coordinate and step with σ = ``event.noise_multiplier``.
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping

    if not isinstance(event, DPSGDEvent):
        raise TypeError(f"dp_sgd_optimizer needs the charged DPSGDEvent, got {type(event).__name__}")
    check_clip_norm(clip_norm)
    local_sigma = event.noise_multiplier * math.sqrt(_check_share(noise_share))
    return DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=local_sigma,
        max_grad_norm=float(clip_norm),
        expected_batch_size=int(expected_batch_size),
        loss_reduction=loss_reduction,
        generator=generator,
    )
