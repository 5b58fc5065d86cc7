"""The version-1 archive index (windows as SQLite rows, scanned file by file in Python): read only
to migrate it to shards, and written by benchmarks as the baseline the shard index is measured
against. New indexes never use it.
"""

from __future__ import annotations

import heapq
import shutil
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import QueryRejected, StoreError
from .retrieval import TOP_LABELS, QueryVectors

V1_SCHEMA_VERSION = 1

V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    sample_rate INTEGER NOT NULL,
    start_epoch REAL,
    time_source TEXT,
    site TEXT,
    n_windows INTEGER NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_start ON files(start_epoch);
CREATE INDEX IF NOT EXISTS files_site ON files(site);
CREATE TABLE IF NOT EXISTS windows (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    offset_s REAL NOT NULL,
    PRIMARY KEY (file_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vectors (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    expert TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('dense', 'top')),
    dim INTEGER NOT NULL,
    k INTEGER NOT NULL,
    data BLOB NOT NULL,
    indices BLOB,
    PRIMARY KEY (file_id, expert)
);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, message TEXT NOT NULL, at TEXT NOT NULL
);
"""




class V1Index:
    """A version-1 index file: the old writer (benchmarks) and the old full scan (baseline, migration)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(str(self.path))
            self.db.executescript(V1_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', '1')")
            self.db.commit()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open version-1 index {str(self.path)!r}: {exc}") from exc
        self.space_id = self.meta("space_id")

    def close(self) -> None:
        self.db.close()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def window_s(self) -> float:
        import json

        experts = json.loads(self.meta("experts") or "{}")
        return max((e["window_s"] for e in experts.values()), default=0.0)

    def add_packed(self, path: str, duration_s: float, start_epoch: float | None, site: str | None,
                   offsets_s: np.ndarray, packed: dict[str, tuple[str, int, int, bytes, bytes | None]]) -> None:
        """One file as the old writer stored it (benchmarks build the baseline with this)."""
        with self.db:
            cur = self.db.execute(
                "INSERT INTO files(path, size, mtime_ns, duration_s, sample_rate, start_epoch, time_source, site,"
                " n_windows, indexed_at) VALUES (?, 0, 0, ?, 48000, ?, NULL, ?, ?, '')",
                (path, duration_s, start_epoch, site, int(offsets_s.size)),
            )
            fid = cur.lastrowid
            self.db.executemany("INSERT INTO windows(file_id, idx, offset_s) VALUES (?, ?, ?)",
                                [(fid, i, float(o)) for i, o in enumerate(offsets_s)])
            for name, row in packed.items():
                self.db.execute(
                    "INSERT INTO vectors(file_id, expert, kind, dim, k, data, indices) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (fid, name, *row))

    def search(
        self,
        queries: QueryVectors,
        top: int = 10,
        since: float | None = None,
        until: float | None = None,
        site: str | None = None,
    ) -> list[tuple[float, str, float, float | None, str | None]]:
        """Best ``top`` windows for one query. Date filters keep windows whose absolute start is in
        [since, until) and so drop files with no known start time; ``site`` matches exactly."""
        if queries.space_id != self.space_id:
            raise QueryRejected(
                f"query space id {queries.space_id[:12]}... differs from index space id {str(self.space_id)[:12]}..."
            )
        where, args = [], []
        if since is not None or until is not None:
            where.append("f.start_epoch IS NOT NULL")
        if since is not None:
            where.append("f.start_epoch + f.duration_s >= ?")
            args.append(since)
        if until is not None:
            where.append("f.start_epoch < ?")
            args.append(until)
        if site is not None:
            where.append("f.site = ?")
            args.append(site)
        sql = (
            "SELECT f.id, f.path, f.start_epoch, f.site, f.n_windows FROM files f"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY f.id"
        )
        wlen = self.window_s()
        dense_q = dict(zip(queries.experts, zip(queries.vectors, queries.weights, strict=True), strict=True))
        wsum = sum(queries.weights) or 1.0
        heap: list[tuple[float, int, int, str, float | None, str | None]] = []  # min-heap of (score, -fid, -idx, ...)
        for fid, path, start, fsite, n in list(self.db.execute(sql, args)):
            scores = np.zeros(n, np.float64)
            for expert, kind, dim, k, data, indices in self.db.execute(
                "SELECT expert, kind, dim, k, data, indices FROM vectors WHERE file_id = ?", (fid,)
            ):
                if expert not in dense_q:
                    continue
                q, w = dense_q[expert]
                if q.size != dim:
                    raise QueryRejected(f"query vector for {expert!r} has dimension {q.size}, index has {dim}")
                scores += (w / wsum) * _score(kind, dim, k, n, data, indices, q)
            offsets = np.asarray([o for (o,) in self.db.execute(
                "SELECT offset_s FROM windows WHERE file_id = ? ORDER BY idx", (fid,))], np.float64)
            keep = np.ones(n, bool)
            if start is not None and (since is not None or until is not None):
                t = start + offsets
                if since is not None:
                    keep &= t >= since
                if until is not None:
                    keep &= t < until
            for i in np.flatnonzero(keep):
                item = (float(scores[i]), -fid, -int(i), path, start, fsite)
                if len(heap) < top:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        hits = []
        for s, nfid, nidx, path, start, fsite in sorted(heap, reverse=True):
            off = float(self.db.execute(
                "SELECT offset_s FROM windows WHERE file_id = ? AND idx = ?", (-nfid, -nidx)).fetchone()[0])
            hits.append((s, path, off, start, fsite))
        del wlen
        return hits

    def migrate(self, shards_dir: Path, experts: dict[str, dict[str, object]]) -> list[str]:
        """Copy every file's windows into shards (no re-embedding); returns the shard names."""
        from .shards import SHARD_WINDOWS, ShardBuilder, ShardFile

        names: list[str] = []
        builder = ShardBuilder(experts)
        rows = list(self.db.execute(
            "SELECT id, path, size, mtime_ns, duration_s, sample_rate, start_epoch, time_source, site, n_windows"
            " FROM files ORDER BY id"))
        for fid, path, size, mtime, dur, rate, start, tsrc, site, n in rows:
            offsets = np.asarray([o for (o,) in self.db.execute(
                "SELECT offset_s FROM windows WHERE file_id = ? ORDER BY idx", (fid,))], np.float64)
            top, dense = {}, {}
            for expert, kind, dim, k, data, indices in self.db.execute(
                "SELECT expert, kind, dim, k, data, indices FROM vectors WHERE file_id = ?", (fid,)
            ):
                if kind == "top":
                    top[expert] = (np.frombuffer(indices or b"", "<u2").reshape(n, k),
                                   np.frombuffer(data, "<f2").reshape(n, k))
                else:
                    dense[expert] = np.frombuffer(data, "<f2").reshape(n, dim)
            f = ShardFile(path, size, mtime, dur, rate, start, tsrc, site, n)
            builder.add_windows(f, offsets, top=top, dense=dense)
            if builder.n_windows >= SHARD_WINDOWS:
                names.append(builder.write(shards_dir))
                builder = ShardBuilder(experts)
        if builder.files:
            names.append(builder.write(shards_dir))
        return names

    def copy_meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def failures(self) -> list[tuple[str, int, int, str, str]]:
        return list(self.db.execute("SELECT path, size, mtime_ns, message, at FROM failures"))


def is_v1(db_path: Path) -> bool:
    """True when ``db_path`` is a version-1 index (schema 1, windows in SQLite rows)."""
    if not db_path.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == str(V1_SCHEMA_VERSION)


def migrate_index(directory: Path, index_name: str) -> Path:
    """Move a version-1 index aside (``index.v1.sqlite``) and return its new path; the caller
    builds the version-2 catalog and copies the windows with ``V1Index.migrate``."""
    old = directory / index_name
    aside = directory / "index.v1.sqlite"
    if aside.exists():
        raise StoreError(f"{str(aside)!r} exists from an earlier migration; remove it or move it away first")
    shutil.move(str(old), str(aside))
    for suffix in ("-wal", "-shm"):
        side = directory / (index_name + suffix)
        if side.exists():
            shutil.move(str(side), str(directory / ("index.v1.sqlite" + suffix)))
    return aside


def _pack(v: np.ndarray, labels: bool) -> tuple[str, int, int, bytes, bytes | None]:
    """Window vectors -> (kind, dim, k, data, indices) for the vectors table."""
    n, dim = v.shape
    if labels:
        k = min(TOP_LABELS, dim)
        idx = np.argsort(-v, axis=1, kind="stable")[:, :k]
        probs = np.take_along_axis(v, idx, axis=1)
        return "top", dim, k, probs.astype("<f2").tobytes(), idx.astype("<u2").tobytes()
    return "dense", dim, dim, v.astype("<f2").tobytes(), None


def _unpack(kind: str, dim: int, k: int, n: int, data: bytes, indices: bytes | None) -> np.ndarray:
    """Back to dense [n, dim] float32 (labels outside the stored top-k are 0)."""
    if kind == "dense":
        return np.frombuffer(data, "<f2").reshape(n, dim).astype(np.float32)
    out = np.zeros((n, dim), np.float32)
    idx = np.frombuffer(indices or b"", "<u2").reshape(n, k).astype(np.int64)
    np.put_along_axis(out, idx, np.frombuffer(data, "<f2").reshape(n, k).astype(np.float32), axis=1)
    return out


def _score(kind: str, dim: int, k: int, n: int, data: bytes, indices: bytes | None, q: np.ndarray) -> np.ndarray:
    if kind == "dense":
        return np.frombuffer(data, "<f2").reshape(n, dim).astype(np.float32) @ q
    idx = np.frombuffer(indices or b"", "<u2").reshape(n, k)
    probs = np.frombuffer(data, "<f2").reshape(n, k).astype(np.float32)
    return (probs * q[idx]).sum(axis=1)


