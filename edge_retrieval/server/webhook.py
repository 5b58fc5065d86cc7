"""Webhook: POSTs detections and notices as JSON from its own thread (bounded queue, retries),
so a slow phone gateway never blocks the MQTT thread.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- webhook


class Webhook:
    """POST JSON to ``url`` from a worker thread; at most ``max_queue`` messages wait (messages).

    Each message gets ``retries`` attempts with doubling backoff; a full queue drops the new
    message (counted, WARNING), so the MQTT thread never waits on a slow gateway.
    """

    def __init__(self, url: str, max_queue: int = 1000, retries: int = 3, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook {url[:120]!r} is not valid (expected http:// or https:// URL)")
        self.url = url
        self.retries = retries
        self.timeout_s = timeout_s
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def post(self, body: dict[str, Any]) -> None:
        try:
            self._q.put_nowait(body)
        except queue.Full:
            self.dropped += 1
            log.warning("webhook queue full: dropped a %s message (%d dropped so far)", body.get("type"), self.dropped)

    def _run(self) -> None:
        while True:
            body = self._q.get()
            if body is None:
                return
            data = json.dumps(body).encode()
            delay = 0.5
            for attempt in range(self.retries):
                req = urllib.request.Request(self.url, data=data, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "edge-retrieval-server"})
                try:
                    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - configured URL
                        resp.read(1024)
                    self.sent += 1
                    break
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    if attempt == self.retries - 1:
                        self.failed += 1
                        log.warning("webhook %s failed after %d attempts: %s", self.url, self.retries, exc)
                    else:
                        time.sleep(delay)
                        delay *= 2

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self._q.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout=timeout_s)
