"""Text side (server part): text -> one query vector per expert, plus what it resolved to.

Each ``TextSpec.kind`` of a manifest names a registered ``TextSide`` factory:
- ``label_bridge``: sentence encoder over label texts -> sparse softmax weights (labels space),
- ``union_bridge``: one label bridge over several experts' labels -> a sparse vector per expert
  and the expert weights (``extra["gate"]``), one text side per expert sharing one index,
- ``joint``: a text tower that gives a unit vector (CLAP),
- ``projected``: a trained text projection (mixture of experts).
``QueryBuilder.build`` turns a text into a signed-ready ``QueryMessage`` for a bundle; a temporal
text ("A followed by B within 30 s", grammar in ``text.temporal``) becomes one message with two parts.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..bundle import Bundle, TextSpec
from ..errors import BundleError, QueryRejected
from ..policy import PolicyOverlay
from ..protocol import SCHEMA, QueryMessage, VectorPayload, utcnow
from .temporal import build_temporal, parse_temporal


@dataclass(frozen=True)
class Resolution:
    """What a text resolved to for one expert, for ``explain`` and ``alerts add``."""

    expert: str
    vector: VectorPayload
    top: list[tuple[str, float]]  # (label or caption, weight or similarity), best first
    fit: float  # best similarity of the text to anything the expert knows (cosine)
    warning: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    fits: bool = True  # False when ``fit`` is below the expert's calibrated floor: it will hardly score


# What ``explain`` prints under its table: users read "fit 1.000" as "will be heard".
FIT_MEANING = (
    "fit: the best cosine similarity between the text and anything an expert knows (its label texts, "
    "or the captions it was trained on); 1.0 means the text names a label outright. It says the text "
    "was understood, not that the sound occurs or scores high: scores come from the audio."
)


def query_warnings(text: str, resolutions: list[Resolution]) -> list[str]:
    """The warnings of a resolved query, per expert, then for the whole query (one place for
    ``explain``, ``run`` and ``alerts add``): "may never fire" only when no expert fits."""
    out = [f"{r.expert}: {r.warning}" for r in resolutions if r.warning]
    if not any(r.fits for r in resolutions):
        out.append(f"{text.strip()!r} fits no expert of this bundle: the query may never fire")
    if not text.isascii():
        out.append(f"{text.strip()!r} has non-English characters: the text side reads English only "
                   "(describe the sound in English, e.g. 'chainsaw')")
    return out


class TextSide(ABC):
    """Maps text to one expert's query vector."""

    expert: str

    @abstractmethod
    def resolve(self, text: str) -> Resolution: ...


_REGISTRY: dict[str, Callable[[Bundle, TextSpec], TextSide]] = {}
_MODULES: dict[str, str] = {
    "label_bridge": "edge_retrieval.text.label_bridge",
    "union_bridge": "edge_retrieval.text.union_bridge",
    "joint": "edge_retrieval.text.joint",
    "projected": "edge_retrieval.text.projected",
}


def register_text_side(kind: str) -> Callable[[Callable[[Bundle, TextSpec], TextSide]], Callable[[Bundle, TextSpec], TextSide]]:
    def deco(factory: Callable[[Bundle, TextSpec], TextSide]) -> Callable[[Bundle, TextSpec], TextSide]:
        _REGISTRY[kind] = factory
        return factory

    return deco


def make_text_side(bundle: Bundle, spec: TextSpec) -> TextSide:
    if spec.kind not in _REGISTRY and spec.kind in _MODULES:
        importlib.import_module(_MODULES[spec.kind])
    if spec.kind not in _REGISTRY:
        raise BundleError(f"unknown text side {spec.kind!r}; known: {sorted(set(_REGISTRY) | set(_MODULES))}")
    return _REGISTRY[spec.kind](bundle, spec)


class QueryBuilder:
    """All text sides of a bundle, loaded once (the server keeps one)."""

    def __init__(self, bundle: Bundle) -> None:
        server = bundle.require_server()
        self.bundle = bundle
        self.sides = [make_text_side(bundle, spec) for spec in server.text]
        self.gating = server.gating

    def resolve(self, text: str) -> list[Resolution]:
        text = (text or "").strip()
        if not text:
            raise QueryRejected("query text is empty")
        if len(text) > 500:
            raise QueryRejected(f"query text is {len(text)} characters, limit 500")
        return [side.resolve(text) for side in self.sides]

    def expert_weights(self, text: str, resolutions: list[Resolution]) -> list[float]:
        """Per-expert weights: the gate's if the bundle has one (set by a resolution), else equal."""
        gates = [r.extra.get("gate") for r in resolutions]
        if all(g is not None for g in gates):
            total = float(sum(gates)) or 1.0
            return [float(g) / total for g in gates]
        return [1.0 / len(resolutions)] * len(resolutions)

    def build(
        self,
        text: str,
        query_id: str,
        threshold: float,
        version: int = 1,
        policy: PolicyOverlay | None = None,
        expires: str | None = None,
        *,
        part_thresholds: Sequence[float] | None = None,
        temporal: bool = False,
    ) -> tuple[QueryMessage, list[Resolution]]:
        """A signed-ready message. With ``temporal`` a text with a relation ("A followed by B",
        ``text.temporal``) gives one message carrying both parts (``part_thresholds``, default
        ``threshold`` for each) and the resolutions of both parts in order; without it (retrieval
        over captions, where "while" and "with" are ordinary words) every text is a plain query.
        """
        tq = parse_temporal(text) if temporal else None
        if tq is not None:
            thresholds = list(part_thresholds) if part_thresholds is not None else [threshold, threshold]
            msg, per_part = build_temporal(self, tq, query_id, thresholds, version, policy, expires)
            return msg, [r for res in per_part for r in res]
        res = self.resolve(text)
        lo = -1.0 if self.bundle.manifest.space.kind == "joint" else 0.0
        if not lo <= threshold <= 1.0:
            raise QueryRejected(f"threshold {threshold!r} is out of range [{lo}, 1] for a {self.bundle.manifest.space.kind} space")
        msg = QueryMessage.model_validate(
            {
                "schema": SCHEMA,
                "query_id": query_id,
                "version": version,
                "text": text.strip(),
                "space_id": self.bundle.manifest.space.id,
                "vectors": [r.vector.model_dump(exclude_none=True) for r in res],
                "weights": self.expert_weights(text, res),
                "threshold": threshold,
                "policy": policy.model_dump(exclude_none=True) if policy else None,
                "created": utcnow(),
                "expires": expires,
            }
        )
        return msg, res
