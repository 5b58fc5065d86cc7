"""Fleet server: wires the store, alerts, webhook and Home Assistant to the broker.

A persistent session means detections published while the server is down wait in the broker.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import EdgeRetrievalError, QueryRejected
from ..protocol import (
    MAX_CLIP_BYTES,
    NAME_RE,
    clip_topic,
    detections_topic,
    device_query_topic,
    group_query_topic,
    parse_event,
    parse_status,
    parse_topic,
    status_topic,
)
from ..transport import MqttTransport
from .alerts import AlertManager
from .homeassistant import HaDiscovery
from .store import ServerStore
from .webhook import Webhook

log = logging.getLogger(__name__)



SERVER_CLIENT_ID = "edge-retrieval-server"


# --------------------------------------------------------------------------- server



class FleetServer:
    """Subscribes to every device's detections, status and clips; stores, tracks, forwards."""

    def __init__(self, store: ServerStore, transport: MqttTransport, *, webhook: Webhook | None = None,
                 alerts: AlertManager | None = None, space_id: str | None = None,
                 clips_dir: str | Path | None = None, ha: HaDiscovery | None = None,
                 share_group: str | None = None) -> None:
        """``clips_dir`` defaults to ``clips/`` next to the database; ``ha`` enables HA discovery;
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
        self.counts = {"events": 0, "new_events": 0, "bad_events": 0, "status": 0, "notices": 0,
                       "clips": 0, "bad_clips": 0}
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

    def stop(self) -> None:
        self.transport.stop()
        if self.webhook is not None:
            self.webhook.close()

    def _on_connect(self) -> None:
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
            log.warning("bad event on %s: %s", topic, exc)
            return
        if dev is not None and ev.device != dev:
            self.counts["bad_events"] += 1
            log.warning("event %s claims device %r but came on %s; dropped", ev.event_id, ev.device, topic)
            return
        try:
            new = self.store.upsert_event(ev)
        except EdgeRetrievalError as exc:
            log.error("cannot store event %s: %s", ev.event_id, exc)
            return
        self.counts["events"] += 1
        if self.ha is not None:
            self.ha.on_event(ev, new)
        if new:
            self.counts["new_events"] += 1
            log.info("detection %s: %s %.3f on %s", ev.event_id[:8], ev.query, ev.score, ev.device)
            if self.webhook is not None:
                self.webhook.post({"type": "detection", "event": json.loads(ev.to_json())})

    def _on_status(self, topic: str, payload: bytes, retained: bool) -> None:
        dev = self._device_of(topic)
        if not payload or dev is None:
            return
        try:
            st = parse_status(payload)
        except (QueryRejected, ValueError) as exc:
            log.warning("bad status on %s: %s", topic, exc)
            return
        if st.device != dev:
            log.warning("status for %r came on %s; dropped", st.device, topic)
            return
        self.counts["status"] += 1
        if self.ha is not None:
            self.ha.device_seen(dev)
        try:
            notices = self.store.apply_status(st)
        except EdgeRetrievalError as exc:
            log.error("cannot store status of %s: %s", dev, exc)
            return
        for n in notices:
            self.counts["notices"] += 1
            lvl = logging.INFO if n["kind"] == "online" else logging.WARNING
            log.log(lvl, "device %s: %s %s", n["device"], n["kind"], n["detail"] or "")
            if self.webhook is not None:
                self.webhook.post({"type": "notice", **n})


    def _on_clip(self, topic: str, payload: bytes, retained: bool) -> None:
        """Store a FLAC clip as ``<clips_dir>/<device>/<event_id>.flac`` (written atomically)."""

        t = parse_topic(topic)
        dev, eid = (t.target, t.item or "") if t is not None and t.kind == "clip" else ("", "")
        if not payload:
            return
        if not (NAME_RE.match(dev) and NAME_RE.match(eid)) or len(payload) > MAX_CLIP_BYTES or payload[:4] != b"fLaC":
            self.counts["bad_clips"] += 1
            log.warning("bad clip on %s (%d bytes; expected FLAC up to %d bytes)", topic, len(payload), MAX_CLIP_BYTES)
            return
        d = self.clips_dir / dev
        path = d / f"{eid}.flac"
        tmp = d / f".{eid}.flac.part"
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(payload)
            tmp.replace(path)
            self.store.save_clip(eid, dev, path, len(payload))
        except (OSError, EdgeRetrievalError) as exc:
            self.counts["bad_clips"] += 1
            log.error("cannot store clip %s from %s: %s", eid, dev, exc)
            tmp.unlink(missing_ok=True)
            return
        self.counts["clips"] += 1
        log.info("clip %s from %s: %d bytes", eid[:8], dev, len(payload))
