"""Run the console with uvicorn in a thread of the server's process (same database, same alerts)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:8080`` / ``[::1]:8080`` / ``:8080`` -> (host, port)."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--http {text!r} is not valid (expected HOST:PORT, e.g. 127.0.0.1:8080)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class HttpServer:
    """uvicorn in a daemon thread; ``stop`` asks it to finish open requests and exit."""

    def __init__(self, app: Any, listen: str, certfile: Path | None = None, keyfile: Path | None = None) -> None:
        import uvicorn

        host, port = parse_listen(listen)
        if (certfile is None) != (keyfile is None):
            raise ConfigError("give both --http-cert and --http-key, or neither")
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     ssl_certfile=str(certfile) if certfile else None,
                                     ssl_keyfile=str(keyfile) if keyfile else None,
                                     proxy_headers=True, forwarded_allow_ips="127.0.0.1", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(self.config)
        self.url = f"{'https' if certfile else 'http'}://{host}:{port}"
        self._thread = threading.Thread(target=self.server.run, name="console-http", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise ConfigError(f"console cannot listen on {self.url} (port in use or not allowed?)")
            if time.monotonic() > deadline:
                raise ConfigError(f"console did not start on {self.url} within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=5)
