"""The generated catalogue domain (simulations/domains/catalogue.py): size, determinism, text that
carries signal, popularity skew, and one-line errors for bad sizes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from fedrec.common.errors import FedrecInputError
from fedrec.simulations.domains.catalogue import CATEGORIES, generate_catalogue


@pytest.fixture(scope="module")
def big():
    return generate_catalogue(people=20_000, items=600, seed=3)


def test_twenty_thousand_people_hundreds_of_items_each_with_text(big):
    r, truth = big
    assert r.n_persons == 20_000 and r.n_items == 600
    assert np.unique(r.person).size == 20_000  # everyone has a history
    assert np.bincount(r.person).min() >= 5
    assert r.items["description"].str.len().min() > 40
    assert r.items["description"].nunique() > 500  # descriptions differ item to item
    pairs = r.person * r.n_items + r.item
    assert np.unique(pairs).size == len(pairs)  # one interaction per (person, item)
    assert set(np.unique(r.rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    # the cold-start protocol (20% of items with >= 5 interactions, 99 unrated cold negatives) can run
    assert (np.bincount(r.item, minlength=r.n_items) >= 5).sum() >= 0.9 * r.n_items


def test_same_seed_same_catalogue_other_seed_other():
    a, _ = generate_catalogue(people=500, items=100, seed=7)
    b, _ = generate_catalogue(people=500, items=100, seed=7)
    c, _ = generate_catalogue(people=500, items=100, seed=8)
    assert np.array_equal(a.person, b.person) and np.array_equal(a.item, b.item)
    assert np.array_equal(a.rating, b.rating) and a.items.equals(b.items)
    assert not (len(a.item) == len(c.item) and np.array_equal(a.item, c.item))


def test_text_states_the_latent_attributes(big):
    r, truth = big
    cats = list(CATEGORIES)
    for desc, cat, topic in zip(r.items["description"], truth.attributes["category"], truth.attributes["topic"]):
        phrase, topics = CATEGORIES[cats[cat]]
        assert phrase in desc and topics[topic] in desc


def test_interactions_follow_the_text_visible_category(big):
    """People concentrate on categories (which the text states): a person's most frequent category
    holds far more of their items than the 1/10 a text-blind draw would give."""
    r, truth = big
    cat = truth.attributes["category"].to_numpy()[r.item]
    counts = np.zeros((r.n_persons, len(CATEGORIES)))
    np.add.at(counts, (r.person, cat), 1)
    top_share = counts.max(1) / counts.sum(1)
    # the same histories with categories shuffled across items: what no text signal would give
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(truth.attributes["category"].to_numpy())[r.item]
    base = np.zeros_like(counts)
    np.add.at(base, (r.person, shuffled), 1)
    assert top_share.mean() > base.max(1).mean() / base.sum(1).mean() + 0.15


def test_popularity_is_skewed_and_follows_the_latent_popularity(big):
    r, truth = big
    n = np.sort(np.bincount(r.item, minlength=r.n_items))[::-1]
    assert n[: r.n_items // 10].sum() / n.sum() > 0.2  # top 10% of items: over 20% of interactions
    assert n[0] > 5 * np.median(n)
    rho = spearmanr(np.bincount(r.item, minlength=r.n_items), truth.popularity).statistic
    assert rho > 0.4


@pytest.mark.parametrize("kw, field", [({"people": 1}, "people"), ({"items": 5}, "items"),
                                       ({"items": 30, "max_items": 40}, "max_items"), ({"dim": 0}, "dim")])
def test_bad_sizes_are_one_line_errors(kw, field):
    with pytest.raises(FedrecInputError) as e:
        generate_catalogue(**kw)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and "fix:" in msg


def test_catalogue_is_registered_but_not_a_causal_domain():
    from fedrec.simulations.domains import CATALOGUES, get_domain

    assert "catalogue" in CATALOGUES
    with pytest.raises(FedrecInputError) as e:
        get_domain("catalogue")
    assert "\n" not in str(e.value) and "--dataset catalogue" in str(e.value)
