"""The LLM adapter: real packaged MiniLM weights, real PEFT LoRA, real Opacus hooks.

Nothing here mocks transformers, PEFT or Opacus. The encoder loads once per module (a few
seconds on 2 cores); every test uses tiny texts and a handful of rows.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from fedrec.client.train_adapter import AdapterTrainer, ItemBank, plan_adapter_dp
from fedrec.common.models.adapter import (
    AdapterConfig,
    TextAdapter,
    flatten,
    per_row_gradients,
    person_clipped_sum,
    privatize,
    unflatten,
)
from fedrec.common.models.text_prior import (
    MINILM_SHA256,
    ModelIntegrityError,
    catalogue_texts,
    embed_texts,
    item_embeddings,
    load_encoder,
    person_profiles,
    text_prior_scores,
    verify_model_dir,
)
from fedrec.common.privacy.accountant import epsilon_for

TEXTS = [
    "Toy Story (1995). Genres: Adventure, Animation, Children.",
    "Heat (1995). Genres: Action, Crime, Thriller.",
    "Sense and Sensibility (1995). Genres: Drama, Romance.",
    "Aliens (1986). Genres: Action, Horror, Sci-Fi.",
    "The Lion King (1994). Genres: Animation, Children, Musical.",
    "Pulp Fiction (1994). Genres: Comedy, Crime, Drama, Thriller.",
    "Alien (1979). Genres: Horror, Sci-Fi.",
    "Aladdin (1992). Genres: Animation, Children, Comedy, Musical.",
]


@pytest.fixture(scope="module")
def encoder():
    t0 = time.perf_counter()
    enc = load_encoder()
    assert time.perf_counter() - t0 < 30, "loading the packaged MiniLM should take seconds"
    return enc


@pytest.fixture(scope="module")
def emb(encoder):
    tok, model, _ = encoder
    return embed_texts(TEXTS, tok, model, progress=False)


@pytest.fixture()
def adapter(encoder, emb):
    torch.manual_seed(0)
    # a fresh PEFT wrapper per test on a fresh copy of the weights (get_peft_model mutates the model)
    tok, _, digest = encoder
    from transformers import AutoModel

    from fedrec.common.models.text_prior import verify_model_dir as vm

    folder, _ = vm(None)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()
    return TextAdapter(AdapterConfig(device="cpu"), center=emb.mean(0), encoder=(tok, model, digest))


# ---------------------------------------------------------------------- weights and text prior
def test_packaged_weights_are_verified_and_tampering_is_refused():
    folder, digest = verify_model_dir(None)
    assert digest == MINILM_SHA256 and (folder / "config.json").exists()
    with pytest.raises(ModelIntegrityError, match="does not match"):
        verify_model_dir(None, expected_sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="no config.json"):
        verify_model_dir("/nonexistent/model-dir")


def test_frozen_embeddings_are_sentence_embeddings(emb):
    assert emb.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ emb.T
    # real pretrained weights: "Alien" is closer to "Aliens" than to "Sense and Sensibility"
    assert sims[6, 3] > sims[6, 2] + 0.1


def test_item_embeddings_cached_by_weights_and_text(tmp_path, encoder, emb):
    out = item_embeddings(TEXTS, encoder=encoder, cache_dir=str(tmp_path), progress=False)
    files = list(tmp_path.glob("items-*.npy"))
    assert len(files) == 1
    np.testing.assert_allclose(out, emb, atol=1e-6)
    # a cache hit does not need the encoder; a changed catalogue is a different key
    again = item_embeddings(TEXTS, cache_dir=str(tmp_path), progress=False)
    np.testing.assert_array_equal(again, out)
    item_embeddings(TEXTS[:3], encoder=encoder, cache_dir=str(tmp_path), progress=False)
    assert len(list(tmp_path.glob("items-*.npy"))) == 2


def test_catalogue_texts_use_title_year_and_genres():
    import pandas as pd

    items = pd.DataFrame({"item_id": [1, 2], "title": ["Toy Story", "Heat (1995)"], "year": [1995, 1995],
                          "genres": ["Adventure|Animation", "(no genres listed)"]})
    assert catalogue_texts(items) == ["Toy Story (1995). Genres: Adventure, Animation.", "Heat (1995)."]


def test_text_prior_ranks_by_history(emb):
    # person 0 watched sci-fi horror, person 1 animation
    prof = person_profiles(emb, np.array([0, 0, 1, 1]), np.array([3, 6, 0, 4]), 2)
    s = text_prior_scores(prof, emb, np.array([0, 1]), np.array([[1, 7], [1, 7]]))
    assert s[1, 1] > s[1, 0]  # Aladdin over Heat for the animation fan


# ---------------------------------------------------------------------- the adapter
def test_adapter_size_and_released_tensors(adapter):
    names = adapter.released_parameters()
    assert adapter.n_trainable() == 4 * 2 * (2 * 384) + 385  # r=2 on q,v of 2 layers + head
    assert all(("lora_A" in n or "lora_B" in n or n.startswith("head.")) for n in names)
    frozen = [n for n, p in adapter.peft.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []  # the encoder is frozen: nothing else could be released
    arrays = adapter.to_numpy()
    with pytest.raises(ValueError, match="unknown"):
        adapter.load_numpy({**arrays, "embeddings.word_embeddings.weight": np.zeros(1)})


def test_untrained_adapter_is_the_frozen_encoder(adapter, emb):
    # LoRA B = 0 at initialisation: the adapted item vectors are the centred frozen embeddings
    hidden, mask = adapter.lower_states(TEXTS, progress=False)
    z = adapter.item_vectors(hidden, mask)
    centred = emb - emb.mean(0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    np.testing.assert_allclose(z, centred, atol=2e-5)


def _perturb_lora(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter.released_parameters().items():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_opacus_per_sample_gradients_equal_a_per_example_loop(adapter, emb):
    """Guard for opacus#820-style breakage: hooks on PEFT LoRA must equal single-row backward."""
    _perturb_lora(adapter)
    hidden, mask = adapter.lower_states(TEXTS[:6], progress=False)
    prof = torch.nn.functional.normalize(torch.as_tensor(emb[[1, 2, 3, 4, 5, 6]] - emb.mean(0)), dim=-1)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    grads, _ = per_row_gradients(adapter.grad_sample_module(), hidden, mask, prof, label)
    hooks = flatten(grads)
    params = adapter.released_parameters()
    with adapter.plain_mode():
        for r in range(6):
            for p in params.values():
                p.grad = None
            logit = adapter.top(hidden[r:r + 1], mask[r:r + 1], prof[r:r + 1])
            torch.nn.functional.binary_cross_entropy_with_logits(logit, label[r:r + 1], reduction="sum").backward()
            loop = flatten({n: p.grad for n, p in params.items()}, rows=False)
            assert loop.norm() > 0
            rel = (hooks[r] - loop).norm() / loop.norm()
            assert rel < 1e-4, f"row {r}: per-sample gradient differs from the loop by {rel:.2e}"


# ---------------------------------------------------------------------- person-level clipping and noise
def test_clipping_is_per_person_not_per_row():
    C = 1.0
    d = torch.zeros(4)
    d[0] = 1.0
    # person 0: three rows of norm 0.6 C in one direction (per-row clipping would leave 1.8 C)
    rows = torch.stack([0.6 * d, 0.6 * d, 0.6 * d, 0.1 * torch.ones(4)])
    total, norms, scale = person_clipped_sum(rows, torch.tensor([0, 0, 0, 1]), 2, C)
    assert norms[0] == pytest.approx(1.8)
    assert float(total[0]) == pytest.approx(C + 0.1)  # person 0 contributes exactly C, person 1 unclipped
    assert float(scale[1]) == 1.0


def test_every_person_contribution_is_at_most_C():
    g = torch.Generator().manual_seed(1)
    rows = 5 * torch.randn(200, 50, generator=g)
    person = torch.randint(0, 30, (200,), generator=g)
    C = 0.7
    _, norms, scale = person_clipped_sum(rows, person, 30, C)
    per = torch.zeros(30, 50, dtype=torch.float64).index_add_(0, person, rows.double())
    clipped = (per * scale[:, None]).norm(dim=1)
    assert float(clipped.max()) <= C * (1 + 1e-12)
    assert torch.allclose(per.norm(dim=1), norms)
    assert float(clipped.max()) == pytest.approx(C)  # large gradients are clipped *to* C, not below


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_noise_std_is_sigma_times_C(share):
    sigma, C, D = 1.3, 0.7, 40_000
    out = privatize(np.zeros(D), noise_multiplier=sigma, clip_norm=C, noise_share=share,
                    generator=np.random.default_rng(5))
    target = (sigma * C) ** 2 * share
    # sample variance of D normals: relative sd sqrt(2/D) = 0.7%; 5 sd tolerance (3.5%)
    assert abs(out.var() / target - 1) < 5 * math.sqrt(2 / D)
    assert abs(out.mean()) < 5 * math.sqrt(target / D)


def test_non_private_path_adds_nothing():
    v = np.arange(5.0)
    np.testing.assert_array_equal(privatize(v, noise_multiplier=None, clip_norm=1.0), v)


def test_flatten_roundtrip():
    like = {"b": np.zeros((2, 3)), "a": np.zeros(4)}
    vec = np.arange(10.0)
    back = unflatten(vec, like)
    np.testing.assert_array_equal(flatten({k: torch.as_tensor(v) for k, v in back.items()}, rows=False).numpy(), vec)


# ---------------------------------------------------------------------- the client trainer
def test_plan_adapter_dp_spends_the_budget_and_refuses_distributed_multistep():
    s = plan_adapter_dp(epsilon=8.0, delta=1e-5, sample_rate=1 / 3, steps_per_round=2, rounds=3, clip_norm=1.0)
    eps = epsilon_for(s.run_events(), delta=1e-5)
    assert 7.8 <= eps <= 8.0
    assert s.round_event().sample_rate == pytest.approx(1 / 3)
    assert plan_adapter_dp(epsilon=math.inf, delta=1e-5, sample_rate=1.0, steps_per_round=1,
                           rounds=1, clip_norm=1.0) is None
    with pytest.raises(ValueError, match="distributed"):
        plan_adapter_dp(epsilon=8.0, delta=1e-5, sample_rate=1.0, steps_per_round=2, rounds=1,
                        clip_norm=1.0, noise_mode="distributed", n_min=2)


def _trainer(adapter, emb, seed=3):
    bank = ItemBank.build(adapter, TEXTS, emb, dtype=torch.float32, progress=False)
    person = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    item = np.array([3, 6, 1, 0, 4, 7, 2, 5])
    return AdapterTrainer(adapter, bank, person, item, 3, lr=1.0, pos_per_person=1, neg_per_person=1, seed=seed)


def test_dp_round_releases_only_noised_lora_and_head(adapter, emb):
    tr = _trainer(adapter, emb)
    g0 = adapter.to_numpy()
    sched = plan_adapter_dp(epsilon=8.0, delta=1e-5, sample_rate=1.0, steps_per_round=1, rounds=2, clip_norm=1.0)
    delta = tr.train_round(g0, event=sched.round_event(), clip_norm=1.0, step_persons=3)
    assert set(delta) == set(adapter.released_parameters())
    vec = np.concatenate([delta[k].ravel() for k in sorted(delta)])
    assert np.isfinite(vec).all()
    # the noise dominates: every coordinate moved (LoRA A included), at about lr·σ·C/(q·step_persons)
    assert (vec != 0).mean() > 0.99
    expected_sd = sched.noise_multiplier * 1.0 / 3
    assert 0.8 < vec.std() / expected_sd < 1.25
    with pytest.raises(TypeError, match="DPSGDEvent"):
        tr.train_round(g0, event=object(), clip_norm=1.0, step_persons=3)


@pytest.mark.timeout(120)
def test_a_person_who_rated_every_candidate_is_skipped_not_looped_on(adapter, emb):
    """Negatives are drawn by rejection from the candidates a person never rated: someone who
    rated all of them looped forever (a hung institution). They are skipped, like a person without
    a second item; the others still train."""
    bank = ItemBank.build(adapter, TEXTS, emb, dtype=torch.float32, progress=False)
    cands = np.array([0, 1, 2, 3])
    person = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # person 0 rated every candidate
    item = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    tr = AdapterTrainer(adapter, bank, person, item, 3, lr=1.0, pos_per_person=1, neg_per_person=2,
                        candidate_items=cands, seed=3)
    assert tr.has_negative.tolist() == [False, True, True]
    slot, items, labels, _ = tr._rows(np.array([0, 1, 2]))
    assert 0 not in slot.tolist() and set(slot.tolist()) == {1, 2}
    assert all(i in cands for i, y in zip(items, labels) if y == 0)
    delta = tr.train_round(adapter.to_numpy(), event=None, clip_norm=1.0, steps=1, step_persons=3)
    assert all(np.isfinite(v).all() for v in delta.values())


def test_non_private_round_learns_and_scores_locally(adapter, emb):
    tr = _trainer(adapter, emb)
    g = adapter.to_numpy()
    persons, cands = np.array([0, 1]), np.array([[3, 0], [3, 0]])
    before = tr.score(persons, cands, g)
    delta = tr.train_round(g, event=None, clip_norm=1.0, steps=3, step_persons=3)
    assert any(np.abs(v).max() > 0 for v in delta.values())
    after = tr.score(persons, cands, {k: g[k] + delta[k] for k in g})
    assert after.shape == (2, 2) and np.isfinite(after).all()
    assert not np.allclose(before, after)


# ---------------------------------------------------------------------- hybrid blend
def test_hybrid_standardise_and_blend_match_scipy_zscore():
    from scipy.stats import zscore

    from fedrec.common.models.hybrid import blend, standardise

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.exponential(size=(5, 7))
    np.testing.assert_allclose(standardise(a), zscore(a, axis=1), atol=1e-12)
    np.testing.assert_allclose(blend({"a": 1.0, "b": 0.5}, {"a": a, "b": b}),
                               zscore(a, axis=1) + 0.5 * zscore(b, axis=1), atol=1e-12)
    assert np.array_equal(standardise(np.ones((2, 3))), np.zeros((2, 3)))  # a constant row stays tied
    with pytest.raises(KeyError, match="not computed"):
        blend({"a": 1.0, "mf": 0.5}, {"a": a})
    with pytest.raises(ValueError, match="every weight is 0"):
        blend({"a": 0.0}, {"a": a})


def test_hybrid_dp_popularity_subtracts_one_noise_sd():
    from fedrec.common.models.hybrid import dp_popularity

    counts = np.array([-3.0, 0.5, 2.0, 10.0])
    np.testing.assert_allclose(dp_popularity(counts, 4.0), np.log1p([0.0, 0.0, 0.0, 8.0]))
    np.testing.assert_allclose(dp_popularity(counts, 0.0), np.log1p([0.0, 0.5, 2.0, 10.0]))


def test_hybrid_fit_blend_finds_the_informative_component():
    """A component that puts the positive (column 0) first gets weight; pure noise gets none."""
    from fedrec.common.models.hybrid import fit_blend

    rng = np.random.default_rng(1)
    noise = rng.normal(size=(200, 20))
    signal = rng.normal(size=(200, 20))
    signal[:, 0] += 3.0

    def hit_rate(s, _t):  # positive ranked first: an independent, trivially correct metric
        return float((s.argmax(axis=1) == 0).mean())

    w = fit_blend({"noise": [noise], "signal": [signal]}, hit_rate)
    assert w["noise"] == 0.0 and w["signal"] > 0


# ---------------------------------------------------------------------- text for simulated domains
def test_domain_catalogue_and_people_have_text():
    import pandas as pd

    from fedrec.common.models.text_prior import catalogue_texts, person_profiles, person_texts
    from fedrec.common.schema import Covariate
    from fedrec.simulations.domains import get_domain

    for name in ("health", "education", "finance"):
        texts = catalogue_texts(get_domain(name).items_frame())
        assert all(len(t.split()) >= 8 for t in texts), texts  # name, category and a description
    people = pd.DataFrame({"age": [54, 31], "female": [1, 0], "region": ["north", None]})
    covs = (Covariate("age", "integer", 18, 90, description="age in years"), Covariate("female", "binary"),
            Covariate("region", "category", levels=("north", "south")))
    assert person_texts(people, covs) == ["age in years: 54. female: yes. region: north.", "age in years: 31. female: no."]
    emb = np.eye(3, dtype=np.float32)
    fallback = np.full((3, 3), 0.5, np.float32)
    prof = person_profiles(emb, np.array([0, 0]), np.array([1, 2]), 3, fallback=fallback)
    assert np.allclose(prof[1:], 0.5) and not np.allclose(prof[0], 0.5)  # only empty histories fall back


def test_the_released_step_does_not_scale_with_the_private_person_count(adapter, emb):
    """Add/remove-one-person neighbours: an institution with one more person whose clipped
    gradient is zero (no rows) must release exactly the same step under the same noise draw.
    Dividing the noised sum by the institution's own count (a private number) would scale the
    whole release by 3/4 here — beyond the charged sensitivity, and revealing the count."""
    bank = ItemBank.build(adapter, TEXTS, emb, dtype=torch.float32, progress=False)
    person = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    item = np.array([3, 6, 1, 0, 4, 7, 2, 5])
    sched = plan_adapter_dp(epsilon=8.0, delta=1e-5, sample_rate=1.0, steps_per_round=1, rounds=2, clip_norm=1.0)
    g0 = adapter.to_numpy()
    released = []
    for n_persons in (3, 4):  # person 3 has no rows: its clipped gradient is zero
        tr = AdapterTrainer(adapter, bank, person, item, n_persons, lr=1.0, pos_per_person=1, neg_per_person=1, seed=3)
        released.append(tr.train_round(g0, event=sched.round_event(), clip_norm=1.0, step_persons=3, seed=11))
        adapter.load_numpy(g0)
    for k in released[0]:
        np.testing.assert_allclose(released[1][k], released[0][k], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="step_persons"):
        AdapterTrainer(adapter, bank, person, item, 3, lr=1.0, seed=3).train_round(
            g0, event=sched.round_event(), clip_norm=1.0, step_persons=0.0)
