"""The device's link to the fleet: a Sink (events -> outbox -> MQTT QoS 1) and the query subscriber.

``DeviceAgent(cfg, daemon)`` owns the broker link (transport), the on-disk
outbox and the query store. On connect it publishes a retained "online" state (the broker
publishes the retained "offline" last will if the link dies), subscribes to its own query
topic and its groups' topics, re-sends unacknowledged events and then publishes a retained
health message every ``mqtt.health_interval_s`` seconds. Queries apply live, without restart.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from ..protocol import (
    Event,
    Status,
    clip_topic,
    detections_topic,
    device_query_topic,
    group_query_topic,
    status_topic,
)
from ..transport import MqttTransport, Will
from .clip_outbox import ClipOutbox
from .outbox import Outbox
from .query_store import QueryStore, load_public_key

if TYPE_CHECKING:
    from ..config import DeviceConfig
    from .daemon import Daemon

log = logging.getLogger(__name__)

REPORT_BURST = 20  # rejection reports published back to back before the rate limit applies
REPORT_RATE_S = 5.0  # rejection reports per second after the burst (the rest are only counted)


class ClockStatus:
    """NTP sync state (edge_retrieval.config.clock_status), asked at most every ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float = 60.0) -> None:
        self.ttl_s = ttl_s
        self._value = "unknown"
        self._at = -1e9

    def __call__(self) -> str:
        now = time.monotonic()
        if now - self._at >= self.ttl_s:
            from ..config import clock_status

            self._at = now
            self._value = clock_status()
        return self._value


class _Bucket:
    """Token bucket: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = float(burst), float(rate)
        self.tokens, self.t = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _AfterEvents:
    """The transport as the clip queue sees it: "connected" only while no event waits in the outbox,
    so a clip reaches the server after its detection (the server refuses clips of unknown events)."""

    def __init__(self, transport: MqttTransport, outbox: Outbox) -> None:
        self._transport, self._outbox = transport, outbox

    @property
    def connected(self) -> bool:
        return self._transport.connected and self._outbox.depth() == 0

    def publish_tracked(self, topic: str, payload: bytes, qos: int = 1) -> Any:
        return self._transport.publish_tracked(topic, payload, qos=qos)


class DeviceAgent:
    """Sink + query subscriber + health publisher for one device (see module docstring)."""

    def __init__(self, cfg: DeviceConfig, daemon: Daemon, *, attach: bool = False) -> None:
        """``attach=True`` also registers the agent as a daemon sink (``run`` does that itself)."""
        if cfg.mqtt is None:
            from ..errors import ConfigError

            raise ConfigError("mqtt: not configured (expected an [mqtt] table with url = \"mqtt://host:1883\")")
        self.cfg = cfg
        self.daemon = daemon
        mq = cfg.mqtt
        self.device = cfg.device.id
        self.groups = list(cfg.device.groups)
        storage = Path(cfg.storage.dir)
        self.storage = storage
        self.started = time.monotonic()
        self.clock = ClockStatus()
        self.rejections_unreported = 0
        self._bucket = _Bucket(REPORT_BURST, REPORT_RATE_S)
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self.outbox = Outbox(storage / "outbox.sqlite", max_events=cfg.storage.outbox_max_events)
        pub = load_public_key(mq.public_key_file) if mq.public_key_file else None
        self.queries = QueryStore(storage / "queries.sqlite", daemon, device=self.device, public_key=pub,
                                  report=self._report)
        self.status_topic = status_topic(self.device)
        will = Will(self.status_topic, Status(type="state", state="offline", device=self.device).to_json().encode())
        self.transport = MqttTransport.from_config(mq, client_id=self.device, will=will, clean_session=False)
        self.transport.add_connect_callback(self._on_connect)
        self.transport.add_connect_callback(self.outbox.on_connected)
        self.transport.add_disconnect_callback(self.outbox.on_disconnected)
        self.transport.add_publish_callback(self.outbox.on_ack)
        for topic in self.query_topics():
            self.transport.subscribe(topic, self._on_query, qos=1)
        self.outbox.attach(self._send)
        clips = getattr(daemon, "clips", None)
        self.clip_dir: Path | None = Path(clips.dir) if clips is not None else None
        self.clip_outbox = ClipOutbox(storage / "clip_outbox.sqlite", _AfterEvents(self.transport, self.outbox))
        self.transport.add_connect_callback(self.clip_outbox.wake)
        if attach:
            daemon.add_sink(self)

    def query_topics(self) -> list[str]:
        return [device_query_topic(self.device)] + [group_query_topic(g) for g in self.groups]

    # ------------------------------------------------------------------ Sink

    def emit(self, event: Event) -> None:
        """Store the event on disk (the pump sends it when the broker is reachable)."""
        try:
            self.outbox.put(detections_topic(self.device), event.to_json(), key=event.event_id)
        except StoreError as exc:  # never stop the inference thread; the loss is logged
            log.error("event %s could not be stored: %s", event.event_id, exc)
        if event.final and event.clip and self.clip_dir is not None:
            try:
                self.clip_outbox.put(event.event_id, clip_topic(self.device, event.event_id),
                                     self.clip_dir / event.clip)
            except StoreError as exc:
                log.error("clip of event %s could not be queued: %s", event.event_id, exc)

    def close(self) -> None:
        """Sink protocol: the daemon is done; the agent itself stops in ``stop``."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.transport.start()
        self.clip_outbox.start()
        if self._health_thread is None:
            self._stop.clear()
            self._health_thread = threading.Thread(target=self._health_loop, name="agent-health", daemon=True)
            self._health_thread.start()

    def stop(self, drain_s: float = 5.0) -> None:
        """Deliver what is queued (up to ``drain_s`` seconds while the link is up), say "offline"
        (retained), disconnect, close the stores. Undelivered events stay on disk for next time."""
        end = time.monotonic() + drain_s
        while (self.transport.connected and (self.outbox.depth() > 0 or self.clip_outbox.depth() > 0)
               and time.monotonic() < end):
            time.sleep(0.05)
        self._stop.set()
        if self._health_thread is not None:
            self._health_thread.join(timeout=5)
            self._health_thread = None
        final = Will(self.status_topic, Status(type="state", state="offline", device=self.device).to_json().encode())
        self.transport.stop(final=final)
        self.outbox.close()
        self.clip_outbox.close()
        self.queries.close()

    # ------------------------------------------------------------------ internals

    def _send(self, topic: str, payload: bytes) -> Any:
        return self.transport.publish_tracked(topic, payload, qos=1)

    def _on_connect(self) -> None:
        self.transport.publish(
            self.status_topic, Status(type="state", state="online", device=self.device).to_json(), qos=1, retain=True
        )
        threading.Thread(target=self.publish_health, name="agent-health-now", daemon=True).start()

    def _on_query(self, topic: str, payload: bytes, retained: bool) -> None:
        self.queries.handle(topic, payload)

    def _report(self, status: Status) -> None:
        if not self._bucket.take():
            self.rejections_unreported += 1
            return
        self.transport.publish(self.status_topic, status.to_json(), qos=0, retain=False)

    def _health_loop(self) -> None:
        """Every second: expire queries (QueryStore.tick); every health interval: publish health."""
        interval = float(self.cfg.mqtt.health_interval_s)
        due = time.monotonic() + interval
        while not self._stop.wait(min(1.0, interval)):
            self.queries.tick()
            if time.monotonic() >= due:
                due = max(due + interval, time.monotonic())
                self.publish_health()

    def health(self) -> dict[str, Any]:
        """Everything the server tracks about this device (also the body of the health message)."""
        h: dict[str, Any] = {}
        try:
            h.update(self.daemon.health())
        except Exception as exc:  # noqa: BLE001 - health must always go out
            h["daemon_error"] = str(exc)[:200]
        try:
            du = shutil.disk_usage(self.storage)
            free_mb = du.free / 1e6
        except OSError:
            free_mb = None
        ob = self.outbox.stats()
        h.update(
            {
                "agent_uptime_s": round(time.monotonic() - self.started, 1),
                "outbox_depth": ob["depth"],
                "outbox_inflight": ob["inflight"],
                "outbox_dropped": ob["dropped"],
                "clip_queue": self.clip_outbox.stats(),
                "free_mb": None if free_mb is None else round(free_mb, 1),
                "low_disk": free_mb is not None and free_mb < self.cfg.storage.min_free_mb,
                "clock": self.clock(),
                "queries_held": self.queries.held_versions(),
                "query_counts": dict(self.queries.counts),
                "rejections_unreported": self.rejections_unreported,
                "last_rejection": self.queries.last_rejection,
                "mqtt_connects": self.transport.connects,
            }
        )
        return h

    def publish_health(self) -> None:
        if not self.transport.connected:
            return
        st = Status(type="health", state="online", device=self.device, health=self.health())
        self.transport.publish(self.status_topic, st.to_json(), qos=1, retain=True)
