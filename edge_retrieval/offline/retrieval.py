"""Offline retrieval shared by archive search and evaluation: files -> window vectors -> clip scores.

A file is decoded by ``device.sources.FileSource`` and embedded through ``pipeline.Pipeline`` as
the daemon does (without the gate): windows start every ``hop_s`` of the bundle, each expert
takes its own window length at its own rate, and an uncovered tail gets one zero-padded window.
A clip's score for a query is the max over its windows (docs/architecture.md, "Scores"); the
ranking metrics over those scores are in ``offline.metrics``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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
from ..protocol import QueryMessage

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


def clip_scores(fv: FileVectors, mats: dict[str, tuple[np.ndarray, np.ndarray]],
                cosine: Collection[str] = ()) -> np.ndarray:
    """Scores of one clip for all queries: max over windows of ``window_scores`` -> [Q]."""
    return window_scores(fv, mats, cosine).max(axis=0)


def window_scores(fv: FileVectors, mats: dict[str, tuple[np.ndarray, np.ndarray]],
                  cosine: Collection[str] = ()) -> np.ndarray:
    """Scores of every window of one clip for all queries: sum_e w_e * (V_e @ q_e) -> [N, Q].

    Experts named in ``cosine`` (labels experts) score as archive search ranks: the cosine of the
    window's top ``TOP_LABELS`` probabilities (what the index stores) with the query."""
    total = None
    for name, (mat, w) in mats.items():
        if mat.shape[0] == 0:
            continue
        x = fv.vectors[name]
        if name in cosine:
            x = top_rows(x, TOP_LABELS)
            norms = np.linalg.norm(x, axis=1, keepdims=True) * np.linalg.norm(mat, axis=0, keepdims=True)
            s = (x @ mat) / np.maximum(norms, 1e-12) * w
        else:
            s = (x @ mat) * w  # [N, Q]
        total = s if total is None else total + s
    if total is None:
        raise QueryRejected("no query vector matches an expert of this bundle")
    return total


def top_rows(x: np.ndarray, k: int) -> np.ndarray:
    """Each row with all but its ``k`` largest entries set to 0 (as a labels index stores it)."""
    if x.shape[1] <= k:
        return x
    keep = np.argpartition(-x, k - 1, axis=1)[:, :k]
    out = np.zeros_like(x)
    np.put_along_axis(out, keep, np.take_along_axis(x, keep, axis=1), axis=1)
    return out


def fmt_offset(seconds: float) -> str:
    """Stream offset as H:MM:SS.s (or M:SS.s under an hour)."""
    s = max(0.0, float(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h)}:{int(m):02d}:{sec:04.1f}" if h >= 1 else f"{int(m)}:{sec:04.1f}"
