"""The LLM adapter's releases at an institution: what the ``train`` and ``evaluate`` handlers of
``client/app.py`` run when the run's model is ``adapter``.

Privacy contract of :func:`adapter_train_reply`: one round releases the delta of the LoRA and
head tensors only (``common/models/adapter.py``), the result of ``event.steps`` Poisson-sampled
steps at ``event.sample_rate``, each the sum over sampled persons of their gradients clipped to
``privacy.clip-norm`` as a whole (one person = all their rows) plus
``N(0, (σ·C)²·noise_share)`` with σ the **charged** event's (``client/train_adapter.py``,
``common/privacy/release.py``). The private person side (profiles from each person's history)
never leaves. Before round 1 the whole run's plan is checked against the budget and policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedrec.client.guard import Refusal, ReleaseGuard
from fedrec.client.train_adapter import AdapterSchedule, AdapterTrainer, ItemBank, plan_adapter_dp
from fedrec.common.config import RunConfig
from fedrec.common.privacy.accountant import NonPrivateEvent

__all__ = ["adapter_state", "adapter_train_release", "adapter_eval_sums", "catalogue_items", "hybrid_components",
           "hybrid_eval_sums"]


@dataclass
class AdapterState:
    trainer: AdapterTrainer
    schedule: AdapterSchedule | None


def catalogue_items(folder: Path, item_ids: np.ndarray):
    """The public catalogue table in the model's dense item order (ratings folders: items.parquet
    or .csv; data-contract folders: the study's items table)."""
    import pandas as pd

    folder = Path(folder)
    if (folder / "study.toml").exists():
        from fedrec.common.datasets import load_institution

        items = load_institution(folder).items
    else:
        from fedrec.common.ratings import CATALOGUE_FILE, _either, _read_table

        items = _read_table(_either(folder, CATALOGUE_FILE))
    items = items.assign(item_id=items["item_id"].astype(str)).set_index("item_id")
    return items.reindex(pd.Index(np.asarray(item_ids).astype(str), name="item_id")).reset_index()


@lru_cache(maxsize=8)
def _state(folder: str, cfg_items: tuple, n_persons: int) -> AdapterState:
    from fedrec.client.app import _load  # the validated institution data (cached)
    from fedrec.common.models.adapter import AdapterConfig, TextAdapter
    from fedrec.common.models.text_prior import catalogue_texts, default_cache_dir, item_embeddings

    cfg = RunConfig.from_flat(dict(cfg_items))
    inst = _load(folder, cfg_items)
    texts = catalogue_texts(catalogue_items(Path(folder), inst.data.item_ids))
    emb = item_embeddings(texts, progress=False)
    adapter = TextAdapter(AdapterConfig(), center=emb.mean(0))
    bank = ItemBank.build(adapter, texts, emb, cache_dir=str(default_cache_dir()))
    trainer = AdapterTrainer(adapter, bank, inst.data.train_person, inst.data.train_item, inst.data.n_persons,
                             lr=cfg.train.lr)
    p, t = cfg.privacy, cfg.train
    schedule = plan_adapter_dp(epsilon=p.epsilon, delta=p.delta, sample_rate=t.sample_rate,
                               steps_per_round=t.local_steps, rounds=t.rounds,
                               clip_norm=p.clip_norm, noise_mode=p.noise_mode, n_min=cfg.n_min,
                               accountant=p.accountant)
    return AdapterState(trainer=trainer, schedule=schedule)


def adapter_state(folder: Path, cfg: RunConfig, n_persons: int) -> AdapterState:
    return _state(str(folder), tuple(sorted(cfg.to_flat().items())), n_persons)


def adapter_train_release(state: AdapterState, guard: ReleaseGuard, cfg: RunConfig, *, share: float, run_id: str,
                          server_round: int, global_arrays: dict[str, np.ndarray], seed: int | None = None
                          ) -> tuple[dict[str, np.ndarray], dict[str, float], object]:
    """Policy-checked, charged round of the adapter: returns (delta, public metrics, charge).
    The caller marks the charge released once the reply is built. ``seed`` fixes this round's
    noise and sampling (simulations only: ``client.app.simulation_seed``; None = OS CSPRNG)."""
    from fedrec.common.privacy.public_inputs import check_model_arrays

    sched = state.schedule
    if sched is not None and server_round <= 1:
        guard.check_plan(sched.run_events(), run_id=run_id)
    try:  # before the charge: names, shapes, finite, bounded (common/privacy/public_inputs.py)
        check_model_arrays(global_arrays, {n: tuple(p.shape) for n, p in
                                           state.trainer.adapter.released_parameters().items()},
                           what="global adapter weights")
    except ValueError as err:
        raise Refusal("policy", str(err)) from None
    event = sched.round_event() if sched is not None else NonPrivateEvent()
    charge = guard.charge(event, run_id=run_id, round=server_round, task="train", model="adapter")
    delta = state.trainer.train_round(global_arrays, event=charge.event if sched is not None else None,
                                      clip_norm=cfg.privacy.clip_norm, noise_share=share,
                                      step_persons=cfg.train.step_persons, steps=cfg.train.local_steps,
                                      sample_rate=cfg.train.sample_rate,
                                      seed=seed)
    noise_sd = 0.0 if sched is None else sched.noise_multiplier * cfg.privacy.clip_norm * math.sqrt(share)
    return delta, {"noise-var": noise_sd**2}, charge


def adapter_eval_sums(state: AdapterState, global_arrays: dict[str, np.ndarray], test_person: np.ndarray,
                      test_item: np.ndarray, negatives: np.ndarray, *, k: int) -> dict[str, float]:
    """Held-out ranking sums of the adapter (1 positive vs the sampled negatives): a release of
    institution data, answered only where the evaluation policy allows (simulations)."""
    from fedrec.common.metrics import ranking_sums

    if len(test_person) == 0:
        return {}
    cand = np.concatenate([np.asarray(test_item)[:, None], np.asarray(negatives)[test_person]], axis=1)
    scores = state.trainer.score(np.asarray(test_person), cand, global_arrays)
    return ranking_sums(scores[:, 0], scores[:, 1:], k)


# ---------------------------------------------------------------------- hybrid (model = hybrid)
@lru_cache(maxsize=8)
def _text_side(folder: str, cfg_items: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(frozen item embeddings of the public catalogue text, each person's private history
    profile). Embeddings: public text through public weights, cached on disk; profiles: the
    institution's own histories, never released."""
    from fedrec.client.app import _load
    from fedrec.common.models.text_prior import catalogue_texts, item_embeddings, person_profiles

    inst = _load(folder, cfg_items)
    emb = item_embeddings(catalogue_texts(catalogue_items(Path(folder), inst.data.item_ids)), progress=False)
    d = inst.data
    return emb, person_profiles(emb, d.train_person, d.train_item, d.n_persons, fallback=_people_fallback(folder, emb))


def _people_fallback(folder: str, emb: np.ndarray) -> np.ndarray | None:
    """Data-contract folders: the profile of a person with no training history is their own
    covariates as text, embedded here (``text_prior.person_texts``; never released). Persons in
    the dense order of ``common.ratings.institution_ratings_from_contract`` (sorted ids of the
    people with an exposed row)."""
    if not (Path(folder) / "study.toml").exists():
        return None
    from fedrec.common.datasets import load_institution
    from fedrec.common.models.text_prior import person_texts, profile_fallback

    data = load_institution(Path(folder))
    ids = np.unique(data.engagement_rows()["person_id"].astype(str).to_numpy())
    people = data.people.assign(_key=data.people["person_id"].astype(str)).set_index("_key").reindex(ids)
    return profile_fallback(person_texts(people, data.study.covariates), emb)


def hybrid_components(folder: Path, cfg: RunConfig, mf_score, counts: np.ndarray, count_noise_var: float,
                      persons: np.ndarray, cands: np.ndarray, *, own_counts: np.ndarray | None = None,
                      mean_weight: float = 1.0) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """The hybrid's component scores ``[len(persons), k]`` for this institution's persons:
    popularity, DP MF (``mf_score(persons, cands)``), the text prior, and each component's
    per-person mean and sd over the person's **whole catalogue**
    (:func:`~fedrec.common.models.hybrid.catalogue_moments`), which :func:`hybrid.blend` z-scores
    with (never the candidates' own spread). Popularity is the institution's own exact counts pooled
    with the released DP counts (:func:`~fedrec.common.models.hybrid.pooled_popularity`) when
    ``own_counts`` (same weighting as the release; ``mean_weight`` its mean per-interaction weight)
    is given, else the DP counts alone. Local scoring of the institution's own people: nothing
    released."""
    from fedrec.common.models.hybrid import catalogue_moments, dp_popularity, pooled_popularity
    from fedrec.common.models.text_prior import text_prior_scores

    emb, prof = _text_side(str(folder), tuple(sorted(cfg.to_flat().items())))
    if len(counts) != len(emb):
        raise ValueError(f"hybrid: {len(counts)} released counts for a catalogue of {len(emb)} items")
    popularity = (dp_popularity(counts, count_noise_var) if own_counts is None
                  else pooled_popularity(counts, count_noise_var, own_counts, mean_weight=mean_weight))
    scorers = {"dp_popularity": lambda p, c: popularity[c], "mf": mf_score,
               "text_prior": lambda p, c: text_prior_scores(prof, emb, p, c)}
    return ({n: f(persons, cands) for n, f in scorers.items()},
            {n: catalogue_moments(f, persons, len(emb)) for n, f in scorers.items()})


def hybrid_eval_sums(folder: Path, cfg: RunConfig, mf_score, counts: np.ndarray, count_noise_var: float,
                     test_person: np.ndarray, test_item: np.ndarray, negatives: np.ndarray, *, k: int,
                     own_counts: np.ndarray | None = None, mean_weight: float = 1.0) -> dict[str, float]:
    """Held-out ranking sums of the hybrid (``common/models/hybrid.DEFAULT_WEIGHTS``; public
    weights fixed before the run): a release of institution data, answered only where the
    evaluation policy allows (simulations)."""
    from fedrec.common.metrics import ranking_sums
    from fedrec.common.models.hybrid import DEFAULT_WEIGHTS, blend

    if len(test_person) == 0:
        return {}
    person = np.asarray(test_person)
    cand = np.concatenate([np.asarray(test_item)[:, None], np.asarray(negatives)[person]], axis=1)
    scores = blend(DEFAULT_WEIGHTS, *hybrid_components(folder, cfg, mf_score, counts, count_noise_var, person, cand,
                                                       own_counts=own_counts, mean_weight=mean_weight))
    return ranking_sums(scores[:, 0], scores[:, 1:], k)
