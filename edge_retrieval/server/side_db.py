"""The console's own tables (accounts, sessions, feedback) beside the server's detections.

``open_side_db(db, ...)`` opens the same ``--db`` the server store uses: a SQLite file (WAL, its
own connection, every statement under one lock) or a ``postgresql://`` URL (psycopg, autocommit),
so servers sharing one PostgreSQL also share their console's users, sessions and feedback. The SQL
is written once with ``?`` placeholders (turned into psycopg's ``%s``); only the schema differs. A
database failure becomes a StoreError naming the file or the URL (its password hidden).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .store_pg import is_postgres_url, redact

_PLACEHOLDER = re.compile(r"\?")
_SCHEMA_LOCK = 0x6564676553  # advisory lock key held while creating the console's tables


class SqliteDb:
    """One SQLite file of the server's, its schema applied."""

    def __init__(self, path: str | Path, schema: str) -> None:
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=15)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open server database {str(self.path)!r}: {exc}") from exc

    def __str__(self) -> str:
        return str(self.path)

    def exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"server database {str(self.path)!r}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PgDb:
    """The same on PostgreSQL (one connection, serialised by a lock; needs the ``scale`` extra)."""

    def __init__(self, url: str, schema: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ImportError("--db postgresql://... needs psycopg: pip install 'edge-retrieval[scale]'") from exc
        self._psycopg = psycopg
        self.url = url
        self._lock = threading.Lock()
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
            with self._lock, self._db.transaction():  # two servers starting together: one at a time
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
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


def open_side_db(db: str | Path, sqlite_schema: str, pg_schema: str) -> SqliteDb | PgDb:
    """``--db`` (a SQLite path or a postgresql:// URL) with the tables of ``*_schema`` created."""
    if isinstance(db, str) and is_postgres_url(db):
        return PgDb(db, pg_schema)
    return SqliteDb(db, sqlite_schema)
