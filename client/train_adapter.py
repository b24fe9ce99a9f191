"""Local person-level DP-SGD for the LLM adapter (LoRA + head on a pretrained text encoder).

Mirrors :class:`fedrec.client.train.MFTrainer`: an :class:`AdapterTrainer` holds one
institution's histories and its private person profiles; :meth:`AdapterTrainer.train_round`
starts from the global released tensors (LoRA A/B and the head), runs this round's DP-SGD steps
and returns the delta of the released tensors only; :meth:`AdapterTrainer.score` ranks items
for this institution's own people (local, nothing released).

One DP sample is **one person with all their records**. Per step, persons are Poisson-sampled
at rate ``q``; each sampled person contributes ``pos_per_person`` positive rows (items from
their history, scored against their leave-one-out profile) and ``neg_per_person`` negative rows
(catalogue items they never interacted with); Opacus' hooks give per-row gradients, rows are
summed per person and each person's sum clipped to ``C``
(:func:`fedrec.common.models.adapter.person_clipped_sum`), and Gaussian noise ``σ·C·√share`` is
added once per step (:func:`fedrec.common.models.adapter.privatize`). The step is plain SGD,
``θ ← θ − lr · noised_sum / B`` with the public fixed denominator ``B = q · step_persons`` (run
config ``step-persons``; never the institution's own count ``n``, which is private), so the round's
delta is linear in the noise (what distributed noise needs; a server-side optimiser is
post-processing).

Privacy contract of :meth:`AdapterTrainer.train_round`: the delta is post-processing of
``event.steps`` Poisson-subsampled Gaussian steps with rate ``event.sample_rate``, per-person
sensitivity ``clip_norm`` and noise std ``σ · C · √noise_share`` with σ =
``event.noise_multiplier``, where ``event`` is the round's ``DPSGDEvent`` that the caller
charged to the ledger before calling (``AdapterSchedule.round_event()``). The person profiles, histories and the negative samples never leave.
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.common.models.adapter import (
    TextAdapter,
    flatten,
    per_row_gradients,
    person_clipped_sum,
    privatize,
    unflatten,
)
from fedrec.common.privacy.accountant import DPSGDEvent, calibrate_for_events
from fedrec.common.privacy.release import check_clip_norm, check_sample_rate, realizable_rate

__all__ = ["AdapterSchedule", "plan_adapter_dp", "ItemBank", "AdapterTrainer", "measure_throughput"]


@dataclass(frozen=True)
class AdapterSchedule:
    """The run's DP plan for the adapter at one institution, calibrated once for all rounds."""

    #: σ of the released aggregate (what the accountant composes)
    noise_multiplier: float
    #: the share of σ² this institution adds (1 local, 1/n_min distributed)
    noise_share: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    clip_norm: float

    def round_event(self) -> DPSGDEvent:
        """The mechanism one round releases: charge it before :meth:`AdapterTrainer.train_round`."""
        return DPSGDEvent(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                          steps=self.steps_per_round)

    def run_events(self) -> list[DPSGDEvent]:
        return [self.round_event()] * self.rounds


def plan_adapter_dp(*, epsilon: float, delta: float, sample_rate: float, steps_per_round: int,
                    rounds: int, clip_norm: float, noise_mode: str = "local", n_min: int = 1,
                    accountant: str = "prv") -> AdapterSchedule | None:
    """σ such that ``rounds × steps_per_round`` Poisson-subsampled Gaussian steps at the public
    ``sample_rate`` (1 = every person in every step) spend ``epsilon``.

    Privacy contract: nothing here reads the institution's data — σ, the sample rate and the
    events charged are functions of public run-config values only. Returns None for ε = inf
    (non-private: simulations only). Distributed noise needs one local step per round.
    """
    if not math.isfinite(epsilon):
        return None
    check_sample_rate(sample_rate)  # before any charge (common/privacy/release.py): one range for the knobs
    check_clip_norm(clip_norm)
    if noise_mode == "distributed" and steps_per_round != 1:
        raise ValueError("distributed noise needs steps_per_round=1: a second local step builds on an update "
                         "carrying only σ²/n_min of the noise")
    q = float(sample_rate)

    def events(s: float) -> list[DPSGDEvent]:
        return [DPSGDEvent(noise_multiplier=s, sample_rate=q, steps=steps_per_round)] * rounds

    sigma = calibrate_for_events(events, target_epsilon=epsilon, delta=delta, accountant=accountant)
    share = 1.0 if noise_mode == "local" else 1.0 / max(n_min, 1)
    return AdapterSchedule(noise_multiplier=sigma, noise_share=share, sample_rate=q, steps_per_round=steps_per_round,
                           rounds=rounds, clip_norm=clip_norm)


@dataclass
class ItemBank:
    """Public per-catalogue state: frozen lower-layer states of every item text, the frozen
    sentence embeddings (the person tower reads these) and the catalogue centre. Built from
    public text and public weights only; shared by every institution and every round."""

    hidden: torch.Tensor  # [n_items, L, H] (float16 or float32)
    mask: torch.Tensor  # [n_items, L]
    emb: np.ndarray  # [n_items, H] frozen unit-norm embeddings
    center: np.ndarray  # [H]

    @classmethod
    def build(cls, adapter: TextAdapter, texts: list[str], emb: np.ndarray, *, cache_dir: str | None = None,
              dtype: torch.dtype = torch.float16, progress: bool = True) -> ItemBank:
        hidden, mask = adapter.lower_states(texts, dtype=dtype, cache_dir=cache_dir, progress=progress)
        return cls(hidden=hidden, mask=mask, emb=np.asarray(emb, np.float32), center=np.asarray(emb, np.float32).mean(0))

    @property
    def n_items(self) -> int:
        return len(self.emb)


class AdapterTrainer:
    """One institution's adapter state: its histories, private profiles and noise generator.

    ``person``/``item`` are the institution's training interactions (dense local person index,
    global catalogue item index). ``candidate_items`` (default: the whole catalogue) is where
    negatives are drawn from.
    """

    def __init__(self, adapter: TextAdapter, bank: ItemBank, person: np.ndarray, item: np.ndarray, n_persons: int, *,
                 lr: float = 0.5, pos_per_person: int = 2, neg_per_person: int = 2,
                 candidate_items: np.ndarray | None = None, chunk_rows: int = 256, seed: int | None = None,
                 progress: bool = False):
        self.adapter, self.bank = adapter, bank
        self.n_persons = int(n_persons)
        self.lr, self.pos, self.neg, self.chunk_rows, self.progress = lr, pos_per_person, neg_per_person, chunk_rows, progress
        person, item = np.asarray(person, np.int64), np.asarray(item, np.int64)
        order = np.argsort(person, kind="stable")
        self.hist_item = item[order]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(person, minlength=self.n_persons))])
        self.rated = [set(self.hist_item[self.indptr[u]:self.indptr[u + 1]].tolist()) for u in range(self.n_persons)]
        # private person tower: sum of the centred frozen embeddings of each history (never released)
        centred = bank.emb - bank.center
        self.profile_sum = np.zeros((self.n_persons, bank.emb.shape[1]), np.float64)
        np.add.at(self.profile_sum, person, centred[item])
        self.candidates = np.arange(bank.n_items) if candidate_items is None else np.asarray(candidate_items, np.int64)
        # who has an unrated candidate to draw negatives from (someone who rated all of them
        # would make the rejection sampling below loop forever: such a person is skipped, as
        # one without a second item is; a skipped sampled person adds a zero gradient)
        cand = set(self.candidates.tolist())
        self.has_negative = np.array([len(r & cand) < len(cand) for r in self.rated], dtype=bool)  # O(|r|) each
        # DP noise and sampling must be unpredictable to the server: OS-seeded unless a test pins them
        self.noise_rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self.sample_rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed + 1)
        self._item_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ rows
    def _profiles(self, persons: np.ndarray, leave_out: np.ndarray | None) -> np.ndarray:
        s = self.profile_sum[persons].copy()
        if leave_out is not None:
            s -= self.bank.emb[leave_out] - self.bank.center
        return (s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _rows(self, persons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(row person slot, item, label, profile) for the sampled persons."""
        slot, items, labels, leave = [], [], [], []
        for k, u in enumerate(persons):
            lo, hi = self.indptr[u], self.indptr[u + 1]
            # a leave-one-out profile needs a second item; a negative, an unrated candidate
            if hi - lo < 2 or not self.has_negative[u]:
                continue
            for i in self.hist_item[self.sample_rng.integers(lo, hi, size=self.pos)]:
                slot.append(k), items.append(i), labels.append(1.0), leave.append(True)
            got = 0
            while got < self.neg:
                c = int(self.candidates[self.sample_rng.integers(len(self.candidates))])
                if c not in self.rated[u]:
                    slot.append(k), items.append(c), labels.append(0.0), leave.append(False)
                    got += 1
        slot_a, item_a = np.asarray(slot, np.int64), np.asarray(items, np.int64)
        prof = np.zeros((len(slot_a), self.bank.emb.shape[1]), np.float32)
        if len(slot_a):
            lv = np.asarray(leave)
            prof[lv] = self._profiles(persons[slot_a[lv]], item_a[lv])
            prof[~lv] = self._profiles(persons[slot_a[~lv]], None)
        return slot_a, item_a, np.asarray(labels, np.float32), prof

    def _batch(self, items: np.ndarray, prof: np.ndarray, labels: np.ndarray):
        m = self.bank.mask[items]
        n = max(1, int(m.sum(1).max()))  # trim the padding the whole chunk shares
        dev = self.adapter.device
        return (self.bank.hidden[items, :n].to(dev, torch.float32), m[:, :n].to(dev),
                torch.as_tensor(prof, device=dev), torch.as_tensor(labels, device=dev))

    # ------------------------------------------------------------------ gradients
    def _gs_model(self):
        return self.adapter.grad_sample_module()

    def clipped_gradient_sum(self, persons: np.ndarray, clip_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ over ``persons`` of each person's clipped gradient (flattened, name order): the
        sensitivity-``clip_norm`` sum :func:`privatize` needs. Internal: not a release."""
        slot, items, labels, prof = self._rows(persons)
        dim = self.adapter.n_trainable()
        if len(slot) == 0:
            return torch.zeros(dim, dtype=torch.float64), {"clipped_fraction": 0.0, "rows": 0}
        grads = []
        for s in range(0, len(slot), self.chunk_rows):
            sl = slice(s, s + self.chunk_rows)
            g, _ = per_row_gradients(self._gs_model(), *self._batch(items[sl], prof[sl], labels[sl]))
            grads.append(flatten(g).detach())
        total, norms, scale = person_clipped_sum(torch.cat(grads), torch.as_tensor(slot), len(persons), clip_norm)
        active = torch.zeros(len(persons), dtype=torch.bool)
        active[torch.as_tensor(np.unique(slot))] = True
        return total, {"clipped_fraction": float((scale[active] < 1).float().mean()), "rows": len(slot)}

    def gradient_sum(self, persons: np.ndarray) -> torch.Tensor:
        """Non-private Σ of the persons' gradients (one plain backward; ε = ∞ runs only)."""
        slot, items, labels, prof = self._rows(persons)
        params = self.adapter.released_parameters()
        for p in params.values():
            p.grad = None
        with self.adapter.plain_mode():
            for s in range(0, len(slot), self.chunk_rows):
                sl = slice(s, s + self.chunk_rows)
                h, m, pr, y = self._batch(items[sl], prof[sl], labels[sl])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.adapter.top(h, m, pr), y,
                                                                            reduction="sum")
                loss.backward()
        out = flatten({n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}, rows=False)
        for p in params.values():
            p.grad = None
        return out.detach().to(torch.float64)

    # ------------------------------------------------------------------ release
    def train_round(self, global_arrays: dict[str, np.ndarray], *, event: DPSGDEvent | None, clip_norm: float,
                    step_persons: float, noise_share: float = 1.0, steps: int = 1, sample_rate: float = 1.0,
                    seed: int | None = None) -> dict[str, np.ndarray]:
        """This round's local steps from the global LoRA + head tensors; returns the delta of the
        released tensors (nothing else: diagnostics stay in ``self.last_stats``, local).

        ``event`` is the **charged** round event (``AdapterSchedule.round_event()``): its σ,
        sample rate and step count drive the noise, the Poisson sampling and the number of steps
        (``steps``/``sample_rate`` are then ignored). Each step releases the sum over
        sampled persons of their gradients clipped to ``clip_norm`` (one person = all their
        rows) plus ``N(0, (σ·clip_norm)²·noise_share)`` per coordinate, moved by
        ``lr / (q · step_persons)``: a **public** fixed denominator (the fixed-denominator
        estimator of DP-FedAvg, McMahan et al. 2018). Dividing by the institution's own number
        of persons instead would scale the whole noised sum by a private count — under
        add/remove-one-person neighbours that is not post-processing, and one person could move
        the release by about twice the charged sensitivity. ``event=None`` is the non-private
        path (ε = ∞; only where the institution's policy allows it): ``steps`` plain steps at
        ``sample_rate``.

        ``seed`` (simulations only) re-seeds this round's noise and Poisson sampling so that a
        same-seed simulation repeats exactly; None keeps the trainer's generators (OS-seeded
        unless the trainer was built with a seed).
        """
        if seed is not None:
            self.noise_rng = np.random.default_rng(seed)
            self.sample_rng = np.random.default_rng([seed, 1])
        if event is not None and not isinstance(event, DPSGDEvent):
            raise TypeError(f"train_round needs the charged DPSGDEvent, got {type(event).__name__}")
        self.adapter.load_numpy(global_arrays)
        self._item_cache = None
        start = {k: v.copy() for k, v in global_arrays.items()}
        params = self.adapter.released_parameters()
        n = self.n_persons
        if not (step_persons > 0 and math.isfinite(step_persons)):
            raise ValueError(f"step_persons must be a positive public constant, got {step_persons}")
        if event is not None:
            q, n_steps = event.sample_rate, event.steps
        else:
            q, n_steps = float(sample_rate), steps
        denominator = q * float(step_persons)  # public: never a function of n
        stats = {"clipped_fraction": 0.0, "rows": 0.0, "persons": 0.0}
        for _ in range(n_steps):
            # Generator.random is a multiple of 2^-53: compared with q itself it would sample at
            # ceil(q·2^53)/2^53 > q; on the grid below q, at most q (common/privacy/release.py)
            persons = (np.flatnonzero(self.sample_rng.random(n) < realizable_rate(q, bits=53)) if q < 1
                       else np.arange(n))
            if event is not None:
                total, st = self.clipped_gradient_sum(persons, clip_norm)
                noised = privatize(total, noise_multiplier=event.noise_multiplier, clip_norm=clip_norm,
                                   noise_share=noise_share, generator=self.noise_rng)
                stats["clipped_fraction"] = st["clipped_fraction"]
                stats["rows"] += st["rows"]
            else:
                noised = self.gradient_sum(persons).numpy()
            stats["persons"] += len(persons)
            step = unflatten(-self.lr * noised / denominator, start)
            with torch.no_grad():
                for name, p in params.items():
                    p.add_(torch.as_tensor(step[name], dtype=p.dtype, device=p.device))
        self.last_stats = stats  # local diagnostics (data-dependent): never sent
        return {k: v - start[k] for k, v in self.adapter.to_numpy().items()}

    # ------------------------------------------------------------------ local scoring
    def item_vectors(self) -> np.ndarray:
        """Adapted vectors of every catalogue item under the current weights (public: a
        function of released weights and public text), computed once per weights."""
        key = hash(tuple(float(np.asarray(v).sum()) for v in self.adapter.to_numpy().values()))
        if self._item_cache is None or self._item_cache[0] != key:
            self._item_cache = (key, self.adapter.item_vectors(self.bank.hidden, self.bank.mask))
        return self._item_cache[1]

    def score(self, persons: np.ndarray, items: np.ndarray, global_arrays: dict[str, np.ndarray] | None = None
              ) -> np.ndarray:
        """Adapter scores ``[len(persons), k]`` of candidate ``items`` for this institution's
        persons. Local: reads private profiles, releases nothing (a metric computed from it is a
        release and follows the evaluation policy)."""
        if global_arrays is not None:
            self.adapter.load_numpy(global_arrays)
        z = self.item_vectors()
        prof = self._profiles(np.asarray(persons), None)
        w = self.adapter.top.head.weight.detach().float().cpu().numpy()[0]
        b = float(self.adapter.top.head.bias.detach().cpu())
        items = np.asarray(items)
        return np.einsum("pd,pkd->pk", prof * w, z[items.reshape(len(persons), -1)]).reshape(items.shape) + b


def measure_throughput(trainer: AdapterTrainer, *, persons: int, clip_norm: float = 1.0, repeats: int = 5) -> dict:
    """Persons per second of one DP step (Opacus hooks + per-person clip + noise) and of one plain
    step (hooks off, one backward), on the **same persons and the same rows** (the row sampler
    is rewound before every step), **interleaved** (plain, DP, plain, DP, ...) after one
    untimed warm-up step of each, so that both see the same load; the median of ``repeats``
    timings per mode, and the median of the per-pair ratios. Benchmarks only: nothing released.
    """
    idx = np.arange(min(persons, trainer.n_persons))
    state = trainer.sample_rng.bit_generator.state

    def step(mode: str) -> float:
        trainer.sample_rng.bit_generator.state = state  # the same rows for both modes
        t0 = time.perf_counter()
        if mode == "dp":
            total, _ = trainer.clipped_gradient_sum(idx, clip_norm)
            privatize(total, noise_multiplier=1.0, clip_norm=clip_norm, generator=trainer.noise_rng)
        else:
            trainer.gradient_sum(idx)
        return time.perf_counter() - t0

    step("nonprivate"), step("dp")  # warm-up: lazy allocations, hook registration
    times: dict[str, list[float]] = {"nonprivate": [], "dp": []}
    for _ in range(repeats):
        for mode in ("nonprivate", "dp"):
            times[mode].append(step(mode))
    out = {mode: len(idx) / float(np.median(t)) for mode, t in times.items()}
    out["ratio_median_of_pairs"] = float(np.median(np.asarray(times["nonprivate"]) / np.asarray(times["dp"])))
    out["repeats"] = repeats
    print(f"adapter throughput: {out}", file=sys.stderr)
    return out
