"""Shared pieces of the MQTT tests: device configs, a recording sink, an in-process server, mosquitto_sub."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.config import DeviceConfig, load_config
from edge_retrieval.protocol import Event
from edge_retrieval.server import FleetServer, ServerStore
from edge_retrieval.transport import MqttTransport, TlsFiles


def wait_for(pred: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll until ``pred()`` is truthy; fail the test naming ``what`` otherwise."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def beep_scene(path: Path, beeps: int, beep_s: float = 1.0, gap_s: float = 1.5, lead_s: float = 1.0,
               rate: int = 16000) -> Path:
    """Noise with ``beeps`` 1 kHz tones (the tiny bundle's "beep" label) separated by noise gaps."""
    rng = np.random.default_rng(beeps)
    parts = [0.01 * rng.standard_normal(int(lead_s * rate))]
    t = np.arange(int(beep_s * rate)) / rate
    for _ in range(beeps):
        parts.append(0.5 * np.sin(2 * np.pi * 1000 * t) + 0.01 * rng.standard_normal(t.size))
        parts.append(0.01 * rng.standard_normal(int(gap_s * rate)))
    sf.write(str(path), np.concatenate(parts).astype(np.float32), rate)
    return path


def device_config(
    tmp: Path,
    url: str,
    bundle: Path,
    audio: Path,
    *,
    device_id: str = "dev-1",
    groups: tuple[str, ...] = ("site-a",),
    public_key: Path | None = None,
    tls: TlsFiles | None = None,
    credentials: Path | None = None,
    realtime: bool = True,
    health_s: float = 1.0,
    storage: Path | None = None,
    name: str = "device.toml",
) -> tuple[Path, DeviceConfig]:
    """Write a device TOML (real config loader) and return (path, config)."""
    storage = storage or tmp / f"{device_id}-state"
    lines = [
        "[device]",
        f'id = "{device_id}"',
        "groups = [" + ", ".join(f'"{g}"' for g in groups) + "]",
        "[model]",
        f'bundle = "{bundle}"',
        "[audio]",
        'source = "file"',
        f'path = "{audio}"',
        f"realtime = {'true' if realtime else 'false'}",
        "[gate]",
        "enabled = false",
        "[storage]",
        f'dir = "{storage}"',
        "[mqtt]",
        f'url = "{url}"',
        f"health_interval_s = {health_s}",
    ]
    if public_key is not None:
        lines.append(f'public_key_file = "{public_key}"')
    if credentials is not None:
        lines.append(f'credentials_file = "{credentials}"')
    if tls is not None:
        lines += ["[mqtt.tls]", f'ca = "{tls.ca}"']
        if tls.cert is not None:
            lines += [f'cert = "{tls.cert}"', f'key = "{tls.key}"']
    p = tmp / name
    p.write_text("\n".join(lines) + "\n")
    return p, load_config(p)


class Recorder:
    """A sink that remembers every event the daemon emitted (onsets and final updates)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def close(self) -> None:
        pass

    def ids(self) -> set[str]:
        with self._lock:
            return {e.event_id for e in self.events}


def start_server(url: str, db: Path, *, tls: TlsFiles | None = None, credentials: tuple[str, str] | None = None,
                 **kw: Any) -> tuple[FleetServer, ServerStore]:
    store = ServerStore(db)
    tr = MqttTransport(url, "edge-retrieval-server", tls=tls, credentials=credentials, clean_session=False,
                       max_backoff_s=2, manual_ack=True, retry_s=0.5)
    srv = FleetServer(store, tr, **kw)
    srv.start()
    wait_for(lambda: tr.connected, 10, "server connection")
    return srv, store


class MosquittoSub:
    """The outside client: ``mosquitto_sub`` on the whole tree, one line per message."""

    def __init__(self, port: int, out: Path, topic: str = "edge-retrieval/v1/#", extra: tuple[str, ...] = ()) -> None:
        exe = shutil.which("mosquitto_sub")
        if exe is None:
            pytest.skip("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
        self.out = out
        self.f = out.open("wb")
        self.proc = subprocess.Popen(
            [exe, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-t", "probe/#",
             "-F", "%r\t%t\t%p", *extra], stdout=self.f, stderr=subprocess.PIPE)
        # prove the subscription is active before the test goes on
        probe = MqttTransport(f"mqtt://127.0.0.1:{port}", "probe", clean_session=True)
        probe.start()
        try:
            def probed() -> bool:
                if probe.connected:
                    probe.publish("probe/x", b"probe", qos=1)
                time.sleep(0.1)
                return b"probe/x" in out.read_bytes()
            wait_for(probed, 10, "mosquitto_sub to subscribe")
        finally:
            probe.stop()

    def messages(self) -> list[tuple[bool, str, bytes]]:
        self.f.flush()
        rows = []
        for line in self.out.read_bytes().splitlines():
            parts = line.split(b"\t", 2)
            if len(parts) == 3:
                rows.append((parts[0] == b"1", parts[1].decode(), parts[2]))
        return rows

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.f.close()
