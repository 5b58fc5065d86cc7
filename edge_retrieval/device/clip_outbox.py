"""Durable queue of detection clips to publish: a SQLite row per clip that points at its FLAC file.

The clip file is already on disk (edge_retrieval.device.clips), so the queue only remembers *which*
files still have to reach the broker. One sender thread publishes one clip at a time (QoS 1,
not retained) on ``protocol.clip_topic(device, event_id)`` and deletes the row only after the
broker's PUBACK, so a broker outage, a lost link or a restart loses nothing (the server stores
a clip by event id, so a repeat after a lost PUBACK overwrites the same file). Clips larger
than ``max_bytes`` are skipped and counted; a file the size-capped clip folder already deleted
is dropped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TransportError
from ..protocol import MAX_CLIP_BYTES
from .sqlite_queue import QueueOwner, SqliteQueue

if TYPE_CHECKING:
    from ..transport import MqttTransport

log = logging.getLogger(__name__)



class ClipOutbox(QueueOwner):
    """At most ``max_rows`` clips (rows) wait; the oldest is dropped (counted) when full."""

    def __init__(self, path: str | Path, transport: MqttTransport, *, max_rows: int = 10_000,
                 max_bytes: int = MAX_CLIP_BYTES, ack_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.transport = transport
        self.max_rows = int(max_rows)
        self.max_bytes = int(max_bytes)
        self.ack_timeout_s = float(ack_timeout_s)
        self._q = SqliteQueue(self.path, "clips",
                              "event_id TEXT UNIQUE NOT NULL, topic TEXT NOT NULL, file TEXT NOT NULL, created REAL NOT NULL",
                              self.max_rows, what="clip queue", unit="clips")
        self._lock = self._q.lock
        self._wake = self._q.wake
        self._stop = False
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.skipped_large = 0
        self.missing = 0

    def put(self, event_id: str, topic: str, file: str | Path) -> None:
        """Remember that ``file`` must be published on ``topic`` (durable when this returns)."""
        self._q.append({"event_id": event_id, "topic": topic, "file": str(file), "created": time.time()}, replace=True)

    def wake(self) -> None:
        """A (re)connect: try the queue now."""
        with self._lock:
            self._wake.notify_all()

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="clip-sender", daemon=True)
            self._thread.start()

    def depth(self) -> int:
        return self._q.depth()

    def dropped(self) -> int:
        """Clips dropped because the queue was full (persisted across restarts)."""
        return self._q.dropped()

    def stats(self) -> dict[str, int]:
        return {"depth": self.depth(), "sent": self.sent, "skipped_large": self.skipped_large,
                "missing": self.missing, "dropped": self.dropped()}


    # ------------------------------------------------------------------ sender

    def _next(self) -> tuple[int, str, str] | None:
        rows = self._q.first("topic, file", 1)
        return rows[0] if rows else None  # type: ignore[return-value]

    def _remove(self, rid: int) -> None:
        self._q.delete(rid)  # a failure is logged; sent again later, the server overwrites the same file

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self.transport.connected and self._next() is not None):
                    self._wake.wait(1.0)
                if self._stop:
                    return
                rid, topic, file = self._next()  # type: ignore[misc]
            p = Path(file)
            try:
                size = p.stat().st_size
                data = p.read_bytes() if size <= self.max_bytes else b""
            except OSError:
                with self._lock:
                    self.missing += 1
                    self._remove(rid)
                log.warning("clip %s is gone (the clip folder's size cap deleted it?); not sent", p.name)
                continue
            if size > self.max_bytes:
                with self._lock:
                    self.skipped_large += 1
                    self._remove(rid)
                log.warning("clip %s is %d bytes, over the %d-byte cap; not sent", p.name, size, self.max_bytes)
                continue
            try:
                info = self.transport.publish_tracked(topic, data, qos=1)
            except TransportError as exc:
                with self._lock:
                    self.skipped_large += 1
                    self._remove(rid)
                log.warning("clip %s not sent: %s", p.name, exc)
                continue
            if info is None:
                time.sleep(0.2)  # link went down; the wait above resumes after the reconnect
                continue
            end = time.monotonic() + self.ack_timeout_s
            while not info.is_published() and self.transport.connected and time.monotonic() < end and not self._stop:
                time.sleep(0.02)
            if info.is_published():
                with self._lock:
                    self.sent += 1
                    self._remove(rid)
