"""Fleet server: stores detections, tracks devices, publishes signed retained queries, forwards alerts.

- ``ServerStore`` (SQLite, WAL): detections upserted by ``event_id`` (an onset and its final
  update merge; a late or repeated onset never undoes a final update), device status, alerts,
  and notices (a device went offline, low disk, unsynchronised clock, a refused query).
- ``AlertManager`` turns an alert into a query message (edge_retrieval.text.QueryBuilder),
  signs it (Ed25519) and publishes it retained, QoS 1, on one topic per query under the group
  or device: devices that boot later receive every query, and the server never needs a list of
  devices. Removal publishes a signed tombstone with a higher version, then clears the topic.
- ``Webhook`` POSTs detections and notices as JSON from its own thread with a bounded queue
  and retries, so a slow phone gateway never blocks the MQTT thread.
- ``FleetServer`` wires them to the broker with a persistent session, so detections published
  while the server is down wait in the broker.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .errors import ConfigError, EdgeRetrievalError, QueryRejected, StoreError, TransportError
from .policy import PolicyOverlay
from .protocol import (
    TOPIC_ROOT,
    Event,
    QueryMessage,
    Status,
    clip_topic,
    detections_topic,
    device_query_topic,
    group_query_topic,
    parse_event,
    parse_query_message,
    parse_status,
    sign_message,
    status_topic,
    utcnow,
)
from .transport import MqttTransport

log = logging.getLogger(__name__)

SERVER_CLIENT_ID = "edge-retrieval-server"


# --------------------------------------------------------------------------- keys


def load_private_key(path: str | Path) -> Any:
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


# --------------------------------------------------------------------------- store


_SCHEMA = """
CREATE TABLE IF NOT EXISTS detections (
    event_id TEXT PRIMARY KEY, device TEXT NOT NULL, query_id TEXT NOT NULL, query TEXT NOT NULL,
    score REAL NOT NULL, start_s REAL NOT NULL, end_s REAL NOT NULL, time TEXT NOT NULL,
    clock TEXT NOT NULL, source TEXT NOT NULL, final INTEGER NOT NULL, clip TEXT,
    site TEXT, lat REAL, lon REAL, received TEXT NOT NULL, updated TEXT NOT NULL, messages INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_received ON detections(received);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, last_seen TEXT NOT NULL, offline_since TEXT,
    low_disk INTEGER NOT NULL DEFAULT 0, clock TEXT NOT NULL DEFAULT 'unknown', health TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, target_kind TEXT NOT NULL, target TEXT NOT NULL,
    version INTEGER NOT NULL, threshold REAL NOT NULL, policy TEXT, message TEXT NOT NULL,
    created TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clips (
    event_id TEXT PRIMARY KEY, device TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL, received TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS notices (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
    detail TEXT
);
"""

EVENT_COLUMNS = ("event_id", "device", "query_id", "query", "score", "start_s", "end_s", "time", "clock",
                 "source", "final", "clip", "site", "lat", "lon", "received", "updated", "messages")
# what ``detections`` returns: the event columns and the stored clip file (None until it arrives)
DETECTION_COLUMNS = (*EVENT_COLUMNS, "clip_path")


class ServerStore:
    """The server's SQLite database (WAL: the CLI reads while the server writes)."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        """``create=False`` for readers: a mistyped path must fail, not leave an empty database."""
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        if not create and not self.path.is_file():
            raise StoreError(f"no server database at {str(self.path)!r} (expected the --db the server writes; "
                             "set --db or $EDGE_RETRIEVAL_DB)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=15)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open server database {str(self.path)!r}: {exc}") from exc

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"server database {str(self.path)!r}: {exc}") from exc

    # ------------------------------------------------------------------ detections

    def upsert_event(self, ev: Event) -> bool:
        """Insert or merge by ``event_id``; True when the event is new. Merging keeps the highest
        score, the latest end, and ``final`` once set (a late onset never undoes an update)."""
        now = utcnow()
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO detections VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1) "
                    "ON CONFLICT(event_id) DO UPDATE SET "
                    "score=max(score, excluded.score), "
                    "end_s=CASE WHEN excluded.final >= final THEN max(end_s, excluded.end_s) ELSE end_s END, "
                    "final=max(final, excluded.final), clip=coalesce(excluded.clip, clip), "
                    "updated=excluded.updated, messages=messages+1 "
                    "RETURNING messages",
                    (ev.event_id, ev.device, ev.query_id, ev.query, ev.score, ev.start_s, ev.end_s, ev.time,
                     ev.clock, ev.source, int(ev.final), ev.clip, ev.site, ev.lat, ev.lon, now, now),
                )
                row = cur.fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"server database {str(self.path)!r}: cannot store event: {exc}") from exc
        return row is not None and int(row[0]) == 1

    def detection_devices(self) -> list[str]:
        return [r[0] for r in self._exec("SELECT DISTINCT device FROM detections").fetchall()]

    def save_clip(self, event_id: str, device: str, path: Path, size: int) -> None:
        """Record a received clip (it may arrive before or after its event's messages)."""
        self._exec("INSERT INTO clips VALUES (?,?,?,?,?) ON CONFLICT(event_id) DO UPDATE SET "
                   "path=excluded.path, bytes=excluded.bytes, received=excluded.received",
                   (event_id, device, str(path), int(size), utcnow()))

    def detections(self, since: datetime | None = None, limit: int = 100_000) -> list[dict[str, Any]]:
        cols = ", ".join(f"d.{c}" for c in EVENT_COLUMNS)
        sql = f"SELECT {cols}, c.path FROM detections d LEFT JOIN clips c ON c.event_id = d.event_id"
        args: tuple[Any, ...] = ()
        if since is not None:
            sql += " WHERE d.received >= ?"
            args = (since.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),)
        sql += " ORDER BY d.received, d.event_id LIMIT ?"
        rows = self._exec(sql, (*args, limit)).fetchall()
        out = []
        for r in rows:
            d = dict(zip(DETECTION_COLUMNS, r, strict=True))
            d["final"] = bool(d["final"])
            out.append(d)
        return out

    # ------------------------------------------------------------------ devices and notices

    def device(self, device: str) -> dict[str, Any] | None:
        r = self._exec("SELECT device, state, last_seen, offline_since, low_disk, clock, health FROM devices "
                       "WHERE device=?", (device,)).fetchone()
        if r is None:
            return None
        return {"device": r[0], "state": r[1], "last_seen": r[2], "offline_since": r[3], "low_disk": bool(r[4]),
                "clock": r[5], "health": json.loads(r[6]) if r[6] else None}

    def devices(self) -> list[dict[str, Any]]:
        names = [r[0] for r in self._exec("SELECT device FROM devices ORDER BY device").fetchall()]
        return [d for n in names if (d := self.device(n)) is not None]

    def add_notice(self, device: str, kind: str, detail: Any = None) -> dict[str, Any]:
        n = {"time": utcnow(), "device": device, "kind": kind, "detail": detail}
        self._exec("INSERT INTO notices (time, device, kind, detail) VALUES (?,?,?,?)",
                   (n["time"], device, kind, json.dumps(detail) if detail is not None else None))
        return n

    def notices(self, device: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT time, device, kind, detail FROM notices WHERE 1=1", []
        if device is not None:
            sql += " AND device=?"
            args.append(device)
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        rows = self._exec(sql + " ORDER BY id", tuple(args)).fetchall()
        return [{"time": t, "device": d, "kind": k, "detail": json.loads(x) if x else None} for t, d, k, x in rows]

    def apply_status(self, st: Status) -> list[dict[str, Any]]:
        """Record a status message; returns the notices it raised (state changes, not repeats)."""
        prev = self.device(st.device)
        notices: list[dict[str, Any]] = []
        now = utcnow()
        if st.type == "rejection":
            notices.append(self.add_notice(st.device, "rejection", {"query_id": st.query_id, "reason": st.reason}))
            if prev is None:
                self._exec("INSERT INTO devices (device, state, last_seen) VALUES (?,?,?)", (st.device, "online", now))
            else:
                self._exec("UPDATE devices SET last_seen=? WHERE device=?", (now, st.device))
            return notices
        state = st.state or "online"
        was = prev["state"] if prev else None
        low_disk = bool(st.health.get("low_disk")) if st.health else (prev["low_disk"] if prev else False)
        clock = str(st.health.get("clock", "unknown")) if st.health else (prev["clock"] if prev else "unknown")
        offline_since = prev["offline_since"] if prev else None
        if state == "offline" and was != "offline":
            offline_since = now
            notices.append(self.add_notice(st.device, "offline", {"since": now}))
        elif state == "online":
            if was == "offline":
                notices.append(self.add_notice(st.device, "online", {"offline_since": offline_since}))
            offline_since = None
        if st.health is not None:
            if low_disk and not (prev and prev["low_disk"]):
                notices.append(self.add_notice(st.device, "low_disk", {"free_mb": st.health.get("free_mb")}))
            if clock == "unsynced" and not (prev and prev["clock"] == "unsynced"):
                notices.append(self.add_notice(st.device, "clock_unsynced", None))
        health = json.dumps(st.health) if st.health is not None else (json.dumps(prev["health"]) if prev and prev["health"] else None)
        self._exec(
            "INSERT INTO devices (device, state, last_seen, offline_since, low_disk, clock, health) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(device) DO UPDATE SET state=excluded.state, last_seen=excluded.last_seen, "
            "offline_since=excluded.offline_since, low_disk=excluded.low_disk, clock=excluded.clock, health=excluded.health",
            (st.device, state, now, offline_since, int(low_disk), clock, health),
        )
        return notices

    # ------------------------------------------------------------------ alerts

    def save_alert(self, alert_id: str, text: str, target_kind: str, target: str, msg: QueryMessage,
                   deleted: bool = False) -> None:
        self._exec(
            "INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET text=excluded.text, "
            "target_kind=excluded.target_kind, target=excluded.target, version=excluded.version, "
            "threshold=excluded.threshold, policy=excluded.policy, message=excluded.message, deleted=excluded.deleted",
            (alert_id, text, target_kind, target, msg.version, msg.threshold if msg.threshold is not None else 0.0,
             msg.policy.model_dump_json(exclude_none=True) if msg.policy else None, msg.to_json().decode(),
             utcnow(), int(deleted)),
        )

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        rows = [a for a in self.alerts(include_deleted=True) if a["id"] == alert_id]
        return rows[0] if rows else None

    def alerts(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT id, text, target_kind, target, version, threshold, policy, message, created, deleted FROM alerts"
        if not include_deleted:
            sql += " WHERE deleted=0"
        rows = self._exec(sql + " ORDER BY created, id").fetchall()
        keys = ("id", "text", "target_kind", "target", "version", "threshold", "policy", "message", "created", "deleted")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["deleted"] = bool(d["deleted"])
            d["policy"] = json.loads(d["policy"]) if d["policy"] else None
            out.append(d)
        return out

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass


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


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class AlertManager:
    """Create, list and remove alerts: sign, publish retained QoS 1, record in the store."""

    def __init__(self, store: ServerStore, transport: MqttTransport | None, private_key: Any | None = None,
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
        if not _NAME.match(name):
            raise ConfigError(f"{kind} {name!r} is not a valid name (expected 1-64 of A-Z a-z 0-9 _ . -)")
        return kind, name

    def add(self, text: str, threshold: float, *, group: str | None = None, device: str | None = None,
            policy: PolicyOverlay | None = None, alert_id: str | None = None,
            expires: str | None = None) -> tuple[dict[str, Any], list[Any]]:
        """Resolve ``text`` with the bundle's text side, then publish; returns (alert, resolutions)."""
        if self.builder is None:
            raise ConfigError("alerts add needs the full bundle (--bundle DIR with its server part)")
        kind, target = self.target(group, device)
        qid = alert_id or new_alert_id(text)
        if not _NAME.match(qid):
            raise ConfigError(f"alert id {qid!r} is not valid (expected 1-64 of A-Z a-z 0-9 _ . -)")
        held = self.store.alert(qid)
        msg, res = self.builder.build(text, qid, threshold, version=next_version(held["version"] if held else None),
                                      policy=policy, expires=expires)
        return self.publish(msg, kind, target), res

    def publish(self, msg: QueryMessage, kind: str, target: str) -> dict[str, Any]:
        """Sign and publish a ready query message (the text path and tests both end here)."""
        held = self.store.alert(msg.query_id)
        if held is not None and (held["target_kind"], held["target"]) != (kind, target) and not held["deleted"]:
            raise ConfigError(
                f"alert {msg.query_id!r} already targets {held['target_kind']} {held['target']!r}; remove it first"
            )
        signed = self._sign(msg)
        self._publish(query_topic(kind, target, msg.query_id), signed.to_json())
        self.store.save_alert(msg.query_id, msg.text, kind, target, signed)
        a = self.store.alert(msg.query_id)
        assert a is not None
        return a

    def remove(self, alert_id: str) -> dict[str, Any]:
        """Signed tombstone with a higher version, then clear the retained topic."""
        held = self.store.alert(alert_id)
        if held is None or held["deleted"]:
            known = ", ".join(a["id"] for a in self.store.alerts()) or "none"
            raise ConfigError(f"no active alert {alert_id!r} (active: {known})")
        tomb = QueryMessage.model_validate({"schema": 1, "query_id": alert_id, "version": next_version(held["version"]),
                                            "deleted": True, "created": utcnow()})
        signed = self._sign(tomb)
        topic = query_topic(held["target_kind"], held["target"], alert_id)
        self._publish(topic, signed.to_json())
        self._publish(topic, b"")  # clear the retained topic: later devices see nothing at all
        self.store.save_alert(alert_id, held["text"], held["target_kind"], held["target"], signed, deleted=True)
        a = self.store.alert(alert_id)
        assert a is not None
        return a

    def republish(self) -> int:
        """Re-publish every active alert as stored (same version and signature: devices see no change).
        Restores the retained queries if the broker lost them."""
        if self.transport is None:
            return 0
        n = 0
        for a in self.store.alerts():
            self.transport.publish(query_topic(a["target_kind"], a["target"], a["id"]), a["message"].encode(),
                                   qos=1, retain=True)
            n += 1
        return n


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
        parts = topic.split("/")
        root = TOPIC_ROOT.split("/")
        if len(parts) != len(root) + 4 or parts[len(root)] not in ("groups", "devices"):
            return
        kind = "group" if parts[len(root)] == "groups" else "device"
        target, qid = parts[len(root) + 1], parts[len(root) + 3]
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


# --------------------------------------------------------------------------- server

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class FleetServer:
    """Subscribes to every device's detections, status and clips; stores, tracks, forwards."""

    def __init__(self, store: ServerStore, transport: MqttTransport, *, webhook: Webhook | None = None,
                 alerts: AlertManager | None = None, space_id: str | None = None,
                 clips_dir: str | Path | None = None, ha: HaDiscovery | None = None) -> None:
        """``clips_dir`` defaults to ``clips/`` next to the database; ``ha`` enables HA discovery."""
        self.store = store
        self.transport = transport
        self.webhook = webhook
        self.alerts = alerts or AlertManager(store, transport)
        self.space_id = space_id
        self.clips_dir = Path(clips_dir).expanduser() if clips_dir is not None else store.path.parent / "clips"
        self.ha = ha
        self.counts = {"events": 0, "new_events": 0, "bad_events": 0, "status": 0, "notices": 0,
                       "clips": 0, "bad_clips": 0}
        transport.subscribe(detections_topic("+"), self._on_detection, qos=1)
        transport.subscribe(status_topic("+"), self._on_status, qos=1)
        transport.subscribe(clip_topic("+", "+"), self._on_clip, qos=1)
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
        parts = topic.split("/")
        root = TOPIC_ROOT.split("/")
        if parts[: len(root)] != root or len(parts) < len(root) + 3 or parts[len(root)] != "devices":
            return None
        return parts[len(root) + 1]

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
        from .clip_outbox import MAX_CLIP_BYTES

        parts = topic.split("/")
        dev, eid = (parts[-3], parts[-1]) if len(parts) >= 3 else ("", "")
        if not payload:
            return
        if not (_SAFE.match(dev) and _SAFE.match(eid)) or len(payload) > MAX_CLIP_BYTES or payload[:4] != b"fLaC":
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


def parse_since(text: str) -> datetime:
    """``30m``, ``1h``, ``2d``, ``45s`` or an ISO 8601 time -> an aware UTC datetime."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if m:
        n, unit = float(m.group(1)), m.group(2)
        secs = n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
        return datetime.now(timezone.utc) - timedelta(seconds=secs)
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--since {text!r} is not valid (expected e.g. 30m, 1h, 2d or an ISO 8601 time)") from exc
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
