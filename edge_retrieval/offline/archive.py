"""Archive search: an index of window vectors for a folder of recordings, ranked by text queries.

An index directory holds a catalog and the window shards:
  index.sqlite      meta(key, value)   schema, space id, bundle name/path, hop, per-expert storage
                    files              path, size, mtime_ns, duration, rate, start time (UTC epoch; from
                                       GUANO, BWF bext, the AudioMoth comment, or a ``YYYYMMDD_HHMMSS``
                                       file name), site, and where its windows are: (shard, local)
                    shards(name)       registered shards
                    failures(path, size, mtime_ns, message)   unreadable files (retried when changed)
  shards/<name>/    columnar window vectors (``offline.shards``): labels experts keep each window's
                    top 64 probabilities as posting lists scored exactly; embedding experts keep
                    float16 rows and, in large shards, a faiss IVF-PQ for candidates re-ranked exactly
An index belongs to one space id: indexing or searching with a bundle of another space is refused.
A version-1 index (windows as SQLite rows) is refused with the command that migrates it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from ..bundle import Bundle, Manifest
from ..errors import BundleError, ConfigError, EdgeRetrievalError, QueryRejected, StoreError
from .archive_v1 import V1Index, is_v1, migrate_index
from .retrieval import AUDIO_SUFFIXES, TOP_LABELS, FileEmbedder, FileVectors, QueryVectors, is_labels_expert
from .shards import SHARD_WINDOWS, Shard, ShardBuilder, ShardFile, search_shards

INDEX_NAME = "index.sqlite"
SHARDS_DIR = "shards"
INCOMING = ".incoming"  # under SHARDS_DIR: shards written by workers, not yet registered
SCHEMA_VERSION = 2
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
    indexed_at TEXT NOT NULL,
    shard TEXT NOT NULL,
    local INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_shard ON files(shard);
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, windows INTEGER NOT NULL, registered TEXT NOT NULL);
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
    """The catalog and shards of one archive. Not thread-safe: one writer at a time."""

    def __init__(self, directory: str | Path, create: bool = False, migrate: bool = False) -> None:
        self.dir = Path(directory)
        self.path = self.dir / INDEX_NAME
        self.shards_dir = self.dir / SHARDS_DIR
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
        v1_path = None
        if is_v1(self.path):
            if not migrate:
                raise StoreError(
                    f"index {str(self.dir)!r} is a version-1 index (windows in SQLite rows); migrate it once with: "
                    f"edge-retrieval index DIR --bundle B --out {self.dir} --migrate"
                )
            v1_path = migrate_index(self.dir, INDEX_NAME)
        try:
            self.db = sqlite3.connect(str(self.path))
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
        self.shards_dir.mkdir(exist_ok=True)
        self._builder: ShardBuilder | None = None
        self._open: dict[str, Shard] = {}
        self._tables: dict[str, _FileTable] | None = None
        self._sweep(leftovers=True)
        if v1_path is not None:
            self._migrate_from(v1_path)

    def close(self) -> None:
        self.flush()
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
            with self.db:
                self._set_meta("space_id", m.space.id)
                self._set_meta("space_kind", m.space.kind)
                self._set_meta("bundle_name", m.name)
                self._set_meta("bundle_path", str(bundle.root))
                self._set_meta("hop_s", repr(m.device.hop_s))
                self._set_meta("experts", json.dumps(expert_storage(m)))
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

    def experts(self) -> dict[str, dict[str, object]]:
        """Per expert: storage kind ("top" or "dense"), dim, k, window_s (set by ``bind``)."""
        return json.loads(self.meta("experts") or "{}")

    def window_s(self) -> float:
        return max((float(e["window_s"]) for e in self.experts().values()), default=0.0)

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
        """Buffer one file's windows; they reach disk (and replace an older version of the file) when
        the buffer fills a shard, at ``flush`` or at ``close``."""
        if self._builder is None:
            self._builder = ShardBuilder(storage_of(self.experts()))
        self._builder.add(shard_file(path, size, mtime_ns, meta, fv), fv.offsets_s, fv.vectors)
        if self._builder.n_windows >= SHARD_WINDOWS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered files as one shard and register it."""
        if self._builder is not None and self._builder.files:
            self.register(self._builder.write(self.shards_dir))
        self._builder = None

    def register(self, name: str) -> None:
        """Make a written shard (``shards/<name>``) searchable: its files replace older versions of the
        same paths, in one transaction; shards left with no live file are deleted."""
        if (self.incoming / name).is_dir():
            os.replace(self.incoming / name, self.shards_dir / name)
        shard = Shard(self.shards_dir / name)
        want = storage_of(self.experts())
        if shard.experts != want:
            raise StoreError(f"shard {name!r} stores experts {shard.experts}, the index expects {want}")
        try:
            with self.db:
                for local, f in enumerate(shard.files):
                    self.db.execute("DELETE FROM files WHERE path = ?", (f.path,))
                    self.db.execute("DELETE FROM failures WHERE path = ?", (f.path,))
                    self.db.execute(
                        "INSERT INTO files(path, size, mtime_ns, duration_s, sample_rate, start_epoch, time_source,"
                        " site, n_windows, indexed_at, shard, local) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (f.path, f.size, f.mtime_ns, f.duration_s, f.sample_rate, f.start_epoch, f.time_source,
                         f.site, f.n_windows, _now(), name, local),
                    )
                self.db.execute("INSERT INTO shards(name, windows, registered) VALUES (?, ?, ?)",
                                (name, shard.n, _now()))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot register shard {name!r} in {str(self.path)!r}: {exc}") from exc
        self._tables = None
        self._sweep()

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
        if gone:
            self._tables = None
            self._sweep()
        return len(gone)

    def _sweep(self, leftovers: bool = False) -> None:
        """Delete shards whose files are all gone or replaced; with ``leftovers`` (at open, when no
        writer runs) also unregistered folders: half-written or unregistered shards of a crashed run."""
        dead = [n for (n,) in self.db.execute(
            "SELECT name FROM shards WHERE name NOT IN (SELECT DISTINCT shard FROM files)")]
        with self.db:
            for n in dead:
                self.db.execute("DELETE FROM shards WHERE name = ?", (n,))
        for n in dead:
            shutil.rmtree(self.shards_dir / n, ignore_errors=True)
            self._open.pop(n, None)
        if leftovers:
            live = {n for (n,) in self.db.execute("SELECT name FROM shards")}
            for p in self.shards_dir.iterdir():
                if p.name not in live:
                    shutil.rmtree(p, ignore_errors=True)

    @property
    def incoming(self) -> Path:
        """Where worker processes write shards before ``register`` moves them in."""
        return self.shards_dir / INCOMING

    def _migrate_from(self, v1_path: Path) -> None:
        """Fill this (new) catalog from a version-1 index moved aside: meta, failures, windows."""
        old = V1Index(v1_path)
        try:
            meta = old.copy_meta()
            with self.db:
                for k, v in meta.items():
                    if k != "schema":
                        self._set_meta(k, v)
                for row in old.failures():
                    self.db.execute("INSERT OR REPLACE INTO failures(path, size, mtime_ns, message, at)"
                                    " VALUES (?, ?, ?, ?, ?)", row)
            for name in old.migrate(self.shards_dir, storage_of(self.experts())):
                self.register(name)
        finally:
            old.close()

    # ----------------------------------------------------------------- reading

    def stats(self) -> dict[str, object]:
        files, windows, timed = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n_windows), 0), COUNT(start_epoch) FROM files").fetchone()
        failed = self.db.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
        shards = self.db.execute("SELECT COUNT(*) FROM shards").fetchone()[0]
        return {"files": files, "windows": windows, "failed": failed, "shards": shards,
                "space_id": self.space_id, "bundle": self.meta("bundle_name"), "timed_files": timed}

    def failures(self) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, message FROM failures ORDER BY path"))

    def _file_tables(self) -> dict[str, _FileTable]:
        """Per registered shard, its live files as arrays (cached until the catalog changes)."""
        if self._tables is None:
            tables: dict[str, _FileTable] = {}
            for (name,) in self.db.execute("SELECT name FROM shards ORDER BY name"):
                shard = self._open.get(name) or Shard(self.shards_dir / name)
                self._open[name] = shard
                nf = len(shard.files)
                t = _FileTable(shard, np.zeros(nf, bool), np.full(nf, np.nan), np.full(nf, np.nan),
                               np.full(nf, None, object))
                for local, start, dur, fsite in self.db.execute(
                        "SELECT local, start_epoch, duration_s, site FROM files WHERE shard = ?", (name,)):
                    t.live[local] = True
                    t.start[local] = np.nan if start is None else start
                    t.duration[local] = dur
                    t.site[local] = fsite
                t.all_live = bool(t.live.all())
                tables[name] = t
            self._tables = tables
        return self._tables

    def search(
        self,
        queries: QueryVectors,
        top: int = 10,
        since: float | None = None,
        until: float | None = None,
        site: str | None = None,
        cosine: bool = True,
        nprobe: int = 32,
    ) -> list[Hit]:
        """Best ``top`` windows for one query. Date filters keep windows whose absolute start is in
        [since, until) and so drop files with no known start time; ``site`` matches exactly.
        Ties rank by file path, then offset. ``cosine`` (the default) ranks labels windows by the
        cosine of their stored probabilities with the query: the windows most *about* the query,
        not the loudest on its labels (docs/architecture.md, "Scores"); ``cosine=False`` ranks by
        the detection score (the dot product), through the threshold algorithm."""
        self._check_queries([queries])
        wlen = self.window_s()
        self.flush()
        tables = list(self._file_tables().values())
        masks = [t.window_mask(since, until, site) for t in tables]
        cands = search_shards([t.shard for t in tables], masks, queries.experts, queries.vectors, queries.weights,
                              top, nprobe=nprobe, cosine=cosine)
        hits = []
        for c in cands:
            shard = tables[c.shard].shard
            f = shard.files[int(shard.file[c.row])]
            off = float(shard.offset[c.row])
            t = iso_utc(f.start_epoch + off) if f.start_epoch is not None else None
            hits.append(Hit(c.score, f.path, off, wlen, t, f.site))
        hits.sort(key=lambda h: (-h.score, h.path, h.offset_s))
        return hits[:top]

    def _check_queries(self, queries: Sequence[QueryVectors]) -> None:
        """Refuse a query of another space, or naming an expert or a dimension the index lacks."""
        experts = self.experts()
        for q in queries:
            if q.space_id != self.space_id:
                raise QueryRejected(
                    f"query space id {q.space_id[:12]}... differs from index space id {str(self.space_id)[:12]}..."
                )
            for e, v in zip(q.experts, q.vectors, strict=True):
                spec = experts.get(e)
                if spec is None:
                    raise QueryRejected(f"query expert {e!r} is not in the index (has {sorted(experts)})")
                if v.size != int(spec["dim"]):  # type: ignore[call-overload]
                    raise QueryRejected(f"query vector for {e!r} has dimension {v.size}, index has {spec['dim']}")

    def window_scores(
        self,
        queries: Sequence[QueryVectors],
        since: float | None = None,
        until: float | None = None,
        site: str | None = None,
        cosine: bool = False,
    ) -> Iterator[FileScores]:
        """Per file (filters as ``search``; in catalog order): every window's exact score for each
        query, in window order. Reads the row-major columns of the selected files only."""
        self._check_queries(queries)
        self.flush()
        where, args = [], []
        if since is not None or until is not None:
            where.append("start_epoch IS NOT NULL")
        if since is not None:
            where.append("start_epoch + duration_s >= ?")
            args.append(since)
        if until is not None:
            where.append("start_epoch < ?")
            args.append(until)
        if site is not None:
            where.append("site = ?")
            args.append(site)
        sql = ("SELECT id, path, start_epoch, site, shard, local FROM files"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id")
        files = list(self.db.execute(sql, args))
        wsums = [sum(q.weights) or 1.0 for q in queries]
        by_shard: dict[str, list[tuple[int, str, float | None, str | None, int]]] = {}
        for fid, path, start, fsite, shard_name, local in files:
            by_shard.setdefault(shard_name, []).append((fid, path, start, fsite, int(local)))
        tables = self._file_tables()
        out: dict[int, FileScores] = {}
        for shard_name, rows_of in by_shard.items():
            shard = tables[shard_name].shard
            want = np.zeros(len(shard.files), bool)
            want[[r[4] for r in rows_of]] = True
            rows = np.flatnonzero(want[np.asarray(shard.file)])
            scores = np.zeros((rows.size, len(queries)), np.float64)
            for j, q in enumerate(queries):
                for e, v, w in zip(q.experts, q.vectors, q.weights, strict=True):
                    scores[:, j] += (w / wsums[j]) * shard.rows_scores(e, v, rows, cosine)
            file_of = np.asarray(shard.file[rows])
            offsets_all = np.asarray(shard.offset[rows], np.float64)
            order = np.argsort(file_of, kind="stable")  # window order kept within a file
            sorted_files = file_of[order]
            for fid, path, start, fsite, local in rows_of:
                sel = order[np.searchsorted(sorted_files, local, "left"):np.searchsorted(sorted_files, local, "right")]
                offsets = offsets_all[sel]
                keep = np.ones(sel.size, bool)
                if start is not None and (since is not None or until is not None):
                    t = start + offsets
                    if since is not None:
                        keep &= t >= since
                    if until is not None:
                        keep &= t < until
                out[fid] = FileScores(fid, path, start, fsite, offsets, keep, scores[sel])
        for fid, *_ in files:
            yield out[fid]


@dataclass
class _FileTable:
    """One shard's local files as the catalog sees them now (live, start, duration, site)."""

    shard: Shard
    live: np.ndarray
    start: np.ndarray
    duration: np.ndarray
    site: np.ndarray
    all_live: bool = True

    def window_mask(self, since: float | None, until: float | None, site: str | None) -> np.ndarray | None:
        """Rows to keep (None: all), from the live flag, the site and the window start times."""
        if self.all_live and since is None and until is None and site is None:
            return None
        keep = self.live.copy()
        if site is not None:
            keep &= self.site == site
        if since is not None or until is not None:
            keep &= ~np.isnan(self.start)
            if since is not None:
                keep &= self.start + self.duration >= since
            if until is not None:
                keep &= self.start < until
        rows = keep[self.shard.file]
        if (since is not None or until is not None) and rows.any():
            sel = np.flatnonzero(rows)
            t = self.start[self.shard.file[sel]] + self.shard.offset[sel].astype(np.float64)
            ok = np.ones(sel.size, bool)
            if since is not None:
                ok &= t >= since
            if until is not None:
                ok &= t < until
            rows[sel[~ok]] = False
        return rows


def expert_storage(m: Manifest) -> dict[str, dict[str, object]]:
    """How each expert's windows are stored: labels as top-k ("top"), embeddings as rows ("dense")."""
    out: dict[str, dict[str, object]] = {}
    for e in m.device.experts:
        labels = is_labels_expert(m, e.name)
        out[e.name] = {"kind": "top" if labels else "dense", "dim": e.dim,
                       "k": min(TOP_LABELS, e.dim) if labels else e.dim, "window_s": e.window_s}
    return out


def storage_of(experts: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    """The part of ``expert_storage`` a shard records (kind, dim, k)."""
    out: dict[str, dict[str, object]] = {}
    for n, e in experts.items():
        dim = int(e["dim"])  # type: ignore[call-overload]
        k = e.get("k", min(TOP_LABELS, dim) if e["kind"] == "top" else dim)  # version-1 meta has no k
        out[n] = {"kind": e["kind"], "dim": dim, "k": int(k)}  # type: ignore[call-overload]
    return out


def shard_file(path: str, size: int, mtime_ns: int, meta: RecordingMeta, fv: FileVectors) -> ShardFile:
    return ShardFile(path, size, mtime_ns, fv.duration_s, fv.sample_rate,
                     meta.start.timestamp() if meta.start else None, meta.time_source, meta.site, fv.n_windows)


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
    workers: int = 1,
    cluster: str | None = None,
) -> IndexReport:
    """Embed new or changed recordings under ``root`` into ``index``; a bad file is recorded and skipped.

    ``workers`` > 1 embeds in that many local processes, ``cluster`` (a Dask scheduler address) on a
    running Dask cluster; each task writes its own shard (``offline.distributed``)."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"archive folder {str(root)!r} is not a directory")
    if workers < 1:
        raise ConfigError(f"--workers {workers!r} must be >= 1")
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
    if workers > 1 or cluster is not None:
        from .distributed import index_in_parallel

        index_in_parallel(todo, root, bundle, index, report, threads=threads, site=site, workers=workers,
                          cluster=cluster, on_error=on_error)
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
    index.flush()
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
