"""Matcher: every registered query scored against a batch of windows in one product per expert.

A query carries one vector per expert and a weight per expert (weights are normalised to sum 1,
so a score stays in its expert's range). Per expert the matcher keeps one matrix whose columns
are the queries' weighted vectors:

- embedding experts (joint / trained spaces): dense, one row per query ``Q [nq, dim]``; scores
  = ``einsum('bd,qd->bq', X, Q)``: numpy's own loops, not BLAS, whose thread pool made one
  window's product 8x slower (8 ms vs 0.9 ms for 10,000 queries) on a loaded 2-core board;
- labels experts: queries are sparse (<= 64 labels each), kept sparse: every query's label
  indices and weights, either padded to one ``[nq, k]`` table (queries of equal size, as the
  label bridge makes them: one einsum) or flat and grouped by query (CSR, ``np.add.reduceat``).
  scores = per-query sums of ``P[:, idx] * w``: work and memory grow with the number of nonzeros
  (64 per query), not with ``labels x queries`` (a dense union matrix is 261 MB and ~20 ms per
  window at 10,000 queries; this is 7.7 MB and ~1 ms, see benchmarks/).

The ensemble score is the sum over experts. add/remove build a new immutable snapshot and swap
it in under a lock, so scoring never sees a half-updated set. Queries with feedback negatives
also get their examples stacked in the snapshot (``Snapshot.suppressed``, pipeline/feedback.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from ..bundle import Manifest
from ..defaults import feedback_floor
from ..errors import QueryRejected
from ..policy import PolicyOverlay
from ..protocol import QueryMessage
from .feedback import MIN_NEGATIVE_SIMILARITY, FeedbackSet, Unit, build_feedback, decode_example, unit_sparse


@dataclass(frozen=True)
class CompiledQuery:
    """A query checked against a bundle: per-expert vectors (dense, or indices + weights)."""

    query_id: str
    version: int
    text: str
    threshold: float
    policy: PolicyOverlay | None
    weights: dict[str, float]  # expert -> weight (sum 1)
    dense: dict[str, np.ndarray]  # expert -> [dim] float32
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]  # expert -> (indices int64, weights float32)
    # feedback (pipeline/feedback.py): unit vectors per expert (sparse for labels experts);
    # ``anchor`` (the query's own vector) is kept only when there are negatives
    negatives: tuple[dict[str, Unit], ...] = ()
    positives: tuple[dict[str, Unit], ...] = ()
    anchor: dict[str, Unit] = field(default_factory=dict)


def compile_query(msg: QueryMessage, manifest: Manifest) -> CompiledQuery:
    """Check ``msg`` against this bundle and decode its vectors; QueryRejected names the problem."""
    qid = msg.query_id
    if msg.deleted:
        raise QueryRejected(f"query {qid!r} v{msg.version} is a deletion, not a query")
    if msg.space_id != manifest.space.id:
        raise QueryRejected(
            f"query {qid!r}: space id {msg.space_id[:12]}... does not match this bundle's "
            f"{manifest.space.id[:12]}... ({manifest.name}); build the query with the same bundle"
        )
    names = manifest.expert_names
    experts = [v.expert for v in msg.vectors]
    unknown = [e for e in experts if e not in names]
    if unknown:
        raise QueryRejected(f"query {qid!r}: unknown expert(s) {unknown}; this bundle has {names}")
    missing = [e for e in names if e not in experts]
    if missing:
        raise QueryRejected(f"query {qid!r}: no vector for expert(s) {missing}; this bundle has {names}")
    total = float(sum(msg.weights))
    lo = -1.0 if manifest.space.kind == "joint" else 0.0
    assert msg.threshold is not None  # QueryMessage guarantees it for a non-deleted query
    if not lo <= msg.threshold <= 1.0:
        raise QueryRejected(
            f"query {qid!r}: threshold {msg.threshold!r} out of range [{lo}, 1] for a {manifest.space.kind} space"
        )
    dense: dict[str, np.ndarray] = {}
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    weights: dict[str, float] = {}
    for vec, w in zip(msg.vectors, msg.weights, strict=True):
        spec = manifest.expert(vec.expert)
        weights[vec.expert] = float(w) / total
        labels = spec.output_kind in ("probabilities", "logits")
        if labels:
            if vec.encoding != "sparse":
                raise QueryRejected(
                    f"query {qid!r}: expert {vec.expert!r} scores labels and needs a 'sparse' vector, got {vec.encoding!r}"
                )
            assert vec.indices is not None and vec.weights is not None
            idx = np.asarray(vec.indices, np.int64)
            if idx.max() >= spec.dim:
                raise QueryRejected(
                    f"query {qid!r}: label index {int(idx.max())} out of range for expert {vec.expert!r} ({spec.dim} labels)"
                )
            sparse[vec.expert] = (idx, np.asarray(vec.weights, np.float32))
        else:
            if vec.encoding == "sparse":
                raise QueryRejected(
                    f"query {qid!r}: expert {vec.expert!r} gives embeddings and needs an 'f16' or 'f32' vector, got 'sparse'"
                )
            if vec.dim is not None and vec.dim != spec.dim:
                raise QueryRejected(
                    f"query {qid!r}: vector for expert {vec.expert!r} has dimension {vec.dim}, expected {spec.dim}"
                )
            v = vec.dense(spec.dim)
            n = float(np.linalg.norm(v))
            if n == 0.0:
                raise QueryRejected(f"query {qid!r}: vector for expert {vec.expert!r} is all zeros")
            dense[vec.expert] = v / n  # unit vector: score = cosine
    negatives = tuple(decode_example(ex, manifest, f"query {qid!r} negative {i}") for i, ex in enumerate(msg.negatives))
    positives = tuple(decode_example(ex, manifest, f"query {qid!r} positive {i}") for i, ex in enumerate(msg.positives))
    anchor: dict[str, Unit] = {}
    if negatives:  # the query's own vector is a positive: unit, sparse for labels
        for name in names:
            anchor[name] = dense[name] if name in dense else unit_sparse(*sparse[name])
    return CompiledQuery(
        query_id=qid,
        version=msg.version,
        text=msg.text,
        threshold=float(msg.threshold),
        policy=msg.policy,
        weights=weights,
        dense=dense,
        sparse=sparse,
        negatives=negatives,
        positives=positives,
        anchor=anchor,
    )


@dataclass(frozen=True)
class _ExpertMatrix:
    index: np.ndarray | None  # None = all outputs (dense)
    rows: np.ndarray  # [nq, dim] float32, C-contiguous, expert weight folded in

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("bd,qd->bq", x, self.rows)


@dataclass(frozen=True)
class _SparseExpert:
    """CSR by query: entries ``starts[j]:starts[j+1]`` of ``labels``/``weights`` are query j's."""

    index: np.ndarray  # [len(U)] int64, the union of the queries' labels (for inspection)
    labels: np.ndarray  # [nnz] intp, label of each entry
    weights: np.ndarray  # [nnz] float32, query weight x expert weight
    starts: np.ndarray  # [nq] intp, first entry of each query (every query has >= 1 entry)

    def score(self, x: np.ndarray) -> np.ndarray:
        g = np.take(x, self.labels, axis=1)  # [B, nnz]
        np.multiply(g, self.weights, out=g)
        return np.add.reduceat(g, self.starts, axis=1)  # [B, nq]


@dataclass(frozen=True)
class _PaddedSparseExpert:
    """Queries with (nearly) equal label counts, padded to ``k`` (label 0, weight 0): one einsum."""

    index: np.ndarray  # [len(U)] int64, the union of the queries' labels (for inspection)
    labels: np.ndarray  # [nq, k] intp
    weights: np.ndarray  # [nq, k] float32, query weight x expert weight; 0 for padding

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("bqk,qk->bq", np.take(x, self.labels, axis=1), self.weights)  # ~20% faster than reduceat


@dataclass(frozen=True)
class Snapshot:
    """Immutable scoring state: query order, thresholds and per-expert matrices."""

    queries: tuple[CompiledQuery, ...]
    thresholds: np.ndarray  # [nq]
    experts: dict[str, _ExpertMatrix | _SparseExpert | _PaddedSparseExpert]
    feedback: FeedbackSet | None = None  # None: no query has a negative (nothing to suppress)

    @property
    def ids(self) -> list[str]:
        return [q.query_id for q in self.queries]

    def score(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """{expert: [B, dim]} -> scores [B, nq] float32."""
        if not self.queries:
            b = next(iter(vectors.values())).shape[0] if vectors else 0
            return np.zeros((b, 0), np.float32)
        out: np.ndarray | None = None
        for name, em in self.experts.items():
            x = np.asarray(vectors[name], np.float32)
            part = em.score(x)
            out = part if out is None else out + part
        assert out is not None
        return out.astype(np.float32, copy=False)

    def suppressed(self, vectors: dict[str, np.ndarray]) -> np.ndarray | None:
        """[B, nq] bool: windows a query's feedback suppresses (pipeline/feedback.py); None if none can."""
        if self.feedback is None:
            return None
        b = next(iter(vectors.values())).shape[0]
        mask = np.zeros((b, len(self.queries)), np.bool_)
        mask[:, self.feedback.cols] = self.feedback.suppressed(vectors)
        return mask


def _build(queries: tuple[CompiledQuery, ...], dims: dict[str, int], floor: float = MIN_NEGATIVE_SIMILARITY) -> Snapshot:
    experts: dict[str, _ExpertMatrix | _SparseExpert | _PaddedSparseExpert] = {}
    for name, dim in dims.items():
        if not queries:
            break
        if any(name in q.sparse for q in queries):
            labels, weights, counts = [], [], []
            for q in queries:
                idx, w = q.sparse[name]
                if idx.size == 0:  # keep one entry so reduceat sees a segment; it adds 0
                    idx, w = np.zeros(1, np.int64), np.zeros(1, np.float32)
                labels.append(idx)
                weights.append(np.asarray(w, np.float32) * np.float32(q.weights[name]))
                counts.append(idx.size)
            flat = np.concatenate(labels).astype(np.intp)
            union = np.unique(flat).astype(np.int64)
            k = max(counts)
            if len(queries) * k <= 1.25 * flat.size:  # label-bridge queries all have max_labels entries
                lab = np.zeros((len(queries), k), np.intp)
                wts = np.zeros((len(queries), k), np.float32)
                for j, (idx, w) in enumerate(zip(labels, weights, strict=True)):
                    lab[j, : idx.size], wts[j, : idx.size] = idx, w
                experts[name] = _PaddedSparseExpert(union, lab, wts)
            else:
                starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
                experts[name] = _SparseExpert(union, flat, np.concatenate(weights).astype(np.float32), starts)
        else:
            m = np.stack([q.dense[name] * np.float32(q.weights[name]) for q in queries], axis=0)
            experts[name] = _ExpertMatrix(None, np.ascontiguousarray(m.reshape(len(queries), dim), np.float32))
    return Snapshot(queries, np.asarray([q.threshold for q in queries], np.float32), experts,
                    build_feedback(queries, dims, floor))


class Matcher:
    """The registered queries of one bundle; thread-safe add/remove, lock-free scoring."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.dims = {e.name: e.dim for e in manifest.device.experts}
        self.feedback_floor = feedback_floor(manifest.space.id, MIN_NEGATIVE_SIMILARITY)
        self._lock = threading.Lock()
        self._queries: dict[str, CompiledQuery] = {}
        self._removed: dict[str, int] = {}  # id -> version of its deletion (a replay stays deleted)
        self.snapshot = _build((), self.dims)

    def add(self, q: CompiledQuery) -> bool:
        """Register or replace ``q``; an older or equal version of a known id is ignored (False)."""
        with self._lock:
            old = self._queries.get(q.query_id)
            if old is not None and q.version <= old.version:
                return False
            if q.version <= self._removed.get(q.query_id, 0):
                return False
            self._queries[q.query_id] = q
            self.snapshot = _build(tuple(self._queries.values()), self.dims, self.feedback_floor)
            return True

    def remove(self, query_id: str, version: int | None = None) -> bool:
        """Drop a query; with ``version`` (a tombstone's), older versions stay refused later."""
        with self._lock:
            if version is not None:
                self._removed[query_id] = max(version, self._removed.get(query_id, 0))
            old = self._queries.get(query_id)
            if old is not None and version is not None and old.version > version:
                return False
            if self._queries.pop(query_id, None) is None:
                return False
            self.snapshot = _build(tuple(self._queries.values()), self.dims, self.feedback_floor)
            return True

    def get(self, query_id: str) -> CompiledQuery | None:
        return self._queries.get(query_id)

    def __len__(self) -> int:
        return len(self._queries)

    def score(self, vectors: dict[str, np.ndarray]) -> tuple[Snapshot, np.ndarray]:
        snap = self.snapshot  # one reference read: a consistent set even while queries change
        return snap, snap.score(vectors)
