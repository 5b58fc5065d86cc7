"""Offline retrieval shared by archive search and evaluation: files -> window vectors -> scores -> metrics.

A file is cut into windows that start every ``hop_s`` of the bundle (each expert takes its own
window length from that start, at its own rate); a clip's score for a query is the max over its
windows (ARCHITECTURE.md, "Scores"). Metrics follow Oncescu et al. 2021: Recall@K, median rank
of the first relevant item, and mAP@10.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle, Manifest
from .errors import EncoderError, QueryRejected, SourceError
from .expert import AudioExpert, load_experts
from .protocol import QueryMessage, VectorPayload, encode_sparse

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff", ".w64", ".caf")
TOP_LABELS = 64  # labels space: probabilities kept per window (protocol.MAX_SPARSE)
_BLOCK_S = 2.0  # decoded block length (seconds): bounds memory on hour-long field recordings


# --------------------------------------------------------------------------- decoding and windows


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """(sample rate, frames, channels) of an audio file; SourceError names the file."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise SourceError(f"cannot read audio file {str(path)!r}: {str(exc).splitlines()[0][:160]}") from exc
    if info.frames <= 0 or info.samplerate <= 0:
        raise SourceError(f"audio file {str(path)!r} holds no samples")
    return int(info.samplerate), int(info.frames), int(info.channels)


def window_starts(duration_s: float, hop_s: float, window_s: float) -> np.ndarray:
    """Window start offsets (seconds) for a file: every hop, while at least half a window of audio is left.

    The first window always exists (a short file is zero-padded), so every file has >= 1 window.
    """
    n = 1
    while duration_s - n * hop_s >= 0.5 * window_s - 1e-9 and n * hop_s < duration_s:
        n += 1
    return np.arange(n, dtype=np.float64) * hop_s


class _Windower:
    """Cuts one expert's windows from a stream of samples at that expert's rate.

    Holds at most one window plus one decoded block (samples at the expert's rate).
    """

    def __init__(self, rate: int, window_samples: int, starts_s: np.ndarray) -> None:
        self.starts = [int(round(s * rate)) for s in starts_s]
        self.window = window_samples
        self.buf = np.zeros(0, np.float32)
        self.buf_start = 0  # absolute sample index of buf[0]
        self.k = 0

    def push(self, x: np.ndarray) -> list[np.ndarray]:
        self.buf = np.concatenate([self.buf, x]) if self.buf.size else x
        return self._emit(final=False)

    def finish(self) -> list[np.ndarray]:
        return self._emit(final=True)

    def _emit(self, final: bool) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        end = self.buf_start + self.buf.size
        while self.k < len(self.starts):
            s = self.starts[self.k]
            if s + self.window > end and not final:
                break
            w = self.buf[max(0, s - self.buf_start) : max(0, s - self.buf_start) + self.window]
            if w.size < self.window:
                w = np.concatenate([w, np.zeros(self.window - w.size, np.float32)])
            out.append(np.ascontiguousarray(w, dtype=np.float32))
            self.k += 1
        keep_from = self.starts[self.k] if self.k < len(self.starts) else end
        drop = min(max(0, keep_from - self.buf_start), self.buf.size)
        if drop:
            self.buf = self.buf[drop:]
            self.buf_start += drop
        return out


def iter_blocks(path: str | Path, block_s: float = _BLOCK_S) -> Iterator[tuple[np.ndarray, int]]:
    """Decode ``path`` in mono float32 blocks of ``block_s`` seconds: yields (samples, file rate)."""
    import soundfile as sf

    rate, _, _ = audio_info(path)
    try:
        with sf.SoundFile(str(path)) as f:
            n = max(1, int(rate * block_s))
            while True:
                x = f.read(n, dtype="float32", always_2d=True)
                if not len(x):
                    break
                yield (x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]), rate
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot decode audio file {str(path)!r}: {str(exc).splitlines()[0][:160]}") from exc


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
    """Embeds whole files with every audio expert of a bundle (device part only)."""

    def __init__(
        self, bundle: Bundle, threads: int = 1, providers: Sequence[str] | None = None, batch: int = 8
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.hop_s = self.manifest.device.hop_s
        self.experts: list[AudioExpert] = load_experts(bundle, threads, providers)
        self.max_window_s = max(e.spec.window_s for e in self.experts)
        self.batch = max(1, int(batch))

    def embed_file(self, path: str | Path) -> FileVectors:
        import soxr

        rate, frames, _ = audio_info(path)
        duration = frames / rate
        starts = window_starts(duration, self.hop_s, self.max_window_s)
        windowers = [_Windower(e.sample_rate, e.window_samples, starts) for e in self.experts]
        streams = [
            None if e.sample_rate == rate else soxr.ResampleStream(rate, e.sample_rate, 1, dtype="float32")
            for e in self.experts
        ]
        pending: list[list[np.ndarray]] = [[] for _ in self.experts]
        done: list[list[np.ndarray]] = [[] for _ in self.experts]

        def feed(i: int, x: np.ndarray, last: bool) -> None:
            st = streams[i]
            y = x if st is None else st.resample_chunk(x, last=last)
            pending[i].extend(windowers[i].push(np.asarray(y, np.float32)))
            if last:
                pending[i].extend(windowers[i].finish())
            while len(pending[i]) >= self.batch or (last and pending[i]):
                chunk, pending[i] = pending[i][: self.batch], pending[i][self.batch :]
                done[i].append(self._embed(i, np.stack(chunk)))

        for x, _ in iter_blocks(path):
            for i in range(len(self.experts)):
                feed(i, x, last=False)
        for i in range(len(self.experts)):
            feed(i, np.zeros(0, np.float32), last=True)
        vectors = {}
        for i, e in enumerate(self.experts):
            v = np.concatenate(done[i]) if done[i] else np.zeros((0, e.dim), np.float32)
            if v.shape[0] != starts.size:  # every expert must give one vector per common window
                raise EncoderError(f"expert {e.name!r} gave {v.shape[0]} windows for {str(path)!r}, expected {starts.size}")
            vectors[e.name] = v
        return FileVectors(str(path), duration, rate, starts, vectors)

    def _embed(self, i: int, windows: np.ndarray) -> np.ndarray:
        out = self.experts[i].embed(windows)
        assert isinstance(out, np.ndarray)
        return np.asarray(out, np.float32)


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
    """Decode a query message against a bundle; a space id or expert mismatch is refused."""
    if msg.space_id != manifest.space.id:
        raise QueryRejected(
            f"query space id {msg.space_id[:12]}... differs from bundle {manifest.name!r} space id "
            f"{manifest.space.id[:12]}...: the query was built for another model"
        )
    vecs = []
    for p in msg.vectors:
        if p.expert not in manifest.expert_names:
            raise QueryRejected(f"query names expert {p.expert!r}; bundle has {manifest.expert_names}")
        vecs.append(p.dense(manifest.expert(p.expert).dim))
    return QueryVectors(msg.text, msg.space_id, tuple(p.expert for p in msg.vectors), tuple(msg.weights), tuple(vecs))


def text_queries(bundle: Bundle, texts: Sequence[str]) -> list[QueryVectors]:
    """Text -> query vectors with the bundle's text side (needs the server part)."""
    from .text import QueryBuilder

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
    total = None
    for name, (mat, w) in mats.items():
        if mat.shape[0] == 0:
            continue
        s = (fv.vectors[name] @ mat) * w  # [N, Q]
        total = s if total is None else total + s
    if total is None:
        raise QueryRejected("no query vector matches an expert of this bundle")
    return total.max(axis=0)


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
