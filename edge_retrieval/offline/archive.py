"""Archive search: an index of window vectors for a folder of recordings, ranked by text queries.

One SQLite file ``index.sqlite`` in the index directory holds:
  meta(key, value)      schema, space id, bundle name/path, hop, per-expert storage
  files                 path, size, mtime_ns, duration, rate, start time (UTC epoch; from GUANO,
                        BWF bext, the AudioMoth comment, or a ``YYYYMMDD_HHMMSS`` file name), site
  windows(file_id, idx, offset_s)
  vectors(file_id, expert, kind, dim, k, data, indices)
      kind "dense": [windows, dim] float16 blob (embedding experts);
      kind "top":   labels experts keep each window's top 64 probabilities: indices uint16
                    [windows, 64] + probabilities float16 [windows, 64] (not all 6,522 labels)
  failures(path, size, mtime_ns, message)   files that could not be read (retried when changed)
An index belongs to one space id: indexing or searching with a bundle of another space is refused.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from ..bundle import Bundle, Manifest
from ..errors import BundleError, ConfigError, EdgeRetrievalError, QueryRejected, StoreError
from .retrieval import AUDIO_SUFFIXES, TOP_LABELS, FileEmbedder, FileVectors, QueryVectors, is_labels_expert

INDEX_NAME = "index.sqlite"
SCHEMA_VERSION = 1
DEFAULT_INDEX_DIR = ".edge-retrieval-index"

_SCHEMA = """
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_utc(epoch: float | None) -> str | None:
    """UTC ISO 8601 with a Z, to the millisecond (None stays None)."""
    if epoch is None:
        return None
    t = datetime.fromtimestamp(epoch, timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- recording metadata


@dataclass(frozen=True)
class RecordingMeta:
    """When and where a recording was made, as far as the file tells."""

    start: datetime | None = None  # timezone-aware (UTC when the file gives no zone)
    time_source: str | None = None  # "guano", "bext", "audiomoth", "filename"
    site: str | None = None


def _riff_chunks(path: Path, want: Iterable[bytes], max_bytes: int = 1 << 16) -> dict[bytes, bytes]:
    """Read the wanted chunks of a RIFF/WAVE file (first ``max_bytes`` of each), skipping audio data."""
    want = set(want)
    found: dict[bytes, bytes] = {}
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return found
            size = os.fstat(f.fileno()).st_size
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                hdr = f.read(8)
                if len(hdr) < 8:
                    break
                cid, n = hdr[:4], struct.unpack("<I", hdr[4:])[0]
                if cid in want and cid not in found:
                    found[cid] = f.read(min(n, max_bytes))
                pos += 8 + n + (n & 1)
    except OSError:
        return found
    return found


def _parse_iso(text: str) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def parse_guano(raw: bytes) -> dict[str, str]:
    """GUANO metadata text ('Key: value' lines) -> dict. Keys keep their namespace ('NS|Key')."""
    out: dict[str, str] = {}
    for line in raw.decode("utf-8", errors="replace").replace("\x00", "").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


_AUDIOMOTH = re.compile(
    r"Recorded at (\d{2}):(\d{2}):(\d{2}) (\d{2})/(\d{2})/(\d{4}) \(UTC(?:([+-])(\d{1,2})(?::?(\d{2}))?)?\)"
)
_NAME_TIME = re.compile(r"(?:^|[^0-9])((?:19|20)\d{6})[_T-]?(\d{6})(?:[^0-9]|$)")


def _list_info(raw: bytes) -> dict[bytes, str]:
    """LIST/INFO sub-chunks (ICMT, IART...) as text."""
    out: dict[bytes, str] = {}
    if raw[:4] != b"INFO":
        return out
    pos = 4
    while pos + 8 <= len(raw):
        cid, n = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        out[cid] = raw[pos + 8 : pos + 8 + n].split(b"\x00")[0].decode("utf-8", errors="replace")
        pos += 8 + n + (n & 1)
    return out


def recording_meta(path: str | Path, root: str | Path | None = None, site: str | None = None) -> RecordingMeta:
    """Start time and site of a recording.

    Time, first found: GUANO ``Timestamp``; BWF bext origination date/time; the AudioMoth comment
    ("Recorded at HH:MM:SS DD/MM/YYYY (UTC+1)"); a ``YYYYMMDD_HHMMSS`` in the file name (AudioMoth,
    Song Meter). Times without a zone are read as UTC (AudioMoth's default).
    Site, first found: ``site``; GUANO ``Site`` (any namespace); the first folder under ``root``.
    """
    path = Path(path)
    chunks = _riff_chunks(path, (b"guan", b"bext", b"LIST")) if path.suffix.lower() in (".wav", ".w64", ".bwf") else {}
    start: datetime | None = None
    source: str | None = None
    guano = parse_guano(chunks[b"guan"]) if b"guan" in chunks else {}
    if guano.get("Timestamp"):
        start, source = _parse_iso(guano["Timestamp"]), "guano"
    if start is None and b"bext" in chunks and len(chunks[b"bext"]) >= 338:
        b = chunks[b"bext"]
        d, t = b[320:330].decode("ascii", "replace"), b[330:338].decode("ascii", "replace")
        start = _parse_iso(f"{d}T{t.replace('-', ':').replace('.', ':')}")
        source = "bext" if start else None
    if start is None and b"LIST" in chunks:
        comment = _list_info(chunks[b"LIST"]).get(b"ICMT", "")
        m = _AUDIOMOTH.search(comment)
        if m:
            hh, mi, ss, dd, mo, yy, sign, oh, om = m.groups()
            tz = timezone.utc
            if sign:
                off = timedelta(hours=int(oh), minutes=int(om or 0))
                tz = timezone(off if sign == "+" else -off)
            try:
                start, source = datetime(int(yy), int(mo), int(dd), int(hh), int(mi), int(ss), tzinfo=tz), "audiomoth"
            except ValueError:
                start = None
    if start is None:
        m = _NAME_TIME.search(path.stem)
        if m:
            try:
                start = datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
                source = "filename"
            except ValueError:
                start = None
    if site is None:
        site = next((v for k, v in guano.items() if (k == "Site" or k.endswith("|Site")) and v), None)
    if site is None and root is not None:
        try:
            rel = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            rel = None
        if rel is not None and len(rel.parts) > 1:
            site = rel.parts[0]
    return RecordingMeta(start.astimezone(timezone.utc) if start else None, source if start else None, site)


def parse_when(text: str, end_of_day: bool = False) -> float:
    """A --since/--until value (YYYY-MM-DD or ISO 8601) -> UTC epoch; a bare date as --until means the whole day."""
    t = _parse_iso(text)
    if t is None:
        raise ConfigError(f"date {text!r} is not a date; expected YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][Z|+HH:MM]")
    if end_of_day and re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
        t += timedelta(days=1)
    return t.timestamp()


# --------------------------------------------------------------------------- the index


@dataclass
class Hit:
    """One ranked window."""

    score: float
    path: str
    offset_s: float
    window_s: float
    time: str | None
    site: str | None

    def as_dict(self) -> dict[str, object]:
        return {
            "score": round(self.score, 6),
            "file": self.path,
            "offset_s": round(self.offset_s, 3),
            "end_s": round(self.offset_s + self.window_s, 3),
            "time": self.time,
            "site": self.site,
        }


@dataclass
class FileScores:
    """One indexed file's window scores for some queries (``ArchiveIndex.window_scores``)."""

    file_id: int
    path: str
    start: float | None  # epoch of the recording's start, if known
    site: str | None
    offsets: np.ndarray  # [n] window starts (seconds into the file)
    keep: np.ndarray  # [n] bool: inside the date filters
    scores: np.ndarray  # [n, queries] float64


@dataclass
class IndexReport:
    """What an ``index`` run did."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    pruned: int = 0
    windows: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


class ArchiveIndex:
    """The SQLite index of one archive. Not thread-safe: one writer at a time."""

    def __init__(self, directory: str | Path, create: bool = False) -> None:
        self.dir = Path(directory)
        self.path = self.dir / INDEX_NAME
        if not self.path.is_file():
            if not create:
                inner = self.dir / DEFAULT_INDEX_DIR
                if (inner / INDEX_NAME).is_file():
                    raise ConfigError(f"{str(self.dir)!r} is the recordings folder; its index is {str(inner)!r} "
                                      f"(pass --index {inner})")
                raise ConfigError(
                    f"index {str(self.dir)!r} has no {INDEX_NAME}; build it with: edge-retrieval index DIR --bundle B"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path))
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(_SCHEMA)
            ver = self.meta("schema")
            if ver is None:
                self._set_meta("schema", str(SCHEMA_VERSION))
                self.db.commit()
            elif ver != str(SCHEMA_VERSION):
                raise StoreError(f"index {str(self.path)!r} has schema {ver!r}; this version reads {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open index {str(self.path)!r}: {exc}") from exc

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ArchiveIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- meta

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @property
    def space_id(self) -> str | None:
        return self.meta("space_id")

    def bind(self, bundle: Bundle) -> None:
        """Tie the index to the bundle's space (first use), or refuse a bundle of another space."""
        m = bundle.manifest
        have = self.space_id
        if have is None:
            experts = {
                e.name: {"kind": "top" if is_labels_expert(m, e.name) else "dense", "dim": e.dim, "window_s": e.window_s}
                for e in m.device.experts
            }
            with self.db:
                self._set_meta("space_id", m.space.id)
                self._set_meta("space_kind", m.space.kind)
                self._set_meta("bundle_name", m.name)
                self._set_meta("bundle_path", str(bundle.root))
                self._set_meta("hop_s", repr(m.device.hop_s))
                self._set_meta("experts", json.dumps(experts))
                self._set_meta("created", _now())
            return
        self.check_space(m)

    def check_space(self, m: Manifest) -> None:
        have = self.space_id
        if have is None:
            raise ConfigError(f"index {str(self.dir)!r} is empty; run edge-retrieval index first")
        if have != m.space.id:
            raise QueryRejected(
                f"index {str(self.dir)!r} was built in space {have[:12]}... (bundle {self.meta('bundle_name')!r}); "
                f"bundle {m.name!r} has space {m.space.id[:12]}...: use the bundle the index was built with, "
                "or index again into a new --out"
            )

    @property
    def bundle_path(self) -> str | None:
        return self.meta("bundle_path")

    def window_s(self) -> float:
        experts = json.loads(self.meta("experts") or "{}")
        return max((e["window_s"] for e in experts.values()), default=0.0)

    # ----------------------------------------------------------------- writing

    def is_current(self, path: str, size: int, mtime_ns: int) -> bool:
        """True when ``path`` is indexed (or known bad) at this size and mtime: nothing to do."""
        for table in ("files", "failures"):
            row = self.db.execute(f"SELECT size, mtime_ns FROM {table} WHERE path = ?", (path,)).fetchone()
            if row and row[0] == size and row[1] == mtime_ns:
                return True
        return False

    def known(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM files WHERE path = ?", (path,)).fetchone() is not None

    def add(self, path: str, size: int, mtime_ns: int, meta: RecordingMeta, fv: FileVectors, manifest: Manifest) -> None:
        """Store one file's windows (replacing an older version of it) in one transaction."""
        try:
            with self.db:
                self.db.execute("DELETE FROM files WHERE path = ?", (path,))
                self.db.execute("DELETE FROM failures WHERE path = ?", (path,))
                cur = self.db.execute(
                    "INSERT INTO files(path, size, mtime_ns, duration_s, sample_rate, start_epoch, time_source, site,"
                    " n_windows, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        path, size, mtime_ns, fv.duration_s, fv.sample_rate,
                        meta.start.timestamp() if meta.start else None, meta.time_source, meta.site,
                        fv.n_windows, _now(),
                    ),
                )
                fid = cur.lastrowid
                self.db.executemany(
                    "INSERT INTO windows(file_id, idx, offset_s) VALUES (?, ?, ?)",
                    [(fid, i, float(o)) for i, o in enumerate(fv.offsets_s)],
                )
                for name, v in fv.vectors.items():
                    self.db.execute(
                        "INSERT INTO vectors(file_id, expert, kind, dim, k, data, indices) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (fid, name, *_pack(v, is_labels_expert(manifest, name))),
                    )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write {path!r} to index {str(self.path)!r}: {exc}") from exc

    def add_failure(self, path: str, size: int, mtime_ns: int, message: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO failures(path, size, mtime_ns, message, at) VALUES (?, ?, ?, ?, ?)",
                (path, size, mtime_ns, message, _now()),
            )

    def prune(self, root: str, seen: set[str]) -> int:
        """Forget files under ``root`` that are gone from disk (not seen in this scan)."""
        prefix = root.rstrip(os.sep) + os.sep
        gone = [
            p for (p,) in self.db.execute("SELECT path FROM files UNION SELECT path FROM failures")
            if p.startswith(prefix) and p not in seen and not os.path.exists(p)
        ]
        with self.db:
            for p in gone:
                self.db.execute("DELETE FROM files WHERE path = ?", (p,))
                self.db.execute("DELETE FROM failures WHERE path = ?", (p,))
        return len(gone)

    # ----------------------------------------------------------------- reading

    def stats(self) -> dict[str, object]:
        files, windows, timed = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n_windows), 0), COUNT(start_epoch) FROM files").fetchone()
        failed = self.db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
        return {"files": files, "windows": windows, "failed": failed, "space_id": self.space_id,
                "bundle": self.meta("bundle_name"), "timed_files": timed}

    def failures(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, message FROM failures ORDER BY path"))

    def search(
        self,
        queries: QueryVectors,
        top: int = 10,
        since: float | None = None,
        until: float | None = None,
        site: str | None = None,
        cosine: bool = False,
    ) -> list[Hit]:
        """Best ``top`` windows for one query. Date filters keep windows whose absolute start is in
        [since, until) and so drop files with no known start time; ``site`` matches exactly.
        ``cosine`` scores labels windows by the cosine of their probabilities with the query
        (search by example: the nearest sound, not the loudest on the example's labels)."""
        wlen = self.window_s()
        heap: list[tuple[float, int, int, str, float | None, str | None, float]] = []  # min-heap of (score, -fid, -idx, ...)
        for fs in self.window_scores([queries], since, until, site, cosine):
            for i in np.flatnonzero(fs.keep):
                item = (float(fs.scores[i, 0]), -fs.file_id, -int(i), fs.path, fs.start, fs.site, float(fs.offsets[i]))
                if len(heap) < top:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)
        return [
            Hit(s, path, off, wlen, iso_utc(start + off) if start is not None else None, fsite)
            for s, _, _, path, start, fsite, off in sorted(heap, reverse=True)
        ]

    def window_scores(
        self,
        queries: Sequence[QueryVectors],
        since: float | None = None,
        until: float | None = None,
        site: str | None = None,
        cosine: bool = False,
    ) -> Iterator[FileScores]:
        """Per file (filters as ``search``): every window's score for each query, in window order."""
        for q in queries:
            if q.space_id != self.space_id:
                raise QueryRejected(
                    f"query space id {q.space_id[:12]}... differs from index space id {str(self.space_id)[:12]}..."
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
        per_q = [dict(zip(q.experts, zip(q.vectors, q.weights, strict=True), strict=True)) for q in queries]
        wsums = [sum(q.weights) or 1.0 for q in queries]
        for fid, path, start, fsite, n in list(self.db.execute(sql, args)):
            scores = np.zeros((n, len(queries)), np.float64)
            for expert, kind, dim, k, data, indices in self.db.execute(
                "SELECT expert, kind, dim, k, data, indices FROM vectors WHERE file_id = ?", (fid,)
            ):
                for j, dense_q in enumerate(per_q):
                    if expert not in dense_q:
                        continue
                    q, w = dense_q[expert]
                    if q.size != dim:
                        raise QueryRejected(f"query vector for {expert!r} has dimension {q.size}, index has {dim}")
                    scores[:, j] += (w / wsums[j]) * _score(kind, dim, k, n, data, indices, q, cosine)
            offsets = np.asarray([o for (o,) in self.db.execute(
                "SELECT offset_s FROM windows WHERE file_id = ? ORDER BY idx", (fid,))], np.float64)
            keep = np.ones(n, bool)
            if start is not None and (since is not None or until is not None):
                t = start + offsets
                if since is not None:
                    keep &= t >= since
                if until is not None:
                    keep &= t < until
            yield FileScores(fid, path, start, fsite, offsets, keep, scores)


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


def _score(kind: str, dim: int, k: int, n: int, data: bytes, indices: bytes | None, q: np.ndarray,
           cosine: bool = False) -> np.ndarray:
    if kind == "dense":
        return np.frombuffer(data, "<f2").reshape(n, dim).astype(np.float32) @ q
    idx = np.frombuffer(indices or b"", "<u2").reshape(n, k)
    probs = np.frombuffer(data, "<f2").reshape(n, k).astype(np.float32)
    s = (probs * q[idx]).sum(axis=1)
    if cosine:
        s /= np.maximum(np.linalg.norm(probs, axis=1) * np.linalg.norm(q), 1e-12)
    return s


# --------------------------------------------------------------------------- indexing a folder


def find_audio(root: str | Path, skip: Sequence[Path] = ()) -> Iterator[Path]:
    """Audio files under ``root`` (sorted), skipping hidden folders and ``skip`` (the index itself)."""
    root = Path(root)
    skipped = {p.resolve() for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in skipped)
        for name in sorted(filenames):
            if name.lower().endswith(AUDIO_SUFFIXES) and not name.startswith("."):
                yield d / name


def index_folder(
    root: str | Path,
    bundle: Bundle,
    index: ArchiveIndex,
    threads: int = 1,
    site: str | None = None,
    progress: Callable[[Iterable[Path], int], Iterable[Path]] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> IndexReport:
    """Embed new or changed recordings under ``root`` into ``index``; a bad file is recorded and skipped."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"archive folder {str(root)!r} is not a directory")
    index.bind(bundle)
    report = IndexReport()
    files = list(find_audio(root, skip=[index.dir]))
    todo: list[tuple[Path, int, int]] = []
    seen: set[str] = set()
    for p in files:
        ap = str(p.resolve())
        seen.add(ap)
        try:
            st = p.stat()
        except OSError as exc:
            report.failed.append((ap, str(exc)))
            continue
        if index.is_current(ap, st.st_size, st.st_mtime_ns):
            report.unchanged += 1
        else:
            todo.append((p, st.st_size, st.st_mtime_ns))
    report.pruned = index.prune(str(root.resolve()), seen)
    if not todo:
        return report
    embedder = FileEmbedder(bundle, threads=threads)
    it: Iterable[tuple[Path, int, int]] = todo
    if progress is not None:
        it = progress(todo, len(todo))  # type: ignore[arg-type]
    for p, size, mtime in it:
        ap = str(p.resolve())
        existed = index.known(ap)
        try:
            fv = embedder.embed_file(p)
        except EdgeRetrievalError as exc:
            index.add_failure(ap, size, mtime, str(exc))
            report.failed.append((ap, str(exc)))
            if on_error:
                on_error(ap, str(exc))
            continue
        index.add(ap, size, mtime, recording_meta(p, root, site), fv, bundle.manifest)
        report.windows += fv.n_windows
        if existed:
            report.updated += 1
        else:
            report.added += 1
    return report


def open_search_bundle(index: ArchiveIndex, bundle_dir: str | Path | None) -> Bundle:
    """The bundle for text queries: the one given, else the one the index was built with."""
    from ..bundle import load_bundle

    path = bundle_dir or index.bundle_path
    if not path:
        raise ConfigError("no --bundle given and the index does not record one")
    try:
        b = load_bundle(path, part="all")
    except BundleError as exc:
        if bundle_dir is None:
            raise BundleError(f"{exc} (the bundle recorded in the index; pass --bundle)") from exc
        raise
    index.check_space(b.manifest)
    return b
