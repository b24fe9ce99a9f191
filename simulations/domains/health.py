"""Health: patients x health programmes; outcome = weight change (kg, lower is better).

Patients are resampled (with jitter) from the NHEFS cohort covariates shipped by the PyPI
package ``causaldata`` (``causaldata.nhefs``: 1,629 adult smokers examined in 1971).
Programmes are assigned by clinicians who target heavier, older patients and heavy smokers
(confounded logging policy); patients like easy, digital programmes best, which are not the
ones that change weight most.
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
    """NHEFS covariates (causaldata.nhefs), renamed to the study's covariates."""
    import causaldata

    d = causaldata.nhefs.load_pandas().data
    return pd.DataFrame({
        "age": d["age"].astype(np.int64),
        "female": d["sex"].astype(np.int64),
        "nonwhite": d["race"].astype(np.int64),
        "education": d["education"].astype(np.int64),
        "cigs_per_day": d["smokeintensity"].astype(np.int64),
        "smoking_years": d["smokeyrs"].astype(np.int64),
        "exercise": d["exercise"].astype(np.int64),
        "inactivity": d["active"].astype(np.int64),
        "weight_kg": d["wt71"].astype(float),
        "height_cm": d["ht"].astype(float),
    })


@lru_cache(maxsize=1)
def _stats() -> dict[str, tuple[float, float]]:
    src = load_source()
    bmi = src["weight_kg"] / (src["height_cm"] / 100) ** 2
    cols = {c: src[c] for c in ("age", "cigs_per_day", "education")} | {"bmi": bmi}
    return {c: (float(v.mean()), float(v.std())) for c, v in cols.items()}


def features(x: pd.DataFrame) -> dict[str, np.ndarray]:
    """Standardised features (source mean/sd) the models read."""
    s = _stats()
    bmi = x["weight_kg"].to_numpy(float) / (x["height_cm"].to_numpy(float) / 100) ** 2
    z = lambda v, c: (v - s[c][0]) / s[c][1]  # noqa: E731
    return {
        "age": z(x["age"].to_numpy(float), "age"),
        "bmi": z(bmi, "bmi"),
        "cigs": z(x["cigs_per_day"].to_numpy(float), "cigs_per_day"),
        "educ": z(x["education"].to_numpy(float), "education"),
        "female": x["female"].to_numpy(float),
        "nonwhite": x["nonwhite"].to_numpy(float),
        "inactive": (x["inactivity"].to_numpy(float) >= 1).astype(float),
        "no_exercise": (x["exercise"].to_numpy(float) == 2).astype(float),
    }


COVARIATES = (
    Covariate("age", "integer", 18, 90, description="age in years at baseline"),
    Covariate("female", "binary", description="1 = female"),
    Covariate("nonwhite", "binary", description="1 = Black or other race (NHEFS race)"),
    Covariate("education", "integer", 1, 5, description="1 = 8th grade or less ... 5 = college degree"),
    Covariate("cigs_per_day", "integer", 0, 100, description="cigarettes smoked per day"),
    Covariate("smoking_years", "integer", 0, 80, description="years of smoking"),
    Covariate("exercise", "integer", 0, 2, description="recreational exercise: 0 much, 1 moderate, 2 little or none"),
    Covariate("inactivity", "integer", 0, 2, description="daily activity: 0 very active, 1 moderate, 2 inactive"),
    Covariate("weight_kg", "number", 30, 200, description="body weight at baseline (kg)"),
    Covariate("height_cm", "number", 130, 210, description="height (cm)"),
)

I = ItemSpec
L = Linear
ITEMS = (
    I("smoking_cessation", "Smoking cessation programme", "smoking",
      "Eight weeks of counselling with nicotine replacement therapy to help you quit smoking for good.",
      effect=L(2.0, {"cigs": 1.0, "age": -0.5}), appeal=L(-0.4, {"cigs": -0.3}),
      policy=L(-0.6, {"cigs": 1.2, "age": 0.3})),
    I("exercise_coaching", "Personal exercise coaching", "activity",
      "Weekly sessions with a coach building a strength and cardio routine adapted to your fitness.",
      effect=L(-1.5, {"bmi": -1.2, "age": 0.6, "inactive": -0.5}), appeal=L(0.3, {"age": -0.4, "inactive": -0.4}),
      policy=L(-0.5, {"bmi": 0.9, "inactive": 0.6})),
    I("diet_counselling", "Dietitian counselling", "nutrition",
      "Personal meal planning with a registered dietitian, with monthly follow-up on portions and habits.",
      effect=L(-2.0, {"bmi": -1.6, "female": -0.3}), appeal=L(-0.5, {"bmi": 0.2}),
      policy=L(-0.7, {"bmi": 1.3, "age": 0.4})),
    I("sleep_hygiene", "Better sleep course", "sleep",
      "A four-week online course on regular sleep, evening routines and screen time.",
      effect=L(-0.4, {"age": -0.3}), appeal=L(0.4, {"age": -0.2}),
      policy=L(-0.4, {"age": 0.6})),
    I("screening_reminders", "Health screening reminders", "prevention",
      "Text and e-mail reminders when a blood-pressure, cholesterol or cancer screening is due.",
      effect=L(0.0, {"age": -0.1}), appeal=L(0.9, {"age": 0.3}),
      policy=L(-0.2, {"age": 0.9, "bmi": 0.3})),
    I("stress_management", "Stress management group", "mental health",
      "Small-group mindfulness and stress-coping sessions led by a psychologist, six evenings.",
      effect=L(-0.6, {"female": -0.4, "educ": -0.2}), appeal=L(0.0, {"female": 0.4}),
      policy=L(-0.6, {"educ": -0.4, "cigs": 0.4})),
    I("walking_group", "Community walking group", "activity",
      "Guided walks three mornings a week in your neighbourhood, at an easy pace, with others.",
      effect=L(-1.0, {"age": -0.7, "bmi": -0.4}), appeal=L(0.1, {"age": 0.5}),
      policy=L(-0.4, {"age": 0.8, "bmi": 0.5})),
    I("nutrition_app", "Nutrition tracking app", "nutrition",
      "A smartphone app to log meals, count calories and get daily tips and streak rewards.",
      effect=L(-0.3, {"age": 0.2}), appeal=L(1.0, {"age": -0.6, "educ": 0.2}),
      policy=L(-0.3, {"age": -0.6, "bmi": 0.4})),
)
del I, L

DOMAIN = Domain(
    name="health",
    title="Health programmes and weight change (NHEFS covariates)",
    person_unit="patient",
    source="causaldata.nhefs (NHEFS: NHANES I Epidemiologic Follow-up Study, 1,629 smokers, 1971)",
    covariates=COVARIATES,
    load_source=load_source,
    features=features,
    items=ITEMS,
    baseline=Linear(2.5, {"age": -1.5, "bmi": -1.2, "cigs": 0.8, "inactive": 0.6, "female": -0.3}),
    outcome_name="weight_change",
    outcome_unit="kg",
    outcome_bounds=(-40.0, 40.0),
    outcome_better="lower",
    noise_sd=5.0,
    case_mix=Linear(0.0, {"age": 1.0, "bmi": 0.7, "cigs": 0.5}),
    jitter={"female": "none", "nonwhite": "none"},
    # the logging policies and effects act through BMI = weight / height^2: a propensity model
    # linear in weight and height is misspecified (-0.33 SE bias, docs/causal.md), so the study
    # declares BMI (public bounds 12-60 kg/m^2 = 12e-4 to 60e-4 kg/cm^2) in their place
    causal_covariates=("age", "female", "nonwhite", "education", "cigs_per_day", "smoking_years",
                       "exercise", "inactivity"),
    causal_derived=("ratio(weight_kg,height_cm,2)[12e-4,60e-4]",),
)
