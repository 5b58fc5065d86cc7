"""systemd notification (``sd_notify``) without a dependency: READY, WATCHDOG pings, STATUS.

The unit runs ``Type=notify`` with ``WatchdogSec=``: the daemon says ``READY=1`` once the bundle
is loaded and the source is open, then ``WATCHDOG=1`` from its inference loop, so systemd
restarts a daemon whose loop has hung (not merely one that crashed). Outside systemd
(``$NOTIFY_SOCKET`` unset) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

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


_default: Notifier | None = None


def notifier() -> Notifier:
    """The process-wide notifier (reads the environment once)."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


__all__ = ["Notifier", "notifier"]
