"""Offline retrieval shared by archive search and evaluation: files -> window vectors -> clip scores.

A file is decoded by ``device.sources.FileSource`` and embedded through ``pipeline.Pipeline`` as
the daemon does (without the gate): windows start every ``hop_s`` of the bundle, each expert
takes its own window length at its own rate, and an uncovered tail gets one zero-padded window.
A clip's score for a query is the max over its windows (docs/architecture.md, "Scores").
Metrics follow Oncescu et al. 2021: Recall@K, median rank of the first relevant item, mAP@10.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, Manifest
from ..device.sources import FileSource
from ..errors import EncoderError, QueryRejected
from ..pipeline.core import Pipeline
from ..pipeline.expert import AudioExpert
from ..pipeline.matcher import compile_query
from ..pipeline.windows import Tick
from ..protocol import QueryMessage, VectorPayload, encode_sparse

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".w64", ".caf")
TOP_LABELS = 64  # labels space: probabilities kept per window (protocol.MAX_SPARSE)
_BLOCK_S = 2.0  # decoded block length (seconds): bounds memory on hour-long field recordings


# --------------------------------------------------------------------------- embedding


@dataclass
class FileVectors:
    """One file's window vectors: ``vectors[expert]`` is [windows, dim] float32."""

    path: str
    duration_s: float
    sample_rate: int
    offsets_s: np.ndarray
    vectors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return int(self.offsets_s.size)


class FileEmbedder:
    """Embeds whole files with every audio expert of a bundle (device part only), through ``Pipeline``."""

    def __init__(
        self, bundle: Bundle, threads: int = 1, providers: Sequence[str] | None = None, batch: int = 8
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.hop_s = self.manifest.device.hop_s
        # every window is kept (no gate): an archive is searched for quiet sounds too
        self.pipeline = Pipeline(bundle, threads=threads, providers=providers, gate_dbfs=None, max_batch=batch)
        self.experts: list[AudioExpert] = self.pipeline.experts
        self.batch = self.pipeline.max_batch

    def embed_file(self, path: str | Path) -> FileVectors:
        """All windows of one file, on the daemon's windowing and encoders, in batches of ``batch``."""
        src = FileSource(path, block_s=_BLOCK_S)
        pipe = self.pipeline
        pipe.new_stream(src.in_rate)
        pending: list[Tick] = []
        done: dict[str, list[np.ndarray]] = {e.name: [] for e in self.experts}
        starts: list[float] = []

        def take(ticks: list[Tick], last: bool = False) -> None:
            pending.extend(ticks)
            starts.extend(t.start_s for t in ticks)
            while len(pending) >= self.batch or (last and pending):
                chunk = pending[: self.batch]
                del pending[: self.batch]
                for name, v in pipe.encode(chunk, range(len(chunk))).items():
                    done[name].append(v)

        for block in src.blocks():
            take(pipe.push(block))
        take(pipe.flush(), last=True)
        vectors = {}
        for e in self.experts:
            v = np.concatenate(done[e.name]) if done[e.name] else np.zeros((0, e.dim), np.float32)
            if v.shape[0] != len(starts):  # every expert must give one vector per common window
                raise EncoderError(f"expert {e.name!r} gave {v.shape[0]} windows for {str(path)!r}, expected {len(starts)}")
            vectors[e.name] = v
        return FileVectors(str(path), src.duration_s, src.in_rate, np.asarray(starts, np.float64), vectors)


def is_labels_expert(manifest: Manifest, expert: str) -> bool:
    """Labels experts give probabilities (stored as top-64); the others give unit embeddings."""
    return manifest.expert(expert).output_kind in ("probabilities", "logits")


# --------------------------------------------------------------------------- queries and scores


@dataclass(frozen=True)
class QueryVectors:
    """A query decoded for scoring: one dense float32 vector and one weight per expert."""

    text: str
    space_id: str
    experts: tuple[str, ...]
    weights: tuple[float, ...]
    vectors: tuple[np.ndarray, ...]


def query_from_message(msg: QueryMessage, manifest: Manifest) -> QueryVectors:
    """Decode a query message for offline scoring, checked by the device's own rules
    (``matcher.compile_query``: space id, experts, encodings, dimensions, threshold range)."""
    q = compile_query(msg, manifest)
    names = tuple(q.weights)
    vecs = []
    for name in names:
        if name in q.dense:
            vecs.append(q.dense[name])
        else:
            idx, w = q.sparse[name]
            v = np.zeros(manifest.expert(name).dim, np.float32)
            v[idx] = w
            vecs.append(v)
    return QueryVectors(msg.text, msg.space_id, names, tuple(q.weights[n] for n in names), tuple(vecs))


def text_queries(bundle: Bundle, texts: Sequence[str]) -> list[QueryVectors]:
    """Text -> query vectors with the bundle's text side (needs the server part)."""
    from ..text import QueryBuilder

    builder = QueryBuilder(bundle)
    out = []
    for t in texts:
        msg, _ = builder.build(t, "search", threshold=0.0)
        out.append(query_from_message(msg, bundle.manifest))
    return out


def example_query(fv: FileVectors, manifest: Manifest) -> QueryVectors:
    """Query by example: the mean window vector of a recording, per expert.

    Labels experts keep the top-64 mean probabilities as sparse weights (the same form as a text
    query); embedding experts use the normalised mean embedding.
    """
    payloads: list[VectorPayload] = []
    for name, v in fv.vectors.items():
        m = v.mean(axis=0)
        if is_labels_expert(manifest, name):
            idx = np.argsort(-m, kind="stable")[:TOP_LABELS]
            w = np.maximum(m[idx], 1e-12)
            payloads.append(encode_sparse(name, idx, w))
        else:
            payloads.append(VectorPayload(expert=name, encoding="f32", data=_b64(m / max(np.linalg.norm(m), 1e-12)), dim=m.size))
    names = tuple(p.expert for p in payloads)
    vecs = tuple(p.dense(manifest.expert(p.expert).dim) for p in payloads)
    return QueryVectors(f"<example {Path(fv.path).name}>", manifest.space.id, names, (1.0 / len(names),) * len(names), vecs)


def _b64(v: np.ndarray) -> str:
    import base64

    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()


def query_matrix(queries: Sequence[QueryVectors], expert: str) -> tuple[np.ndarray, np.ndarray]:
    """For one expert: ([dim, Q] float32 vectors, [Q] weights); a query without that expert weighs 0."""
    cols, ws = [], []
    dim = None
    for q in queries:
        if expert in q.experts:
            i = q.experts.index(expert)
            cols.append(q.vectors[i])
            ws.append(q.weights[i] / (sum(q.weights) or 1.0))
            dim = q.vectors[i].size
        else:
            cols.append(None)
            ws.append(0.0)
    if dim is None:
        return np.zeros((0, len(queries)), np.float32), np.zeros(len(queries), np.float32)
    mat = np.stack([c if c is not None else np.zeros(dim, np.float32) for c in cols], axis=1)
    return mat.astype(np.float32), np.asarray(ws, np.float32)


def clip_scores(fv: FileVectors, mats: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Scores of one clip for all queries: max over windows of sum_e w_e * (V_e @ q_e) -> [Q]."""
    return window_scores(fv, mats).max(axis=0)


def window_scores(fv: FileVectors, mats: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Scores of every window of one clip for all queries: sum_e w_e * (V_e @ q_e) -> [N, Q]."""
    total = None
    for name, (mat, w) in mats.items():
        if mat.shape[0] == 0:
            continue
        s = (fv.vectors[name] @ mat) * w  # [N, Q]
        total = s if total is None else total + s
    if total is None:
        raise QueryRejected("no query vector matches an expert of this bundle")
    return total


# --------------------------------------------------------------------------- metrics


def ranks_and_ap(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per query: rank (1-based) of the first relevant item, and average precision over the top ``k``.

    ``scores`` and ``relevant`` are [Q, I]. Ties are broken pessimistically (irrelevant items
    first), so a model that scores everything alike earns nothing. AP@k is normalised by
    min(#relevant, k), as in the paper's code.
    """
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, bool)
    if scores.shape != relevant.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must both be [Q, I]")
    q, n = scores.shape
    if n == 0:
        raise ValueError("no items to rank")
    # lexsort: last key is primary -> order by -score, then irrelevant first, then index
    first = np.zeros(q, np.int64)
    ap = np.zeros(q, np.float64)
    idx = np.arange(n)
    for i in range(q):
        if not relevant[i].any():
            raise ValueError(f"query {i} has no relevant item")
        order = np.lexsort((idx, relevant[i].astype(np.int8), -scores[i]))
        rel = relevant[i][order]
        first[i] = int(np.argmax(rel)) + 1
        top = rel[:k].astype(np.float64)
        prec = np.cumsum(top) / np.arange(1, top.size + 1)
        ap[i] = float((prec * top).sum() / min(int(relevant[i].sum()), k))
    return first, ap


def summarize(first: np.ndarray, ap: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (fraction of queries whose first relevant item is in the top K), median rank, mAP@10."""
    first = np.asarray(first)
    out = {f"R@{k}": float(np.mean(first <= k)) for k in ks}
    out["mAP@10"] = float(np.mean(ap))
    out["median_rank"] = float(np.median(first))
    out["mean_rank"] = float(np.mean(first))
    return out


def bootstrap_ci(
    first: np.ndarray, ap: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals over queries (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    q = len(first)
    samples: dict[str, list[float]] = {}
    for _ in range(int(n)):
        i = rng.integers(0, q, q)
        for k, v in summarize(first[i], ap[i]).items():
            samples.setdefault(k, []).append(v)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()}


def paired_bootstrap(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of (b - a) over the same resampled queries: delta, CI, two-sided p.

    p is twice the smaller tail fraction of resampled deltas on either side of zero (capped at 1).
    """
    if len(a[0]) != len(b[0]):
        raise ValueError(f"paired bootstrap needs the same queries: {len(a[0])} vs {len(b[0])}")
    base_a, base_b = summarize(*a), summarize(*b)
    rng = np.random.default_rng(seed)
    q = len(a[0])
    deltas: dict[str, list[float]] = {}
    for _ in range(int(n)):
        i = rng.integers(0, q, q)
        sa, sb = summarize(a[0][i], a[1][i]), summarize(b[0][i], b[1][i])
        for k in sa:
            deltas.setdefault(k, []).append(sb[k] - sa[k])
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out = {}
    for k, d in deltas.items():
        arr = np.asarray(d)
        p = min(1.0, 2 * min(float(np.mean(arr <= 0)), float(np.mean(arr >= 0))))
        out[k] = {
            "delta": base_b[k] - base_a[k],
            "ci_low": float(np.percentile(arr, lo)),
            "ci_high": float(np.percentile(arr, hi)),
            "p": p,
        }
    return out


def recall_curve(first: np.ndarray, max_k: int) -> np.ndarray:
    """Recall@K for K = 1..max_k (for plots)."""
    first = np.asarray(first)
    return np.asarray([float(np.mean(first <= k)) for k in range(1, max_k + 1)])


def fmt_offset(seconds: float) -> str:
    """Stream offset as H:MM:SS.s (or M:SS.s under an hour)."""
    s = max(0.0, float(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h)}:{int(m):02d}:{sec:04.1f}" if h >= 1 else f"{int(m)}:{sec:04.1f}"
