"""A generated catalogue domain for ranking: tens of thousands of people, hundreds of items with text.

The causal domains (health, education, finance) have 8 catalogue items each: too few to rank
(HR@10 is 1 whatever the model). This domain is a health-programme catalogue built for the
recommender benchmarks (``benchmarks/adapter.py --dataset catalogue``): a few hundred
programmes, each with latent attributes (category, topic, format, intensity, audience, length)
and a description **composed from those attributes**, so the public text carries part of the
signal that drives interactions; the rest is an idiosyncratic item factor no text reveals and an
item popularity with a heavy tail.

Interaction model (latent factors with popularity skew, vectorised numpy, seconds for 20,000+
people):

- item factor ``v_i = Σ_a E_a[attr_a(i)] + ε_i`` (``E_a`` one random embedding table per
  attribute, ``ε_i`` idiosyncratic, never in the text);
- person factor ``u_p`` = the embeddings of the category and audience the person leans to plus
  Gaussian taste noise;
- utility ``U_pi = β · u_p·v_i / √d + b_i + Gumbel``; ``b_i ~ N(0, popularity_sd²)`` plus a
  public intensity effect (light programmes are taken up more);
- each person takes up their top ``n_p`` items by utility (Gumbel top-k = sampling without
  replacement ∝ ``exp(β u·v/√d + b)``), ``n_p = 5 + ⌊LogNormal(log 10, 0.7)⌋`` capped at 60;
- the rating (1-5) of a taken-up item is the rounded affinity plus noise.

Everything is drawn from one ``numpy.random.Generator(seed)``: the same seed gives the same
catalogue, text and interactions. It is a simulation: ground truth (factors, popularity) is
returned for tests and never enters a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.common.errors import FedrecInputError
from fedrec.common.ratings import Ratings

__all__ = ["CATEGORIES", "CatalogueTruth", "generate_catalogue"]

#: category -> (phrase used in the text, its topics)
CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "nutrition": ("healthy eating", ("meal planning", "reading food labels", "cooking on a budget", "cutting sugar")),
    "physical activity": ("getting active", ("walking", "strength training", "swimming", "yoga and stretching")),
    "sleep": ("better sleep", ("insomnia", "shift work and sleep", "bedtime routines", "snoring and sleep apnoea")),
    "mental health": ("mental wellbeing", ("stress management", "anxiety", "low mood", "mindfulness")),
    "smoking cessation": ("quitting smoking", ("nicotine replacement", "cravings", "staying smoke-free",
                                              "vaping")),
    "diabetes care": ("living with diabetes", ("blood sugar monitoring", "insulin", "foot care",
                                               "preventing type 2 diabetes")),
    "heart health": ("a healthy heart", ("blood pressure", "cholesterol", "cardiac rehabilitation",
                                         "salt reduction")),
    "weight management": ("a healthy weight", ("portion control", "emotional eating", "weight loss maintenance",
                                               "family weight goals")),
    "maternal health": ("pregnancy and early parenthood", ("antenatal classes", "breastfeeding",
                                                           "postnatal recovery", "baby sleep")),
    "healthy ageing": ("ageing well", ("falls prevention", "memory", "joint pain", "staying independent")),
}
FORMATS = ("online course", "series of group sessions", "one-to-one coaching programme", "mobile app programme")
INTENSITIES = ("light", "moderate", "intensive")
AUDIENCES = ("young adults", "working adults", "parents", "older adults", "people with a long-term condition")
LENGTHS = (2, 4, 6, 8, 12, 16)
#: public effect of intensity on take-up (light programmes are taken up more)
INTENSITY_POPULARITY = (0.4, 0.0, -0.4)
_NAME_WORDS = ("Steady", "Bright", "Open", "Clear", "Strong", "Calm", "Active", "Fresh", "Well", "Next",
               "Simple", "Thrive", "Balance", "Forward", "Kind", "Daily")


@dataclass(frozen=True)
class CatalogueTruth:
    """Ground truth of a generated catalogue (simulation only; never enters a model)."""

    item_factors: np.ndarray  # [n_items, d]
    person_factors: np.ndarray  # [n_people, d]
    popularity: np.ndarray  # [n_items] log-popularity b_i (with the intensity effect)
    attributes: pd.DataFrame  # the items' latent attributes


def _check(name: str, value: int, low: int, fix: str) -> None:
    if int(value) != value or value < low:
        raise FedrecInputError(f"catalogue: {name} = {value!r} must be an integer >= {low}; fix: {fix}")


def generate_catalogue(*, people: int = 20_000, items: int = 600, seed: int = 0, dim: int = 16, beta: float = 3.0,
                       popularity_sd: float = 1.0, taste_sd: float = 0.6, idiosyncratic_sd: float = 0.5,
                       mean_items: float = 10.0, max_items: int = 60) -> tuple[Ratings, CatalogueTruth]:
    """Generate the catalogue, its text and everyone's interactions (see the module docstring).

    Returns ``(ratings, truth)``: ``ratings`` in the same :class:`~fedrec.common.ratings.Ratings`
    form as MovieLens (dense person/item indices, ratings 1-5, ``items`` with ``item_id, name,
    category, description``); ``truth`` the latent factors and popularity (simulation only).
    """
    _check("people", people, 2, "give at least 2 people")
    _check("items", items, 20, "give at least 20 items (a ranking needs candidates)")
    _check("dim", dim, 1, "give a positive latent dimension")
    _check("max_items", max_items, 5, "give max_items >= 5")
    if max_items > items:
        raise FedrecInputError(f"catalogue: max_items = {max_items} exceeds items = {items}; fix: lower max_items")
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    n_cat, n_top = len(cats), 4

    # ---- items: latent attributes -> factor, popularity, text
    cat = rng.integers(0, n_cat, items)
    topic = rng.integers(0, n_top, items)
    fmt = rng.integers(0, len(FORMATS), items)
    inten = rng.integers(0, len(INTENSITIES), items)
    aud = rng.integers(0, len(AUDIENCES), items)
    length = rng.integers(0, len(LENGTHS), items)
    e_cat = rng.normal(0, 1.0, (n_cat, dim))
    e_topic = rng.normal(0, 0.6, (n_cat, n_top, dim))
    e_fmt = rng.normal(0, 0.5, (len(FORMATS), dim))
    e_int = rng.normal(0, 0.3, (len(INTENSITIES), dim))
    e_aud = rng.normal(0, 0.7, (len(AUDIENCES), dim))
    v = (e_cat[cat] + e_topic[cat, topic] + e_fmt[fmt] + e_int[inten] + e_aud[aud]
         + rng.normal(0, idiosyncratic_sd, (items, dim)))
    b = rng.normal(0, popularity_sd, items) + np.asarray(INTENSITY_POPULARITY)[inten]

    names, texts = [], []
    words = rng.integers(0, len(_NAME_WORDS), (items, 2))
    for i in range(items):
        phrase, topics = CATEGORIES[cats[cat[i]]]
        names.append(f"{_NAME_WORDS[words[i, 0]]} {_NAME_WORDS[words[i, 1]]} {i + 1:03d}")
        article = "An" if INTENSITIES[inten[i]][0] in "aeiou" else "A"
        texts.append(f"{article} {INTENSITIES[inten[i]]} {LENGTHS[length[i]]}-week {FORMATS[fmt[i]]} on "
                     f"{phrase}, focused on {topics[topic[i]]}, for {AUDIENCES[aud[i]]}.")
    item_table = pd.DataFrame({
        "item_id": [f"P{i + 1:04d}" for i in range(items)], "name": names, "category": [cats[c] for c in cat],
        "description": texts,
    })
    attributes = pd.DataFrame({"category": cat, "topic": topic, "format": fmt, "intensity": inten,
                               "audience": aud, "length_weeks": np.asarray(LENGTHS)[length]})

    # ---- people: lean to one category and one audience, plus taste noise
    p_cat = rng.integers(0, n_cat, people)
    p_aud = rng.integers(0, len(AUDIENCES), people)
    u = e_cat[p_cat] + 0.7 * e_aud[p_aud] + rng.normal(0, taste_sd, (people, dim))
    aff = (u @ v.T) / np.sqrt(dim)  # [people, items]
    aff = (aff - aff.mean()) / aff.std()
    n_p = np.minimum(5 + np.floor(rng.lognormal(np.log(mean_items), 0.7, people)).astype(np.int64), max_items)

    # ---- interactions: Gumbel top-k of the utilities = sampling without replacement
    util = beta * aff + b[None, :] + rng.gumbel(size=(people, items))
    top = np.argpartition(-util, max_items - 1, axis=1)[:, :max_items]
    order = np.argsort(-np.take_along_axis(util, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)  # each person's items by utility
    keep = np.arange(max_items)[None, :] < n_p[:, None]
    person = np.broadcast_to(np.arange(people)[:, None], top.shape)[keep].astype(np.int64)
    item = top[keep].astype(np.int64)
    latent = 2.0 + 1.0 * aff[person, item] + rng.normal(0, 0.7, len(item))
    rating = np.clip(np.rint(latent), 1, 5).astype(np.float32)

    ratings = Ratings(person=person, item=item, rating=rating, person_ids=np.arange(people),
                      item_ids=item_table["item_id"].to_numpy(), items=item_table, bounds=(1.0, 5.0))
    return ratings, CatalogueTruth(item_factors=v, person_factors=u, popularity=b, attributes=attributes)
