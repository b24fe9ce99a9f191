"""ATE / CATE for one binary treatment from released statistics (EconML-like API).

Pure math, no I/O and no Flower: the client computes per-person contributions with
:mod:`fedrec.client.statistics`, the server (server/causal.py) sums them, and
:class:`FederatedCausalEstimator` turns the fitted nuisances and sums into estimates. It is
post-processing of DP releases and costs no budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import norm

from fedrec.common.causal.influence import ATEResult, ate_from_sums
from fedrec.common.causal.nuisance import ArmModel, arm_shrinkage
from fedrec.common.causal.scaling import TRIM, design, half_range, scale_covariates
from fedrec.common.causal.whitening import Whitening

__all__ = ["FederatedCausalEstimator"]


@dataclass
class FederatedCausalEstimator:
    """ATE / CATE for one binary treatment from released statistics (EconML-like API).

    ``fit`` takes the fitted nuisances and the summed influence terms; ``effect(X)`` is the
    linear CATE ``(coef1 - coef0)' x`` (difference of the per-arm ridge models) in outcome
    units; ``effect_interval`` its pointwise CI from the models' covariances; ``ate`` /
    ``ate_interval`` / ``ate_stderr`` the chosen estimator's ATE.
    """

    covariate_bounds: Sequence[tuple[float, float]]
    outcome_bounds: tuple[float, float]
    estimator: str = "aipw"
    trim: tuple[float, float] = TRIM
    prop_coef: np.ndarray | None = None
    arm1: ArmModel | None = None
    arm0: ArmModel | None = None
    result: ATEResult | None = None
    whitening: Whitening | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return half_range(self.outcome_bounds)

    def fit(self, *, prop_coef: np.ndarray | None, arm1: ArmModel | None, arm0: ArmModel | None,
            sums: Mapping[str, float] | None = None, noise: Mapping[str, float] | None = None,
            ) -> FederatedCausalEstimator:
        """Store the nuisances and compute the ATE.

        ``sums``: ``{"n", "psi", "psi2"}`` summed influence terms (aipw/ipw) with their noise
        variances ``noise`` (same keys). For ``ra`` the ATE comes from the arm models and the
        covariate mean (first row of the pooled Gram): no influence-term release is needed.
        """
        self.prop_coef, self.arm1, self.arm0 = prop_coef, arm1, arm0
        noise = dict(noise or {})
        if self.estimator == "ra":
            assert arm1 is not None and arm0 is not None
            gram = arm1.gram + arm0.gram
            n = max(gram[0, 0], 1.0)
            xbar = gram[0] / n
            diff = arm1.coef - arm0.coef
            ate = float(xbar @ diff)
            # heterogeneity of tau(x) across people + coefficient uncertainty (+ noise in xbar)
            second = gram / n
            var_tau = max(float(diff @ second @ diff) - ate**2, 0.0)
            coef_var = float(xbar @ (arm1.total_cov + arm0.total_cov) @ xbar)
            noise_x = float(noise.get("gram", 0.0)) * float(diff @ diff) / n**2
            sampling = var_tau / n + coef_var
            self.result = ATEResult(ate=self.scale * ate, se=self.scale * math.sqrt(sampling + noise_x), n=n,
                                    sampling_var=self.scale**2 * sampling, noise_var=self.scale**2 * noise_x)
        else:
            if sums is None:
                raise ValueError(f"{self.estimator} needs the summed influence terms")
            self.result = ate_from_sums(sums["n"], sums["psi"], sums["psi2"], v_n=noise.get("n", 0.0),
                                        v_psi=noise.get("psi", 0.0), v_psi2=noise.get("psi2", 0.0),
                                        scale=self.scale, v_nuisance=noise.get("nuisance", 0.0))
        return self

    # ---- ATE
    def ate(self) -> float:
        assert self.result is not None, "call fit() first"
        return self.result.ate

    def ate_stderr(self) -> float:
        assert self.result is not None, "call fit() first"
        return self.result.se

    def ate_interval(self, alpha: float = 0.05) -> tuple[float, float]:
        assert self.result is not None, "call fit() first"
        return self.result.interval(alpha)

    # ---- CATE (linear in covariates)
    def _rows(self, X: np.ndarray) -> np.ndarray:
        x = design(scale_covariates(np.atleast_2d(X), self.covariate_bounds))
        return x if self.whitening is None else self.whitening.apply(x)

    def _coef(self) -> np.ndarray:
        if self.arm1 is None or self.arm0 is None:
            raise ValueError(f"the {self.estimator} estimator fits no outcome models: no CATE")
        return self.scale * (self.arm1.coef - self.arm0.coef)

    def cate_coef(self) -> np.ndarray:
        """CATE coefficients on the bound-scaled design (intercept first), outcome units
        (the linear map; exact for everyone with weighted fits, else for people inside the
        whitening radius)."""
        c = self._coef()
        return c if self.whitening is None else self.whitening.linear_coef(c)

    def cate_shrinkage(self) -> float:
        """How much of the arm models the ridge and the eigenvalue floor take: ``tr(I - A^-1 G) / p``
        for each arm (``A`` the floored, ridged Gram the fit inverted, ``G`` the released one; 0
        without DP, 1 when the floor swamps the Gram), the larger of the two. Post-processing of
        released Grams: no budget. The CATE's intervals carry the noise, not this shrinkage's
        bias; in the simulators they under-cover where it is above about 0.8 (small federations,
        many items per run, small ε; docs/causal.md "Current results", CATE coverage)."""
        if self.arm1 is None or self.arm0 is None:
            raise ValueError(f"the {self.estimator} estimator fits no outcome models: no CATE")
        return max(arm_shrinkage(arm) for arm in (self.arm1, self.arm0))

    def cate_cov(self, part: str = "total_cov") -> np.ndarray:
        """Covariance of :meth:`cate_coef` (outcome units squared, bound-scaled design): the two
        arm models' ``total_cov`` (sampling, X'y noise and the Gram's noise), as
        :meth:`effect_interval` uses. With it, anyone holding ``cate_coef`` gets the same
        pointwise CI as ``effect_interval``: ``x' C x`` for a bound-scaled design row x.
        ``part``: another :class:`ArmModel` covariance mapped the same way (``"noise_cov"``,
        ``"gram_noise_cov"``: the DP noise alone, as benchmarks/cate_coverage.py measures it;
        an arm without it counts 0)."""
        if self.arm1 is None or self.arm0 is None:
            raise ValueError(f"the {self.estimator} estimator fits no outcome models: no CATE")
        parts = [getattr(arm, part) for arm in (self.arm1, self.arm0)]
        c = self.scale**2 * sum(np.zeros_like(self.arm1.cov) if v is None else v for v in parts)
        if self.whitening is None:
            return c
        m = self.whitening.linear_map()
        return m @ c @ m.T

    def effect(self, X: np.ndarray) -> np.ndarray:
        """tau(x) for raw covariate rows X (columns in ``study.design_columns()`` order)."""
        return self._rows(X) @ self._coef()

    def effect_interval(self, X: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        assert self.arm1 is not None and self.arm0 is not None
        x = self._rows(X)
        cov = self.arm1.total_cov + self.arm0.total_cov
        se = self.scale * np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", x, cov, x), 0.0))
        z = float(norm.ppf(1 - alpha / 2))
        tau = x @ self._coef()
        return tau - z * se, tau + z * se
