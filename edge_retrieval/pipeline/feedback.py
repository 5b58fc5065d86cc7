"""Feedback: suppress a window that sounds more like a known false alarm than like the query.

A query may carry ``negatives`` (windows a ranger marked "false alarm") and ``positives``
(windows marked "correct"); each is one vector per expert, as the device sent it with the event.
In every expert space the window ``x`` and each example ``e`` are compared by cosine
(``x.e / |x||e|``: embeddings as they are, labels experts on the probability vectors), and the
per-expert cosines are mixed with the query's expert weights, as the score is:

    neg = max over negatives of sim(x, n)
    pos = max(sim(x, query vector), max over positives of sim(x, p))
    suppressed  <=>  neg >= floor  and  neg > pos + MARGIN

``floor`` is the bundle's ``feedback_floor`` in the tuned defaults (data/default_policy.json,
chosen on the fixture's dev half by scripts/feedback_cv.py), else MIN_NEGATIVE_SIMILARITY.

A suppressed window counts as a miss for that query (the detector leaves its background
baseline alone, as for a gated window). The work is two matrix products over the queries that
carry feedback; a snapshot without any costs one attribute test per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Manifest
from ..errors import QueryRejected
from ..protocol import Example, VectorPayload, encode_dense, encode_sparse

MIN_NEGATIVE_SIMILARITY = 0.8  # the floor of a bundle without a tuned one: this close to a negative (cosine)
MARGIN = 0.0  # ... and closer to it than to every positive by more than this
TOP_LABELS = 32  # labels kept of a window's probability vector when it travels (sparse)


def is_labels(output_kind: str) -> bool:
    return output_kind in ("probabilities", "logits")


def window_example(manifest: Manifest, vectors: dict[str, np.ndarray], event_id: str | None = None) -> Example:
    """One window's vectors ({expert: [dim]}) -> the compact form an event carries.

    Embeddings travel as f16; labels experts as their ``TOP_LABELS`` largest probabilities
    (normalised to sum 1: the cosine does not depend on scale).
    """
    out: list[VectorPayload] = []
    for spec in manifest.device.experts:
        v = np.asarray(vectors[spec.name], np.float32).ravel()
        if is_labels(spec.output_kind):
            k = min(TOP_LABELS, v.size)
            idx = np.argpartition(-v, k - 1)[:k]
            idx = idx[np.argsort(-v[idx])]
            w = np.maximum(v[idx], 0.0)
            if float(w.sum()) <= 0.0:
                w = np.ones_like(w)
            out.append(encode_sparse(spec.name, idx, w))
        else:
            out.append(encode_dense(spec.name, v, "f16"))
    return Example(vectors=out, event_id=event_id)


# one expert's unit example vector: dense [dim] float32 (embeddings), or (label indices int64,
# weights float32) for a labels expert, kept sparse (<= 64 entries, not the 6,528 labels)
Unit = np.ndarray | tuple[np.ndarray, np.ndarray]


def decode_example(ex: Example, manifest: Manifest, what: str) -> dict[str, Unit]:
    """An example -> {expert: unit vector}; QueryRejected names the problem."""
    by = {v.expert: v for v in ex.vectors}
    names = manifest.expert_names
    if sorted(by) != sorted(names) or len(by) != len(ex.vectors):
        raise QueryRejected(f"{what}: vectors for experts {[v.expert for v in ex.vectors]}, this bundle has {names}")
    out: dict[str, Unit] = {}
    for spec in manifest.device.experts:
        vec = by[spec.name]
        labels = is_labels(spec.output_kind)
        if labels != (vec.encoding == "sparse"):
            raise QueryRejected(f"{what}: expert {spec.name!r} needs a {'sparse' if labels else 'dense'} vector")
        if labels:
            assert vec.indices is not None and vec.weights is not None
            idx = np.asarray(vec.indices, np.int64)
            if idx.max() >= spec.dim:
                raise QueryRejected(f"{what}: label index {int(idx.max())} out of range ({spec.dim} labels)")
            out[spec.name] = unit_sparse(idx, np.asarray(vec.weights, np.float32))
            continue
        v = vec.dense(spec.dim)
        n = float(np.linalg.norm(v))
        if not np.isfinite(n) or n == 0.0:
            raise QueryRejected(f"{what}: vector for expert {spec.name!r} is all zeros")
        out[spec.name] = v / n
    return out


def unit_sparse(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = float(np.linalg.norm(w))
    if n == 0.0:
        raise QueryRejected("a sparse example has only zero weights")
    return idx.astype(np.int64), (w / n).astype(np.float32)


@dataclass(frozen=True)
class _Rows:
    """Example rows of one expert: dense ``[n, dim]``, or sparse padded ``idx``/``w`` ``[n, k]``
    (padding: label 0, weight 0). Each row is a unit vector times its query's expert weight."""

    dense: np.ndarray | None = None
    idx: np.ndarray | None = None
    w: np.ndarray | None = None

    def sims(self, xn: np.ndarray) -> np.ndarray:
        """Unit windows [B, dim] -> weighted cosines [B, n]."""
        if self.dense is not None:
            return xn @ self.dense.T
        assert self.idx is not None and self.w is not None
        return np.einsum("bnk,nk->bn", np.take(xn, self.idx, axis=1), self.w)


def _rows(units: list[Unit], weights: list[float]) -> _Rows:
    if isinstance(units[0], tuple):
        k = max(u[0].size for u in units)  # type: ignore[union-attr]
        idx = np.zeros((len(units), k), np.intp)
        w = np.zeros((len(units), k), np.float32)
        for j, (u, qw) in enumerate(zip(units, weights, strict=True)):
            i, v = u  # type: ignore[misc]
            idx[j, : i.size], w[j, : i.size] = i, v * np.float32(qw)
        return _Rows(idx=idx, w=w)
    return _Rows(dense=np.ascontiguousarray(np.stack([u * np.float32(qw) for u, qw in zip(units, weights, strict=True)]),
                                            np.float32))


@dataclass(frozen=True)
class FeedbackSet:
    """Negatives and positives of the queries that have feedback, stacked per expert.

    ``neg_starts`` / ``pos_starts`` give the first row of each query (rows grouped by query, so
    ``np.maximum.reduceat`` takes each query's best); ``cols`` are those queries' columns.
    """

    cols: np.ndarray  # [nf] intp, query columns with negatives
    neg: dict[str, _Rows]
    neg_starts: np.ndarray  # [nf]
    pos: dict[str, _Rows]
    pos_starts: np.ndarray  # [nf]
    floor: float = MIN_NEGATIVE_SIMILARITY  # the least cosine to a negative that suppresses

    def suppressed(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """{expert: [B, dim]} -> [B, nf] bool: which windows each feedback query suppresses."""
        neg = pos = None
        for name, rows in self.neg.items():
            x = np.asarray(vectors[name], np.float32)
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            xn = x / np.where(norm > 0, norm, 1.0)
            a, b = rows.sims(xn), self.pos[name].sims(xn)
            neg = a if neg is None else neg + a
            pos = b if pos is None else pos + b
        assert neg is not None and pos is not None
        neg_max = np.maximum.reduceat(neg, self.neg_starts, axis=1)
        pos_max = np.maximum.reduceat(pos, self.pos_starts, axis=1)
        return (neg_max >= self.floor) & (neg_max > pos_max + MARGIN)


def build_feedback(queries: tuple, dims: dict[str, int],  # tuple[CompiledQuery, ...]
                   floor: float = MIN_NEGATIVE_SIMILARITY) -> FeedbackSet | None:
    """Stack the examples of ``queries`` (CompiledQuery); None when no query has a negative."""
    cols = [j for j, q in enumerate(queries) if q.negatives]
    if not cols:
        return None
    neg: dict[str, list[Unit]] = {e: [] for e in dims}
    pos: dict[str, list[Unit]] = {e: [] for e in dims}
    neg_w: dict[str, list[float]] = {e: [] for e in dims}
    pos_w: dict[str, list[float]] = {e: [] for e in dims}
    neg_starts, pos_starts, n_neg, n_pos = [], [], 0, 0
    for j in cols:
        q = queries[j]
        neg_starts.append(n_neg)
        pos_starts.append(n_pos)
        for e in dims:
            neg[e].extend(ex[e] for ex in q.negatives)
            neg_w[e].extend([q.weights[e]] * len(q.negatives))
            pos[e].extend(ex[e] for ex in (q.anchor, *q.positives))
            pos_w[e].extend([q.weights[e]] * (1 + len(q.positives)))
        n_neg += len(q.negatives)
        n_pos += 1 + len(q.positives)
    return FeedbackSet(
        cols=np.asarray(cols, np.intp),
        neg={e: _rows(neg[e], neg_w[e]) for e in dims},
        neg_starts=np.asarray(neg_starts, np.intp),
        pos={e: _rows(pos[e], pos_w[e]) for e in dims},
        pos_starts=np.asarray(pos_starts, np.intp),
        floor=float(floor),
    )
