"""Fleet server: wires the store, alerts, webhook and Home Assistant to the broker.

A persistent session means detections published while the server is down wait in the broker.
The transport acknowledges a message only after it is stored (``MqttTransport(manual_ack=True)``):
a handler here raises StoreError when the database or the disk refuses it, and the message is
handed back later instead of being lost. Device strings go to logs through ``protocol.printable``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import QueryRejected, StoreError
from ..protocol import (
    MAX_CLIP_BYTES,
    NAME_RE,
    Event,
    clip_topic,
    detections_topic,
    device_query_topic,
    group_query_topic,
    parse_event,
    parse_status,
    parse_topic,
    printable,
    status_topic,
)
from ..transport import MqttTransport
from .alerts import AlertManager
from .homeassistant import HaDiscovery
from .store import ServerStore
from .webhook import Webhook

log = logging.getLogger(__name__)



SERVER_CLIENT_ID = "edge-retrieval-server"
CLIP_QUOTA_BYTES = 500_000_000  # per device: its oldest clips are deleted beyond this (bytes)
CLIP_RETENTION_DAYS = 90.0  # clips older than this are deleted (days)
NOTICE_BURST = 5  # rejection notices (rows + webhook posts) per device back to back ...
EXPIRY_CHECK_S = 10.0  # how often expired alerts are replaced by tombstones (seconds)
NOTICE_EVERY_S = 60.0  # ... then one per this many seconds; the rest are only counted


class _PerDevice:
    """A token bucket per device (``burst`` tokens, one more every ``every_s`` seconds)."""

    def __init__(self, burst: int, every_s: float, max_devices: int = 10_000) -> None:
        self.burst, self.every_s, self.max_devices = burst, every_s, max_devices
        self._b: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, device: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, t = self._b.get(device, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - t) / self.every_s)
            ok = tokens >= 1
            if len(self._b) >= self.max_devices and device not in self._b:
                self._b.clear()  # bounded: forgetting buckets only grants a fresh burst
            self._b[device] = (tokens - 1 if ok else tokens, now)
            return ok


# --------------------------------------------------------------------------- server



class FleetServer:
    """Subscribes to every device's detections, status and clips; stores, tracks, forwards."""

    def __init__(self, store: ServerStore, transport: MqttTransport, *, webhook: Webhook | None = None,
                 alerts: AlertManager | None = None, space_id: str | None = None,
                 clips_dir: str | Path | None = None, ha: HaDiscovery | None = None,
                 clip_quota_bytes: int = CLIP_QUOTA_BYTES, clip_retention_days: float = CLIP_RETENTION_DAYS,
                 share_group: str | None = None) -> None:
        """``clips_dir`` defaults to ``clips/`` next to the database; ``ha`` enables HA discovery;
        each device keeps at most ``clip_quota_bytes`` of clips, none older than ``clip_retention_days``;
        ``share_group``: several servers split the devices' messages through MQTT 5 shared
        subscriptions (``$share/GROUP/...``; the transport must speak MQTT 5), each message going to
        one of them; the store's upserts make a redelivered message harmless."""
        self.store = store
        self.transport = transport
        self.webhook = webhook
        self.alerts = alerts or AlertManager(store, transport)
        self.space_id = space_id
        self.clips_dir = Path(clips_dir).expanduser() if clips_dir is not None else store.path.parent / "clips"
        self.ha = ha
        self._stop = threading.Event()
        self._expiry_thread: threading.Thread | None = None
        self.clip_quota_bytes = int(clip_quota_bytes)
        self.clip_retention_days = float(clip_retention_days)
        # called with (event, new) after each stored event (the console keeps feedback vectors)
        self.event_listeners: list[Callable[[Event, bool], None]] = []
        self._notice_limit = _PerDevice(NOTICE_BURST, NOTICE_EVERY_S)
        # every message read is counted once: stored (events, status, clips) or refused (bad_*)
        self.counts = {"events": 0, "new_events": 0, "bad_events": 0, "status": 0, "bad_status": 0, "notices": 0,
                       "notices_suppressed": 0, "clips": 0, "bad_clips": 0, "clips_pruned": 0}
        share = f"$share/{share_group}/" if share_group else ""
        transport.subscribe(share + detections_topic("+"), self._on_detection, qos=1)
        transport.subscribe(share + status_topic("+"), self._on_status, qos=1)
        transport.subscribe(share + clip_topic("+", "+"), self._on_clip, qos=1)
        if ha is not None:
            transport.subscribe(group_query_topic("+", "+"), ha.on_query, qos=1)
            transport.subscribe(device_query_topic("+", "+"), ha.on_query, qos=1)
            transport.add_connect_callback(ha.on_connect)
        transport.add_connect_callback(self._on_connect)

    def start(self) -> None:
        if self.space_id:
            for a in self.store.alerts():
                sid = json.loads(a["message"]).get("space_id")
                if sid and sid != self.space_id:
                    log.warning("alert %s was built for space %s..., the bundle is %s...; devices with this "
                                "bundle will refuse it", a["id"], sid[:12], self.space_id[:12])
        self.transport.start()
        self._stop.clear()
        self._expiry_thread = threading.Thread(target=self._expiry_loop, name="alert-expiry", daemon=True)
        self._expiry_thread.start()

    def _expiry_loop(self) -> None:
        while not self._stop.wait(EXPIRY_CHECK_S):
            try:
                self.alerts.expire_due()
            except Exception:  # noqa: BLE001 - a database hiccup must not end expiry checks for good
                log.exception("alert expiry check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._expiry_thread is not None:
            self._expiry_thread.join(timeout=5)
        self.transport.stop()
        if self.webhook is not None:
            self.webhook.close()

    def _on_connect(self) -> None:
        self.alerts.expire_due()
        n = self.alerts.republish()
        if n:
            log.info("re-published %d active alert(s)", n)

    @staticmethod
    def _device_of(topic: str) -> str | None:
        t = parse_topic(topic)
        return t.target if t is not None and t.scope == "devices" else None

    def _on_detection(self, topic: str, payload: bytes, retained: bool) -> None:
        dev = self._device_of(topic)
        try:
            ev = parse_event(payload)
        except (QueryRejected, ValueError) as exc:
            self.counts["bad_events"] += 1
            log.warning("bad event on %s: %s", printable(topic), printable(exc, 300))
            return
        if dev is None or ev.device != dev:
            self.counts["bad_events"] += 1
            log.warning("event %s claims device %r but came on %s; dropped", ev.event_id, ev.device, printable(topic))
            return
        new = self.store.upsert_event(ev)  # StoreError: not acknowledged, handed back later
        self.counts["events"] += 1
        for listener in self.event_listeners:
            try:
                listener(ev, new)
            except Exception as exc:  # a listener's failure must not lose the MQTT message loop
                log.error("event listener failed on %s: %s", ev.event_id, exc)
        if self.ha is not None:
            self.ha.on_event(ev, new)
        if new:
            self.counts["new_events"] += 1
            log.info("detection %s: %s %.3f on %s", ev.event_id[:8], printable(ev.query), ev.score, ev.device)
            if self.webhook is not None:
                self.webhook.post({"type": "detection", "event": json.loads(ev.to_json())})

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        dev = self._device_of(topic)
        if not payload:
            return  # a cleared retained status
        try:
            st = parse_status(payload)
        except (QueryRejected, ValueError) as exc:
            self.counts["bad_status"] += 1
            log.warning("bad status on %s: %s", printable(topic), printable(exc, 300))
            return
        if dev is None or st.device != dev:
            self.counts["bad_status"] += 1
            log.warning("status for %r came on %s; dropped", st.device, printable(topic))
            return
        notice = True
        if st.type == "rejection" and not self._notice_limit.take(dev):
            notice = False  # a device flooding rejections gets a few notices, then a count
            self.counts["notices_suppressed"] += 1
        notices = self.store.apply_status(st, notice=notice)  # StoreError: handed back later
        self.counts["status"] += 1
        if self.ha is not None:
            self.ha.device_seen(dev)
        for n in notices:
            self.counts["notices"] += 1
            lvl = logging.INFO if n["kind"] == "online" else logging.WARNING
            log.log(lvl, "device %s: %s %s", n["device"], n["kind"], printable(n["detail"] or "", 300))
            if self.webhook is not None:
                self.webhook.post({"type": "notice", **n})


    def _on_clip(self, topic: str, payload: bytes, retained: bool) -> None:
        """Store a FLAC clip of one of the device's detections as ``<clips_dir>/<device>/<event_id>.flac``
        (written atomically), then prune that device's clips to its quota and retention."""

        t = parse_topic(topic)
        dev, eid = (t.target, t.item or "") if t is not None and t.kind == "clip" else ("", "")
        if not payload:
            return
        if not (NAME_RE.match(dev) and NAME_RE.match(eid)) or len(payload) > MAX_CLIP_BYTES or payload[:4] != b"fLaC":
            self.counts["bad_clips"] += 1
            log.warning("bad clip on %s (%d bytes; expected FLAC up to %d bytes)", printable(topic), len(payload),
                        MAX_CLIP_BYTES)
            return
        # the device sends a clip after its final event (outbox before clip queue, one link, in order)
        if not self.store.has_detection(dev, eid):
            if self.transport.deferred():  # its event may be among those waiting for the database
                raise StoreError(f"clip {eid} from {dev} waits for its detection to be stored")
            self.counts["bad_clips"] += 1
            log.warning("clip %s from %s has no detection of that device; dropped", eid[:8], dev)
            return
        d = self.clips_dir / dev
        path = d / f"{eid}.flac"
        tmp = d / f".{eid}.flac.part"
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(payload)
            tmp.replace(path)
        except OSError as exc:  # a full disk heals: not acknowledged, handed back later
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write clip {eid} from {dev}: {exc}") from exc
        self.store.save_clip(eid, dev, path, len(payload))
        self.counts["clips"] += 1
        log.info("clip %s from %s: %d bytes", eid[:8], dev, len(payload))
        for old in self.store.prune_clips(dev, self.clip_quota_bytes, self.clip_retention_days):
            self.counts["clips_pruned"] += 1
            if old.parent == d:  # only files this server wrote for this device
                old.unlink(missing_ok=True)
