"""Checks on the coordinator's model arrays before an institution spends budget on them.

A training round starts from arrays the coordinator sends (the global MF item side, the
adapter's LoRA and head weights, the per-item step sizes). The institution's guarantee may not
depend on them being honest, and two things depend on them being *usable*:

* **No un-noised bit.** A NaN or inf in a parameter turns the loss of exactly the people whose
  records touch it into NaN; clipping cannot bound a NaN and Gaussian noise added to it is still
  NaN, so which coordinates of the release come back NaN would say, without noise, who rated
  what (measured: a NaN in one rated item's bias made the MF delta NaN on the 28 items co-rated
  with it). Huge finite values do the same through float32 overflow.
* **Nothing spent for nothing.** An array of the wrong shape fails after the charge.

So every model array is checked here — the exact set of names, each shape, finite, and
``|x| <= limit`` (:data:`PUBLIC_PARAMETER_LIMIT`, far above any trained model's weights and far
below float32 overflow in the models' forward passes) — **before** the charge; a refused round
spends nothing. The per-person clipping code additionally drops any person whose gradient is
not finite (``person_clipping.clipped_sum_backward``, ``adapter.person_clipped_sum``), so a
value that slips through cannot make the release data-dependently non-finite either.

Hand-written: Flower's ArrayRecord carries any array, and Opacus assumes finite gradients.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = ["PUBLIC_PARAMETER_LIMIT", "check_model_arrays"]

#: the largest magnitude accepted in a coordinator's model array (MF item factors and biases,
#: LoRA and head weights, step sizes are O(1) in every trained model here); with it, products
#: of a few such values stay far inside float32's range (3.4e38)
PUBLIC_PARAMETER_LIMIT = 1e6


def check_model_arrays(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], *, what: str,
                       limit: float = PUBLIC_PARAMETER_LIMIT) -> None:
    """ValueError (one line naming the array) unless ``arrays`` holds exactly the names of
    ``shapes``, each of that shape, numeric, finite and within ``±limit``. ``what`` names the
    arrays in the message (e.g. "global MF item side")."""
    if not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"limit must be positive and finite, got {limit}")
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ValueError(f"{what}: arrays do not match the model (missing {missing[:3]}, unknown {extra[:3]})")
    for name, shape in shapes.items():
        a = np.asarray(arrays[name])
        if a.shape != tuple(shape):
            raise ValueError(f"{what}: array {name} has shape {a.shape}, expected {tuple(shape)}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{what}: array {name} is not numeric ({a.dtype})")
        if a.size and not np.all(np.isfinite(a)):
            raise ValueError(f"{what}: array {name} has NaN or infinite entries")
        if a.size and float(np.max(np.abs(a))) > limit:
            raise ValueError(f"{what}: array {name} has entries beyond ±{limit:g} (largest {float(np.max(np.abs(a))):.3g})")
