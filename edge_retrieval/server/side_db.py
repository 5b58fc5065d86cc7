"""The console's own tables (accounts, sessions, feedback) beside the server's detections.

``open_side_db(db, ...)`` opens the same ``--db`` the server store uses: a SQLite file (WAL, its
own connection, every statement under one lock) or a ``postgresql://`` URL (psycopg, autocommit),
so servers sharing one PostgreSQL also share their console's users, sessions and feedback. The SQL
is written once with ``?`` placeholders (turned into psycopg's ``%s``); only the schema differs. A
database failure becomes a StoreError naming the file or the URL (its password hidden).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .store_pg import PgDb, is_postgres_url

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


def open_side_db(db: str | Path, sqlite_schema: str, pg_schema: str) -> SqliteDb | PgDb:
    """``--db`` (a SQLite path or a postgresql:// URL) with the tables of ``*_schema`` created."""
    if isinstance(db, str) and is_postgres_url(db):
        return PgDb(db, pg_schema, lock_key=_SCHEMA_LOCK)
    return SqliteDb(db, sqlite_schema)
