"""Feedback: suppress a window that sounds more like a known false alarm than like the query.

A query may carry ``negatives`` (windows a ranger marked "false alarm") and ``positives``
(windows marked "correct"); each is one vector per expert, as the device sent it with the event.
In every expert space the window ``x`` and each example ``e`` are compared by cosine
(``x.e / |x||e|``: embeddings as they are, labels experts on the probability vectors), and the
per-expert cosines are mixed with the query's expert weights, as the score is:

    neg = max over negatives of sim(x, n)
    pos = max(sim(x, query vector), max over positives of sim(x, p))
    suppressed  <=>  neg >= MIN_NEGATIVE_SIMILARITY  and  neg > pos + MARGIN

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

MIN_NEGATIVE_SIMILARITY = 0.8  # a window must be at least this close to a negative (cosine)
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


def decode_example(ex: Example, manifest: Manifest, what: str) -> dict[str, np.ndarray]:
    """An example -> {expert: unit vector [dim] float32}; QueryRejected names the problem."""
    by = {v.expert: v for v in ex.vectors}
    names = manifest.expert_names
    if sorted(by) != sorted(names) or len(by) != len(ex.vectors):
        raise QueryRejected(f"{what}: vectors for experts {[v.expert for v in ex.vectors]}, this bundle has {names}")
    out: dict[str, np.ndarray] = {}
    for spec in manifest.device.experts:
        vec = by[spec.name]
        if is_labels(spec.output_kind) != (vec.encoding == "sparse"):
            raise QueryRejected(f"{what}: expert {spec.name!r} needs a {'sparse' if is_labels(spec.output_kind) else 'dense'} vector")
        v = vec.dense(spec.dim)
        n = float(np.linalg.norm(v))
        if not np.isfinite(n) or n == 0.0:
            raise QueryRejected(f"{what}: vector for expert {spec.name!r} is all zeros")
        out[spec.name] = v / n
    return out


@dataclass(frozen=True)
class FeedbackSet:
    """Negatives and positives of the queries that have feedback, stacked per expert.

    Rows of ``neg[e]`` / ``pos[e]`` are unit example vectors scaled by their query's weight for
    expert ``e``; ``neg_owner`` / ``pos_owner`` give each row's query column (sorted, so
    ``np.maximum.reduceat`` groups them); ``cols`` are the query columns that have negatives.
    """

    cols: np.ndarray  # [nf] intp, query columns with negatives
    neg: dict[str, np.ndarray]  # expert -> [n_neg, dim]
    neg_starts: np.ndarray  # [nf] first negative row of each column in ``cols``
    pos: dict[str, np.ndarray]  # expert -> [n_pos, dim]
    pos_starts: np.ndarray  # [nf]

    def suppressed(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """{expert: [B, dim]} -> [B, nf] bool: which windows each feedback query suppresses."""
        neg = pos = None
        for name, n_rows in self.neg.items():
            x = np.asarray(vectors[name], np.float32)
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            xn = x / np.where(norm > 0, norm, 1.0)
            a = xn @ n_rows.T
            b = xn @ self.pos[name].T
            neg = a if neg is None else neg + a
            pos = b if pos is None else pos + b
        assert neg is not None and pos is not None
        neg_max = np.maximum.reduceat(neg, self.neg_starts, axis=1)
        pos_max = np.maximum.reduceat(pos, self.pos_starts, axis=1)
        return (neg_max >= MIN_NEGATIVE_SIMILARITY) & (neg_max > pos_max + MARGIN)


def build_feedback(queries: tuple, dims: dict[str, int]) -> FeedbackSet | None:  # tuple[CompiledQuery, ...]
    """Stack the examples of ``queries`` (CompiledQuery); None when no query has a negative."""
    cols = [j for j, q in enumerate(queries) if q.negatives]
    if not cols:
        return None
    neg: dict[str, list[np.ndarray]] = {e: [] for e in dims}
    pos: dict[str, list[np.ndarray]] = {e: [] for e in dims}
    neg_starts, pos_starts, n_neg, n_pos = [], [], 0, 0
    for j in cols:
        q = queries[j]
        neg_starts.append(n_neg)
        pos_starts.append(n_pos)
        for e in dims:
            w = np.float32(q.weights[e])
            neg[e].extend(ex[e] * w for ex in q.negatives)
            pos[e].extend(ex[e] * w for ex in (q.anchor, *q.positives))
        n_neg += len(q.negatives)
        n_pos += 1 + len(q.positives)
    return FeedbackSet(
        cols=np.asarray(cols, np.intp),
        neg={e: np.ascontiguousarray(np.stack(v), np.float32) for e, v in neg.items()},
        neg_starts=np.asarray(neg_starts, np.intp),
        pos={e: np.ascontiguousarray(np.stack(v), np.float32) for e, v in pos.items()},
        pos_starts=np.asarray(pos_starts, np.intp),
    )
