"""A lying coordinator's model arrays against the training releases (MF and adapter).

The red-team audit found that a NaN in one rated item's bias made the MF delta NaN on exactly
the items co-rated with it — a pattern of the institution's data, released without noise (NaN
survives clipping and noise). Two defences, each tested here by breaking it:

* before the charge, the handler refuses model arrays that are not exactly the model's names
  and shapes, finite and within ±1e6 (common/privacy/public_inputs.py): nothing is spent;
* in the clipped sum, a person whose loss, norm or gradient is not finite contributes zero
  (common/privacy/person_clipping.py, common/models/adapter.person_clipped_sum), so a value
  that passes the check cannot make the release's NaN pattern depend on the data either.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrec.client import app as client_app
from fedrec.common.privacy.public_inputs import PUBLIC_PARAMETER_LIMIT, check_model_arrays

from test_institution_policy import (  # noqa: F401 - fixtures
    _task_identity, ctx_for, ledger_rows, mf_folder, node, refusal_code, train_msg)
from test_mf_privacy import _toy


def _poisoned(msg, name: str, value) -> None:
    """Replace array ``name`` of the message's ``arrays`` or ``precond`` record."""
    from fedrec.server.aggregation import numpy_to_arrays

    rec = "precond" if name == "precond" else "arrays"
    arrays = {k: v.numpy() for k, v in msg.content.array_records[rec].items()}
    arrays[name] = value(arrays[name])
    msg.content[rec] = numpy_to_arrays(arrays)


def _set(i: int, v: float):
    def f(a):
        a = a.copy()
        a[i] = v
        return a
    return f


@pytest.mark.parametrize("name, value", [
    ("item_bias", _set(0, np.nan)),
    ("item_bias", _set(3, np.inf)),
    ("item_bias", _set(1, 1e30)),                       # finite, overflows float32 arithmetic
    ("item_bias", lambda a: a[:-1]),                    # misshapen: would fail after the charge
    ("precond", _set(2, np.nan)),
    ("precond", lambda a: np.concatenate([a, a])),
], ids=["nan", "inf", "huge", "short", "precond-nan", "precond-long"])
def test_a_poisoned_global_model_is_refused_before_any_charge(node, name, value):
    msg = train_msg(node)
    _poisoned(msg, name, value)
    assert refusal_code(client_app.train(msg, ctx_for(node))) == "policy"
    assert ledger_rows(node) == 0
    # the same message unpoisoned releases (so the refusal above is the check's doing)
    assert refusal_code(client_app.train(train_msg(node), ctx_for(node))) is None
    assert ledger_rows(node) == 1


def test_an_unknown_array_is_refused_before_any_charge(node):
    from fedrec.server.aggregation import numpy_to_arrays

    msg = train_msg(node)
    arrays = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    msg.content["arrays"] = numpy_to_arrays({**arrays, "probe": np.zeros(3, np.float32)})
    assert refusal_code(client_app.train(msg, ctx_for(node))) == "policy"
    assert ledger_rows(node) == 0


def test_check_model_arrays_names_the_array_and_accepts_the_limit():
    shapes = {"w": (2, 3)}
    check_model_arrays({"w": np.full((2, 3), PUBLIC_PARAMETER_LIMIT)}, shapes, what="m")
    for bad, word in [({"w": np.full((2, 3), np.nextafter(PUBLIC_PARAMETER_LIMIT, math.inf))}, "beyond"),
                      ({"w": np.zeros((3, 2))}, "shape"), ({"w": np.array([["a"] * 3] * 2)}, "numeric"),
                      ({}, "missing"), ({"w": np.zeros((2, 3)), "x": np.zeros(1)}, "unknown")]:
        with pytest.raises(ValueError, match=word):
            check_model_arrays(bad, shapes, what="m")


@pytest.mark.parametrize("dim", [0, 3])
def test_a_nan_that_passes_the_check_leaves_no_data_dependent_nan_in_the_mf_delta(dim):
    """Below the handler's check: a NaN in one rated item's bias. Before the fix the delta was NaN
    on every item co-rated with it; now only the poisoned coordinate itself is NaN (NaN − NaN,
    whatever the data), and the rest is what training without that item's raters gives."""
    from fedrec.client.train import MFTrainer
    from fedrec.common.config import RunConfig
    from fedrec.common.models.mf import PersonRatings
    from fedrec.common.privacy.accountant import DPSGDEvent

    pr, side, _ = _toy(n_persons=12, n_items=40, dim=dim)
    cfg = RunConfig().override(**{"lr": 1.0, "item-reg": 0.0, "institutions": 1, "privacy.clip-norm": 0.5,
                                  "mf.dim": dim})
    event = DPSGDEvent(noise_multiplier=1e-9, sample_rate=1.0, steps=1)  # noise negligible: the clipped sum shows
    person, item, rating = (t.numpy() for t in (pr.person_of_rows(), pr.item, pr.rating))
    target = int(item[0])
    start = MFTrainer(pr, 40, cfg, seed=1).item_side.to_numpy()
    poisoned = {k: v.copy() for k, v in start.items()}
    poisoned["item_bias"][target] = np.nan
    delta = MFTrainer(pr, 40, cfg, seed=1).train_round(poisoned, np.ones(40, np.float32), event=event)
    nan = {k: np.argwhere(~np.isfinite(v)).ravel().tolist() for k, v in delta.items()}
    assert nan["item_bias"] == [target], nan
    if dim:
        assert nan["item_factors"] == [], nan
    # the honest reference: the same round without the people who rated the poisoned item
    raters = set(person[item == target].tolist())
    keep = ~np.isin(person, list(raters))
    remap = {p: i for i, p in enumerate(sorted(set(range(12)) - raters))}
    rest = PersonRatings.from_arrays(np.array([remap[p] for p in person[keep]]), item[keep], rating[keep], len(remap))
    ref = MFTrainer(rest, 40, cfg, seed=1).train_round(start, np.ones(40, np.float32), event=event)
    others = np.arange(40) != target
    np.testing.assert_allclose(delta["item_bias"][others], ref["item_bias"][others], atol=1e-5)
    if dim:
        np.testing.assert_allclose(delta["item_factors"][others], ref["item_factors"][others], atol=1e-5)


def test_a_non_finite_person_contributes_zero_to_the_adapter_clipped_sum():
    from fedrec.common.models.adapter import person_clipped_sum

    g = torch.Generator().manual_seed(3)
    rows = torch.randn(12, 5, generator=g)
    person = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    rows[4, 2] = float("nan")   # person 2
    rows[7, 0] = float("inf")   # person 3
    total, _, _ = person_clipped_sum(rows, person, 6, 0.5)
    keep = torch.tensor([p not in (2, 3) for p in person.tolist()])
    ref, _, _ = person_clipped_sum(rows[keep], torch.tensor([p - 2 * (p > 3) for p in person[keep].tolist()]), 4, 0.5)
    assert torch.isfinite(total).all()
    torch.testing.assert_close(total, ref)
