"""Finance: customers x financial products; outcome = annual earnings change (USD, higher is better).

Customers are resampled (with jitter) from the NSW job-training experiment and the CPS
comparison sample shipped by the PyPI package ``causaldata`` (``nsw_mixtape``: 445 people;
``cps_mixtape``: 15,992 people — the LaLonde data). Advisers offer training and counselling
to low earners without a degree (confounded logging policy: low earners also recover most on
their own); customers like apps and savings plans, while job training helps low earners most.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from fedrec.common.schema import Covariate
from fedrec.simulations.domains.base import Domain, ItemSpec, Linear

__all__ = ["DOMAIN", "load_source"]


@lru_cache(maxsize=1)
def load_source() -> pd.DataFrame:
    """NSW + CPS covariates (causaldata nsw_mixtape, cps_mixtape), study column names."""
    import causaldata

    d = pd.concat([causaldata.nsw_mixtape.load_pandas().data, causaldata.cps_mixtape.load_pandas().data],
                  ignore_index=True)
    return pd.DataFrame({
        "age": d["age"].astype(np.int64),
        "education_years": d["educ"].astype(np.int64),
        "black": d["black"].astype(np.int64),
        "hispanic": d["hisp"].astype(np.int64),
        "married": d["marr"].astype(np.int64),
        "no_degree": d["nodegree"].astype(np.int64),
        "earnings_2y_ago": d["re74"].astype(float).round(2),
        "earnings_1y_ago": d["re75"].astype(float).round(2),
    })


@lru_cache(maxsize=1)
def _stats() -> dict[str, tuple[float, float]]:
    src = load_source()
    return {c: (float(src[c].mean()), float(src[c].std()))
            for c in ("age", "education_years", "earnings_1y_ago", "earnings_2y_ago")}


def features(x: pd.DataFrame) -> dict[str, np.ndarray]:
    """Standardised features (source mean/sd) the models read."""
    s = _stats()
    z = lambda c: (x[c].to_numpy(float) - s[c][0]) / s[c][1]  # noqa: E731
    return {
        "age": z("age"),
        "educ": z("education_years"),
        "earn": z("earnings_1y_ago"),
        "earn_prev": z("earnings_2y_ago"),
        "unemployed": (x["earnings_1y_ago"].to_numpy(float) == 0).astype(float),
        "black": x["black"].to_numpy(float),
        "hispanic": x["hispanic"].to_numpy(float),
        "married": x["married"].to_numpy(float),
        "no_degree": x["no_degree"].to_numpy(float),
    }


COVARIATES = (
    Covariate("age", "integer", 16, 70, description="age in years"),
    Covariate("education_years", "integer", 0, 20, description="years of schooling"),
    Covariate("black", "binary", description="1 = Black"),
    Covariate("hispanic", "binary", description="1 = Hispanic"),
    Covariate("married", "binary", description="1 = married"),
    Covariate("no_degree", "binary", description="1 = no high-school degree"),
    Covariate("earnings_2y_ago", "number", 0, 100000, description="annual earnings two years ago (USD)"),
    Covariate("earnings_1y_ago", "number", 0, 100000, description="annual earnings last year (USD)"),
)

I = ItemSpec
L = Linear
ITEMS = (
    I("job_training", "Job training programme", "employment",
      "Nine to eighteen months of paid work experience and training in a supported workplace.",
      effect=L(1200.0, {"no_degree": 900.0, "earn": -700.0, "unemployed": 800.0}), appeal=L(-0.4, {"unemployed": 0.5}),
      policy=L(-1.2, {"earn": -1.0, "no_degree": 0.8, "unemployed": 0.8})),
    I("savings_plan", "Automatic savings plan", "savings",
      "A fixed share of each pay cheque moves to a savings account you can reach in an emergency.",
      effect=L(250.0, {"earn": 250.0}), appeal=L(0.6, {"earn": 0.3}),
      policy=L(-0.4, {"earn": 0.6})),
    I("credit_counselling", "Credit counselling", "debt",
      "One-to-one sessions with a certified counsellor to review debts and agree a repayment plan.",
      effect=L(500.0, {"earn": -250.0, "married": 200.0}), appeal=L(-0.3, {"age": 0.2}),
      policy=L(-0.6, {"earn": -0.6, "age": 0.3})),
    I("financial_literacy", "Financial literacy course", "education",
      "A six-week evening course on budgeting, interest, credit scores and tax credits.",
      effect=L(350.0, {"educ": -200.0, "age": -150.0}), appeal=L(-0.6, {"educ": 0.3}),
      policy=L(-0.7, {"no_degree": 0.6, "age": -0.3})),
    I("matched_savings", "Matched savings account", "savings",
      "Every dollar you save towards education, a home or a business is matched one to one.",
      effect=L(600.0, {"earn": -400.0, "unemployed": -300.0}), appeal=L(0.2, {"earn": -0.2}),
      policy=L(-0.8, {"earn": -0.7, "married": 0.4})),
    I("microloan", "Small business microloan", "credit",
      "A loan of up to 5,000 USD with business mentoring for starting or growing a small business.",
      effect=L(300.0, {"educ": 600.0, "age": 200.0, "no_degree": -500.0}), appeal=L(0.0, {"age": -0.3}),
      policy=L(-0.9, {"educ": 0.5, "married": 0.4})),
    I("budgeting_app", "Budgeting app", "digital",
      "A free app that sorts your spending, warns before overdrafts and rewards saving streaks.",
      effect=L(50.0, {}), appeal=L(1.1, {"age": -0.5}),
      policy=L(-0.3, {"age": -0.7})),
    I("retirement_account", "Retirement account", "savings",
      "An individual retirement account with low fees and an employer-style contribution schedule.",
      effect=L(100.0, {"age": 250.0, "earn": 150.0}), appeal=L(0.0, {"age": 0.5}),
      policy=L(-0.5, {"age": 0.8, "earn": 0.5})),
)
del I, L

DOMAIN = Domain(
    name="finance",
    title="Financial products and earnings change (NSW/CPS covariates)",
    person_unit="customer",
    source="causaldata.nsw_mixtape + causaldata.cps_mixtape (LaLonde NSW experiment and CPS comparison)",
    covariates=COVARIATES,
    load_source=load_source,
    features=features,
    items=ITEMS,
    baseline=Linear(1500.0, {"earn": -2500.0, "unemployed": 1500.0, "educ": 600.0, "age": -500.0}),
    outcome_name="earnings_change",
    outcome_unit="USD per year",
    outcome_bounds=(-100000.0, 100000.0),
    outcome_better="higher",
    noise_sd=4000.0,
    case_mix=Linear(0.0, {"earn": -1.0, "black": 0.8, "no_degree": 0.6}),
    jitter={"earnings_2y_ago": "mul", "earnings_1y_ago": "mul"},
    # unemployment shows as zero earnings: an indicator of it is part of the nuisance design
    causal_derived=("at_min(earnings_1y_ago)",),
)
