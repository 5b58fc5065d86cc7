"""Columnar window shards of an archive index: written once, memory-mapped for search.

Why not rows in SQLite: a search must touch every window, and a row per file decoded in Python
costs ~1 ms per file; a shard is a folder of ``.npy`` columns that ``numpy.load(mmap_mode="r")``
opens in O(1) without copying, which scipy.sparse and faiss consume as they are (no Arrow or
Parquet runtime on a Pi; numpy is already a dependency).

A shard folder ``shards/<name>/``:
  shard.json          format, windows, experts {name: {kind, dim, k}}, files [catalog rows]
  file.npy            int32 [windows]   local file number (index into shard.json's files)
  offset.npy          float32 [windows] window start in its file (seconds)
  labels expert E (kind "top"): each window's top-64 probabilities, stored as posting lists, i.e. a
  CSC matrix [windows, labels]: E.indptr.npy int64 [labels+1], E.rows.npy int32 [nnz],
  E.data.npy float16 [nnz] (zero probabilities dropped). A query (at most 64 weighted labels)
  reads only its labels' lists: score = sum_k w_k p_k, exact over the stored top-64.
  dense expert E (kind "dense"): E.f16.npy float16 [windows, dim]; shards of at least
  ``ANN_MIN_WINDOWS`` also get E.ivfpq.faiss (faiss IVF-PQ, inner product): it proposes
  candidates, which are re-ranked exactly from E.f16.npy.
A shard is self-contained (any process or machine can write one); the index catalog registers it,
and a window is live while its file's catalog row points at (shard, local file).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import QueryRejected, StoreError

SHARD_FORMAT = 1
SHARD_WINDOWS = 1_000_000  # a writer starts a new shard past this many windows (~12 days at a 1 s hop)
ANN_MIN_WINDOWS = 50_000  # dense shards smaller than this are scanned exactly (fast enough, no training)
ANN_CANDIDATES = 20  # re-ranked candidates per wanted hit (top 10 -> 200 exact dot products per shard)
TA_DEPTH = 256  # first entries read from a posting list by the threshold algorithm (then 4x per read)
TA_FOCUS = 0.1  # a round reads the lists whose share of the bound is >= this x the largest one
TIE_LIMIT = 4  # a shard returns windows tied with its k-th best, up to this many times k
_CHUNK = 65_536  # rows per float16 -> float32 block in exact dense scans (bounds temporary memory)


@dataclass(frozen=True)
class ShardFile:
    """One recording of a shard: what the catalog stores about it."""

    path: str
    size: int
    mtime_ns: int
    duration_s: float
    sample_rate: int
    start_epoch: float | None
    time_source: str | None
    site: str | None
    n_windows: int


@dataclass
class ShardBuilder:
    """Collects files' window vectors in memory, then writes them as one shard (see module doc)."""

    experts: dict[str, dict[str, object]]  # name -> {"kind": "top"|"dense", "dim": int, "k": int}
    files: list[ShardFile] = field(default_factory=list)
    _file: list[np.ndarray] = field(default_factory=list)
    _offset: list[np.ndarray] = field(default_factory=list)
    _vec: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return sum(f.n_windows for f in self.files)

    def add(self, f: ShardFile, offsets_s: np.ndarray, vectors: dict[str, np.ndarray]) -> None:
        """One file's windows; labels vectors are cut to their top-k here (as the v1 index did)."""
        n = int(offsets_s.size)
        for name, spec in self.experts.items():
            v = vectors[name]
            if v.shape != (n, spec["dim"]):
                raise StoreError(f"expert {name!r} gave shape {v.shape} for {f.path!r}, expected ({n}, {spec['dim']})")
            if spec["kind"] == "top":
                k = int(spec["k"])
                idx = np.argsort(-v, axis=1, kind="stable")[:, :k]
                self._vec.setdefault(name, []).append(
                    (idx.astype(np.uint16), np.take_along_axis(v, idx, axis=1).astype(np.float16)))
            else:
                self._vec.setdefault(name, []).append((v.astype(np.float16), None))
        self._file.append(np.full(n, len(self.files), np.int32))
        self._offset.append(np.asarray(offsets_s, np.float32))
        self.files.append(f)

    def add_windows(self, f: ShardFile, offsets_s: np.ndarray, top: dict[str, tuple[np.ndarray, np.ndarray]],
                    dense: dict[str, np.ndarray]) -> None:
        """One file's windows already in storage form: labels experts as (top indices uint16 [n, k],
        probabilities float16 [n, k]), dense experts as float16 [n, dim] (migration, benchmarks)."""
        n = int(offsets_s.size)
        for name, (idx, p) in top.items():
            srt = np.sort(np.asarray(idx), axis=1)
            if (srt[:, 1:] == srt[:, :-1]).any():  # the threshold algorithm's bound counts a label once
                raise StoreError(f"{f.path!r}: a window of expert {name!r} lists a label twice in its top-k")
            self._vec.setdefault(name, []).append((np.asarray(idx, np.uint16), np.asarray(p, np.float16)))
        for name, v in dense.items():
            self._vec.setdefault(name, []).append((np.asarray(v, np.float16), None))
        self._file.append(np.full(n, len(self.files), np.int32))
        self._offset.append(np.asarray(offsets_s, np.float32))
        self.files.append(f)

    def write(self, shards_dir: str | Path, ann: bool = True) -> str:
        """Write the shard under ``shards_dir`` (to a temporary name, then renamed: a crash leaves
        no half shard under a real name) and return its name."""
        shards_dir = Path(shards_dir)
        name = uuid.uuid4().hex[:16]
        tmp = shards_dir / f".tmp-{name}"
        tmp.mkdir(parents=True)
        try:
            n = self.n_windows
            np.save(tmp / "file.npy", np.concatenate(self._file) if self._file else np.zeros(0, np.int32))
            np.save(tmp / "offset.npy", np.concatenate(self._offset) if self._offset else np.zeros(0, np.float32))
            for ename, spec in self.experts.items():
                parts = self._vec.get(ename, [])
                dim = int(spec["dim"])
                if spec["kind"] == "top":
                    k = int(spec["k"])
                    idx = np.concatenate([a for a, _ in parts]) if parts else np.zeros((0, k), np.uint16)
                    p = np.concatenate([b for _, b in parts]) if parts else np.zeros((0, k), np.float16)
                    np.save(tmp / f"{ename}.top_idx.npy", idx)
                    np.save(tmp / f"{ename}.top_p.npy", p)
                    indptr, rows, data = _posting_lists(idx, p, dim)
                    del idx, p
                    np.save(tmp / f"{ename}.indptr.npy", indptr)
                    np.save(tmp / f"{ename}.rows.npy", rows)
                    np.save(tmp / f"{ename}.data.npy", data)
                else:
                    v = np.concatenate([a for a, _ in parts]) if parts else np.zeros((0, dim), np.float16)
                    np.save(tmp / f"{ename}.f16.npy", v)
                    if ann and n >= ANN_MIN_WINDOWS:
                        build_ivfpq(v, tmp / f"{ename}.ivfpq.faiss")
            meta = {"format": SHARD_FORMAT, "windows": n, "experts": self.experts,
                    "files": [asdict(f) for f in self.files]}
            (tmp / "shard.json").write_text(json.dumps(meta))
            os.replace(tmp, shards_dir / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name


def _posting_lists(idx: np.ndarray, p: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-major top-k (indices, probabilities) -> CSC (indptr, rows, data), zeros dropped; within a
    label, entries by probability, highest first (impact order, for the threshold algorithm)."""
    n, k = idx.shape
    flat_p = p.reshape(-1)
    keep = np.flatnonzero(flat_p != 0)
    cols = idx.reshape(-1)[keep]
    # one uint32 key: label in the high half, the complement of the float16 bits in the low half
    # (non-negative float16 values order as their bit patterns), so one stable sort does both
    key = (cols.astype(np.uint32) << 16) | (0xFFFF - flat_p[keep].view(np.uint16)).astype(np.uint32)
    order = np.argsort(key, kind="stable")
    del key
    rows = (keep[order] // max(k, 1)).astype(np.int32)
    data = flat_p[keep[order]].astype(np.float16)
    indptr = np.zeros(dim + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=dim)[:dim], out=indptr[1:])
    return indptr, rows, data


def _faiss():  # noqa: ANN202
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("large embedding shards need faiss: pip install 'edge-retrieval[scale]'") from exc
    return faiss


def build_ivfpq(v: np.ndarray, out: Path, seed: int = 0) -> None:
    """Train and fill a faiss IVF-PQ (inner product) over float16 rows; written to ``out``.

    nlist ~ sqrt(n) cells; PQ with dim/16 sub-quantisers of 8 bits (64 bytes per 1024-d window,
    32x smaller than float16), trained on at most 64 windows per cell."""
    faiss = _faiss()
    n, d = v.shape
    nlist = int(min(4096, max(16, np.sqrt(n))))
    m = max(d // 16, min(d, 16))  # >= 16 bytes per window: short vectors keep their recall
    while d % m:
        m -= 1
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
    index.train(np.ascontiguousarray(v[train], np.float32))
    for s in range(0, n, _CHUNK):
        index.add(np.ascontiguousarray(v[s:s + _CHUNK], np.float32))
    faiss.write_index(index, str(out))


class Shard:
    """A registered shard, memory-mapped (nothing is read until a search touches it)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        try:
            meta = json.loads((self.dir / "shard.json").read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"shard {str(self.dir)!r} is unreadable: {exc}") from exc
        if meta.get("format") != SHARD_FORMAT:
            raise StoreError(f"shard {str(self.dir)!r} has format {meta.get('format')!r}; this version reads {SHARD_FORMAT}")
        self.name = self.dir.name
        self.n = int(meta["windows"])
        self.experts: dict[str, dict[str, object]] = meta["experts"]
        self.files = [ShardFile(**f) for f in meta["files"]]
        self.file = self._load("file.npy")
        self.offset = self._load("offset.npy")
        self._ann: dict[str, object] = {}
        self._arrays: dict[str, np.ndarray] = {}

    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.dir / name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise StoreError(f"shard {str(self.dir)!r}: cannot read {name}: {exc}") from exc

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir())

    # ----------------------------------------------------------------- scoring

    def labels_scores(self, expert: str, q: np.ndarray) -> np.ndarray:
        """Exact scores [windows] float32 of a labels query (dense [labels] vector, few non-zeros):
        a scipy CSC matrix of the query's posting lists times the query weights."""
        from scipy.sparse import csc_array

        indptr = self._load(f"{expert}.indptr.npy")
        cols = np.flatnonzero(q)
        if cols.size == 0 or self.n == 0:
            return np.zeros(self.n, np.float32)
        rows_all, data_all = self._load(f"{expert}.rows.npy"), self._load(f"{expert}.data.npy")
        starts, ends = indptr[cols], indptr[cols + 1]
        sub_ptr = np.zeros(cols.size + 1, np.int64)
        np.cumsum(ends - starts, out=sub_ptr[1:])
        rows = np.concatenate([rows_all[s:e] for s, e in zip(starts, ends, strict=True)])
        data = np.concatenate([data_all[s:e] for s, e in zip(starts, ends, strict=True)]).astype(np.float32)
        mat = csc_array((data, rows, sub_ptr), shape=(self.n, cols.size))
        return np.asarray(mat @ q[cols].astype(np.float32), np.float32)

    def labels_top(self, expert: str, q: np.ndarray, top: int, mask: np.ndarray | None,
                   floor: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact best rows of a labels query without touching most windows: Fagin's threshold
        algorithm over the impact-ordered posting lists. The most an unread row can score is
        sum_k w_k x (the next probability in list k); each round reads further into the lists
        that weigh most in that bound (each list's step grows 4x), scores every row met exactly
        from the row-major top-k, and stops when the k-th best (or ``floor``, the k-th best of the
        shards already searched) beats the bound. A text query puts most of its weight on a few
        labels, so most lists are never read.
        Returns (rows, exact scores) holding every row that can be in the top ``top``; None when
        the lists run out first (fewer rows with a positive score than ``top``: scan instead)."""
        cols = np.flatnonzero(q)
        if cols.size == 0 or (q[cols] < 0).any():
            return None  # the bound needs non-negative weights (labels queries are a softmax)
        indptr = self._array(f"{expert}.indptr.npy")
        rows_all, data_all = self._array(f"{expert}.rows.npy"), self._array(f"{expert}.data.npy")
        tidx, tp = self._array(f"{expert}.top_idx.npy"), self._array(f"{expert}.top_p.npy")
        w = q[cols].astype(np.float32)
        qf = q.astype(np.float32)
        starts = indptr[cols]
        lens = indptr[cols + 1] - starts
        done = np.zeros(cols.size, np.int64)  # entries read per list
        step = np.full(cols.size, TA_DEPTH, np.int64)
        seen = np.zeros(self.n, bool)
        got_rows: list[np.ndarray] = []
        got_scores: list[np.ndarray] = []
        n_got = 0
        while True:
            more = done < lens
            nxt = np.zeros(cols.size, np.float32)
            nxt[more] = data_all[(starts + done)[more]].astype(np.float32)
            impact = w * nxt
            bound = float(impact.sum())
            if bound <= 0.0:
                break  # every list read: all rows with a positive score are scored
            if n_got >= top:
                allsc = np.concatenate(got_scores)
                kth = float(np.partition(allsc, n_got - top)[n_got - top])
                if max(kth, floor) > bound:
                    break
            elif floor > bound:
                break
            pick = np.flatnonzero(impact >= TA_FOCUS * impact.max())
            parts = []
            for i in pick:
                s0 = starts[i] + done[i]
                parts.append(rows_all[s0:s0 + min(step[i], lens[i] - done[i])])
                done[i] = min(lens[i], done[i] + step[i])
                step[i] *= 4
            new = np.unique(np.concatenate(parts))
            new = new[~seen[new]]
            seen[new] = True
            if mask is not None:
                new = new[mask[new]]
            if new.size:
                got_rows.append(new)
                got_scores.append((tp[new].astype(np.float32) * qf[tidx[new]]).sum(axis=1))
                n_got += new.size
        if n_got < top and not (floor > 0):
            return None
        if not got_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(got_rows).astype(np.int64), np.concatenate(got_scores)

    def rows_scores(self, expert: str, q: np.ndarray, rows: np.ndarray, cosine: bool = False) -> np.ndarray:
        """Exact scores float32 of the sorted ``rows`` (every window of some files: temporal search,
        search by example). ``cosine`` divides a labels score by the norms of the window's stored
        top-k probabilities and of the query (the nearest sound, not the loudest on its labels)."""
        if rows.size == 0:
            return np.zeros(0, np.float32)
        if self.experts[expert]["kind"] == "dense":
            return self.dense_scores(expert, q, rows)
        tidx, tp = self._array(f"{expert}.top_idx.npy"), self._array(f"{expert}.top_p.npy")
        p = tp[rows].astype(np.float32)
        out = (p * q.astype(np.float32)[tidx[rows]]).sum(axis=1)
        if cosine:
            out /= np.maximum(self.row_norms(expert)[rows] * float(np.linalg.norm(q)), 1e-12)
        return out

    def row_norms(self, expert: str) -> np.ndarray:
        """L2 norm [windows] float32 of each window's stored top-k probabilities (cosine ranking),
        computed once per shard in blocks (a million windows: 4 MB kept, 16 MB at a time)."""
        key = f"{expert}.norm"
        a = self._arrays.get(key)
        if a is None:
            tp = self._array(f"{expert}.top_p.npy")
            a = np.empty(self.n, np.float32)
            for s in range(0, self.n, _CHUNK):
                a[s:s + _CHUNK] = np.linalg.norm(tp[s:s + _CHUNK].astype(np.float32), axis=1)
            self._arrays[key] = a
        return a

    def _array(self, name: str) -> np.ndarray:
        """A column as a plain ndarray over the memory map, opened once per shard (slicing an
        ndarray skips np.memmap's per-slice Python overhead)."""
        a = self._arrays.get(name)
        if a is None:
            a = self._arrays[name] = np.asarray(self._load(name))
        return a

    def dense_scores(self, expert: str, q: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Exact inner products with float16 rows (all rows, or ``rows``), in bounded blocks."""
        v = self._load(f"{expert}.f16.npy")
        q = q.astype(np.float32)
        if rows is not None:
            return v[np.sort(rows)].astype(np.float32) @ q if rows.size else np.zeros(0, np.float32)
        out = np.empty(self.n, np.float32)
        for s in range(0, self.n, _CHUNK):
            out[s:s + _CHUNK] = v[s:s + _CHUNK].astype(np.float32) @ q
        return out

    def has_ann(self, expert: str) -> bool:
        return (self.dir / f"{expert}.ivfpq.faiss").is_file()

    def ann_candidates(self, expert: str, q: np.ndarray, k: int, mask: np.ndarray | None, nprobe: int) -> np.ndarray:
        """Row numbers of the ``k`` best windows by the IVF-PQ estimate (only rows where ``mask``)."""
        faiss = _faiss()
        index = self._ann.get(expert)
        if index is None:
            index = faiss.read_index(str(self.dir / f"{expert}.ivfpq.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            self._ann[expert] = index
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if mask is not None:
            bits = np.packbits(mask.astype(np.uint8), bitorder="little")
            params.sel = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
            _, ids = index.search(q.reshape(1, -1).astype(np.float32), k, params=params)
            del bits
        else:
            _, ids = index.search(q.reshape(1, -1).astype(np.float32), k, params=params)
        ids = ids[0]
        return ids[ids >= 0].astype(np.int64)


@dataclass(frozen=True)
class Candidate:
    """A window that made a shard's top list."""

    score: float
    shard: int
    row: int


def search_shards(
    shards: Sequence[Shard],
    masks: Sequence[np.ndarray | None],
    experts: Sequence[str],
    vectors: Sequence[np.ndarray],
    weights: Sequence[float],
    top: int,
    nprobe: int = 32,
    cosine: bool = False,
) -> list[Candidate]:
    """The best ``top`` windows over all shards (by score; ties by shard order, then row).

    ``masks[i]`` keeps shard i's rows where True (None: all). Labels experts are scored exactly from
    posting lists; a query whose only expert is dense uses a shard's IVF-PQ for candidates, then
    exact inner products; a mixture is scored exactly for every expert. A labels query is
    answered by the threshold algorithm (``Shard.labels_top``), falling back to a scan of its
    posting lists when fewer rows than ``top`` score above zero. ``cosine`` divides each labels
    expert's score by the norms of the window's stored top-k and of the query (the ranking of
    text and example searches, docs/architecture.md "Scores"); its bound is not the threshold
    algorithm's, so those queries scan their posting lists."""
    wsum = float(sum(weights)) or 1.0
    out: list[Candidate] = []
    single_dense = len(experts) == 1
    for si, (shard, mask) in enumerate(zip(shards, masks, strict=True)):
        if shard.n == 0 or (mask is not None and not mask.any()):
            continue
        for e, q in zip(experts, vectors, strict=True):
            spec = shard.experts.get(e)
            if spec is None:
                raise QueryRejected(f"query expert {e!r} is not in the index (has {sorted(shard.experts)})")
            if q.size != int(spec["dim"]):
                raise QueryRejected(f"query vector for {e!r} has dimension {q.size}, index has {spec['dim']}")
        found = None
        if single_dense and shard.experts[experts[0]]["kind"] == "top" and not cosine:
            scored = [c.score for c in out]
            scale = weights[0] / wsum or 1.0
            floor = float(np.partition(scored, len(scored) - top)[len(scored) - top]) / scale \
                if len(scored) >= top else -1.0
            found = shard.labels_top(experts[0], vectors[0], top, mask, floor)
        if found is not None:
            rows, scores = found
            scores = scores * (weights[0] / wsum)
        elif single_dense and shard.experts[experts[0]]["kind"] == "dense" and shard.has_ann(experts[0]):
            cand = shard.ann_candidates(experts[0], vectors[0], top * ANN_CANDIDATES, mask, nprobe)
            cand = np.sort(cand)
            scores = shard.dense_scores(experts[0], vectors[0], cand) * (weights[0] / wsum)
            rows = cand
        else:
            total = np.zeros(shard.n, np.float32)
            for e, q, w in zip(experts, vectors, weights, strict=True):
                if shard.experts[e]["kind"] == "top":
                    s = shard.labels_scores(e, q)
                    if cosine:
                        s /= np.maximum(shard.row_norms(e) * float(np.linalg.norm(q)), 1e-12)
                else:
                    s = shard.dense_scores(e, q)
                total += (w / wsum) * s
            rows = np.arange(shard.n) if mask is None else np.flatnonzero(mask)
            scores = total if mask is None else total[rows]
        if scores.size > top:
            part = np.argpartition(-scores, top - 1)[:top]
            # windows tied with the k-th score come along (up to TIE_LIMIT x top), so the caller's
            # tie order decides, and results do not depend on how windows were cut into shards
            tied = np.flatnonzero(scores >= scores[part].min())
            if tied.size <= TIE_LIMIT * top:
                part = tied
        else:
            part = np.arange(scores.size)
        out.extend(Candidate(float(scores[i]), si, int(rows[i])) for i in part)
    out.sort(key=lambda c: (-c.score, c.shard, c.row))
    return out


def directory_size(path: str | Path) -> int:
    """Bytes of all files under ``path`` (index size in benchmarks and stats)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
