"""Webhook: POSTs detections and notices as JSON from its own thread, so a slow phone gateway never
blocks the MQTT thread.

Messages wait in a SQLite queue (a file next to the server database), so a gateway that is down
for hours, or a server restart, loses nothing within ``horizon_s``. Each message is retried with
doubling backoff; the sender takes devices in turn, and each device holds at most
``per_device`` waiting messages, so one noisy device can only drop its own. A redirect is a
failure (following a 301/302/303 would turn the POST into a GET). The URL usually carries a
token: it is only ever shown redacted (``redact_url``).
"""

from __future__ import annotations

import http.client
import json
import logging
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, StoreError

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """``scheme://host[:port]/...``: path, query and credentials (often a token) left out."""
    try:
        u = urlsplit(url)
        host = u.hostname or "?"
        port = f":{u.port}" if u.port else ""
    except ValueError:
        return "<webhook URL>"
    rest = "/..." if (u.path not in ("", "/") or u.query or u.fragment) else ""
    return f"{u.scheme}://{host}{port}{rest}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: urllib then raises HTTPError for the 3xx, which counts as a failure."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _device_of(body: dict[str, Any]) -> str:
    ev = body.get("event")
    dev = ev.get("device") if isinstance(ev, dict) else body.get("device")
    return str(dev)[:64] if dev is not None else ""


class Webhook:
    """POST JSON to ``url`` from a worker thread (see the module docstring).

    ``queue_path`` None keeps the queue in memory (tests); ``max_queue`` and ``per_device`` bound
    it (messages); retries back off from ``min_backoff_s`` to ``max_backoff_s`` (seconds) and a
    message older than ``horizon_s`` (seconds) is given up (counted, WARNING).
    """

    def __init__(self, url: str, queue_path: str | Path | None = None, *, max_queue: int = 10_000,
                 per_device: int = 500, timeout_s: float = 5.0, min_backoff_s: float = 1.0,
                 max_backoff_s: float = 600.0, horizon_s: float = 86_400.0) -> None:
        u = urlsplit(url) if isinstance(url, str) else None
        if u is None or u.scheme not in ("http", "https") or not u.netloc:
            raise ConfigError(f"webhook {redact_url(str(url))!r} is not valid (expected http:// or https:// URL)")
        self.url = url
        self.display = redact_url(url)
        self.max_queue, self.per_device = int(max_queue), int(per_device)
        self.timeout_s = timeout_s
        self.min_backoff_s, self.max_backoff_s, self.horizon_s = min_backoff_s, max_backoff_s, horizon_s
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._last_served: dict[str, float] = {}
        self.sent = 0
        self.failed = 0  # given up after ``horizon_s``
        self.attempts_failed = 0
        self.dropped = 0  # queue bounds
        where = str(Path(queue_path).expanduser()) if queue_path is not None else ":memory:"
        try:
            if queue_path is not None:
                Path(where).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(where, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, "
                             "body TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, "
                             "next_try REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS queue_device ON queue(device, id)")
            # a restart (often after fixing the URL) tries every waiting message once more right away
            self._db.execute("UPDATE queue SET next_try=?", (time.time(),))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open webhook queue {where!r}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ producer

    def post(self, body: dict[str, Any]) -> None:
        """Queue one message (never blocks on the network; bounds drop the device's own oldest)."""
        try:
            data = json.dumps(body, allow_nan=False)
        except ValueError as exc:  # NaN/inf is not JSON; the protocol refuses them, this is a backstop
            self.dropped += 1
            log.warning("webhook: %s message is not valid JSON (%s); dropped", body.get("type"), exc)
            return
        dev, now = _device_of(body), time.time()
        with self._lock:
            try:
                n_dev = self._db.execute("SELECT COUNT(*) FROM queue WHERE device=?", (dev,)).fetchone()[0]
                if n_dev >= self.per_device:
                    self._drop("DELETE FROM queue WHERE id=(SELECT MIN(id) FROM queue WHERE device=?)", (dev,),
                               f"device {dev!r} has {n_dev} messages waiting")
                elif self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0] >= self.max_queue:
                    self._drop("DELETE FROM queue WHERE id=(SELECT MIN(id) FROM queue)", (),
                               f"{self.max_queue} messages waiting")
                self._db.execute("INSERT INTO queue (device, body, created, next_try) VALUES (?,?,?,?)",
                                 (dev, data, now, now))
            except sqlite3.Error as exc:
                self.dropped += 1
                log.warning("webhook queue: cannot store a %s message: %s", body.get("type"), exc)
                return
            self._wake.notify_all()

    def _drop(self, sql: str, args: tuple[Any, ...], why: str) -> None:
        self._db.execute(sql, args)
        self.dropped += 1
        log.warning("webhook queue full (%s): dropped the oldest (%d dropped so far)", why, self.dropped)

    def depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])

    # ------------------------------------------------------------------ sender

    def _next(self, now: float) -> tuple[int, str, str, int, float] | None:
        """The oldest due message of the due device served least recently (lock held)."""
        due = self._db.execute("SELECT device, MIN(id) FROM queue WHERE next_try <= ? GROUP BY device", (now,)).fetchall()
        if not due:
            return None
        _, rid = min(due, key=lambda r: (self._last_served.get(r[0], 0.0), r[1]))
        return self._db.execute("SELECT id, device, body, attempts, created FROM queue WHERE id=?", (rid,)).fetchone()

    def _run(self) -> None:
        while True:
            try:
                with self._lock:
                    while not self._stop:
                        now = time.time()
                        item = self._next(now)
                        if item is not None:
                            break
                        nxt = self._db.execute("SELECT MIN(next_try) FROM queue").fetchone()[0]
                        self._wake.wait(min(1.0, max(0.01, nxt - now)) if nxt is not None else 1.0)
                    if self._stop:
                        return
                    rid, dev, body, attempts, created = item
                    self._last_served[dev] = time.monotonic()
                    if len(self._last_served) > 4 * self.max_queue:
                        self._last_served.clear()  # bounded; fairness restarts from scratch
                error = self._send(body.encode())
                with self._lock:
                    if error is None:
                        self.sent += 1
                        self._db.execute("DELETE FROM queue WHERE id=?", (rid,))
                    elif time.time() - created >= self.horizon_s:
                        self.failed += 1
                        self._db.execute("DELETE FROM queue WHERE id=?", (rid,))
                        log.warning("webhook %s: gave up on a message after %d attempts over %.0f s: %s",
                                    self.display, attempts + 1, time.time() - created, error)
                    else:
                        self.attempts_failed += 1
                        delay = min(self.max_backoff_s, self.min_backoff_s * 2.0 ** min(attempts, 30))
                        self._db.execute("UPDATE queue SET attempts=attempts+1, next_try=? WHERE id=?",
                                         (time.time() + delay, rid))
                        log.warning("webhook %s failed (%s); retry in %.0f s", self.display, error, delay)
            except Exception:  # noqa: BLE001 - the sender must never die (a SQLite error, a bug): log, go on
                log.exception("webhook sender: unexpected error; continuing")
                time.sleep(1.0)

    def _send(self, data: bytes) -> str | None:
        """One POST; None on a 2xx answer, else what went wrong (no exception escapes)."""
        req = urllib.request.Request(self.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "edge-retrieval-server"})
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                resp.read(1024)
                if not 200 <= resp.status < 300:
                    return f"HTTP {resp.status}"
            return None
        except urllib.error.HTTPError as exc:  # 3xx (redirects refused), 4xx, 5xx
            exc.close()
            return f"HTTP {exc.code}"
        except urllib.error.URLError as exc:  # before HTTPError's parent: message without the URL
            return f"cannot reach the gateway ({type(exc.reason).__name__})"
        except (http.client.HTTPException, OSError, ValueError) as exc:
            # a malformed reply (BadStatusLine, IncompleteRead, RemoteDisconnected), a reset, a timeout
            return f"{type(exc).__name__}"

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the sender; waiting messages stay in the queue file for the next start."""
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=timeout_s)
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
