"""The one durable queue under both outboxes: rows in a SQLite table, oldest dropped when full.

A row is on disk (WAL, ``synchronous=FULL``: a power cut keeps it) when ``append`` returns and
leaves only through ``delete``, which its owner calls after the broker's PUBACK. The queue holds
at most ``max_rows`` rows; appending to a full queue drops the oldest, logs a WARNING and adds
to the persisted ``dropped`` count. Owners (``Outbox``, ``ClipOutbox``) share ``lock`` and
``wake`` with it and may run their own statements on ``db`` under ``lock``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import StoreError

log = logging.getLogger(__name__)


class SqliteQueue:
    """Bounded on-disk FIFO of rows (``id INTEGER PRIMARY KEY AUTOINCREMENT`` gives the order)."""

    def __init__(self, path: str | Path, table: str, columns: str, max_rows: int, *, what: str, unit: str,
                 indexes: Sequence[str] = ()) -> None:
        """``columns``: the SQL column definitions after ``id``; ``what``/``unit`` name it in messages."""
        self.path = Path(path)
        self.table = table
        self.max_rows = int(max_rows)
        self.what, self.unit = what, unit
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # rows are rare; survive power loss too
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, {columns})")
            for sql in indexes:
                self.db.execute(sql)
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', 0)")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open {what} {str(self.path)!r}: {exc}") from exc

    def append(self, row: Mapping[str, Any], *, replace: bool = False) -> None:
        """Store one row durably, dropping the oldest when full; ``replace``: INSERT OR REPLACE."""
        names = list(row)
        sql = (f"INSERT {'OR REPLACE ' if replace else ''}INTO {self.table} ({', '.join(names)}) "
               f"VALUES ({', '.join('?' * len(names))})")
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                n = self.db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]
                if n >= self.max_rows:
                    drop = n - self.max_rows + 1
                    self.db.execute(
                        f"DELETE FROM {self.table} WHERE id IN (SELECT id FROM {self.table} ORDER BY id LIMIT ?)", (drop,)
                    )
                    self.db.execute("UPDATE meta SET value = value + ? WHERE name='dropped'", (drop,))
                    log.warning("%s full (%d %s): dropped the %d oldest", self.what, self.max_rows, self.unit, drop)
                self.db.execute(sql, tuple(row.values()))
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise StoreError(f"{self.what} {str(self.path)!r}: cannot store a row: {exc}") from exc
            self.wake.notify_all()

    def first(self, columns: str, n: int, skip: Sequence[int] = ()) -> list[tuple[Any, ...]]:
        """The ``n`` oldest rows (``id`` first, then ``columns``), leaving out the ids in ``skip``."""
        if n <= 0:
            return []
        with self.lock:
            if skip:
                marks = ",".join("?" * len(skip))
                q = f"SELECT id, {columns} FROM {self.table} WHERE id NOT IN ({marks}) ORDER BY id LIMIT ?"
                return self.db.execute(q, (*skip, n)).fetchall()
            return self.db.execute(f"SELECT id, {columns} FROM {self.table} ORDER BY id LIMIT ?", (n,)).fetchall()

    def delete(self, rid: int) -> bool:
        """Remove a delivered row; a failure is logged (the row is sent again later; receivers upsert)."""
        with self.lock:
            try:
                self.db.execute(f"DELETE FROM {self.table} WHERE id=?", (rid,))
            except sqlite3.Error as exc:
                log.warning("%s: cannot delete row %d: %s", self.what, rid, exc)
                return False
            self.wake.notify_all()
            return True

    def depth(self) -> int:
        with self.lock:
            return int(self.db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])

    def dropped(self) -> int:
        """Rows dropped because the queue was full (persisted across restarts)."""
        with self.lock:
            return int(self.db.execute("SELECT value FROM meta WHERE name='dropped'").fetchone()[0])

    def close(self) -> None:
        with self.lock:
            try:
                self.db.close()
            except sqlite3.Error:
                pass


class QueueOwner:
    """What both outboxes share: a sender thread over a ``SqliteQueue``, woken by ``_wake`` (a
    Condition on ``_lock``) and stopped by ``_stop``. ``close`` stops it, then the queue."""

    _lock: threading.Lock
    _wake: threading.Condition
    _stop: bool
    _thread: threading.Thread | None
    _q: SqliteQueue

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._q.close()
