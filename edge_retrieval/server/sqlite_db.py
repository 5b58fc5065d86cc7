"""One SQLite file of the server's (WAL), its schema applied, every statement under one lock.

The console's accounts (``users``) and feedback (``feedback``) keep their tables next to the
detections this way; a SQLite failure becomes a StoreError naming the file.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import StoreError


class SqliteDb:
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

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"server database {str(self.path)!r}: {exc}") from exc
