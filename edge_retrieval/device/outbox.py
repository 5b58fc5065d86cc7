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
from .sqlite_queue import QueueOwner, SqliteQueue

log = logging.getLogger(__name__)


class Delivery(Protocol):
    """The handle of one publish (paho's MQTTMessageInfo): true once the broker acknowledged it."""

    def is_published(self) -> bool: ...


# publish(topic, payload) -> the publish's handle, or None when the link is down
PublishFn = Callable[[str, bytes], "Delivery | None"]
ACK_POLL_S = 0.02  # how often in-flight handles are checked while some are outstanding (seconds)


class Outbox(QueueOwner):
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
        self._q = SqliteQueue(
            self.path, "outbox",
            "key TEXT, topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0",
            self.max_events, what="outbox", unit="events",
            indexes=["CREATE INDEX IF NOT EXISTS outbox_key ON outbox(key)"],
        )
        self._db = self._q.db
        self._lock = self._q.lock
        self._wake = self._q.wake
        self._inflight: dict[int, Delivery] = {}  # row id -> its publish's handle (at most ``window``)
        self._sent_rows: set[int] = set()  # row ids sent (or being sent) on the current link
        self._link = 0  # bumped on every connect / disconnect
        self._publish: PublishFn | None = None
        self._online = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.acked = 0

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
            except sqlite3.Error as exc:
                raise StoreError(f"outbox {str(self.path)!r}: cannot store a message: {exc}") from exc
            self._q.append({"key": key, "topic": topic, "payload": data, "created": time.time()})

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
        if self._q.delete(rid):
            self.acked += 1

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
        return self._q.first("topic, payload", n, sorted(self._sent_rows))  # type: ignore[return-value]

    # ------------------------------------------------------------------ status

    def depth(self) -> int:
        return self._q.depth()

    def dropped(self) -> int:
        return self._q.dropped()

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def stats(self) -> dict[str, int]:
        return {"depth": self.depth(), "inflight": self.inflight(), "dropped": self.dropped(),
                "sent": self.sent, "acked": self.acked}

