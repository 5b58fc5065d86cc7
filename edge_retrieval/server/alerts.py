"""Alerts: text -> signed query message, published retained (QoS 1) under the group or device.

Devices that boot later receive every query, and the server never needs a list of devices.
Every message names the topic it is published on (``topic``, covered by the signature), so a
message signed for one device or group cannot be replayed on another. Removal publishes a signed
tombstone with a higher version and leaves it retained: a device that boots later (new or
re-flashed) learns the removal too and refuses any older version replayed to it. Expired
alerts are no longer republished.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, TransportError
from ..policy import PolicyOverlay
from ..protocol import (
    NAME_FORM,
    NAME_RE,
    QueryMessage,
    device_query_topic,
    group_query_topic,
    sign_message,
    utcnow,
)
from ..transport import MqttTransport
from .store import ServerStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- keys


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key (PEM, from ``edge-retrieval keys generate``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"private key {str(path)!r} cannot be read (expected an Ed25519 PEM private key): {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {str(path)!r} is {type(key).__name__}, expected Ed25519")
    return key


# --------------------------------------------------------------------------- alerts


def query_topic(target_kind: str, target: str, query_id: str) -> str:
    if target_kind == "group":
        return group_query_topic(target, query_id)
    if target_kind == "device":
        return device_query_topic(target, query_id)
    raise ConfigError(f"alert target kind {target_kind!r} is not valid (expected 'group' or 'device')")


def new_alert_id(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "alert"
    return f"{slug}-{secrets.token_hex(3)}"


def next_version(held: int | None) -> int:
    """Versions are milliseconds since the epoch (and above any held): monotonic even if the
    server's database is rebuilt, so devices never see a fresh alert as a replay."""
    return max(int(time.time() * 1000), (held or 0) + 1)




class AlertManager:
    """Create, list and remove alerts: sign, publish retained QoS 1, record in the store."""

    def __init__(self, store: ServerStore, transport: MqttTransport | None, private_key: Ed25519PrivateKey | None = None,
                 builder: Any | None = None) -> None:
        self.store = store
        self.transport = transport
        self.private_key = private_key
        self.builder = builder

    def _sign(self, msg: QueryMessage) -> QueryMessage:
        return sign_message(msg, self.private_key) if self.private_key is not None else msg

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.transport is None:
            raise TransportError("no broker connection (expected --broker mqtt://host:1883)")
        self.transport.publish_wait(topic, payload, qos=1, retain=True)

    @staticmethod
    def target(group: str | None, device: str | None) -> tuple[str, str]:
        if (group is None) == (device is None):
            raise ConfigError("give exactly one target: --group NAME or --device ID")
        kind, name = ("group", group) if group is not None else ("device", device)
        assert name is not None
        if not NAME_RE.match(name):
            raise ConfigError(f"{kind} {name!r} is not a valid name (expected {NAME_FORM})")
        return kind, name

    def add(self, text: str, threshold: float, *, group: str | None = None, device: str | None = None,
            policy: PolicyOverlay | None = None, alert_id: str | None = None,
            expires: str | None = None) -> tuple[dict[str, Any], list[Any]]:
        """Resolve ``text`` with the bundle's text side, then publish; returns (alert, resolutions)."""
        if self.builder is None:
            raise ConfigError("alerts add needs the full bundle (--bundle DIR with its server part)")
        kind, target = self.target(group, device)
        qid = alert_id or new_alert_id(text)
        if not NAME_RE.match(qid):
            raise ConfigError(f"alert id {qid!r} is not valid (expected {NAME_FORM})")
        held = self.store.alert(qid)
        msg, res = self.builder.build(text, qid, threshold, version=next_version(held["version"] if held else None),
                                      policy=policy, expires=expires, temporal=True)
        return self.publish(msg, kind, target), res

    def publish(self, msg: QueryMessage, kind: str, target: str) -> dict[str, Any]:
        """Sign and publish a ready query message (the text path and tests both end here)."""
        held = self.store.alert(msg.query_id)
        if held is not None and (held["target_kind"], held["target"]) != (kind, target) and not held["deleted"]:
            raise ConfigError(
                f"alert {msg.query_id!r} already targets {held['target_kind']} {held['target']!r}; remove it first"
            )
        topic = query_topic(kind, target, msg.query_id)
        signed = self._sign(msg.model_copy(update={"topic": topic}))
        self._publish(topic, signed.to_json())
        self.store.save_alert(msg.query_id, msg.text, kind, target, signed)
        a = self.store.alert(msg.query_id)
        assert a is not None
        return a

    def remove(self, alert_id: str) -> dict[str, Any]:
        """Signed tombstone with a higher version, left retained (see the module docstring)."""
        held = self.store.alert(alert_id)
        if held is None or held["deleted"]:
            known = ", ".join(a["id"] for a in self.store.alerts()) or "none"
            raise ConfigError(f"no active alert {alert_id!r} (active: {known})")
        topic = query_topic(held["target_kind"], held["target"], alert_id)
        tomb = QueryMessage.model_validate({"schema": 1, "query_id": alert_id, "version": next_version(held["version"]),
                                            "deleted": True, "created": utcnow(), "topic": topic})
        signed = self._sign(tomb)
        self._publish(topic, signed.to_json())  # stays retained: it outranks every older version
        self.store.save_alert(alert_id, held["text"], held["target_kind"], held["target"], signed, deleted=True)
        a = self.store.alert(alert_id)
        assert a is not None
        return a

    def expire_due(self) -> int:
        """Replace every expired alert by a signed tombstone (published without waiting, so it may run
        on the MQTT thread): devices whose clock is behind drop it too. Returns how many."""
        if self.transport is None or not self.transport.connected:
            return 0
        n = 0
        for a in self.store.alerts():
            try:
                msg = QueryMessage.model_validate_json(a["message"])
            except ValueError:
                continue
            if not msg.expired():
                continue
            topic = query_topic(a["target_kind"], a["target"], a["id"])
            tomb = self._sign(QueryMessage.model_validate({
                "schema": 1, "query_id": a["id"], "version": next_version(a["version"]), "deleted": True,
                "created": utcnow(), "topic": topic}))
            if self.transport.publish(topic, tomb.to_json(), qos=1, retain=True) is None:
                break  # the link went down; next time
            self.store.save_alert(a["id"], a["text"], a["target_kind"], a["target"], tomb, deleted=True)
            log.info("alert %s expired at %s; removed (tombstone v%d)", a["id"], msg.expires, tomb.version)
            n += 1
        return n

    def republish(self) -> int:
        """Re-publish every alert and tombstone as stored (same version and signature: devices see no
        change), except expired alerts. Restores the retained queries if the broker lost them."""
        if self.transport is None:
            return 0
        n = 0
        for a in self.store.alerts(include_deleted=True):
            topic = query_topic(a["target_kind"], a["target"], a["id"])
            try:
                msg = QueryMessage.model_validate_json(a["message"])
            except ValueError:
                msg = None  # stored by an older version: devices judge it
            if msg is not None and not a["deleted"] and msg.expired():
                continue  # expire_due replaces it by a tombstone
            payload = a["message"].encode()
            if msg is not None and msg.topic is None and self.private_key is not None:
                # stored before messages named their topic: devices now refuse it, so sign it again
                # bound to its topic, with a higher version
                msg = self._sign(msg.model_copy(update={"topic": topic, "version": next_version(msg.version)}))
                self.store.save_alert(a["id"], a["text"], a["target_kind"], a["target"], msg, deleted=a["deleted"])
                payload = msg.to_json()
                log.info("alert %s re-signed for its topic (v%d)", a["id"], msg.version)
            self.transport.publish(topic, payload, qos=1, retain=True)
            n += 1
        return n
