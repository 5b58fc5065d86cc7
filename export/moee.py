"""Mixture of embedding experts (Miech et al.; Oncescu et al. 2021), trained with torch on CPU.

Inputs are cached clip features (arrays); outputs are small numpy matrices that the device and
the server apply without torch:
- per embedding expert: an audio projection ``W_a [d_in, D], b_a [D]`` (input standardisation
  folded in) and a text projection ``W_t [384, D], b_t [D]``;
- a gate ``G [384 + 2, E], g [E]``: softmax over the experts from the text embedding plus two fits
  (best cosine of the text to the label texts, and to the training captions);
- the label bridge is one more expert with a fixed score (sum_k w_k p_k), weighted by its gate.
Score(text i, clip j) = sum_e gate_ie * score_e(i, j). Loss: symmetric InfoNCE, where clips whose
caption equals the text's count as positives. Deterministic for a seed (one thread, fixed order).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BRIDGE = "bridge"  # name of the label-bridge pseudo-expert in the gate


@dataclass
class TrainData:
    """Clip-level features for one split (N clips, one caption each)."""

    audio: dict[str, np.ndarray]  # expert -> [N, d_in] raw clip embeddings (mean over windows)
    text: np.ndarray  # [N, 384] unit caption embeddings
    fits: np.ndarray  # [N, 2] (label fit, caption fit) of each caption
    bridge: np.ndarray | None  # [N, N] label-bridge score of caption i for clip j, or None
    groups: np.ndarray  # [N] int: clips with equal group share a caption (positives)


@dataclass
class TrainConfig:
    dim: int = 256
    epochs: int = 60
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-3
    temperature: float = 0.05
    dropout: float = 0.2
    gating: bool = True  # False: fixed equal weights over the experts
    patience: int = 12  # epochs without a better validation mAP before stopping
    seed: int = 0


@dataclass
class Trained:
    """numpy weights of a trained mixture, ready for the bundle."""

    experts: list[str]  # embedding experts, in order
    use_bridge: bool
    audio: dict[str, tuple[np.ndarray, np.ndarray]]  # expert -> (W [d_in, D], b [D])
    text: dict[str, tuple[np.ndarray, np.ndarray]]  # expert -> (W [384, D], b [D])
    gate: tuple[np.ndarray, np.ndarray] | None  # (G [386, E], g [E]) or None = equal weights
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def gate_names(self) -> list[str]:
        return self.experts + ([BRIDGE] if self.use_bridge else [])


class Moee(torch.nn.Module):
    def __init__(self, dims: dict[str, int], mu: dict[str, np.ndarray], sd: dict[str, np.ndarray],
                 text_dim: int, use_bridge: bool, cfg: TrainConfig) -> None:
        super().__init__()
        self.experts = list(dims)
        self.use_bridge = use_bridge
        self.cfg = cfg
        for e in self.experts:
            self.register_buffer(f"mu_{e}", torch.from_numpy(mu[e].astype(np.float32)))
            self.register_buffer(f"sd_{e}", torch.from_numpy(sd[e].astype(np.float32)))
        self.audio = torch.nn.ModuleDict({e: torch.nn.Linear(d, cfg.dim) for e, d in dims.items()})
        self.text = torch.nn.ModuleDict({e: torch.nn.Linear(text_dim, cfg.dim) for e in dims})
        n_gate = len(self.experts) + int(use_bridge)
        self.gate = torch.nn.Linear(text_dim + 2, n_gate)
        torch.nn.init.zeros_(self.gate.weight)
        torch.nn.init.zeros_(self.gate.bias)
        self.drop = torch.nn.Dropout(cfg.dropout)

    def gates(self, text: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
        n = len(self.experts) + int(self.use_bridge)
        if not self.cfg.gating:
            return torch.full((text.shape[0], n), 1.0 / n)
        return torch.softmax(self.gate(torch.cat([text, fits], dim=1)), dim=1)

    def audio_vec(self, e: str, x: torch.Tensor) -> torch.Tensor:
        z = (x - getattr(self, f"mu_{e}")) / getattr(self, f"sd_{e}")
        return F.normalize(self.audio[e](self.drop(z)), dim=1)

    def text_vec(self, e: str, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text[e](self.drop(t)), dim=1)

    def scores(self, audio: dict[str, torch.Tensor], text: torch.Tensor, fits: torch.Tensor,
               bridge: torch.Tensor | None) -> torch.Tensor:
        """[n_text, n_clip] mixture scores."""
        g = self.gates(text, fits)
        total = torch.zeros(text.shape[0], next(iter(audio.values())).shape[0])
        for k, e in enumerate(self.experts):
            total = total + g[:, k : k + 1] * (self.text_vec(e, text) @ self.audio_vec(e, audio[e]).T)
        if self.use_bridge:
            assert bridge is not None
            total = total + g[:, -1:] * bridge
        return total

    def export(self) -> Trained:
        """Fold standardisation into the audio projection and return numpy weights."""
        audio, text = {}, {}
        with torch.no_grad():
            for e in self.experts:
                w = self.audio[e].weight.T.double().numpy()  # [d_in, D]
                b = self.audio[e].bias.double().numpy()
                mu, sd = getattr(self, f"mu_{e}").double().numpy(), getattr(self, f"sd_{e}").double().numpy()
                w_f = w / sd[:, None]
                audio[e] = (w_f.astype(np.float32), (b - mu @ w_f).astype(np.float32))
                text[e] = (self.text[e].weight.T.numpy().astype(np.float32), self.text[e].bias.numpy().astype(np.float32))
            gate = None
            if self.cfg.gating:
                gate = (self.gate.weight.T.numpy().astype(np.float32).copy(), self.gate.bias.numpy().astype(np.float32).copy())
        return Trained(self.experts, self.use_bridge, audio, text, gate)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _loss(s: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE with every equal-caption clip as a positive (soft targets)."""
    pos = (groups[:, None] == groups[None, :]).float()
    tgt = pos / pos.sum(dim=1, keepdim=True)
    logits = s / temperature
    return 0.5 * (-(tgt * F.log_softmax(logits, dim=1)).sum(1).mean() - (tgt * F.log_softmax(logits.T, dim=1)).sum(1).mean())


def train(
    tr: TrainData, cfg: TrainConfig, experts: list[str], use_bridge: bool,
    evaluate: Callable[[Trained], float] | None = None,
) -> Trained:
    """Train on ``tr``; ``evaluate`` (validation mAP of exported weights) drives early stopping."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)  # same float order every run: deterministic for a seed
    rng = np.random.default_rng(cfg.seed)
    mu = {e: tr.audio[e].mean(0) for e in experts}
    sd = {e: tr.audio[e].std(0) + 1e-3 * (tr.audio[e].std() + 1e-6) for e in experts}
    model = Moee({e: tr.audio[e].shape[1] for e in experts}, mu, sd, tr.text.shape[1], use_bridge, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    audio = {e: _t(tr.audio[e]) for e in experts}
    text, fits, groups = _t(tr.text), _t(tr.fits), torch.from_numpy(tr.groups.astype(np.int64))
    bridge = _t(tr.bridge) if (use_bridge and tr.bridge is not None) else None
    n = text.shape[0]
    best, best_state, best_epoch, since, history = -np.inf, None, 0, 0, []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, cfg.batch):
            idx = torch.from_numpy(order[start : start + cfg.batch])
            if idx.numel() < 2:
                continue
            s = model.scores({e: a[idx] for e, a in audio.items()}, text[idx], fits[idx],
                             None if bridge is None else bridge[idx][:, idx])
            loss = _loss(s, groups[idx], cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        model.eval()
        row = {"epoch": epoch, "loss": total / n}
        if evaluate is not None:
            row["val_mAP@10"] = float(evaluate(model.export()))
            if row["val_mAP@10"] > best + 1e-9:
                best, best_state, best_epoch, since = row["val_mAP@10"], copy.deepcopy(model.state_dict()), epoch, 0
            else:
                since += 1
        history.append(row)
        log.info("epoch %d %s", epoch, row)
        if evaluate is not None and since >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    out = model.export()
    out.history, out.best_epoch = history, best_epoch or len(history)
    return out


# --------------------------------------------------------------------------- numpy side (scoring)


def np_gates(trained: Trained, text: np.ndarray, fits: np.ndarray) -> np.ndarray:
    """[n, E] gate weights, the same formula as the server's text side."""
    n_e = len(trained.gate_names)
    if trained.gate is None:
        return np.full((text.shape[0], n_e), 1.0 / n_e, np.float32)
    g_w, g_b = trained.gate
    z = np.concatenate([text, fits], axis=1) @ g_w + g_b
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_text_vectors(trained: Trained, text: np.ndarray) -> dict[str, np.ndarray]:
    return {e: _unit(text @ w + b) for e, (w, b) in trained.text.items()}


def np_audio_vectors(trained: Trained, e: str, x: np.ndarray) -> np.ndarray:
    w, b = trained.audio[e]
    return _unit(x @ w + b)
