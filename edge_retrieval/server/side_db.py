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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import StoreError

_SCHEMA_LOCK = 0x6564676553  # advisory lock key held while creating the console's tables


class SqliteDb:
    """One SQLite file of the server's (WAL), every statement under one lock: the SQLite twin of
    ``store_pg.PgDb``. ``settings`` run first, then ``prepare(connection)`` (a migration), then
    the schema. The server store and the console's tables each open one."""

    def __init__(self, path: str | Path, schema: str, *, settings: tuple[str, ...] = (),
                 prepare: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.path = Path(path).expanduser()
        self.lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=15)
            self.conn.execute("PRAGMA journal_mode=WAL")
            for stmt in settings:
                self.conn.execute(stmt)
            if prepare is not None:
                prepare(self.conn)
            self.conn.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open server database {str(self.path)!r}: {exc}") from exc

    def __str__(self) -> str:
        return str(self.path)

    def exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self.lock:
                return self.conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"server database {str(self.path)!r}: {exc}") from exc

    def close(self) -> None:
        with self.lock:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass


def open_side_db(db: str | Path, sqlite_schema: str, pg_schema: str) -> Any:
    """``--db`` (a SQLite path or a postgresql:// URL) with the tables of ``*_schema`` created:
    a SqliteDb or a store_pg.PgDb (imported here: store_pg imports the store, which uses SqliteDb)."""
    from .store_pg import PgDb, is_postgres_url

    if isinstance(db, str) and is_postgres_url(db):
        return PgDb(db, pg_schema, lock_key=_SCHEMA_LOCK)
    return SqliteDb(db, sqlite_schema)
