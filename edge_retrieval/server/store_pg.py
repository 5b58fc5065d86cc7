"""The server store on PostgreSQL, for several server processes sharing one fleet.

Same interface and tables as ``store.ServerStore`` (whose SQL it runs, with ``?`` placeholders
turned into psycopg's ``%s``); only what SQLite spells differently is written here: the schema
(BIGSERIAL, DOUBLE PRECISION), the detection merge and the console's change feed (GREATEST), and
the migrations (detections and clips keyed by ``(device, event_id)``, 64-bit alert versions).
``PgDb`` is the connection; the console's users, sessions and feedback open one too
(server/side_db.py). Every write is an upsert by key inside one statement, so two servers
storing the same (redelivered) event race safely and it is stored once. Chosen by ``--db postgresql://...``; needs ``pip install 'edge-retrieval[scale]'``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..protocol import Event, utcnow
from .store import ServerStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS detections (
    event_id TEXT NOT NULL, device TEXT NOT NULL, query_id TEXT NOT NULL, query TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL, start_s DOUBLE PRECISION NOT NULL, end_s DOUBLE PRECISION NOT NULL,
    time TEXT NOT NULL, clock TEXT NOT NULL, source TEXT NOT NULL, final INTEGER NOT NULL, clip TEXT,
    site TEXT, lat DOUBLE PRECISION, lon DOUBLE PRECISION, received TEXT NOT NULL, updated TEXT NOT NULL,
    messages INTEGER NOT NULL, PRIMARY KEY (device, event_id)
);
CREATE INDEX IF NOT EXISTS detections_received ON detections(received);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, last_seen TEXT NOT NULL, offline_since TEXT,
    low_disk INTEGER NOT NULL DEFAULT 0, clock TEXT NOT NULL DEFAULT 'unknown', health TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, target_kind TEXT NOT NULL, target TEXT NOT NULL,
    version BIGINT NOT NULL, threshold DOUBLE PRECISION NOT NULL, policy TEXT, message TEXT NOT NULL,
    created TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clips (
    event_id TEXT NOT NULL, device TEXT NOT NULL, path TEXT NOT NULL, bytes BIGINT NOT NULL, received TEXT NOT NULL,
    PRIMARY KEY (device, event_id)
);
CREATE TABLE IF NOT EXISTS notices (
    id BIGSERIAL PRIMARY KEY, time TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT
);
"""
_PLACEHOLDER = re.compile(r"\?")
_SCHEMA_LOCK = 0x6564676552  # advisory lock key held while creating the schema
DEFAULT_CLIPS_PARENT = Path("~/.local/state/edge-retrieval")


def is_postgres_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password (for logs and messages)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class PgDb:
    """One PostgreSQL connection (autocommit, statements serialised by a lock) with its tables.

    The SQL is SQLite's, ``?`` placeholders turned into psycopg's ``%s``. ``settings`` run first;
    then, under an advisory lock (two servers starting together create the schema one at a time),
    ``prepare(connection)`` and the schema. A failure is a StoreError naming the URL, password hidden.
    """

    def __init__(self, url: str, schema: str, *, lock_key: int = _SCHEMA_LOCK, settings: tuple[str, ...] = (),
                 prepare: Callable[[Any], None] | None = None) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ImportError("--db postgresql://... needs psycopg: pip install 'edge-retrieval[scale]'") from exc
        self._psycopg = psycopg
        self.url = url
        self._lock = threading.Lock()
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
            with self._lock:
                for stmt in settings:
                    self._db.execute(stmt)
                with self._db.transaction():
                    self._db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
                    if prepare is not None:
                        prepare(self._db)
                    self._db.execute(schema)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open server database {redact(url)}: {exc}") from exc

    def __str__(self) -> str:
        return redact(self.url)

    def exec(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        try:
            with self._lock:
                return self._db.execute(_PLACEHOLDER.sub("%s", sql), args)
        except self._psycopg.Error as exc:
            raise StoreError(f"server database {redact(self.url)}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except self._psycopg.Error:
                pass


class PgServerStore(ServerStore):
    """``ServerStore`` on PostgreSQL (one ``PgDb`` connection)."""

    SCALAR_MAX = "GREATEST"

    def __init__(self, url: str, create: bool = True) -> None:  # noqa: D107 - no ServerStore.__init__ (SQLite)
        self.url = url
        self.path = DEFAULT_CLIPS_PARENT.expanduser() / "postgresql"  # clips default to the folder beside it
        # the SQLite store's durability (WAL, synchronous=NORMAL): a commit survives the server
        # process dying; only a database host crash may lose the last ~0.6 s (3 x wal_writer_delay).
        # Waiting for every fsync capped a server at ~170 events/s.
        self._pg = PgDb(url, _SCHEMA, settings=("SET synchronous_commit = off",),
                        prepare=lambda db: self._prepare(db, create))

    def _prepare(self, db: Any, create: bool) -> None:
        if not create and db.execute("SELECT to_regclass('detections')").fetchone()[0] is None:
            raise StoreError(f"no server tables in {redact(self.url)} (expected the --db the server writes)")
        self._migrate(db)

    @staticmethod
    def _migrate(db: Any) -> None:
        """Tables written before detections and clips were keyed by (device, event_id): re-keyed in
        place; an alerts table with 32-bit versions: widened."""
        for table in ("detections", "clips"):
            pk = [r[0] for r in db.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary",
                (table,)).fetchall()]
            if pk == ["event_id"]:
                db.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey, ADD PRIMARY KEY (device, event_id)")
        # alert versions are milliseconds since the epoch (alerts.next_version): 32 bits overflow
        kind = db.execute("SELECT data_type FROM information_schema.columns WHERE table_name = 'alerts' "
                          "AND column_name = 'version' AND table_schema = current_schema()").fetchone()
        if kind is not None and kind[0] == "integer":
            db.execute("ALTER TABLE alerts ALTER COLUMN version TYPE BIGINT")

    def __str__(self) -> str:
        return redact(self.url)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._pg.exec(sql, args)

    def upsert_event(self, ev: Event) -> bool:
        """As ``ServerStore.upsert_event``, atomic under concurrent servers (ON CONFLICT)."""
        now = utcnow()
        row = self._exec(
            "INSERT INTO detections VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1) "
            "ON CONFLICT(device, event_id) DO UPDATE SET "
            "score=GREATEST(detections.score, excluded.score), "
            "end_s=CASE WHEN excluded.final >= detections.final THEN GREATEST(detections.end_s, excluded.end_s) "
            "ELSE detections.end_s END, "
            "final=GREATEST(detections.final, excluded.final), clip=coalesce(excluded.clip, detections.clip), "
            "updated=excluded.updated, messages=detections.messages+1 "
            "RETURNING messages",
            (ev.event_id, ev.device, ev.query_id, ev.query, ev.score, ev.start_s, ev.end_s, ev.time,
             ev.clock, ev.source, int(ev.final), ev.clip, ev.site, ev.lat, ev.lon, now, now),
        ).fetchone()
        return row is not None and int(row[0]) == 1

    def close(self) -> None:
        self._pg.close()


def open_store(db: str, create: bool = True) -> ServerStore:
    """``--db``: a postgresql:// URL opens PostgreSQL, anything else is a SQLite file path;
    ``create=False`` for readers (a mistyped --db fails instead of creating an empty store)."""
    return PgServerStore(db, create=create) if is_postgres_url(db) else ServerStore(db, create=create)
