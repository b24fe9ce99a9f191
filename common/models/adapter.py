"""LLM adapter: a pretrained sentence encoder with LoRA (PEFT) on its top layers and a small
scoring head, scoring (person history, item text). Only LoRA + head weights are trained and
released; the frozen encoder never leaves.

Model. The item tower is the encoder: item text → (frozen embeddings + frozen lower layers) →
top ``top_layers`` layers with LoRA rank ``rank`` on ``query``/``value`` → mean pooling →
``z_i`` (unit norm, minus the public catalogue centre, renormalised). The person tower is the
person's history as text: the mean frozen embedding of the texts of the items they interacted
with, centred and normalised (``text_prior.person_profiles``) — computed at the institution and
never released. The head is one ``Linear(hidden, 1)`` on ``p_u ⊙ z_i``, initialised to
``scale · Σ_k p_k z_k`` (a scaled cosine). With LoRA's ``B = 0`` initialisation the untrained
adapter *is* the zero-budget text prior; DP training can only move it from there.

Defaults follow ARCHITECTURE.md: r = 2 on query/value of the top two layers of
all-MiniLM-L6-v2 plus the 385-weight head: 6,529 trainable parameters — what 671 persons carry
at ε = 8. The frozen part below the adapted layers is computed once per catalogue
(:meth:`TextAdapter.lower_states`: public text through public weights, no budget).

Person-level DP-SGD (opacus#366: Opacus clips per *sample*). One training row is (person,
item, label); Opacus' ``GradSampleModule`` hooks give a gradient per row (LoRA and the head
are ``nn.Linear``s, which Opacus supports; :func:`per_row_gradients`); :func:`person_clipped_sum`
sums the rows of each person, clips each person's sum to ``C`` jointly over all released
tensors, and sums over persons; :func:`privatize` adds Gaussian noise ``σ·C·√share`` once per
step through :func:`fedrec.common.privacy.release.gaussian_release`, with σ taken from the
charged event. Ghost clipping cannot group rows by person, so it is not used.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedrec.common.models.text_prior import load_encoder
from fedrec.common.privacy.accountant import GaussianEvent
from fedrec.common.privacy.release import gaussian_release

__all__ = [
    "AdapterConfig",
    "TextAdapter",
    "AdapterTop",
    "default_device",
    "per_row_gradients",
    "person_clipped_sum",
    "privatize",
    "flatten",
    "unflatten",
]

#: released tensor names contain one of these (LoRA matrices and the head)
RELEASED_MARKERS = ("lora_A", "lora_B", "head.")


def default_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class AdapterConfig:
    """The adapter's shape. Defaults: r = 2 LoRA on query/value of the top two layers."""

    #: "" = the packaged all-MiniLM-L6-v2; else a local Hugging Face model directory
    model_dir: str = ""
    #: sha256 the weights must have ("" = the pinned MiniLM digest for the packaged model,
    #: no check for another directory — give one in deployment)
    expected_sha256: str = ""
    rank: int = 2
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ("query", "value")
    top_layers: int = 2
    #: initial head scale (logit = scale · cosine)
    head_scale: float = 10.0
    max_length: int = 32
    device: str = field(default_factory=default_device)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.top_layers < 1:
            raise ValueError(f"adapter rank and top_layers must be >= 1, got rank={self.rank}, top_layers={self.top_layers}")


class AdapterTop(nn.Module):
    """The trainable part's forward: adapted top layers → pooled item vector → head.

    ``forward(hidden, mask, profile)`` takes per row the frozen lower layers' output
    ``[R, L, H]``, the token mask ``[R, L]`` and the person profile ``[R, H]``; returns logits
    ``[R]``. Rows are independent (batch-first), which Opacus' per-sample hooks need.
    """

    def __init__(self, layers: Sequence[nn.Module], hidden: int, center: torch.Tensor, head_scale: float):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("center", center.detach().clone().float())
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.head.weight.fill_(head_scale)
            self.head.bias.zero_()

    def item_vectors(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Adapted, centred, unit-norm item vectors ``[R, H]``."""
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        x = hidden
        for layer in self.layers:
            out = layer(x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = nn.functional.normalize((x * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
        return nn.functional.normalize(pooled - self.center, dim=-1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return self.head(self.item_vectors(hidden, mask) * profile).squeeze(-1)


class TextAdapter:
    """The pretrained encoder with LoRA on its top layers, split into a frozen lower part
    (:meth:`lower_states`) and the trainable :class:`AdapterTop` (``self.top``).

    ``center`` is the public catalogue centre subtracted from item vectors (the mean frozen
    embedding of the catalogue; zeros when not given).
    """

    def __init__(self, cfg: AdapterConfig = AdapterConfig(), *, center: np.ndarray | None = None, encoder=None):
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        tokenizer, model, digest = encoder if encoder is not None else load_encoder(
            cfg.model_dir or None, expected_sha256=cfg.expected_sha256 or None, device="cpu")
        self.tokenizer, self.weights_sha256 = tokenizer, digest
        n_layers = model.config.num_hidden_layers
        if cfg.top_layers > n_layers:
            raise ValueError(f"top_layers={cfg.top_layers} exceeds the encoder's {n_layers} layers")
        # dropout off: per-sample gradients must equal a per-example loop, and the released
        # update must be a function of the data and the noise only
        for mod in model.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        top_idx = list(range(n_layers - cfg.top_layers, n_layers))
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                          target_modules=list(cfg.target_modules), layers_to_transform=top_idx, layers_pattern="layer")
        self.peft = get_peft_model(model, lora)
        base = self.peft.base_model.model
        self.embeddings = base.embeddings
        self.lower = nn.ModuleList(base.encoder.layer[: n_layers - cfg.top_layers])
        hidden = model.config.hidden_size
        c = torch.zeros(hidden) if center is None else torch.as_tensor(np.asarray(center), dtype=torch.float32)
        self.top = AdapterTop(base.encoder.layer[n_layers - cfg.top_layers:], hidden, c, cfg.head_scale)
        for name, p in self.top.named_parameters():
            p.requires_grad_(any(mark in name for mark in RELEASED_MARKERS))
        self.peft.to(self.device)
        self.top.to(self.device).train()  # train mode for Opacus hooks; dropout is 0 anyway
        self._gs = None

    def grad_sample_module(self):
        """The one Opacus ``GradSampleModule`` over :attr:`top` (hooks may be added only once)."""
        if self._gs is None:
            from opacus import GradSampleModule

            self._gs = GradSampleModule(self.top, batch_first=True, loss_reduction="sum")
        return self._gs

    def plain_mode(self):
        """Context manager: Opacus hooks off (non-private training, throughput baselines)."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            if self._gs is None:
                yield
                return
            self._gs.disable_hooks()
            try:
                yield
            finally:
                self._gs.enable_hooks()

        return ctx()

    # ------------------------------------------------------------------ frozen part
    @torch.no_grad()
    def lower_states(self, texts: Sequence[str], *, batch_size: int = 128, progress: bool = True,
                     dtype: torch.dtype = torch.float32, cache_dir: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen embeddings + lower layers for each text: ``(hidden [n, L, H], mask [n, L])``
        on CPU, padded to the longest text (at most ``cfg.max_length`` tokens).

        Public text through public weights: no budget. With ``cache_dir`` the result is cached
        on disk, keyed by the weights' sha256, the texts, ``top_layers``, ``max_length`` and dtype.
        """
        import hashlib
        import os
        from pathlib import Path

        from tqdm.auto import tqdm

        path = None
        if cache_dir:
            h = hashlib.sha256(f"{self.weights_sha256}|{self.cfg.top_layers}|{self.cfg.max_length}|{dtype}".encode())
            for t in texts:
                h.update(t.encode() + b"\x00")
            path = Path(cache_dir) / f"lower-{h.hexdigest()[:32]}.pt"
            if path.exists():
                saved = torch.load(path)
                return saved["hidden"], saved["mask"]
        L, H = self.cfg.max_length, self.top.head.in_features
        out_h = torch.zeros(len(texts), L, H, dtype=dtype)
        out_m = torch.zeros(len(texts), L)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for s in tqdm(range(0, len(texts), batch_size), desc="adapter: frozen layers", disable=not progress,
                      file=sys.stderr, leave=False):
            idx = torch.as_tensor(order[s:s + batch_size])
            enc = self.tokenizer([texts[int(i)] for i in idx], padding=True, truncation=True, max_length=L,
                                 return_tensors="pt").to(self.device)
            x = self.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
            mask = enc["attention_mask"]
            additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
            for layer in self.lower:
                o = layer(x, attention_mask=additive)
                x = o[0] if isinstance(o, tuple) else o
            n = x.shape[1]
            out_h[idx, :n] = x.to(dtype).cpu()
            out_m[idx, :n] = mask.float().cpu()
        longest = int(out_m.sum(1).max()) if len(texts) else 1
        out_h, out_m = out_h[:, :longest].contiguous(), out_m[:, :longest].contiguous()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"hidden": out_h, "mask": out_m}, tmp)
            os.replace(tmp, path)
        return out_h, out_m

    @torch.no_grad()
    def item_vectors(self, hidden: torch.Tensor, mask: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
        """Adapted item vectors for cached lower states (post-processing of public weights)."""
        H = self.top.head.in_features
        out = np.zeros((len(hidden), H), np.float32)
        order = torch.argsort(mask.sum(1), stable=True)  # similar lengths together: little padding
        for s in range(0, len(hidden), batch_size):
            idx = order[s:s + batch_size]
            m = mask[idx]
            n = max(1, int(m.sum(1).max()))
            out[idx.numpy()] = self.top.item_vectors(hidden[idx, :n].to(self.device, torch.float32),
                                                     m[:, :n].to(self.device)).float().cpu().numpy()
        return out

    # ------------------------------------------------------------------ released state
    def released_parameters(self) -> dict[str, nn.Parameter]:
        """The tensors that leave the institution: LoRA A/B and the head, by stable name."""
        return {n: p for n, p in self.top.named_parameters() if p.requires_grad}

    def to_numpy(self) -> dict[str, np.ndarray]:
        return {n: p.detach().float().cpu().numpy().copy() for n, p in self.released_parameters().items()}

    def load_numpy(self, arrays: dict[str, np.ndarray]) -> None:
        """Load released tensors; refuses missing, unknown or mis-shaped entries (one line)."""
        params = self.released_parameters()
        if set(arrays) != set(params):
            missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
            raise ValueError(f"adapter arrays do not match the model: missing {missing[:3]}, unknown {extra[:3]}")
        with torch.no_grad():
            for n, p in params.items():
                a = np.asarray(arrays[n])
                if a.shape != tuple(p.shape):
                    raise ValueError(f"adapter array {n}: shape {a.shape}, expected {tuple(p.shape)}")
                p.copy_(torch.as_tensor(a, dtype=p.dtype))

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.released_parameters().values())


# ---------------------------------------------------------------------- DP-SGD pieces
def per_row_gradients(gs_model, hidden: torch.Tensor, mask: torch.Tensor, profile: torch.Tensor,
                      label: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-row gradients of the BCE loss via Opacus' hooks: ``({name: [R, *shape]}, losses [R])``.

    ``gs_model`` is ``opacus.GradSampleModule(adapter.top, loss_reduction="sum")``. Internal:
    the result is raw per-row gradients, which must go through :func:`person_clipped_sum`
    before anything derived from them is released.
    """
    for p in gs_model.parameters():
        p.grad = None
        if hasattr(p, "grad_sample"):
            p.grad_sample = None
    import warnings

    logits = gs_model(hidden, mask, profile)
    losses = nn.functional.binary_cross_entropy_with_logits(logits, label, reduction="none")
    with warnings.catch_warnings():  # inputs are frozen states: the hook fires on outputs, as intended
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        losses.sum().backward()
    grads = {n.removeprefix("_module."): p.grad_sample for n, p in gs_model.named_parameters() if p.requires_grad}
    for p in gs_model.parameters():
        p.grad = None
        if hasattr(p, "grad_sample"):
            p.grad_sample = None
    return grads, losses.detach()


def flatten(tensors: dict[str, torch.Tensor], *, rows: bool = True) -> torch.Tensor:
    """Concatenate tensors in name order: ``[R, D]`` (``rows=True``) or ``[D]``."""
    names = sorted(tensors)
    if rows:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(vec: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` (``rows=False``) for arrays shaped like ``like``."""
    out, at = {}, 0
    for n in sorted(like):
        size = int(np.prod(like[n].shape))
        out[n] = np.asarray(vec[at:at + size]).reshape(like[n].shape)
        at += size
    if at != len(vec):
        raise ValueError(f"vector of length {len(vec)} does not match {at} parameters")
    return out


def person_clipped_sum(row_grads: torch.Tensor, row_person: torch.Tensor, n_persons: int, clip_norm: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum rows per person, clip each person's sum to ``clip_norm`` (L2, jointly over all
    released coordinates), sum over persons.

    ``row_grads`` is ``[R, D]`` (one row per training row, :func:`flatten` of
    :func:`per_row_gradients`), ``row_person`` ``[R]`` the person (0..n_persons−1) of each row.
    Returns ``(total [D], per-person norms before clipping [P], per-person scale [P])``.

    Privacy contract: person u's contribution to ``total`` is ``scale_u · Σ_{rows of u} g_r``
    with L2 norm ≤ ``clip_norm`` however many rows u has, so ``total`` has L2 sensitivity
    ``clip_norm`` to adding or removing one person with all their records. A person whose summed
    gradient is not finite (NaN or inf from the coordinator's weights; which people get one
    depends on their data) contributes zero. Not a release by itself: it must pass
    :func:`privatize` before leaving.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip norm must be positive and finite, got {clip_norm}")
    per = torch.zeros(n_persons, row_grads.shape[1], dtype=torch.float64, device=row_grads.device)
    per.index_add_(0, row_person.to(row_grads.device), row_grads.to(torch.float64))
    finite = torch.isfinite(per).all(dim=1)
    per = torch.where(finite[:, None], per, torch.zeros((), dtype=per.dtype, device=per.device))
    norms = per.norm(dim=1)
    scale = (clip_norm / norms.clamp(min=1e-300)).clamp(max=1.0)
    return (per * scale[:, None]).sum(0), norms, scale


def privatize(total: torch.Tensor | np.ndarray, *, noise_multiplier: float | None, clip_norm: float,
              noise_share: float = 1.0, generator: np.random.Generator | None = None) -> np.ndarray:
    """The step's released gradient sum: ``total + N(0, (σ·C)² · noise_share · I)``.

    Privacy contract: ``total`` must come from :func:`person_clipped_sum` with the same
    ``clip_norm`` C (sensitivity C), and σ must be the charged round event's
    (:class:`~fedrec.common.privacy.accountant.DPSGDEvent`) noise multiplier; the noise is drawn
    by :func:`~fedrec.common.privacy.release.gaussian_release` from a
    ``GaussianEvent(noise_multiplier=σ, sensitivity=C)``, once per step. ``noise_share`` is 1 in
    local mode, 1/n_min in distributed mode. ``noise_multiplier=None`` is the non-private path
    (ε = ∞; simulations only) and returns ``total`` unchanged.
    """
    value = total.detach().cpu().numpy() if isinstance(total, torch.Tensor) else np.asarray(total, np.float64)
    if noise_multiplier is None:
        return value.astype(np.float64)
    event = GaussianEvent(noise_multiplier=noise_multiplier, sensitivity=clip_norm)
    return gaussian_release(value, event=event, noise_share=noise_share, generator=generator)
