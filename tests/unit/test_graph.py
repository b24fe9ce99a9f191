"""Declared causal graphs (common/causal/graph.py): back-door adjustment sets on textbook graphs,
refusal naming the open path, and linear mediation from one Gram against statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrec.common.causal.graph import (adjustment_set, check_identifiable, gram_bound, gram_rows, mediation,
                                        parse_graph, read_graph, sem_paths)
from fedrec.common.errors import FedrecInputError


def g(*edges, latent=(), mediators=()):
    return parse_graph({"edges": list(edges), "latent": list(latent), "mediators": list(mediators)})


@pytest.mark.parametrize(("edges", "latent", "expect"), [
    # one observed confounder
    (["age -> exposed", "age -> outcome", "exposed -> outcome"], (), {"age"}),
    # M-bias: the collider z must NOT be adjusted for (Pearl 2009, sec. 11.3)
    (["u1 -> exposed", "u1 -> z", "u2 -> z", "u2 -> outcome", "exposed -> outcome"], ("u1", "u2"), set()),
    # a mediator is a descendant of the treatment: never in the set
    (["age -> exposed", "age -> outcome", "exposed -> engagement", "engagement -> outcome", "exposed -> outcome"],
     (), {"age"}),
    # a latent confounder blocked by an observed one on its path: u -> age -> exposed
    (["u -> age", "age -> exposed", "u -> outcome", "exposed -> outcome"], ("u",), {"age"}),
    # only a precursor of the outcome: nothing needs adjusting
    (["income -> outcome", "exposed -> outcome"], (), set()),
])
def test_backdoor_adjustment_sets_on_textbook_graphs(edges, latent, expect):
    graph = g(*edges, latent=latent)
    assert adjustment_set(graph) == expect
    assert check_identifiable(graph) == sorted(expect)


def test_an_unblocked_backdoor_path_is_refused_naming_it():
    graph = g("age -> exposed", "age -> outcome", "motivation -> exposed", "motivation -> outcome",
              "exposed -> outcome", latent=["motivation"])
    with pytest.raises(FedrecInputError, match=r"back-door path exposed <- motivation -> outcome stays open "
                                               r"\(motivation not observed\)"):
        check_identifiable(graph)


def test_bad_graphs_are_one_clear_line():
    with pytest.raises(FedrecInputError, match="cycle"):
        g("a -> exposed", "exposed -> outcome", "outcome -> a")
    with pytest.raises(FedrecInputError, match="is not 'A -> B'"):
        g("a => exposed")
    with pytest.raises(FedrecInputError, match="no directed path"):
        g("exposed -> a", "outcome -> a")
    with pytest.raises(FedrecInputError, match="'bmi' is observed in the graph but not a declared covariate"):
        check_identifiable(g("bmi -> exposed", "bmi -> outcome", "exposed -> outcome"), declared=["age"])


def test_the_graph_is_read_from_study_toml():
    from fedrec.simulations.domains import get_domain

    base = get_domain("health").study().to_toml()
    text = base + '\n[graph]\nedges = ["age -> exposed", "age -> outcome", "exposed -> outcome"]\n'
    assert check_identifiable(read_graph(text), declared=get_domain("health").study().covariate_names) == ["age"]
    nested = base.replace("[causal]\n", '[causal.graph]\nedges = ["exposed -> outcome"]\n\n[causal]\n', 1)
    assert read_graph(nested) is not None
    assert read_graph(base) is None


def _sem_data(seed=0, n=4000):
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, n)
    t = (rng.random(n) < 1 / (1 + np.exp(-1.5 * z))).astype(float)
    m = np.clip(0.5 * t + 0.3 * z + rng.normal(0, 0.2, n), -1, 1)
    y = np.clip(0.2 * t + 0.6 * m - 0.4 * z + rng.normal(0, 0.2, n), -1, 1)
    v = np.column_stack([np.ones(n), z, t, m, y])
    return v, ["1", "z", "exposed", "engagement", "outcome"]


def test_mediation_from_one_gram_direct_plus_indirect_is_total_and_matches_statsmodels():
    import statsmodels.api as sm

    v, names = _sem_data()
    gram = gram_rows(v).sum(axis=0)
    from fedrec.common.causal.graph import _unvech

    full = _unvech(gram, v.shape[1])
    med = mediation(full, names, treatment="exposed", mediator="engagement", outcome="outcome", adjust=["z"])
    assert med.direct[0] + med.indirect[0] == pytest.approx(med.total[0], abs=1e-10)
    z, t, m, y = v[:, 1], v[:, 2], v[:, 3], v[:, 4]
    tot = sm.OLS(y, sm.add_constant(np.column_stack([t, z]))).fit()
    dr = sm.OLS(y, sm.add_constant(np.column_stack([t, m, z]))).fit()
    am = sm.OLS(m, sm.add_constant(np.column_stack([t, z]))).fit()
    assert med.total == pytest.approx((tot.params[1], tot.bse[1]), rel=1e-8)
    assert med.direct == pytest.approx((dr.params[1], dr.bse[1]), rel=1e-8)
    assert med.a == pytest.approx(am.params[1], rel=1e-8) and med.b == pytest.approx(dr.params[2], rel=1e-8)
    sobel = math.hypot(dr.params[2] * am.bse[1], am.params[1] * dr.bse[2])
    assert med.indirect[1] == pytest.approx(sobel, rel=1e-8)
    # the truths: direct 0.2, indirect 0.5 x 0.6 (a little clipping)
    assert abs(med.direct[0] - 0.2) < 4 * med.direct[1] and abs(med.indirect[0] - 0.3) < 4 * med.indirect[1]
    graph = g("z -> exposed", "z -> engagement", "z -> outcome", "exposed -> engagement", "engagement -> outcome",
              "exposed -> outcome", mediators=["engagement"])
    paths = sem_paths(full, names, graph)
    assert paths["engagement -> outcome"]["coef"] == pytest.approx(dr.params[2], rel=1e-8)


def test_the_mediation_se_carries_the_gram_noise():
    v, names = _sem_data(1, n=3000)
    from fedrec.common.causal.graph import _unvech

    rows = gram_rows(v)
    assert np.linalg.norm(rows, axis=1).max() <= gram_bound(v.shape[1])
    exact = rows.sum(axis=0)
    sd = 4.0  # per released coordinate (small next to the Gram's smallest eigenvalue: the linear regime)
    rng = np.random.default_rng(2)
    draws, ses = [], []
    for _ in range(300):
        noisy = _unvech(exact + rng.normal(0, sd, exact.shape), v.shape[1])
        med = mediation(noisy, names, treatment="exposed", mediator="engagement", outcome="outcome", adjust=["z"],
                        noise_var=sd**2)
        draws.append(med.direct[0])
        ses.append(med.direct[1])
    base = mediation(_unvech(exact, v.shape[1]), names, treatment="exposed", mediator="engagement",
                     outcome="outcome", adjust=["z"])
    noise_sd = math.sqrt(max(np.mean(ses) ** 2 - base.direct[1] ** 2, 0.0))
    assert np.std(draws) == pytest.approx(noise_sd, rel=0.2)


def test_sensitivity_measures_reproduce_their_papers_worked_examples():
    from fedrec.common.causal.graph import e_value, robustness_value

    # VanderWeele & Ding (2017): an observed risk ratio of 3.9 has E-value 7.26. Feed it through
    # the continuous-outcome route: d = log(3.9) / 0.91 gives RR = 3.9 exactly.
    d = math.log(3.9) / 0.91
    assert e_value(d, 1e-9, 1.0)["point"] == pytest.approx(7.26, abs=0.01)
    assert e_value(-d, 1e-9, 1.0)["point"] == pytest.approx(7.26, abs=0.01)  # protective: inverted
    assert e_value(0.1, 1.0, 1.0)["ci"] == 1.0  # the CI covers the null
    # Cinelli & Hazlett (2020), Darfur: t = 4.18 on 783 dof -> RV = 13.9%, RV(alpha = .05) = 7.6%
    assert robustness_value(4.18, 1.0, 783) == pytest.approx(0.139, abs=0.0015)
    assert robustness_value(4.18, 1.0, 783, alpha=0.05) == pytest.approx(0.076, abs=0.0015)
    assert robustness_value(0.5, 1.0, 783, alpha=0.05) == 0.0
