"""Persistent outbox: detections wait on disk (SQLite, WAL) until the broker acknowledges them.

An event row is deleted only when the broker acknowledged the very publish it was last sent
under (paho's MQTTMessageInfo of that publish reports ``is_published()``; acks of other
publishes on the link, health or clips, are never collected, and a wrapped message id cannot
delete a newer row), so a broker outage, a lost link or a ``kill -9`` of the daemon loses nothing: unacknowledged
rows are sent again after every (re)connect and every restart (the server upserts by
``event_id``, so a repeat is harmless). The outbox holds at most ``max_events`` rows; when full
the oldest row is dropped, counted (persisted) and reported in the device's health.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import StoreError

log = logging.getLogger(__name__)


class Delivery(Protocol):
    """The handle of one publish (paho's MQTTMessageInfo): true once the broker acknowledged it."""

    def is_published(self) -> bool: ...


# publish(topic, payload) -> the publish's handle, or None when the link is down
PublishFn = Callable[[str, bytes], "Delivery | None"]
ACK_POLL_S = 0.02  # how often in-flight handles are checked while some are outstanding (seconds)


class Outbox:
    """Bounded on-disk queue of (topic, payload) rows, at most ``max_events`` rows (events).

    ``window`` is the most rows in flight (sent, not yet acknowledged) at once. A pump thread
    sends rows in insertion order whenever the link is up and deletes a row once its publish's
    handle says it was acknowledged; ``on_ack`` only wakes the pump.
    An unsent row for the same ``key`` (event id) is replaced in place by a newer payload, so
    an onset and its final update that both wait out an outage travel as one message.
    """

    def __init__(self, path: str | Path, max_events: int = 100_000, window: int = 64) -> None:
        self.path = Path(path)
        self.max_events = int(max_events)
        self.window = int(window)
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._inflight: dict[int, Delivery] = {}  # row id -> its publish's handle (at most ``window``)
        self._sent_rows: set[int] = set()  # row ids sent (or being sent) on the current link
        self._link = 0  # bumped on every connect / disconnect
        self._publish: PublishFn | None = None
        self._online = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.acked = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # events are rare; survive power loss too
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, "
                "topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS outbox_key ON outbox(key)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', 0)")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open outbox {str(self.path)!r}: {exc}") from exc

    # ------------------------------------------------------------------ producer side

    def put(self, topic: str, payload: bytes | str, key: str | None = None) -> None:
        """Store one message durably (returns after the row is on disk)."""
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        with self._lock:
            try:
                if key is not None:
                    row = self._db.execute(
                        "SELECT id FROM outbox WHERE key=? AND topic=? ORDER BY id DESC LIMIT 1", (key, topic)
                    ).fetchone()
                    if row is not None and row[0] not in self._sent_rows:
                        self._db.execute("UPDATE outbox SET payload=? WHERE id=?", (data, row[0]))
                        self._wake.notify_all()
                        return
                self._db.execute("BEGIN IMMEDIATE")
                n = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                if n >= self.max_events:
                    drop = n - self.max_events + 1
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?)", (drop,)
                    )
                    self._db.execute("UPDATE meta SET value = value + ? WHERE name='dropped'", (drop,))
                    log.warning("outbox full (%d events): dropped the %d oldest", self.max_events, drop)
                self._db.execute(
                    "INSERT INTO outbox (key, topic, payload, created) VALUES (?, ?, ?, ?)",
                    (key, topic, data, time.time()),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"outbox {str(self.path)!r}: cannot store a message: {exc}") from exc
            self._wake.notify_all()

    # ------------------------------------------------------------------ link side

    def attach(self, publish: PublishFn) -> None:
        """Start the pump thread that sends rows through ``publish``."""
        self._publish = publish
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._pump, name="outbox-pump", daemon=True)
            self._thread.start()

    def on_connected(self) -> None:
        """A fresh link: everything unacknowledged is sent again."""
        with self._lock:
            self._link += 1
            self._inflight.clear()
            self._sent_rows.clear()
            self._online = True
            self._wake.notify_all()

    def on_disconnected(self) -> None:
        with self._lock:
            self._link += 1
            self._online = False
            self._inflight.clear()
            self._sent_rows.clear()

    def on_ack(self, mid: int) -> None:
        """The broker acknowledged some publish on the link: let the pump look at its handles.
        (paho marks the handle published just after this callback, so the pump polls briefly.)"""
        with self._lock:
            self._wake.notify_all()

    def _sweep(self) -> None:
        """Delete the rows whose publish was acknowledged (lock held)."""
        for rid in [r for r, info in self._inflight.items() if info.is_published()]:
            del self._inflight[rid]
            self._delete(rid)

    def _delete(self, rid: int) -> None:
        self._sent_rows.discard(rid)
        try:
            self._db.execute("DELETE FROM outbox WHERE id=?", (rid,))
        except sqlite3.Error as exc:  # the row is sent again later; the server upserts
            log.warning("outbox: cannot delete acknowledged row %d: %s", rid, exc)
            return
        self.acked += 1
        self._wake.notify_all()

    def _pump(self) -> None:
        # publish() runs outside our lock: paho calls on_publish (-> on_ack) under its own mutex
        while True:
            with self._lock:
                self._sweep()
                while not self._stop and not (self._online and len(self._inflight) < self.window and self._has_unsent()):
                    self._wake.wait(ACK_POLL_S if self._inflight else 1.0)
                    self._sweep()
                if self._stop:
                    return
                rows = self._next_unsent(self.window - len(self._inflight))
                for rid, _, _ in rows:
                    self._sent_rows.add(rid)
                link = self._link
            for i, (rid, topic, payload) in enumerate(rows):
                assert self._publish is not None
                try:
                    info = self._publish(topic, payload)
                except Exception as exc:  # noqa: BLE001 - e.g. oversize: keep the row, log it
                    log.warning("outbox: cannot send row %d to %s: %s", rid, topic, exc)
                    info = None
                with self._lock:
                    if info is None or link != self._link:
                        for r, _, _ in rows[i:]:
                            self._sent_rows.discard(r)
                        if info is None and link == self._link:
                            self._online = False  # link went down; on_connected resumes
                        break
                    self.sent += 1
                    self._inflight[rid] = info  # deleted by _sweep once acknowledged
                    try:
                        self._db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id=?", (rid,))
                    except sqlite3.Error:
                        pass

    def _has_unsent(self) -> bool:
        return bool(self._next_unsent(1))

    def _next_unsent(self, n: int) -> list[tuple[int, str, bytes]]:
        if n <= 0:
            return []
        skip = sorted(self._sent_rows)
        if skip:
            marks = ",".join("?" * len(skip))
            q = f"SELECT id, topic, payload FROM outbox WHERE id NOT IN ({marks}) ORDER BY id LIMIT ?"
            return self._db.execute(q, (*skip, n)).fetchall()
        return self._db.execute("SELECT id, topic, payload FROM outbox ORDER BY id LIMIT ?", (n,)).fetchall()

    # ------------------------------------------------------------------ status

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def dropped(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE name='dropped'").fetchone()[0])

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def stats(self) -> dict[str, int]:
        return {"depth": self.depth(), "inflight": self.inflight(), "dropped": self.dropped(),
                "sent": self.sent, "acked": self.acked}

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
