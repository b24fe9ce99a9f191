"""Exact per-person clipping in one backward pass.

Opacus computes per-sample gradients with hooks (for ``nn.Embedding`` it materialises a
[batch, num_embeddings, dim] tensor per layer: 0.036x non-private throughput measured on an
H100) or, in ghost mode, per-sample norms in an extra backward pass (0.26x). When a model can
give each person's exact gradient norm from its forward quantities — as matrix factorization
can, because a person's gradient touches only the rows of the items they rated
(``common/models/mf.py``) — clipping needs neither: weight each person's loss by
``min(1, C / ‖g_u‖)`` (a constant) and one ordinary backward yields ``Σ_u clip_C(g_u)``,
exactly the clipped sum Opacus' fast-gradient-clipping optimizer expects in ``p.grad``. Noise,
scaling, Poisson sampling and accounting stay Opacus' own (``DPOptimizerFastGradientClipping``,
``DPDataLoader``, its accountants).

Privacy contract: after :func:`clipped_sum_backward`, each parameter's ``.grad`` holds
``Σ_u c_u g_u`` with ``‖c_u g_u‖₂ ≤ C`` jointly over all parameters, provided ``norms[u]`` is
the exact joint L2 norm of person u's gradient (checked against autograd in the tests).
"""

from __future__ import annotations

import torch

__all__ = ["clip_coefficients", "clipped_sum_backward"]


def clip_coefficients(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / ‖g_u‖)`` per person (1 for zero gradients)."""
    return (max_norm / (norms + 1e-12)).clamp(max=1.0).detach()


def clipped_sum_backward(losses: torch.Tensor, norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Backward of ``Σ_u c_u · loss_u``: leaves the per-person-clipped gradient sum in ``.grad``.

    A person whose loss or gradient norm is not finite (NaN or inf from the coordinator's
    parameters: common/privacy/public_inputs.py) is left out of the sum — coefficient 0 and no
    backward through their loss: clipping cannot bound a NaN, and which people produce one
    depends on their data. Leaving a person out moves the sum by at most ``C``, like any person,
    so the sensitivity is unchanged. Where people's losses share one graph (MF: ``index_add``
    over their rows), autograd still multiplies the zero weight by their NaN partials: the caller
    must then rebuild the losses without them first (client/train.py does).

    Returns the coefficients (for diagnostics such as the fraction of persons clipped).
    """
    finite = torch.isfinite(losses.detach()) & torch.isfinite(norms)
    coef = torch.where(finite, clip_coefficients(torch.where(finite, norms, 0.0), max_norm), 0.0)
    (losses[finite] * coef[finite]).sum().backward()
    return coef
