"""Query by example: a recording's own vector as the query.

Per expert, the vectors of the recording's windows are averaged: for an embedding expert the
mean is renormalised to a unit vector; for a labels expert the top-64 mean probabilities are
normalised to sum 1 and sent as a sparse vector. Needs only the device part of the bundle. The
same vectors serve a device query (``query_from_audio``) and archive search by example
(``example_query``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle, Manifest
from ..protocol import MAX_SPARSE, SCHEMA, QueryMessage, VectorPayload, encode_dense, encode_sparse, utcnow
from .retrieval import FileEmbedder, FileVectors, QueryVectors


def example_vectors(bundle: Bundle, path: str | Path, threads: int = 1, max_batch: int = 16) -> dict[str, np.ndarray]:
    """Mean vector per expert over the windows of ``path`` (embedded by ``FileEmbedder``)."""
    fv = FileEmbedder(bundle, threads, batch=max_batch).embed_file(path)
    return {k: (v.astype(np.float64).sum(axis=0) / max(fv.n_windows, 1)).astype(np.float32) for k, v in fv.vectors.items()}


def example_payloads(means: dict[str, np.ndarray], manifest: Manifest, top_k: int = MAX_SPARSE) -> list[VectorPayload]:
    """Per expert of the bundle, the query vector of a recording's mean window vector (module doc)."""
    payloads = []
    for spec in manifest.device.experts:
        v = means[spec.name]
        if spec.output_kind in ("probabilities", "logits"):
            k = min(top_k, v.size)
            idx = np.argsort(-v, kind="stable")[:k]
            w = np.maximum(v[idx].astype(np.float64), 0.0)
            if w.sum() <= 0:
                w = np.ones_like(w)
            payloads.append(encode_sparse(spec.name, idx, w / w.sum()))
        else:
            n = float(np.linalg.norm(v))
            payloads.append(encode_dense(spec.name, v / n if n > 0 else v, "f32"))
    return payloads


def example_query(fv: FileVectors, manifest: Manifest) -> QueryVectors:
    """Query by example for archive search: the same vectors ``query_from_audio`` sends a device."""
    means = {k: v.astype(np.float64).mean(axis=0).astype(np.float32) for k, v in fv.vectors.items()}
    payloads = example_payloads(means, manifest)
    names = tuple(p.expert for p in payloads)
    vecs = tuple(p.dense(manifest.expert(p.expert).dim) for p in payloads)
    return QueryVectors(f"<example {Path(fv.path).name}>", manifest.space.id, names, (1.0 / len(names),) * len(names), vecs)


def query_from_audio(
    bundle: Bundle, path: str | Path, query_id: str, threshold: float, threads: int = 1, top_k: int = MAX_SPARSE
) -> QueryMessage:
    """A QueryMessage whose vectors are the recording's mean vectors (see module doc)."""
    payloads = example_payloads(example_vectors(bundle, path, threads), bundle.manifest, top_k)
    n_exp = len(payloads)
    return QueryMessage.model_validate(
        {
            "schema": SCHEMA,
            "query_id": query_id,
            "version": 1,
            "text": f"like {Path(path).name}"[:500],
            "space_id": bundle.manifest.space.id,
            "vectors": [p.model_dump(exclude_none=True) for p in payloads],
            "weights": [1.0 / n_exp] * n_exp,
            "threshold": threshold,
            "created": utcnow(),
        }
    )
