"""systemd notification (``sd_notify``) without a dependency: READY, WATCHDOG pings, STATUS.

The unit runs ``Type=notify`` with ``WatchdogSec=``: the daemon says ``READY=1`` once the bundle
is loaded and the source is open, then ``WATCHDOG=1`` from its inference loop, so systemd
restarts a daemon whose loop has hung (not merely one that crashed). Outside systemd
(``$NOTIFY_SOCKET`` unset) every call is a cheap no-op. ``Supervisor`` does both for a daemon
from its ``health()`` counters, so the inference loop needs no systemd code.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET``; never raises (a lost ping is systemd's to judge)."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace socket
            addr = "\0" + addr[1:]
        self.address = addr or None
        self._lock = threading.Lock()
        self._last_ping = 0.0
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # systemd wants a ping at least every WATCHDOG_USEC: ping four times per period
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self.ping_interval_s = self.watchdog_s / 4 if self.watchdog_s else 1.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send one state string (e.g. ``READY=1``); True when it went out."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self.address)
                s.sendall(state.encode("utf-8"))
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", state, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Ping the watchdog, at most once per ``ping_interval_s``; cheap enough to call per window."""
        if self.address is None:
            return False
        now = time.monotonic()
        with self._lock:
            if self._last_ping and now - self._last_ping < self.ping_interval_s:
                return False
            self._last_ping = now
        return self.notify("WATCHDOG=1")


class Supervisor:
    """READY=1 once, then WATCHDOG=1 only while the daemon makes progress.

    Progress is ``health()[key]`` (seconds of audio consumed by the inference loop) changing
    between checks: a hung encoder or a silent, stalled microphone stops the pings and systemd
    restarts the service. Does nothing outside systemd.
    """

    def __init__(
        self, health: Callable[[], dict[str, Any]], notifier: Notifier | None = None, key: str = "audio_s"
    ) -> None:
        self.health = health
        self.n = notifier or _notifier()
        self.key = key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, status: str = "listening") -> Supervisor:
        if not self.n.enabled:
            return self
        self.n.ready(status)
        self._thread = threading.Thread(target=self._loop, name="sd-watchdog", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        last: Any = object()
        while not self._stop.wait(self.n.ping_interval_s):
            try:
                h = self.health()
            except Exception as exc:  # noqa: BLE001 - a failing health() means no ping, never a crash
                log.debug("health() failed: %s", exc)
                continue
            now = h.get(self.key)
            if now != last:
                last = now
                self.n.notify("WATCHDOG=1")
                self.n.status(f"audio {now} s, events {h.get('events')}, rtf {h.get('rtf')}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self.n.stopping()
            self._thread.join(timeout=5)


_default: Notifier | None = None


def notifier() -> Notifier:
    """The process-wide notifier (reads the environment once)."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


_notifier = notifier


__all__ = ["Notifier", "Supervisor", "notifier"]
