"""LLM adapter vs its peers on MovieLens or the generated catalogue domain, warm and cold-start, in one run.

``--dataset movielens`` (671 persons) or ``--dataset catalogue`` (``simulations/domains/catalogue.py``:
``--people`` persons, default 20,000, ``--items`` generated programmes with text, default 600,
generated from ``--seed``).

Rows (ARCHITECTURE.md "Benchmarks"): ``dataset, model, split, epsilon, ndcg10, hr10`` with model
random | popularity | category_knn | text_knn | mf | text_prior | adapter | dp_popularity |
pooled_popularity | hybrid,
plus rows ``kind=throughput, device, ratio_dp_to_nonprivate`` (DP and plain steps on the same
persons and rows, interleaved, medians). ``dp_popularity`` and ``hybrid`` rows come once per MF-side
DP plan (:data:`HYBRID_VARIANTS`: count share 0.18 or 0.9 of the budget, local or distributed
noise; columns ``count_share``, ``noise_mode``), each with the popularity component
``popularity = dp`` (the released DP counts) and ``popularity = pooled`` (the institution's own
exact counts pooled with the DP release by inverse variance, ``hybrid.pooled_popularity``). Adapter rows also on the validation splits
(``val_warm``/``val_cold``: training data only). ``--tune-lr`` trains only the adapter and prints
validation rows; ``--no-adapter`` skips the adapter (the hybrid as the Flower app runs it).
``--via-flower EPS`` also runs the **real Flower hybrid** (Ray, SecAgg+, ledgers, ``model = hybrid``)
on this run's training split and scores the same warm and cold tasks with what it released (rows
``via = flower``; :func:`flower_hybrid`).

Protocol (seeded): 20% of the items with >= 5 ratings are **cold**: all their ratings are held
out of training. Each cold rating is ranked against 99 cold items its person never rated (cold
split). The remaining (warm) ratings are split 80/20 per person; each warm test rating is ranked
against 99 warm items its person never rated (warm split). Training data are the warm 80%;
the hybrid's blend weights are chosen on a validation split *of the training data* (10% of each
person's training ratings, and 20% of the training items with >= 5 ratings held out as
pseudo-cold), never on test. The hybrid z-scores each component with the mean and sd of the
person's scores over the whole catalogue (``hybrid.catalogue_moments``, as the Flower hybrid
does), then reads off the candidates; the fixed-weight rows also report the blend z-scored per
candidate row (``candidate_z_ndcg10``, the scoring before issue 30's fix) and each component's
spread (``sd_<component>_candidates`` / ``_catalogue``, medians over rows). Persons are spread
over ``--institutions`` federated institutions (in-process federation: each round every
institution runs its local steps from the global weights; the server applies the mean delta). DP: person-level, local noise, ε per
institution for the whole run (δ = 1e-5).

Usage: ``python benchmarks/adapter.py [--quick]`` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedrec.client.train import MFTrainer, plan_dp  # noqa: E402
from fedrec.client.train_adapter import AdapterTrainer, ItemBank, measure_throughput, plan_adapter_dp  # noqa: E402
from fedrec.common.config import RunConfig  # noqa: E402
from fedrec.common.metrics import ranking_from_scores  # noqa: E402
from fedrec.common.models.adapter import AdapterConfig, TextAdapter, default_device  # noqa: E402
from fedrec.common.models.hybrid import (  # noqa: E402
    DEFAULT_WEIGHTS,
    blend,
    catalogue_moments,
    dp_popularity,
    fit_blend,
    pooled_popularity,
)
from fedrec.common.models.mf import PersonRatings, preconditioner, score_items  # noqa: E402
from fedrec.common.models.text_prior import (  # noqa: E402
    catalogue_texts,
    default_cache_dir,
    item_embeddings,
    load_encoder,
    person_profiles,
    text_prior_scores,
)
from fedrec.common.ratings import load_movielens  # noqa: E402

DELTA = 1e-5
#: the hybrid's MF-side DP plans: (name, privacy.count-budget-share, privacy.noise-mode)
HYBRID_VARIANTS = (("default", 0.18, "local"), ("count90", 0.9, "local"), ("distributed", 0.18, "distributed"),
                   ("count90_distributed", 0.9, "distributed"))


def log(msg: str) -> None:
    print(f"[adapter-bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- splits
def per_person_split(person: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask: ``fraction`` of each person's rows (at least one kept for training)."""
    out = np.zeros(len(person), bool)
    order = np.argsort(person, kind="stable")
    bounds = np.flatnonzero(np.diff(np.concatenate([[-1], person[order], [-2]])))
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        k = int(round(fraction * len(rows)))
        k = min(k, len(rows) - 1)
        if k > 0:
            out[rng.choice(rows, size=k, replace=False)] = True
    return out


def cold_items(item: np.ndarray, n_items: int, fraction: float, rng: np.random.Generator, min_ratings: int = 5
               ) -> np.ndarray:
    counts = np.bincount(item, minlength=n_items)
    eligible = np.flatnonzero(counts >= min_ratings)
    return np.sort(rng.choice(eligible, size=int(round(fraction * len(eligible))), replace=False))


def negatives_for(person: np.ndarray, item: np.ndarray, pool: np.ndarray, n_persons: int, k: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[P, k'] items from ``pool`` each person never interacted with (k' = min(k, fewest available))."""
    rated = [set() for _ in range(n_persons)]
    for u, i in zip(person.tolist(), item.tolist()):
        rated[u].add(i)
    pool_set = set(pool.tolist())
    k = min(k, min(len(pool_set - r) for r in rated))
    out = np.empty((n_persons, k), np.int64)
    for u in range(n_persons):
        out[u] = rng.choice(np.array(sorted(pool_set - rated[u])), size=k, replace=False)
    return out


class Task:
    """Positives (person, item) and each person's negatives: one ranking evaluation."""

    def __init__(self, person: np.ndarray, item: np.ndarray, negatives: np.ndarray):
        self.person, self.item, self.neg = person, item, negatives
        self.cands = np.concatenate([item[:, None], negatives[person]], axis=1)  # [n, 1 + k]

    def metrics(self, scores: np.ndarray) -> dict[str, float]:
        ndcg, hit = ranking_from_scores(scores[:, 0], scores[:, 1:], 10)
        return {"ndcg10": round(float(ndcg.mean()), 4), "hr10": round(float(hit.mean()), 4)}


# ---------------------------------------------------------------------- peers
def knn_scores(vectors: np.ndarray, hist_p: np.ndarray, hist_i: np.ndarray, persons: np.ndarray, cands: np.ndarray,
               k: int = 20) -> np.ndarray:
    """Item kNN: mean of the ``k`` largest cosines between a candidate and the person's history."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    order = np.argsort(hist_p, kind="stable")
    hp, hi = hist_p[order], hist_i[order]
    out = np.zeros(cands.shape, np.float64)
    by_person = np.argsort(persons, kind="stable")
    ps = persons[by_person]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    for a, b in zip(starts, np.r_[starts[1:], len(ps)]):
        u = ps[a]
        rows = by_person[a:b]
        h = hi[np.searchsorted(hp, u):np.searchsorted(hp, u, side="right")]
        if len(h) == 0:
            continue
        sims = v[cands[rows]] @ v[h].T  # [r, c, n_hist]
        kk = min(k, len(h))
        out[rows] = np.partition(sims, len(h) - kk, axis=-1)[..., -kk:].mean(-1)  # mean of the k largest
    return out


def genre_vectors(items) -> np.ndarray:
    """One-hot genres (MovieLens ``genres``) or categories (a contract catalogue's ``category``)."""
    col = "genres" if "genres" in items.columns else "category"
    g = items[col].fillna("").astype(str).str.get_dummies("|")
    return g.to_numpy(np.float32)


def own_counts(hist_p: np.ndarray, hist_i: np.ndarray, owner: np.ndarray, K: int, n_items: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each institution's exact weighted item counts ``[K, n_items]`` (w_u = 1/√n_u, as the MF
    count release weighs them) and each one's mean per-interaction weight ``[K]`` (never released)."""
    n_u = np.bincount(hist_p, minlength=len(owner)).astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(n_u[hist_p], 1.0))
    inst = owner[hist_p]
    out = np.zeros((K, n_items))
    np.add.at(out, (inst, hist_i), w)
    mean_w = np.array([w[inst == k].mean() if (inst == k).any() else 1.0 for k in range(K)])
    return out, mean_w


def pooled_scores(counts, noise_var, own, mean_w, owner, persons, cands) -> np.ndarray:
    """``hybrid.pooled_popularity`` for each person's own institution, on their candidates."""
    return pooled_scorer(counts, noise_var, own, mean_w, owner)(persons, cands)


def pooled_scorer(counts, noise_var, own, mean_w, owner):
    """fn(persons, cands): ``hybrid.pooled_popularity`` of each person's own institution (each
    institution's vector computed once)."""
    pop = np.stack([pooled_popularity(counts, noise_var, own[k], mean_weight=mean_w[k]) for k in range(len(own))])

    def score(persons: np.ndarray, cands: np.ndarray) -> np.ndarray:
        return pop[owner[np.asarray(persons)][:, None], cands]

    return score


def cap_task(task: "Task", max_rows: int, rng: np.random.Generator) -> "Task":
    """At most ``max_rows`` positives of a (validation) task, drawn at random (0 = all)."""
    if not max_rows or len(task.person) <= max_rows:
        return task
    keep = np.sort(rng.choice(len(task.person), size=max_rows, replace=False))
    return Task(task.person[keep], task.item[keep], task.neg)


def mf_model(train_p, train_i, train_r, owner, n_persons, n_items, K, epsilon, seed, count_share=0.18,
             noise_mode="local"):
    """In-process federated MF (as the Flower run does it): DP counts (``count_share`` of the
    budget, ``privacy.count-budget-share``) -> public step sizes -> ``rounds`` summed DP rounds.
    Returns (score fn, DP popularity counts, public count noise variance of the sum)."""
    cfg = RunConfig().override(**{"institutions": K, "seed": seed, "privacy.epsilon": epsilon, "rounds": 2,
                                  "privacy.count-budget-share": count_share, "privacy.noise-mode": noise_mode})
    share = 1.0 if noise_mode == "local" else 1.0 / K  # distributed: each adds σ²/K, the sum carries σ²
    trainers, maps = [], []
    for k in range(K):
        rows = owner[train_p] == k
        persons = np.flatnonzero(owner == k)
        local = np.full(n_persons, -1)
        local[persons] = np.arange(len(persons))
        pr = PersonRatings.from_arrays(local[train_p[rows]], train_i[rows], train_r[rows], len(persons))
        t = MFTrainer(pr, n_items, cfg, seed=seed + 17 * k)
        sched = plan_dp(cfg)
        trainers.append((t, sched))
        maps.append(local)
    counts = sum(t.item_counts(None if s is None else s.count_event(), noise_share=share) for t, s in trainers)
    count_noise_var = sum(0.0 if s is None else s.count_noise_std(share) ** 2 for _, s in trainers)
    noise_var = sum(0.0 if s is None else s.noise_std(share) ** 2 for _, s in trainers)
    precond = preconditioner(counts, cfg.train.item_reg, noise_var, cfg.train.item_prior_var)
    g = trainers[0][0].item_side.to_numpy()
    for _ in range(cfg.train.rounds):
        deltas = [t.train_round(g, precond, event=None if s is None else s.round_event(), noise_share=share)
                  for t, s in trainers]
        g = {key: g[key] + cfg.train.server_lr * sum(d[key] for d in deltas) for key in g}
    for t, _ in trainers:
        t.refit(g)

    def score(persons: np.ndarray, cands: np.ndarray) -> np.ndarray:
        out = np.zeros(cands.shape)
        for k, (t, _) in enumerate(trainers):
            rows = owner[persons] == k
            if rows.any():
                out[rows] = score_items(t.item_side, t.user, torch.as_tensor(maps[k][persons[rows]]),
                                        torch.as_tensor(cands[rows])).numpy()
        return out

    return score, np.asarray(counts, np.float64), count_noise_var


def adapter_model(adapter: TextAdapter, bank: ItemBank, train_p, train_i, owner, n_persons, K, epsilon, *, rounds,
                  sample_rate, steps, lr, server_lr, clip, pos, neg, candidates, seed, score_items_needed):
    """In-process federated DP adapter; returns the score fn (each institution scores its own)."""
    init = adapter.to_numpy()
    trainers, maps = [], []
    for k in range(K):
        persons = np.flatnonzero(owner == k)
        local = np.full(n_persons, -1)
        local[persons] = np.arange(len(persons))
        rows = owner[train_p] == k
        t = AdapterTrainer(adapter, bank, local[train_p[rows]], train_i[rows], len(persons), lr=lr,
                           pos_per_person=pos, neg_per_person=neg, candidate_items=candidates, seed=seed + 31 * k)
        sched = plan_adapter_dp(epsilon=epsilon, delta=DELTA, sample_rate=sample_rate,
                                steps_per_round=steps, rounds=rounds, clip_norm=clip)
        trainers.append((t, sched))
        maps.append(local)
    g = {key: v.copy() for key, v in init.items()}
    from tqdm.auto import tqdm

    for _ in tqdm(range(rounds), desc=f"adapter rounds eps={epsilon}", file=sys.stderr, leave=False):
        deltas = [t.train_round(g, event=None if s is None else s.round_event(),
                                clip_norm=clip, steps=steps, sample_rate=sample_rate,
                                # public step denominator: the design's mean persons per institution
                                step_persons=n_persons / K)
                  for t, s in trainers]
        g = {key: g[key] + server_lr * np.mean([d[key] for d in deltas], axis=0) for key in g}
    adapter.load_numpy(g)
    z = np.zeros((bank.n_items, bank.emb.shape[1]), np.float32)
    need = torch.as_tensor(score_items_needed)
    z[score_items_needed] = adapter.item_vectors(bank.hidden[need], bank.mask[need])
    w = adapter.top.head.weight.detach().float().cpu().numpy()[0]
    adapter.load_numpy(init)  # leave the shared model untouched for the next caller
    sigma = None if trainers[0][1] is None else trainers[0][1].noise_multiplier

    def score(persons: np.ndarray, cands: np.ndarray) -> np.ndarray:
        out = np.zeros(cands.shape)
        for k, (t, _) in enumerate(trainers):
            rows = owner[persons] == k
            if rows.any():
                prof = t._profiles(maps[k][persons[rows]], None)
                out[rows] = np.take_along_axis((prof * w) @ z.T, cands[rows], axis=1)
        return out

    return score, sigma


# ---------------------------------------------------------------------- hybrid
def fit_task_blend(components: dict[str, np.ndarray], moments: dict[str, tuple], task: Task) -> dict[str, float]:
    """Blend weights maximising NDCG@10 on one validation task (``common/models/hybrid``), each
    component z-scored with its catalogue ``moments`` (as the Flower hybrid scores)."""
    return fit_blend({n: [v] for n, v in components.items()}, lambda s, _t: task.metrics(s)["ndcg10"],
                     moments={n: [m] for n, m in moments.items()})


# ---------------------------------------------------------------------- the real Flower hybrid
def flower_hybrid(*, work: Path, pid_of: np.ndarray, iid_of: np.ndarray, items_table, train_rows, test_rows,
                  owner: np.ndarray, K: int, epsilon: float, seed: int, rounds: int, tasks: dict,
                  n_items: int) -> tuple[list[dict], dict]:
    """Run the real Flower hybrid (``simulations.run.run_simulation``: Ray, SecAgg+, the real
    ledgers, ``model = hybrid``) on this run's split and score the benchmark's own tasks with
    what it released.

    The institution folders hold exactly the benchmark's training rows of each institution's
    persons (``owner``) and, as their test rows, the benchmark's warm test rows. The server's
    last evaluation round is captured in this process (the ServerApp runs in a thread here):
    the global MF arrays and the released DP counts with their noise variance — what every
    client's ``evaluate`` receives. Each institution is then rebuilt as its client builds itself
    (``client.app._load`` / ``_trainer`` + ``refit``) and scores the benchmark's warm and cold
    tasks with ``client/adapter_round.hybrid_components`` and ``DEFAULT_WEIGHTS`` (pooled
    popularity, MF, text prior). As a check that this is the Flower client's scoring, the same
    in-process path also recomputes the Flower run's own reported metric (its test rows against
    its clients' own sampled negatives): row ``split = flower_eval``, ``ndcg10`` (reported) vs
    ``recomputed_ndcg10`` must agree.
    Returns (rows, meta)."""
    import pandas as pd

    import fedrec.server.app as server_app
    from fedrec.client import app as client_app
    from fedrec.client.adapter_round import hybrid_components, hybrid_eval_sums
    from fedrec.common.metrics import add_sums, finalize, ranking_sums
    from fedrec.common.models.mf import score_items, weighted_item_counts
    from fedrec.common.ratings import CATALOGUE_FILE, TRAIN_FILE, read_ratings_file, write_institution_ratings
    from fedrec.simulations.run import run_simulation

    tp, ti, tr = train_rows
    wp, wi, wr = test_rows
    data = work / "data"
    for k in range(K):
        a, b = owner[tp] == k, owner[wp] == k
        write_institution_ratings(data / f"institution_{k:02d}", person_ids=pid_of, item_ids=iid_of,
                                  train=(tp[a], ti[a], tr[a]), test=(wp[b], wi[b], wr[b]), catalogue=items_table)
    overrides = {"dataset": "movielens", "institutions": K, "rounds": rounds, "privacy.epsilon": epsilon,
                 "seed": seed, "sim.noise-seed": seed, "model": "hybrid", "data-dir": str(data)}
    cfg = RunConfig().override(**overrides)
    if not cfg.secagg.enabled:
        raise RuntimeError("the Flower hybrid must run over SecAgg+ (secagg.enabled is off in the defaults)")
    captured: dict = {}
    original = server_app.evaluate_round

    def capture(grid, nodes, arrays, server_round, steps=None, hybrid=False):
        if steps is not None:  # exactly what the evaluate message carries (counts as float32)
            captured.update(round=server_round, arrays={n: np.array(v) for n, v in arrays.items()},
                            counts=np.asarray(steps.counts, np.float32).copy(),
                            noise_var=float(steps.count_noise_var))
        return original(grid, nodes, arrays, server_round, steps, hybrid=hybrid)

    t0 = time.time()
    server_app.evaluate_round = capture
    try:
        history = run_simulation(cfg, work / "out", quiet=True, allow_non_private=not math.isfinite(epsilon))
    finally:
        server_app.evaluate_round = original
    flower_s = time.time() - t0
    if not captured:
        raise RuntimeError("the Flower hybrid run sent no evaluation with DP counts (was model = hybrid honoured?)")
    last = next(r for r in history["rounds"] if r["round"] == captured["round"])

    def ids(x) -> pd.Index:
        return pd.Index(np.asarray(x).astype(str))

    all_counts = np.bincount(ti, minlength=n_items).astype(np.float64)  # exact popularity (the peer)
    cfg_items = tuple(sorted(cfg.to_flat().items()))
    covered = {split: np.zeros(len(t.person), bool) for split, t in tasks.items()}
    scores = {split: np.zeros(t.cands.shape) for split, t in tasks.items()}
    flower_sums, pop_sums = [], []
    for k in range(K):
        folder = data / f"institution_{k:02d}"
        inst = client_app._load(str(folder), cfg_items)
        trainer = client_app._trainer(inst, cfg)
        trainer.refit(captured["arrays"])

        def mf_score(persons: np.ndarray, cands: np.ndarray, trainer=trainer) -> np.ndarray:
            with torch.no_grad():
                return score_items(trainer.item_side, trainer.user, torch.as_tensor(persons),
                                   torch.as_tensor(cands)).numpy()

        own = weighted_item_counts(trainer.ratings, trainer.item_side.n_items).numpy().astype(np.float64)
        mean_w = float(own.sum()) / max(int(trainer.ratings.item.numel()), 1)
        d = inst.data
        flower_sums.append(hybrid_eval_sums(folder, cfg, mf_score, captured["counts"], captured["noise_var"],
                                            d.test_person, d.test_item, inst.negatives, k=10, own_counts=own,
                                            mean_weight=mean_w))
        bench_item = ids(iid_of).get_indexer(ids(d.item_ids))  # local dense item -> benchmark item
        local_item = ids(d.item_ids).get_indexer(ids(iid_of))  # benchmark item -> local dense item
        if (bench_item < 0).any() or (local_item < 0).any():
            raise RuntimeError(f"{folder.name}: its catalogue is not the benchmark's (item ids differ)")
        cand = np.concatenate([d.test_item[:, None], inst.negatives[d.test_person]], axis=1)
        pc = all_counts[bench_item[cand]]
        pop_sums.append(ranking_sums(pc[:, 0], pc[:, 1:], 10))
        local_person = np.full(len(pid_of), -1)
        train_ids = read_ratings_file(folder / TRAIN_FILE, items_path=folder / CATALOGUE_FILE).person_ids
        where = ids(pid_of).get_indexer(ids(train_ids))
        if (where < 0).any():
            raise RuntimeError(f"{folder.name}: a training person is not one of the benchmark's persons")
        local_person[where] = np.arange(len(train_ids))
        for split, task in tasks.items():
            rows = (owner[task.person] == k) & (local_person[task.person] >= 0)
            if rows.any():
                comps, moments = hybrid_components(folder, cfg, mf_score, captured["counts"], captured["noise_var"],
                                                   local_person[task.person[rows]], local_item[task.cands[rows]],
                                                   own_counts=own, mean_weight=mean_w)
                scores[split][rows] = blend(DEFAULT_WEIGHTS, comps, moments)
                covered[split][rows] = True
    weights = " ".join(f"{n}={w}" for n, w in DEFAULT_WEIGHTS.items())
    plan = {"via": "flower", "rounds": rounds, "count_share": cfg.privacy.count_budget_share,
            "noise_mode": cfg.privacy.noise_mode if math.isfinite(epsilon) else "none", "secagg": True}
    e = epsilon if math.isfinite(epsilon) else None
    rows: list[dict] = []
    for split, task in tasks.items():
        keep = covered[split]
        sub = Task(task.person[keep], task.item[keep], task.neg)
        rows.append({"model": "hybrid", "split": split, "epsilon": e, **sub.metrics(scores[split][keep]),
                     "positives": int(keep.sum()), "positives_in_split": len(keep), "weights": weights,
                     "popularity": "pooled", **plan})
        rows.append({"model": "popularity", "split": split, "epsilon": None,
                     **sub.metrics(all_counts[sub.cands]), "positives": int(keep.sum()),
                     "positives_in_split": len(keep), "via": "flower",
                     "note": "exact counts, on the same positives as the Flower hybrid's row"})
    recomputed, pop_flower = finalize(add_sums(flower_sums)), finalize(add_sums(pop_sums))
    rows.append({"model": "hybrid", "split": "flower_eval", "epsilon": e,
                 "ndcg10": round(float(last["ndcg10"]), 4), "hr10": round(float(last["hr10"]), 4),
                 "recomputed_ndcg10": round(recomputed["ndcg10"], 4), "recomputed_hr10": round(recomputed["hr10"], 4),
                 "recompute_abs_diff": float(abs(recomputed["ndcg10"] - last["ndcg10"])), "weights": weights,
                 "popularity": "pooled", **plan,
                 "note": "the Flower run's own reported metric: warm test rows vs its clients' sampled negatives"})
    rows.append({"model": "popularity", "split": "flower_eval", "epsilon": None,
                 "ndcg10": round(pop_flower["ndcg10"], 4), "hr10": round(pop_flower["hr10"], 4), "via": "flower",
                 "note": "exact counts, on the Flower clients' own candidates"})
    eps_spent = [float(v) for v in last.get("epsilon", {}).values()]
    meta = {"flower_wall_s": round(flower_s, 1), "flower_rounds": rounds, "flower_eval_round": captured["round"],
            "flower_institutions_reporting": len(eps_spent), "flower_contributors": last.get("contributors"),
            "flower_epsilon_spent_max": max(eps_spent) if eps_spent else None,
            "flower_count_noise_var": captured["noise_var"], "flower_secagg": True,
            "flower_command_equivalent": f"fedrec-sim run --data DIR -k {K} -r {rounds} --epsilon {epsilon:g} "
                                         f"--seed {seed} --set model=hybrid (DIR: this run's split)"}
    return rows, meta


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run (subset of persons and items)")
    ap.add_argument("--dataset", choices=("movielens", "catalogue"), default="movielens")
    ap.add_argument("--people", type=int, default=20_000, help="catalogue: persons generated")
    ap.add_argument("--items", type=int, default=600, help="catalogue: items generated")
    ap.add_argument("--variants", default=",".join(v[0] for v in HYBRID_VARIANTS),
                    help="comma list of the MF-side DP plans to run (names of HYBRID_VARIANTS)")
    ap.add_argument("--adapter-epsilons", default="", help="comma list: train the adapter only at these ε "
                    "(default: every --epsilons)")
    ap.add_argument("--throughput-persons", type=int, default=0, help="persons per timed step (0: 128; quick 32)")
    ap.add_argument("--throughput-repeats", type=int, default=0, help="timed pairs (0: 7; quick 3)")
    ap.add_argument("--skip-knn", action="store_true", help="skip the category/text kNN peer rows (slow on long "
                    "MovieLens histories; measured in earlier runs)")
    ap.add_argument("--no-throughput", action="store_true", help="skip the DP vs non-private throughput rows")
    ap.add_argument("--val-rows", type=int, default=0, help="at most this many validation positives per split "
                    "for the blend's grid search (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--persons", type=int, default=0, help="subsample persons (0 = all 671; quick: 60 persons on the 600 most-rated items)")
    ap.add_argument("--institutions", type=int, default=10)
    ap.add_argument("--epsilons", default="8,inf", help="comma list of per-institution ε (inf = non-private)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sample-rate", type=float, default=1.0, help="public Poisson sampling rate of each DP-SGD step (1 = all)")
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--pos", type=int, default=None)
    ap.add_argument("--neg", type=int, default=None)
    ap.add_argument("--top-layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--lean-eps1", action="store_true", help="at ε = 1 only the default hybrid variant")
    ap.add_argument("--no-adapter", action="store_true", help="skip training the adapter (no adapter rows; the "
                    "hybrid blends DP popularity, MF and the text prior, as the Flower hybrid does)")
    ap.add_argument("--via-flower", default="", metavar="EPSILONS", help="comma list of ε: also run the real "
                    "Flower hybrid (fedrec-sim's run_simulation: Ray, SecAgg+, ledgers, model = hybrid) on this "
                    "split at each and score the warm and cold tasks with what it released (rows via = flower)")
    ap.add_argument("--flower-rounds", type=int, default=2, help="rounds of the Flower hybrid run (2: the MF plan "
                    "the in-process hybrid and DEFAULT_WEIGHTS use)")
    ap.add_argument("--tune-lr", default="", help="comma list of adapter lrs: train only the adapter for each and "
                    "print its validation rows (training data only; run on a seed never used for the headline)")
    args = ap.parse_args(argv)
    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    quick = args.quick
    rounds = args.rounds if args.rounds is not None else (2 if quick else 5)
    pos = args.pos if args.pos is not None else (1 if quick else 2)
    neg = args.neg if args.neg is not None else (1 if quick else 2)
    K = 2 if quick else args.institutions
    epsilons = [float(e) for e in args.epsilons.split(",")]
    adapter_eps = [float(e) for e in args.adapter_epsilons.split(",")] if args.adapter_epsilons else epsilons
    known = {v[0] for v in HYBRID_VARIANTS}
    variant_names = [v for v in args.variants.split(",") if v]
    if not variant_names or set(variant_names) - known:
        print(f"--variants {args.variants!r}: unknown plan; fix: use names from {sorted(known)}", file=sys.stderr)
        return 2
    if args.dataset == "catalogue" and args.quick:
        print("--quick is MovieLens only; fix: use --dataset catalogue --people 2000 for a small catalogue run",
              file=sys.stderr)
        return 2

    try:
        flower_eps = [float(e) for e in args.via_flower.split(",") if e.strip()]
    except ValueError:
        flower_eps = [-1.0]
    if any(not e > 0 for e in flower_eps):
        print(f"--via-flower {args.via_flower!r}: not a comma list of positive ε; fix: e.g. --via-flower 8",
              file=sys.stderr)
        return 2
    if flower_eps and (args.tune_lr or args.flower_rounds < 1):
        print("--via-flower: needs --flower-rounds >= 1 and no --tune-lr; fix: drop --tune-lr or raise "
              "--flower-rounds", file=sys.stderr)
        return 2
    if args.dataset == "catalogue":
        from fedrec.simulations.domains.catalogue import generate_catalogue

        r, _truth = generate_catalogue(people=args.people, items=args.items, seed=args.seed)
    else:
        r = load_movielens()
    person, item = r.person.copy(), r.item.copy()
    n_persons = r.n_persons
    keep_items = np.arange(r.n_items)
    pid_of = np.asarray(r.person_ids)  # source ids of the dense persons (the Flower folders use them)
    n_sub = 0 if args.dataset == "catalogue" else args.persons or (60 if quick else 0)
    if n_sub and n_sub < n_persons:  # subsample persons (quick: and the 600 most-rated items)
        if quick:
            top = np.argsort(-np.bincount(item, minlength=r.n_items), kind="stable")[:600]
            in_top = np.isin(item, top)
            person, item, base_rating = person[in_top], item[in_top], r.rating[in_top]
        else:
            base_rating = r.rating
        eligible = np.flatnonzero(np.bincount(person, minlength=n_persons) >= 10)
        chosen = np.sort(rng.choice(eligible, size=min(n_sub, len(eligible)), replace=False))
        n_sub = len(chosen)
        pid_of = pid_of[chosen]
        pmap = np.full(n_persons, -1)
        pmap[chosen] = np.arange(n_sub)
        rows = pmap[person] >= 0
        keep_items = np.unique(item[rows])
        imap = np.full(r.n_items, -1)
        imap[keep_items] = np.arange(len(keep_items))
        person, item = pmap[person[rows]], imap[item[rows]]
        rating = base_rating[rows]
        n_persons = n_sub
    else:
        rating = r.rating
    items_table = r.items.iloc[keep_items].reset_index(drop=True)
    iid_of = np.asarray(r.item_ids)[keep_items]
    n_items = len(items_table)
    texts = catalogue_texts(items_table)
    log(f"{n_persons} persons, {n_items} items, {len(person)} ratings")

    # --- splits: cold items (all ratings out), warm 80/20 per person, validation inside train
    cold = cold_items(item, n_items, 0.2, rng)
    is_cold = np.isin(item, cold)
    warm_test = per_person_split(np.where(is_cold, -1, person), 0.2, rng) & ~is_cold
    train = ~is_cold & ~warm_test
    tp, ti, tr = person[train], item[train], rating[train]
    val_cold = cold_items(ti, n_items, 0.2, rng)
    v_is_cold = np.isin(ti, val_cold)
    v_warm = per_person_split(np.where(v_is_cold, -1, tp), 0.1, rng) & ~v_is_cold
    fit = ~v_is_cold & ~v_warm
    fp, fi, fr = tp[fit], ti[fit], tr[fit]
    warm_pool = np.setdiff1d(np.arange(n_items), cold)
    fit_pool = np.setdiff1d(warm_pool, val_cold)
    neg_k = 99
    tasks = {
        "warm": Task(person[warm_test], item[warm_test], negatives_for(person, item, warm_pool, n_persons, neg_k, rng)),
        "cold": Task(person[is_cold], item[is_cold], negatives_for(person, item, cold, n_persons, neg_k, rng)),
    }
    val_tasks = {
        "warm": Task(tp[v_warm], ti[v_warm], negatives_for(tp, ti, fit_pool, n_persons, neg_k, rng)),
        "cold": Task(tp[v_is_cold], ti[v_is_cold], negatives_for(tp, ti, val_cold, n_persons, neg_k, rng)),
    }
    val_tasks = {split: cap_task(t, args.val_rows, rng) for split, t in val_tasks.items()}
    owner = rng.integers(0, K, size=n_persons)
    needed = np.arange(n_items)  # the hybrid z-scores the adapter over each person's whole catalogue
    log(f"cold items {len(cold)}, warm test {warm_test.sum()}, cold test {is_cold.sum()}, "
        f"val warm {v_warm.sum()}, val cold {v_is_cold.sum()}")

    # --- public text side (cached per catalogue)
    encoder = load_encoder()
    emb = item_embeddings(texts, encoder=encoder, cache_dir=args.cache_dir, progress=True)
    genres = genre_vectors(items_table)
    acfg = AdapterConfig(top_layers=args.top_layers, rank=args.rank)
    adapter = TextAdapter(acfg, center=emb.mean(0), encoder=encoder)
    bank = ItemBank.build(adapter, texts, emb, cache_dir=args.cache_dir)
    log(f"adapter: {adapter.n_trainable()} trainable parameters (LoRA r={acfg.rank} on "
        f"{','.join(acfg.target_modules)} of the top {acfg.top_layers} layers + head)")

    rows: list[dict] = []

    def add(model: str, split: str, eps: float | None, m: dict, **extra) -> None:
        e = None if eps is None or not math.isfinite(eps) else eps
        rows.append({"dataset": args.dataset, "model": model, "split": split, "epsilon": e, **m, **extra})
        log(f"{model:12s} {split:5s} eps={e}: {m}")

    # scorers trained on (hist_p, hist_i[, hist_r]): returns fn(persons, cands)
    def text_side(hp, hi):
        prof = person_profiles(emb, hp, hi, n_persons)
        return {
            "text_prior": lambda p, c: text_prior_scores(prof, emb, p, c),
            "text_knn": lambda p, c: knn_scores(emb, hp, hi, p, c),
            "category_knn": lambda p, c: knn_scores(genres, hp, hi, p, c),
        }

    def popularity(hp, hi):
        counts = np.bincount(hi, minlength=n_items).astype(float)
        return lambda p, c: counts[c]

    # --- validation-time models (trained on the fit part) and test-time models (all training data)
    val_scorers = text_side(fp, fi)
    test_scorers = text_side(tp, ti)
    val_scorers["popularity"], test_scorers["popularity"] = popularity(fp, fi), popularity(tp, ti)
    rand = np.random.default_rng(args.seed + 99)
    for split, task in ([] if args.tune_lr else tasks.items()):  # tuning computes no test rows
        add("random", split, None, task.metrics(rand.random(task.cands.shape)))
        for name in ("popularity", "text_prior") if args.skip_knn else ("popularity", "category_knn", "text_knn",
                                                                           "text_prior"):
            add(name, split, None, task.metrics(test_scorers[name](task.person, task.cands)))

    if args.tune_lr:  # validation only: no test rows are computed
        for lr in [float(x) for x in args.tune_lr.split(",")]:
            for eps in epsilons:
                t0 = time.time()
                ad_score, sigma = adapter_model(
                    adapter, bank, fp, fi, owner, n_persons, K, eps, rounds=rounds,
                    sample_rate=args.sample_rate, steps=args.local_steps, lr=lr, server_lr=args.server_lr,
                    clip=args.clip, pos=pos, neg=neg, candidates=fit_pool, seed=args.seed, score_items_needed=needed)
                for split, task in val_tasks.items():
                    add("adapter", f"val_{split}", eps, task.metrics(ad_score(task.person, task.cands)), lr=lr,
                        train_s=round(time.time() - t0, 1))
        print(json.dumps({"meta": {"command": "python benchmarks/adapter.py " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv),
                                   "seed": args.seed, "purpose": "adapter lr tuning on validation"}, "rows": rows}))
        return 0
    own_val, own_test = own_counts(fp, fi, owner, K, n_items), own_counts(tp, ti, owner, K, n_items)
    for eps in epsilons:
        t0 = time.time()
        # the adapter is trained once, on the fit part (validation never enters its training)
        ad_score, sigma = (None, None) if args.no_adapter or eps not in adapter_eps else adapter_model(
            adapter, bank, fp, fi, owner, n_persons, K, eps, rounds=rounds, sample_rate=args.sample_rate,
            steps=args.local_steps, lr=args.lr, server_lr=args.server_lr, clip=args.clip, pos=pos, neg=neg,
            candidates=fit_pool, seed=args.seed, score_items_needed=needed)
        ad_s = time.time() - t0
        log(f"adapter eps={eps}: {ad_s:.1f}s, sigma={sigma}")
        extra = {"rounds": rounds, "sigma": None if sigma is None else round(sigma, 4), "train_s": round(ad_s, 1),
                 "lr": args.lr}
        for split, task in (tasks.items() if ad_score is not None else ()):
            add("adapter", split, eps, task.metrics(ad_score(task.person, task.cands)), **extra)
        for split, task in (val_tasks.items() if ad_score is not None else ()):  # what lr was chosen on
            add("adapter", f"val_{split}", eps, task.metrics(ad_score(task.person, task.cands)), **extra)

        def comps(mf, counts, noise_var, scorers, task, pooled=None):
            """(candidate scores, catalogue moments) of each component, as
            ``client/adapter_round.hybrid_components`` computes them for the Flower hybrid."""
            if pooled is None:
                pop = dp_popularity(counts, noise_var)
                fns = {"dp_popularity": lambda p, c: pop[c]}
            else:
                fns = {"dp_popularity": pooled_scorer(counts, noise_var, *pooled, owner)}
            fns.update({"mf": mf, "text_prior": scorers["text_prior"]})
            if ad_score is not None:
                fns["adapter"] = ad_score
            return ({n: f(task.person, task.cands) for n, f in fns.items()},
                    {n: catalogue_moments(f, task.person, n_items) for n, f in fns.items()})

        # the MF side's DP plan: the default budget split (counts 18%) and a hybrid that spends 90%
        # on the counts it mostly uses; local noise (each institution adds all of it) and distributed
        # (SecAgg+: each adds 1/K of the variance); at ε = ∞ they coincide
        variants = [v for v in HYBRID_VARIANTS if v[0] in variant_names] if math.isfinite(eps) else [
            ("default", 0.18, "local")]
        for vname, share, mode in variants:
            if eps == 1.0 and vname != "default" and args.lean_eps1:
                continue
            t0 = time.time()
            mf_val, cnt_val, cv_val = mf_model(fp, fi, fr, owner, n_persons, n_items, K, eps, args.seed, share, mode)
            mf_test, cnt_test, cv_test = mf_model(tp, ti, tr, owner, n_persons, n_items, K, eps, args.seed, share, mode)
            log(f"mf eps={eps} {vname}: {time.time() - t0:.1f}s")
            plan = {"count_share": share, "noise_mode": mode if math.isfinite(eps) else "none"}
            for split, task in tasks.items():
                if vname == "default":
                    add("mf", split, eps, task.metrics(mf_test(task.person, task.cands)), **plan)
                add("dp_popularity", split, eps, task.metrics(dp_popularity(cnt_test, cv_test)[task.cands]), **plan)
                add("pooled_popularity", split, eps, task.metrics(
                    pooled_scores(cnt_test, cv_test, *own_test, owner, task.person, task.cands)), **plan)
                for pop, pv, pt in (("dp", None, None), ("pooled", own_val, own_test)):
                    weights = fit_task_blend(*comps(mf_val, cnt_val, cv_val, val_scorers, val_tasks[split], pv),
                                             val_tasks[split])
                    m = task.metrics(blend(weights, *comps(mf_test, cnt_test, cv_test, test_scorers, task, pt)))
                    add("hybrid", split, eps, m, **plan, popularity=pop,
                        weights=" ".join(f"{k}={v}" for k, v in weights.items()))
                # the Flower hybrid's fixed public weights (DEFAULT_WEIGHTS, pooled popularity), in-process,
                # on the validation split (what a weight choice may look at) and on test
                fixed = " ".join(f"{k}={v}" for k, v in DEFAULT_WEIGHTS.items())
                for tag, t_, args_ in ((f"val_{split}", val_tasks[split], (mf_val, cnt_val, cv_val, val_scorers, own_val)),
                                       (split, task, (mf_test, cnt_test, cv_test, test_scorers, own_test))):
                    mf_, cnt_, cv_, sc_, own_ = args_
                    c_, mom_ = comps(mf_, cnt_, cv_, sc_, t_, own_)
                    # diagnostics (issue 30): each weighted component's spread among a row's sampled
                    # candidates vs over the person's catalogue (medians over rows), and the blend
                    # z-scored per candidate row (the scoring before the catalogue moments)
                    scale = {}
                    for n, w in DEFAULT_WEIGHTS.items():
                        if w:
                            scale[f"sd_{n}_candidates"] = round(float(np.median(c_[n].std(axis=1))), 4)
                            scale[f"sd_{n}_catalogue"] = round(float(np.median(mom_[n][1])), 4)
                    old = t_.metrics(blend(DEFAULT_WEIGHTS, c_))
                    add("hybrid", tag, eps, t_.metrics(blend(DEFAULT_WEIGHTS, c_, mom_)),
                        **plan, popularity="pooled", weights=fixed, fixed_weights=True, **scale,
                        candidate_z_ndcg10=old["ndcg10"], candidate_z_hr10=old["hr10"])

    flower_meta: dict = {}
    if flower_eps:  # the real Flower hybrid on this split, scored on the same tasks
        import shutil
        import tempfile

        for eps in flower_eps:
            work = Path(tempfile.mkdtemp(prefix="fedrec-adapter-flower-"))
            try:
                f_rows, f_meta = flower_hybrid(
                    work=work, pid_of=pid_of, iid_of=iid_of, items_table=items_table, train_rows=(tp, ti, tr),
                    test_rows=(person[warm_test], item[warm_test], rating[warm_test]), owner=owner, K=K,
                    epsilon=eps, seed=args.seed, rounds=args.flower_rounds, tasks=tasks, n_items=n_items)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            for row in f_rows:
                rows.append({"dataset": args.dataset, **row})
                log(f"flower {row['model']:10s} {row['split']:11s} eps={row['epsilon']}: ndcg10={row['ndcg10']}")
            flower_meta[f"{eps:g}"] = f_meta

    # --- throughput: one DP step (hooks + per-person clip + noise) vs one plain step, same rows
    if not args.no_throughput:
        tput_trainer = AdapterTrainer(adapter, bank, fp, fi, n_persons, pos_per_person=pos, neg_per_person=neg,
                                      candidate_items=fit_pool, seed=args.seed)
        persons_tp = args.throughput_persons or (32 if quick else 128)
        tp_rows = measure_throughput(tput_trainer, persons=persons_tp,
                                     repeats=args.throughput_repeats or (3 if quick else 7))
        rows.append({"kind": "throughput", "dataset": args.dataset, "device": default_device(),
                     "dp_persons_per_s": round(tp_rows["dp"], 2), "nonprivate_persons_per_s": round(tp_rows["nonprivate"], 2),
                     "ratio_dp_to_nonprivate": round(tp_rows["dp"] / tp_rows["nonprivate"], 3),
                     "ratio_median_of_pairs": round(tp_rows["ratio_median_of_pairs"], 3), "repeats": tp_rows["repeats"],
                     "persons_per_step": persons_tp, "torch_threads": torch.get_num_threads(),
                     "method": "same persons and rows, interleaved plain/DP after a warm-up, medians"})

    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=root).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--", "benchmarks", "client", "common", "server"],
                          capture_output=True, text=True, cwd=root).stdout.strip():
            commit += "+uncommitted"
    except OSError:
        commit = ""
    meta = {
        "command": "python benchmarks/adapter.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit, "seed": args.seed, "quick": quick, "dataset": args.dataset,
        "adapter_epsilons": None if args.no_adapter else adapter_eps, "variants": variant_names,
        "flower_epsilons": flower_eps or None,
        "val_rows_cap": args.val_rows, "knn_peers": not args.skip_knn, "persons": n_persons, "items": n_items,
        "institutions": K, "rounds": rounds, "local_steps": args.local_steps, "sample_rate": args.sample_rate,
        "lr": args.lr, "server_lr": args.server_lr, "adapter_trained": not args.no_adapter, "clip_norm": args.clip, "pos_per_person": pos,
        "neg_per_person": neg, "delta": DELTA, "noise_mode": "local",
        "adapter_trainable_params": adapter.n_trainable(), "adapter_rank": acfg.rank, "adapter_top_layers": acfg.top_layers,
        "encoder_sha256": adapter.weights_sha256, "cold_items": int(len(cold)),
        "protocol": "1 positive vs 99 sampled unrated items of the same split (warm: warm items; cold: cold items)",
        "blend": "components z-scored per person over the person's whole catalogue (all items; hybrid."
                 "catalogue_moments), then read off at the candidates; weights by grid search on a validation "
                 "split of the training data (or DEFAULT_WEIGHTS: fixed_weights rows and the Flower rows)",
        "hybrid_variants": [list(v) for v in HYBRID_VARIANTS], "gpu": "none lent to this task: CPU only",
        "torch_threads": torch.get_num_threads(), "flower": flower_meta or None,
        "wall_s": round(time.time() - t_start, 1),
    }
    print(json.dumps({"meta": meta, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
