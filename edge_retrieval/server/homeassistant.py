"""Home Assistant MQTT discovery: one sensor per alert and device, fed from stored detections."""

from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

from ..errors import ConfigError, QueryRejected
from ..protocol import (
    Event,
    parse_query_message,
    parse_topic,
    status_topic,
)
from ..transport import MqttTransport
from .store import ServerStore

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- Home Assistant


def _ha_id(text: str) -> str:
    """Home Assistant object ids allow [A-Za-z0-9_-] only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


class HaDiscovery:
    """Home Assistant MQTT discovery: one ``binary_sensor`` per alert x device seen.

    The config is retained under ``<prefix>/binary_sensor/edge_retrieval_<device>_<alert>/config``;
    availability follows the device's own status topic (its retained online / offline state,
    the last will included), and ``ON`` / ``OFF`` go to ``.../state`` when a detection starts and
    ends (``off_delay`` turns a sensor off if the final update never comes). Alerts are learnt
    from the retained query topics, so alerts added or removed by the ``alerts`` CLI in another
    process show up live; removing an alert clears its retained configs (empty payload).
    A group alert is offered on every device seen (the server does not know group membership).
    """

    def __init__(self, transport: MqttTransport, store: ServerStore, prefix: str = "homeassistant",
                 off_delay_s: float = 30.0) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*", prefix or ""):
            raise ConfigError(f"--ha-prefix {prefix!r} is not valid (expected a topic like homeassistant)")
        self.transport = transport
        self.store = store
        self.prefix = prefix
        self.off_delay_s = float(off_delay_s)
        self._lock = threading.Lock()
        self.alerts: dict[str, tuple[str, str, str]] = {}  # alert id -> (text, target kind, target)
        self.devices: set[str] = set()
        self.published: set[tuple[str, str]] = set()  # (device, alert) configs published on this link
        self.counts = {"configs": 0, "cleared": 0, "states": 0}

    def object_id(self, device: str, alert_id: str) -> str:
        return _ha_id(f"edge_retrieval_{device}_{alert_id}")

    def config_topic(self, device: str, alert_id: str) -> str:
        return f"{self.prefix}/binary_sensor/{self.object_id(device, alert_id)}/config"

    def state_topic(self, device: str, alert_id: str) -> str:
        return f"{self.prefix}/binary_sensor/{self.object_id(device, alert_id)}/state"

    def config(self, device: str, alert_id: str) -> dict[str, Any]:
        text = self.alerts[alert_id][0]
        oid = self.object_id(device, alert_id)
        return {
            "name": text,
            "unique_id": oid,
            "object_id": oid,
            "state_topic": self.state_topic(device, alert_id),
            "payload_on": "ON",
            "payload_off": "OFF",
            "device_class": "sound",
            "off_delay": self.off_delay_s,
            "availability": [{"topic": status_topic(device), "value_template": "{{ value_json.state }}",
                              "payload_available": "online", "payload_not_available": "offline"}],
            "device": {"identifiers": [_ha_id(f"edge_retrieval_{device}")], "name": f"edge-retrieval {device}",
                       "manufacturer": "edge-retrieval", "model": "edge-retrieval device"},
        }

    def _applies(self, device: str, alert_id: str) -> bool:
        kind, target = self.alerts[alert_id][1:]
        return kind == "group" or target == device

    def _publish_config(self, device: str, alert_id: str) -> None:
        if (device, alert_id) in self.published or not self._applies(device, alert_id):
            return
        mid = self.transport.publish(self.config_topic(device, alert_id), json.dumps(self.config(device, alert_id)),
                                     qos=1, retain=True)
        if mid is not None:
            self.published.add((device, alert_id))
            self.counts["configs"] += 1

    def on_connect(self) -> None:
        """Load alerts and devices from the store and (re)publish every config; clear removed alerts."""
        with self._lock:
            self.published.clear()
            for a in self.store.alerts(include_deleted=True):
                if a["deleted"]:
                    self.alerts.pop(a["id"], None)
                else:
                    self.alerts[a["id"]] = (a["text"], a["target_kind"], a["target"])
            self.devices.update(d["device"] for d in self.store.devices())
            self.devices.update(self.store.detection_devices())
            for a in self.store.alerts(include_deleted=True):
                if a["deleted"]:
                    self._clear(a["id"])
            for dev in sorted(self.devices):
                for aid in list(self.alerts):
                    self._publish_config(dev, aid)

    def _clear(self, alert_id: str) -> None:
        for dev in sorted(self.devices):
            self.transport.publish(self.config_topic(dev, alert_id), b"", qos=1, retain=True)
            self.published.discard((dev, alert_id))
            self.counts["cleared"] += 1

    def device_seen(self, device: str) -> None:
        with self._lock:
            if device in self.devices:
                return
            self.devices.add(device)
            for aid in list(self.alerts):
                self._publish_config(device, aid)

    def on_query(self, topic: str, payload: bytes, retained: bool) -> None:
        """A retained query appeared, changed or was removed (tombstone or cleared topic)."""
        t = parse_topic(topic)
        if t is None or t.kind != "query" or t.item is None:
            return
        kind = "group" if t.scope == "groups" else "device"
        target, qid = t.target, t.item
        msg = None
        if payload:
            try:
                msg = parse_query_message(payload)
            except (QueryRejected, ValueError) as exc:
                log.warning("Home Assistant discovery: unreadable query on %s: %s", topic, exc)
                return
        with self._lock:
            if msg is None or msg.deleted:
                if qid in self.alerts:
                    self.alerts.pop(qid)
                    self._clear(qid)
                return
            held = self.alerts.get(qid)
            new = (msg.text or qid, kind, target)
            if held != new:
                if held is not None:
                    self._clear(qid)
                self.alerts[qid] = new
            for dev in sorted(self.devices):
                self._publish_config(dev, qid)

    def on_event(self, ev: Event, new: bool) -> None:
        """ON when a detection starts, OFF when it is final (ON then OFF if only the final came)."""
        self.device_seen(ev.device)
        with self._lock:
            if ev.query_id not in self.alerts or not self._applies(ev.device, ev.query_id):
                return
            topic = self.state_topic(ev.device, ev.query_id)
            states = (["ON"] if new else []) + (["OFF"] if ev.final else [])
            for st in states:
                self.transport.publish(topic, st, qos=1, retain=False)
                self.counts["states"] += 1
