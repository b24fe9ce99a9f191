"""A study's declared causal graph: the adjustment set by the back-door criterion, refusal of a
non-identifiable study (naming the open path), and linear SEM paths and mediation from one Gram.

Declared in ``study.toml`` (docs/strategies.md)::

    [graph]                       # or [causal.graph]
    treatment = "exposed"         # default
    outcome = "outcome"           # default
    mediators = ["engagement"]    # optional
    latent = ["motivation"]       # unobserved variables (never adjusted for)
    edges = ["age -> exposed", "age -> outcome", "exposed -> engagement",
             "engagement -> outcome", "exposed -> outcome", "motivation -> exposed"]

Every other node is observed and must be a declared covariate. The **adjustment set** is a
minimal set of observed non-descendants of the treatment that d-separates treatment and
outcome once the treatment's outgoing edges are removed (Pearl's back-door criterion),
computed with networkx (``find_minimal_d_separator`` / ``is_d_separator``), not by a
hand-written search. When no such set exists the study is refused **before any budget is
spent**, with a back-door path that every admissible set leaves open.

Mediation (linear SEM, no treatment x mediator interaction): from one Gram matrix ``Σ v v'`` of
``v = [1, Z, T, M, Y]`` the regressions ``Y ~ 1 + T + Z`` (total c), ``M ~ 1 + T + Z`` (a) and
``Y ~ 1 + T + M + Z`` (direct c', b) give ``indirect = a b`` and, for least squares on the same
Gram, ``c = c' + a b`` exactly (at ε = ∞ to numerical precision). SEs: OLS from the Gram plus
the first-order DP noise of the Gram's coordinates; the indirect effect's by the delta method
(Sobel). Privacy: the Gram is a release like the outcome models' (client: one row ``vech(v v')``
per person and item, each coordinate of ``v`` in [-1, 1] by the declared bounds: L2 bound
``(p² + p)/2`` under ``||v||² ≤ p``, :func:`gram_bound`); everything here is post-processing.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np

from fedrec.common.errors import FedrecInputError

__all__ = ["CausalGraph", "parse_graph", "read_graph", "adjustment_set", "open_backdoor_path", "check_identifiable",
           "check_design", "check_study_graph",
           "gram_bound", "gram_rows", "ols_from_gram", "sem_paths", "mediation", "Mediation", "e_value",
           "robustness_value"]


@dataclass(frozen=True)
class CausalGraph:
    """A declared DAG with its treatment, outcome, mediators and latent (unobserved) nodes."""

    dag: nx.DiGraph
    treatment: str = "exposed"
    outcome: str = "outcome"
    mediators: tuple[str, ...] = ()
    latent: frozenset[str] = field(default_factory=frozenset)

    @property
    def observed(self) -> set[str]:
        return set(self.dag.nodes) - set(self.latent)

    def covariates(self) -> set[str]:
        """Observed nodes other than treatment, outcome and mediators."""
        return self.observed - {self.treatment, self.outcome, *self.mediators}


def _edge(text: str, where: str) -> tuple[str, str]:
    a, arrow, b = str(text).partition("->")
    a, b = a.strip(), b.strip()
    if not arrow or not a or not b:
        raise FedrecInputError(f"{where}: edge {text!r} is not 'A -> B'; fix: write edges = [\"age -> exposed\", ...]")
    return a, b


def parse_graph(table: Mapping, where: str = "study.toml [graph]") -> CausalGraph:
    """A :class:`CausalGraph` from a ``[graph]`` table; FedrecInputError (one line) for a bad
    edge, a cycle (named), or a treatment/outcome/mediator that is not a node."""
    if not isinstance(table, Mapping):
        raise FedrecInputError(f"{where}: is not a table; fix: write [graph] with edges = [...]")
    unknown = sorted(set(table) - {"treatment", "outcome", "mediators", "latent", "edges"})
    if unknown:
        raise FedrecInputError(f"{where}: {unknown[0]!r} is not a graph key; fix: use treatment, outcome, mediators, "
                               "latent, edges")
    edges = table.get("edges", [])
    if not isinstance(edges, list) or not edges:
        raise FedrecInputError(f"{where}: edges must be a non-empty list; fix: edges = [\"age -> exposed\", ...]")
    g = nx.DiGraph()
    g.add_edges_from(_edge(e, where) for e in edges)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join([cycle[0][0]] + [e[1] for e in cycle])
        raise FedrecInputError(f"{where}: the graph has a cycle {path}; fix: a causal graph must be acyclic")
    t, y = str(table.get("treatment", "exposed")), str(table.get("outcome", "outcome"))
    med = tuple(str(m) for m in table.get("mediators", []))
    lat = frozenset(str(v) for v in table.get("latent", []))
    for role, name in [("treatment", t), ("outcome", y)] + [("mediator", m) for m in med]:
        if name not in g:
            raise FedrecInputError(f"{where}: the {role} {name!r} is not in any edge; fix: add its edges")
        if name in lat:
            raise FedrecInputError(f"{where}: the {role} {name!r} is declared latent; fix: it must be observed")
    if not nx.has_path(g, t, y):
        raise FedrecInputError(f"{where}: no directed path {t} -> ... -> {y}: the graph says the treatment has no "
                               "effect; fix: add the treatment's edges")
    return CausalGraph(g, t, y, med, lat)


def read_graph(study_toml: Path | str) -> CausalGraph | None:
    """The graph a ``study.toml`` declares (``[graph]`` or ``[causal.graph]``), or None."""
    text = Path(study_toml).read_text(encoding="utf-8") if isinstance(study_toml, Path) else str(study_toml)
    doc = tomllib.loads(text)
    if "graph" in doc:
        return parse_graph(doc["graph"])
    causal = doc.get("causal", {})
    if isinstance(causal, Mapping) and "graph" in causal:
        return parse_graph(causal["graph"], "study.toml [causal.graph]")
    return None


def _backdoor_graph(g: CausalGraph) -> nx.DiGraph:
    bd = g.dag.copy()
    bd.remove_edges_from(list(g.dag.out_edges(g.treatment)))
    return bd


def _admissible(g: CausalGraph) -> set[str]:
    """Observed non-descendants of the treatment (other than treatment and outcome)."""
    return g.observed - nx.descendants(g.dag, g.treatment) - {g.treatment, g.outcome}


def adjustment_set(g: CausalGraph) -> set[str] | None:
    """A minimal back-door adjustment set (networkx), or None when none exists."""
    bd = _backdoor_graph(g)
    allowed = _admissible(g)
    z = nx.find_minimal_d_separator(bd, {g.treatment}, {g.outcome}, restricted=allowed)
    if z is None:
        return None
    assert nx.is_d_separator(bd, {g.treatment}, {g.outcome}, set(z))
    return set(z)


def _path_open(dag: nx.DiGraph, path: Sequence[str], z: set[str]) -> bool:
    """Is ``path`` (a sequence of adjacent nodes) d-connecting given ``z``?"""
    for i in range(1, len(path) - 1):
        a, m, b = path[i - 1], path[i], path[i + 1]
        collider = dag.has_edge(a, m) and dag.has_edge(b, m)
        if collider:
            if m not in z and not (nx.descendants(dag, m) & z):
                return False
        elif m in z:
            return False
    return True


def _render(dag: nx.DiGraph, path: Sequence[str]) -> str:
    out = path[0]
    for a, b in zip(path, path[1:]):
        out += f" -> {b}" if dag.has_edge(a, b) else f" <- {b}"
    return out


def open_backdoor_path(g: CausalGraph, z: set[str] | None = None) -> str | None:
    """A back-door path (into the treatment) left open by ``z`` (default: every admissible
    observed variable), rendered ``exposed <- U -> outcome``; None when all are blocked."""
    z = _admissible(g) if z is None else set(z)
    bd = _backdoor_graph(g)
    und = bd.to_undirected(as_view=True)
    for path in sorted(nx.all_simple_paths(und, g.treatment, g.outcome), key=len):
        if bd.has_edge(path[1], g.treatment) and _path_open(bd, path, z):
            return _render(bd, path)
    return None


def check_identifiable(g: CausalGraph, declared: Sequence[str] = ()) -> list[str]:
    """The adjustment set (sorted), or FedrecInputError naming the open back-door path.

    ``declared``: the study's declared covariates; an observed node that is neither one of
    them nor the treatment, outcome or a mediator is refused (it could not be measured)."""
    if declared:
        undeclared = sorted(g.covariates() - set(declared))
        if undeclared:
            raise FedrecInputError(f"study.toml [graph]: {undeclared[0]!r} is observed in the graph but not a declared "
                                   "covariate; fix: declare it in [covariates] or list it under latent")
    z = adjustment_set(g)
    if z is None:
        path = open_backdoor_path(g)
        latent = sorted(set(path.replace("<-", " ").replace("->", " ").split()) & set(g.latent)) if path else []
        why = f" ({', '.join(latent)} not observed)" if latent else ""
        raise FedrecInputError(f"study.toml [graph]: the effect of {g.treatment} on {g.outcome} is not identifiable by "
                               f"adjustment: the back-door path {path} stays open{why}; fix: measure and declare the "
                               "variable on it, or remove the edge if it does not exist")
    return sorted(z)


def check_design(g: CausalGraph, design: Sequence[str]) -> None:
    """Does adjusting for the run's design covariates (``design``, names as declared; columns such
    as ``sex=male`` count as ``sex``) block every back-door path? FedrecInputError (one line)
    naming a descendant of the treatment in the design, or the back-door path it leaves open."""
    used = {str(c).split("=", 1)[0] for c in design} & set(g.dag.nodes)
    bad = sorted(used & nx.descendants(g.dag, g.treatment))
    if bad:
        raise FedrecInputError(f"study.toml [causal.graph]: the design adjusts for {bad[0]!r}, which the graph makes "
                               f"an effect of {g.treatment} (adjusting for it biases the effect); fix: drop it from "
                               "[causal] covariates")
    path = open_backdoor_path(g, used)
    if path is not None:
        need = ", ".join(sorted(adjustment_set(g) or ()))
        raise FedrecInputError(f"study.toml [causal.graph]: the design's covariates leave the back-door path {path} "
                               f"open; fix: add {need or 'the variables on it'} to [causal] covariates")


def check_study_graph(table: Mapping | None, declared: Sequence[str], design: Sequence[str] | None = None
                      ) -> list[str] | None:
    """The identifiability check every causal run makes **before any budget is spent** (the
    simulation CLI and the server's study query): None when the study declares no graph; else
    the back-door adjustment set, or FedrecInputError (one line) naming the open back-door path
    (:func:`check_identifiable`) or the design's flaw (:func:`check_design`). A pure function of
    public declarations: releases nothing, charges nothing."""
    if table is None:
        return None
    g = parse_graph(table, "study.toml [causal.graph]")
    z = check_identifiable(g, declared)
    if design is not None:
        check_design(g, design)
    return z


# --------------------------------------------------------------------------- Gram -> SEM
def gram_bound(p: int) -> float:
    """L2 bound of one row ``vech(v v')`` with ``|v_k| <= 1`` (p coordinates): ``||v||² <= p``
    and ``||vech(v v')|| <= ||v v'||_F = ||v||²``."""
    return float(p)


def gram_rows(v: np.ndarray) -> np.ndarray:
    """Per row ``vech(v v')`` (upper triangle with diagonal, row-major)."""
    p = v.shape[1]
    iu = np.triu_indices(p)
    return (v[:, :, None] * v[:, None, :])[:, iu[0], iu[1]]


def _unvech(x: np.ndarray, p: int) -> np.ndarray:
    m = np.zeros((p, p))
    m[np.triu_indices(p)] = x
    return m + np.triu(m, 1).T


@dataclass(frozen=True)
class OLSFit:
    coef: np.ndarray
    cov: np.ndarray
    names: tuple[str, ...]


def ols_from_gram(gram: np.ndarray, names: Sequence[str], target: str, regressors: Sequence[str], *,
                  noise_var: float = 0.0) -> OLSFit:
    """Least squares of ``target`` on ``regressors`` from the Gram ``Σ v v'`` over ``names``
    (``names[0]`` the constant 1, so ``gram[0, 0] = n``). ``cov``: OLS sampling covariance
    ``s² A⁻¹`` plus the first-order DP noise (``noise_var`` per released Gram coordinate)."""
    from fedrec.common.causal.nuisance import ridge_noise_input_cov

    idx = {n: i for i, n in enumerate(names)}
    r = [idx[x] for x in regressors]
    t = idx[target]
    a = gram[np.ix_(r, r)]
    c = gram[r, t]
    coef = np.linalg.solve(a, c)
    n = float(gram[0, 0])
    rss = float(gram[t, t] - 2 * coef @ c + coef @ a @ coef)
    s2 = max(rss / max(n - len(r), 1.0), 0.0)
    ainv = np.linalg.inv(a)
    cov = s2 * ainv
    if noise_var > 0:
        cov = cov + ainv @ ridge_noise_input_cov(coef, noise_var) @ ainv
    return OLSFit(coef, cov, tuple(regressors))


def sem_paths(gram: np.ndarray, names: Sequence[str], g: CausalGraph, *, noise_var: float = 0.0
              ) -> dict[str, dict[str, float]]:
    """Linear SEM path coefficients: each observed node with observed parents regressed on them
    (with a constant) from the Gram; ``{"A -> B": {"coef", "se"}}``. Nodes missing from
    ``names`` are skipped (a latent parent makes that equation's paths biased: not reported)."""
    out: dict[str, dict[str, float]] = {}
    for node in nx.topological_sort(g.dag):
        parents = [p for p in g.dag.predecessors(node)]
        if node not in names or not parents or any(p not in names for p in parents):
            continue
        fit = ols_from_gram(gram, names, node, [names[0], *parents], noise_var=noise_var)
        for k, p in enumerate(parents, start=1):
            out[f"{p} -> {node}"] = {"coef": float(fit.coef[k]), "se": float(math.sqrt(max(fit.cov[k, k], 0.0)))}
    return out


@dataclass(frozen=True)
class Mediation:
    """Total, direct and indirect (through the mediator) effect, each (estimate, SE)."""

    total: tuple[float, float]
    direct: tuple[float, float]
    indirect: tuple[float, float]
    a: float
    b: float

    def to_json(self) -> dict:
        return {k: {"estimate": v[0], "se": v[1]} for k, v in
                (("total", self.total), ("direct", self.direct), ("indirect", self.indirect))} | {"a": self.a, "b": self.b}


def mediation(gram: np.ndarray, names: Sequence[str], *, treatment: str, mediator: str, outcome: str,
              adjust: Sequence[str], noise_var: float = 0.0) -> Mediation:
    """Linear mediation from one Gram (module doc): ``total = direct + indirect`` exactly for
    least squares on the same Gram; SEs with the Gram's DP noise, the indirect's by Sobel."""
    one = names[0]
    tot = ols_from_gram(gram, names, outcome, [one, treatment, *adjust], noise_var=noise_var)
    am = ols_from_gram(gram, names, mediator, [one, treatment, *adjust], noise_var=noise_var)
    dr = ols_from_gram(gram, names, outcome, [one, treatment, mediator, *adjust], noise_var=noise_var)
    a, va = float(am.coef[1]), float(am.cov[1, 1])
    b, vb = float(dr.coef[2]), float(dr.cov[2, 2])
    se = lambda v: float(math.sqrt(max(v, 0.0)))  # noqa: E731
    return Mediation(total=(float(tot.coef[1]), se(tot.cov[1, 1])), direct=(float(dr.coef[1]), se(dr.cov[1, 1])),
                     indirect=(a * b, se(b * b * va + a * a * vb)), a=a, b=b)


# --------------------------------------------------------------------------- sensitivity
def e_value(estimate: float, se: float, outcome_sd: float, *, alpha: float = 0.05) -> dict[str, float]:
    """E-values of an effect on a continuous outcome (VanderWeele & Ding 2017): the risk ratio
    is approximated from the standardized difference ``d = estimate / outcome_sd`` by
    ``RR = exp(0.91 d)``; ``E = RR + sqrt(RR (RR − 1))`` (RR < 1 inverted first). ``point``: for
    the estimate; ``ci``: for the CI limit nearest the null (1 when the CI covers it) — how strong
    an unobserved confounder, associated with both treatment and outcome by that risk ratio,
    would have to be to explain the effect (or its significance) away. Post-processing of an
    estimate, its SE and the outcome's released spread: no budget."""
    from scipy.stats import norm

    if not (outcome_sd > 0 and se >= 0):
        raise ValueError(f"e_value needs outcome_sd > 0 and se >= 0, got {outcome_sd}, {se}")

    def ev(effect: float) -> float:
        rr = math.exp(0.91 * effect / outcome_sd)
        rr = 1.0 / rr if rr < 1 else rr
        return rr + math.sqrt(rr * (rr - 1.0))

    z = float(norm.ppf(1 - alpha / 2))
    lo, hi = estimate - z * se, estimate + z * se
    near = 0.0 if lo <= 0 <= hi else (lo if estimate > 0 else hi)
    return {"point": ev(estimate), "ci": ev(near)}


def robustness_value(estimate: float, se: float, dof: float, *, q: float = 1.0, alpha: float | None = None) -> float:
    """Robustness value (Cinelli & Hazlett 2020): the share of residual variance of both the
    treatment and the outcome an unobserved confounder must explain to move the estimate by
    ``q`` x itself (``alpha``: to make the (1 − alpha) CI reach the moved value). From the
    t-statistic ``estimate / se`` and the residual degrees of freedom: ``f = q |t| / sqrt(dof)``,
    ``RV = (sqrt(f⁴ + 4 f²) − f²) / 2`` (``f`` less the critical ``t / sqrt(dof − 1)`` with
    ``alpha``; 0 when that is not positive). Post-processing: no budget."""
    from scipy.stats import t as student_t

    if not (se > 0 and dof > 1):
        raise ValueError(f"robustness_value needs se > 0 and dof > 1, got {se}, {dof}")
    f = q * abs(estimate / se) / math.sqrt(dof)
    if alpha is not None:
        crit = float(student_t.ppf(1 - alpha / 2, dof - 1)) / math.sqrt(dof - 1)
        f = f - crit
        if f <= 0:
            return 0.0
    return 0.5 * (math.sqrt(f**4 + 4 * f**2) - f**2)
