"""Label bridge (labels space): text -> sparse weights over a tagger's labels, no torch.

Each label has a text that says what it is (``Barking Owl, an owl, a bird call or song``; event
classes list their sounds as ``"; "``-separated alternatives). The export stage encodes them
once with the sentence encoder; here the query is encoded, a label's similarity is the best
cosine over its alternatives, and the weights are a softmax at the bundle's temperature, cut to
the ``max_labels`` largest and renormalised (the query travels sparse).

Two warnings, both calibrated at export and recorded in the manifest:
- **fit**: the best cosine is below ``fit_floor`` (the 95th percentile of what off-topic texts
  such as "quarterly tax report" reach): nothing the tagger knows matches the text;
- **kind**: the text is closer to another *kind* (bird, frog, insect, mammal or an event class)
  than to the best label itself, e.g. "cicada" -> Common Cicadabird: a surface-word match.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, TextSpec
from ..errors import BundleError
from ..protocol import encode_sparse
from . import Resolution, TextSide, register_text_side
from .sentence import SentenceEncoder

MAX_LABELS = 64


@dataclass(frozen=True)
class BridgeParams:
    """TextSpec.params of a label bridge (file names relative to the bundle root)."""

    encoder: str
    tokenizer: str
    index: str
    label_texts: str
    temperature: float
    fit_floor: float
    max_labels: int = MAX_LABELS
    max_tokens: int = 256
    model: str = ""
    fit_floor_basis: str = ""
    parity_cosine_min: float | None = None
    dim: int | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> BridgeParams:
        try:
            p = cls(**params)
        except TypeError as exc:
            raise BundleError(f"label_bridge params: {exc}") from exc
        if not 0 < p.temperature <= 1:
            raise BundleError(f"label_bridge temperature {p.temperature!r} must be in (0, 1]")
        if not 1 <= p.max_labels <= MAX_LABELS:
            raise BundleError(f"label_bridge max_labels {p.max_labels!r} must be in 1..{MAX_LABELS}")
        return p


@dataclass(frozen=True)
class LabelIndex:
    """Encoded label texts: alternatives, their labels, and the kind prototypes."""

    alt_vectors: np.ndarray  # [A, D] unit float32
    alt_label: np.ndarray  # [A] label index of each alternative
    label_kind: np.ndarray  # [N] index into kind_names
    kind_names: list[str]
    proto_vectors: np.ndarray  # [P, D] unit float32, taxon kinds only
    proto_kind: np.ndarray  # [P] index into kind_names

    @property
    def n_labels(self) -> int:
        return int(self.label_kind.shape[0])

    def save(self, path: Path) -> None:
        np.savez(
            path,
            alt_vectors=self.alt_vectors.astype(np.float32),
            alt_label=self.alt_label.astype(np.int32),
            label_kind=self.label_kind.astype(np.int16),
            kind_names=np.asarray(self.kind_names),
            proto_vectors=self.proto_vectors.astype(np.float32),
            proto_kind=self.proto_kind.astype(np.int16),
        )

    @classmethod
    def load(cls, path: Path) -> LabelIndex:
        try:
            with np.load(path, allow_pickle=False) as z:
                idx = cls(
                    alt_vectors=z["alt_vectors"].astype(np.float32),
                    alt_label=z["alt_label"].astype(np.int64),
                    label_kind=z["label_kind"].astype(np.int64),
                    kind_names=[str(x) for x in z["kind_names"]],
                    proto_vectors=z["proto_vectors"].astype(np.float32),
                    proto_kind=z["proto_kind"].astype(np.int64),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"label index {str(path)!r} is unreadable: {exc}") from exc
        if len(np.unique(idx.alt_label)) != idx.n_labels:
            raise BundleError(f"label index {str(path)!r}: some labels have no encoded text")
        return idx

    def label_similarity(self, q: np.ndarray) -> np.ndarray:
        """[N] best cosine of ``q`` over each label's alternatives."""
        s = np.full(self.n_labels, -np.inf, np.float32)
        np.maximum.at(s, self.alt_label, self.alt_vectors @ q)
        return s

    def kind_similarity(self, q: np.ndarray, label_sim: np.ndarray) -> np.ndarray:
        """[K] per kind: best prototype cosine (taxa) or best label cosine (event classes)."""
        k = np.full(len(self.kind_names), -np.inf, np.float32)
        np.maximum.at(k, self.proto_kind, self.proto_vectors @ q)
        events = self.label_kind == self.kind_names.index("event") if "event" in self.kind_names else None
        if events is not None and events.any():
            k[self.kind_names.index("event")] = label_sim[events].max()
        return k


def softmax_weights(sim: np.ndarray, temperature: float, max_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights): softmax over all labels, the ``max_labels`` largest, renormalised."""
    z = (sim - sim.max()) / temperature
    w = np.exp(z.astype(np.float64))
    w /= w.sum()
    k = min(max_labels, w.size)
    top = np.argpartition(-w, k - 1)[:k]
    top = top[np.argsort(-w[top], kind="stable")]
    kept = w[top]
    return top, kept / kept.sum()


def read_label_names(path: Path) -> list[str]:
    """Display names (common names; event classes by name) from the bundle's label_texts CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise BundleError(f"cannot read label texts {str(path)!r}: {exc}") from exc
    return [r["label"].partition("_")[2] or r["label"] for r in rows]


class LabelBridge(TextSide):
    """Text -> sparse softmax weights over one expert's labels."""

    def __init__(self, bundle: Bundle, spec: TextSpec) -> None:
        self.expert = spec.expert
        self.params = BridgeParams.from_dict(spec.params)
        p = self.params
        self.encoder = SentenceEncoder(bundle.path(p.encoder), bundle.path(p.tokenizer), max_tokens=p.max_tokens)
        self.index = LabelIndex.load(bundle.path(p.index))
        self.names = read_label_names(bundle.path(p.label_texts))
        n_model = bundle.manifest.expert(spec.expert).dim
        if not self.index.n_labels == len(self.names) == n_model:
            raise BundleError(
                f"label bridge for {spec.expert!r}: index has {self.index.n_labels} labels, texts "
                f"{len(self.names)}, the expert outputs {n_model}"
            )

    def resolve(self, text: str) -> Resolution:
        p = self.params
        q = self.encoder.encode([text])[0]
        sim = self.index.label_similarity(q)
        idx, w = softmax_weights(sim, p.temperature, p.max_labels)
        best = int(idx[0])
        fit = float(sim[best])
        kinds = self.index.kind_names
        ksim = self.index.kind_similarity(q, sim)
        top_kind = kinds[int(self.index.label_kind[best])]
        mass = {k: float(w[self.index.label_kind[idx] == i].sum()) for i, k in enumerate(kinds)}
        warning = None
        if fit < p.fit_floor:
            warning = (
                f"{text!r} matches no {self.expert} label well (best cosine {fit:.2f} < floor "
                f"{p.fit_floor:.2f}, nearest {self.names[best]!r}); the query may never fire"
            )
        else:
            other = [(float(ksim[i]), k) for i, k in enumerate(kinds) if k != top_kind and np.isfinite(ksim[i])]
            if other:
                s_other, k_other = max(other)
                if s_other > fit:
                    warning = (
                        f"{text!r} reads like {_a(k_other)} sound (cosine {s_other:.2f}) more than its best "
                        f"label {self.names[best]!r} ({top_kind}, cosine {fit:.2f}): a name match, check the labels"
                    )
        return Resolution(
            expert=self.expert,
            vector=encode_sparse(self.expert, idx, w),
            top=[(self.names[int(i)], float(x)) for i, x in zip(idx[:10], w[:10], strict=True)],
            fit=fit,
            warning=warning,
            extra={"top_kind": top_kind, "kind_mass": {k: round(v, 4) for k, v in mass.items() if v > 0}},
        )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


@register_text_side("label_bridge")
def make_label_bridge(bundle: Bundle, spec: TextSpec) -> TextSide:
    return LabelBridge(bundle, spec)
