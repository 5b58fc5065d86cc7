"""Label bridge (labels space): text -> sparse weights over a tagger's labels, no torch.

Each label has a text that says what it is (``Barking Owl, an owl, a bird call or song``; event
classes list their sounds as ``"; "``-separated alternatives). The export stage encodes them
once with the sentence encoder; here the query is encoded and a label's similarity is the best
cosine over its alternatives. Weights are a **hierarchical softmax**:
p(label | q) = p(kind | q) * p(label | kind, q). Every label (and every group pseudo-label such
as "Any bird") has a kind (bird, frog, insect, mammal, human, vehicle, tool, explosion, alarm,
weather, noise); a kind's similarity is the best of its prototypes and its labels. So "car horn"
puts its mass on the vehicle kind, not on Hornbill by a shared word, and "bird singing" puts it
on the bird kind, where "Any bird" beats every single species. Both softmaxes run at temperatures
recorded in the manifest; the result is cut to the ``max_labels`` largest and renormalised (the
query travels sparse). A bundle without ``kind_temperature`` gets the flat softmax over labels.

Two warnings, both calibrated at export and recorded in the manifest:
- **fit**: the best cosine is below ``fit_floor`` (the 95th percentile of what off-topic texts
  such as "quarterly tax report" reach): nothing the tagger knows matches the text;
- **kind**: a surface-word match: the label with the closest name is of another kind than the
  one the weights went to ("car horn" -> Helmeted Hornbill set aside for Engine), or the text
  reads more like another kind than like the label it landed on.
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
    kind_temperature: float | None = None
    temperature_basis: str = ""
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
        for name in ("temperature", "kind_temperature"):
            t = getattr(p, name)
            if t is not None and not 0 < t <= 1:
                raise BundleError(f"label_bridge {name} {t!r} must be in (0, 1]")
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
    proto_vectors: np.ndarray  # [P, D] unit float32, kind prototypes
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

    def proto_similarity(self, q: np.ndarray) -> np.ndarray:
        """[K] per kind: best cosine of ``q`` over the kind's prototypes (-inf: none)."""
        k = np.full(len(self.kind_names), -np.inf, np.float32)
        np.maximum.at(k, self.proto_kind, self.proto_vectors @ q)
        return k

    def kind_similarity(self, q: np.ndarray, label_sim: np.ndarray) -> np.ndarray:
        """[K] per kind: the best of its prototypes and its labels."""
        k = self.proto_similarity(q)
        np.maximum.at(k, self.label_kind, label_sim)
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


def hierarchical_weights(sim: np.ndarray, kind_sim: np.ndarray, label_kind: np.ndarray, kind_temperature: float,
                         temperature: float, max_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights): p(kind) * p(label | kind), the ``max_labels`` largest, renormalised.

    ``sim`` [N] label cosines, ``kind_sim`` [K] kind similarities, ``label_kind`` [N] kind of each
    label. Kinds without labels get no mass.
    """
    n_kinds = kind_sim.shape[0]
    has = np.bincount(label_kind, minlength=n_kinds) > 0
    ks = np.where(has, kind_sim, -np.inf).astype(np.float64)
    pk = np.exp((ks - ks[has].max()) / kind_temperature)
    pk /= pk.sum()
    best = np.full(n_kinds, -np.inf)
    np.maximum.at(best, label_kind, sim.astype(np.float64))
    e = np.exp((sim - best[label_kind]) / temperature)
    z = np.bincount(label_kind, weights=e, minlength=n_kinds)
    w = pk[label_kind] * e / z[label_kind]
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

    def weights(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(indices, weights, label cosines [N], kind similarities [K]) of one unit query vector."""
        p = self.params
        sim = self.index.label_similarity(q)
        ksim = self.index.kind_similarity(q, sim)
        if p.kind_temperature is None:
            idx, w = softmax_weights(sim, p.temperature, p.max_labels)
        else:
            idx, w = hierarchical_weights(sim, ksim, self.index.label_kind, p.kind_temperature, p.temperature,
                                          p.max_labels)
        return idx, w, sim, ksim

    def resolve(self, text: str) -> Resolution:
        p = self.params
        q = self.encoder.encode([text])[0]
        idx, w, sim, _ = self.weights(q)
        best = int(idx[0])
        nearest = int(np.argmax(sim))
        fit = float(sim[nearest])
        kinds = self.index.kind_names
        proto = self.index.proto_similarity(q)
        top_kind = kinds[int(self.index.label_kind[best])]
        near_kind = kinds[int(self.index.label_kind[nearest])]
        mass = {k: float(w[self.index.label_kind[idx] == i].sum()) for i, k in enumerate(kinds)}
        warning = None
        if fit < p.fit_floor:
            warning = (
                f"{text!r} matches no {self.expert} label well (best cosine {fit:.2f} < floor "
                f"{p.fit_floor:.2f}, nearest {self.names[nearest]!r}): this expert will hardly score it"
            )
        elif near_kind != top_kind:
            warning = (
                f"{text!r} reads like {_a(top_kind)} sound: weights go to {self.names[best]!r}; the label with "
                f"the closest name, {self.names[nearest]!r} ({near_kind}, cosine {fit:.2f}), matches a word only"
            )
        else:
            own = float(sim[best])
            other = [(float(proto[i]), k) for i, k in enumerate(kinds) if k != top_kind and np.isfinite(proto[i])]
            if other:
                s_other, k_other = max(other)
                if s_other > own:
                    warning = (
                        f"{text!r} reads like {_a(k_other)} sound (cosine {s_other:.2f}) more than its best "
                        f"label {self.names[best]!r} ({top_kind}, cosine {own:.2f}): a name match, check the labels"
                    )
        return Resolution(
            expert=self.expert,
            vector=encode_sparse(self.expert, idx, w),
            top=[(self.names[int(i)], float(x)) for i, x in zip(idx[:10], w[:10], strict=True)],
            fit=fit,
            warning=warning,
            fits=fit >= p.fit_floor,
            extra={"top_kind": top_kind, "kind_mass": {k: round(v, 4) for k, v in mass.items() if v > 0}},
        )


def _a(kind: str) -> str:
    return f"an {kind}" if kind[:1] in "aeiou" else f"a {kind}"


@register_text_side("label_bridge")
def make_label_bridge(bundle: Bundle, spec: TextSpec) -> TextSide:
    return LabelBridge(bundle, spec)
