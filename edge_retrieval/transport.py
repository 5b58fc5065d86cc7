"""MQTT transport on paho-mqtt 2.x: ``publish``, ``subscribe``, ``stop`` and a connection status.

The broker link is an operational state, never an exception that stops the daemon: paho's
network thread (``loop_start``) reconnects with exponential backoff (``reconnect_delay_set``),
subscriptions are renewed on every connect, a retained "online" message is re-published on
every connect and the broker publishes the retained last will when the link dies. Caller
mistakes (a bad URL, a missing TLS file) raise TransportError / ConfigError at once.

With ``manual_ack=True`` (the server) a QoS 1 message is acknowledged only after its handlers
returned: a handler that raises StoreError (database full or unwritable) leaves it unacknowledged
and it is handed to the handler again every ``retry_s`` seconds until it is stored; if the link
drops first, the broker sends it again on the next (persistent) session. So nothing the broker
delivered is acknowledged before it is stored.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .errors import ConfigError, StoreError, TransportError
from .protocol import parse_broker_url

if TYPE_CHECKING:
    from .config import MqttSection

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained
MAX_DEFERRED = 1000  # unacknowledged messages held for a retry (the broker's inflight limit is lower)


@dataclass(eq=False)
class _Deferred:
    """A received QoS 1 message a handler could not store yet (manual acks)."""

    link: int  # the connection it arrived on: its mid means nothing on another one
    mid: int
    qos: int
    topic: str
    payload: bytes
    retained: bool
    handlers: list[MessageHandler]


def read_credentials_file(path: str | Path) -> tuple[str, str]:
    """``user`` and ``password`` from two lines, or one ``user:password`` line (never logged)."""
    from .config import read_credentials  # one parser for the file layout, shared with config checks

    try:
        return read_credentials(Path(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


@dataclass(frozen=True)
class TlsFiles:
    """CA bundle and, for mutual TLS, the client certificate and key (PEM files)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class Will:
    """A retained message the broker publishes for us when the link dies."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttTransport:
    """One broker link. Thread-safe; callbacks run on paho's network thread and must be quick.

    ``on_connect`` callbacks run after every (re)connect, after subscriptions are renewed;
    ``on_publish(mid)`` runs when the broker acknowledges a QoS 1 message (PUBACK).
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        tls: TlsFiles | None = None,
        credentials: tuple[str, str] | None = None,
        will: Will | None = None,
        online: Will | None = None,
        keepalive_s: int = 30,
        clean_session: bool = False,
        min_backoff_s: int = 1,
        max_backoff_s: int = 30,
        max_queued: int = 0,
        manual_ack: bool = False,
        retry_s: float = 5.0,
        mqtt_v5: bool = False,
        session_expiry_s: int = 86_400,
    ) -> None:
        """``mqtt_v5`` speaks MQTT 5 (needed for ``$share/GROUP/...`` shared subscriptions); a
        persistent v5 session outlives a disconnect by ``session_expiry_s`` seconds."""
        self.address = parse_broker_url(url)
        if tls is not None and not self.address.tls:
            raise ConfigError(f"TLS files are set but the URL {url!r} is mqtt:// (expected mqtts://)")
        self.client_id = client_id
        self._online = online
        self._subs: dict[str, tuple[int, MessageHandler]] = {}
        self._lock = threading.Lock()
        self._connect_cbs: list[Callable[[], None]] = []
        self._disconnect_cbs: list[Callable[[], None]] = []
        self._publish_cbs: list[Callable[[int], None]] = []
        self._connected = threading.Event()
        self._started = False
        self.state = "new"  # new | connecting | connected | disconnected | refused | stopped
        self.last_error: str | None = None
        self.connects = 0
        self.disconnects = 0
        self.manual_ack = manual_ack
        self.retry_s = float(retry_s)
        self._deferred: list[_Deferred] = []
        self._link = 0  # bumped on every connect and disconnect
        self._retry_thread: threading.Thread | None = None
        self._retry_wake = threading.Event()
        self.deferred_total = 0  # messages whose ack waited for a retry

        self._v5 = mqtt_v5
        self._clean = clean_session
        self._session_expiry_s = int(session_expiry_s)
        if mqtt_v5:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                            reconnect_on_failure=True, manual_ack=manual_ack)
        else:
            c = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=clean_session,
                protocol=mqtt.MQTTv311,
                reconnect_on_failure=True,
                manual_ack=manual_ack,
            )
        c.reconnect_delay_set(min_backoff_s, max_backoff_s)
        c.max_queued_messages_set(max_queued)
        c.max_inflight_messages_set(100)
        if credentials is not None:
            c.username_pw_set(credentials[0], credentials[1])
        if self.address.tls:
            ca = str(tls.ca) if tls else None
            for label, p in (("ca", tls and tls.ca), ("cert", tls and tls.cert), ("key", tls and tls.key)):
                if p is not None and not Path(p).is_file():
                    raise ConfigError(f"TLS {label} file {str(p)!r} does not exist (expected a PEM file)")
            try:
                c.tls_set(
                    ca_certs=ca,
                    certfile=str(tls.cert) if tls and tls.cert else None,
                    keyfile=str(tls.key) if tls and tls.key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise TransportError(f"cannot load TLS files for {self.address.url}: {exc}") from exc
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_connect_fail = self._on_connect_fail
        self._client = c
        self._keepalive = int(keepalive_s)

    @classmethod
    def from_config(cls, mq: MqttSection, client_id: str, **kw: Any) -> MqttTransport:
        """Build from a ``DeviceConfig.mqtt`` section."""
        tls = TlsFiles(mq.tls.ca, mq.tls.cert, mq.tls.key) if mq.tls is not None else None
        creds = read_credentials_file(mq.credentials_file) if mq.credentials_file else None
        return cls(mq.url, mq.client_id or client_id, tls=tls, credentials=creds, keepalive_s=mq.keepalive_s, **kw)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; failures become state + WARNING, and paho keeps retrying."""
        if self._started:
            return
        self._started = True
        self.state = "connecting"
        try:
            if self._v5:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0 if self._clean else self._session_expiry_s
                self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive,
                                           clean_start=self._clean, properties=props)
            else:
                self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot connect to {self.address.url}: {exc}") from exc
        self._client.loop_start()
        if self.manual_ack and self._retry_thread is None:
            self._retry_wake.clear()
            self._retry_thread = threading.Thread(target=self._retry_loop, name="mqtt-retry", daemon=True)
            self._retry_thread.start()

    def stop(self, final: Will | None = None, timeout_s: float = 3.0) -> None:
        """Publish ``final`` (e.g. a retained "offline") if connected, then disconnect cleanly."""
        if not self._started:
            return
        if final is not None and self.connected:
            info = self._client.publish(final.topic, final.payload, qos=final.qos, retain=final.retain)
            try:
                info.wait_for_publish(timeout=timeout_s)
            except (RuntimeError, ValueError):
                pass
        self.state = "stopped"
        self._retry_wake.set()
        if self._retry_thread is not None:
            self._retry_thread.join(timeout=timeout_s)
            self._retry_thread = None
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._started = False
            self._connected.clear()

    def set_backoff(self, min_s: int, max_s: int) -> None:
        """Reconnect delays: doubling from ``min_s`` up to ``max_s`` seconds."""
        self._client.reconnect_delay_set(min_s, max_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def add_connect_callback(self, cb: Callable[[], None]) -> None:
        self._connect_cbs.append(cb)

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None:
        self._disconnect_cbs.append(cb)

    def add_publish_callback(self, cb: Callable[[int], None]) -> None:
        self._publish_cbs.append(cb)

    # ------------------------------------------------------------------ I/O

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a message; returns its mid, or None when the link is down (the caller keeps it)."""
        info = self._send(topic, payload, qos, retain)
        return None if info is None else info.mid

    def publish_tracked(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo | None:
        """Queue a message and return paho's handle (``is_published()`` after the PUBACK), or None
        when the link is down (the caller keeps the message)."""
        return self._send(topic, payload, qos, False)

    def _send(self, topic: str, payload: bytes | str, qos: int, retain: bool) -> mqtt.MQTTMessageInfo | None:
        if not self.connected:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:
                raise TransportError(f"payload for {topic!r} is too large for MQTT")
            return None
        return info

    def publish_wait(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                     timeout_s: float = 10.0) -> None:
        """Publish and wait for the broker's acknowledgement (CLI use); raises TransportError."""
        if not self.wait_connected(timeout_s):
            raise TransportError(f"broker {self.address.url} is not reachable ({self.last_error or 'no connection'})")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {topic!r} failed: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"broker {self.address.url} did not acknowledge {topic!r} within {timeout_s:g} s")

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        with self._lock:
            self._subs[topic] = (qos, handler)
        if self.connected:
            self._client.subscribe(topic, qos=qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subs.pop(topic, None)
        if self.connected:
            self._client.unsubscribe(topic)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.state = "refused"
            self.last_error = str(reason_code)
            log.warning("broker %s refused the connection: %s", self.address.url, reason_code)
            return
        self.state = "connected"
        self.last_error = None
        self.connects += 1
        with self._lock:
            self._link += 1
            self._deferred.clear()  # the broker sends unacknowledged messages again on this session
        log.info("connected to %s as %s", self.address.url, self.client_id)
        if self._online is not None:
            client.publish(self._online.topic, self._online.payload, qos=self._online.qos, retain=self._online.retain)
        with self._lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe([(t, q) for t, (q, _) in subs])
        self._connected.set()
        for cb in list(self._connect_cbs):
            try:
                cb()
            except Exception:  # noqa: BLE001 - a callback bug must not kill the network thread
                log.exception("on-connect callback failed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        with self._lock:
            self._link += 1
            self._deferred.clear()
        if self.state == "stopped":
            return
        if not was and self.state == "refused":
            return  # keep the refusal (bad credentials, ACL) as the state; paho retries with backoff
        self.state = "disconnected"
        self.disconnects += int(was)
        self.last_error = str(reason_code)
        log.warning("lost broker %s (%s); reconnecting with backoff", self.address.url, reason_code)
        for cb in list(self._disconnect_cbs):
            try:
                cb()
            except Exception:  # noqa: BLE001
                log.exception("on-disconnect callback failed")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self.state != "stopped":
            self.state = "disconnected"
            self.last_error = "connection failed"
            log.warning("cannot reach broker %s; retrying with backoff", self.address.url)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        for cb in list(self._publish_cbs):
            try:
                cb(mid)
            except Exception:  # noqa: BLE001
                log.exception("on-publish callback failed")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for t, (_, h) in self._subs.items() if mqtt.topic_matches_sub(_unshared(t), msg.topic)]
            link = self._link
        failed = self._run_handlers(handlers, msg.topic, bytes(msg.payload), bool(msg.retain))
        if not self.manual_ack or msg.qos == 0:
            return
        if not failed:
            client.ack(msg.mid, msg.qos)
            return
        with self._lock:
            if link == self._link and len(self._deferred) < MAX_DEFERRED:
                self._deferred.append(_Deferred(link, msg.mid, msg.qos, msg.topic, bytes(msg.payload),
                                                bool(msg.retain), failed))
                self.deferred_total += 1
        # not acknowledged: retried below, or sent again by the broker on the next session

    @staticmethod
    def _run_handlers(handlers: list[MessageHandler], topic: str, payload: bytes, retained: bool) -> list[MessageHandler]:
        """Run ``handlers``; returns those that raised StoreError (the message is not stored yet)."""
        failed = []
        for h in handlers:
            try:
                h(topic, payload, retained)
            except StoreError as exc:
                log.warning("message on %s not stored (%s); not acknowledged, will retry", topic[:200], exc)
                failed.append(h)
            except Exception:  # noqa: BLE001 - one bad message must not stop the subscriber
                log.exception("handler for %s failed", topic[:200])
        return failed

    def _retry_loop(self) -> None:
        """Hand deferred messages to their handlers again until stored, then acknowledge them."""
        while not self._retry_wake.wait(self.retry_s):
            with self._lock:
                todo = list(self._deferred)
            for d in todo:
                d.handlers = self._run_handlers(d.handlers, d.topic, d.payload, d.retained)
                if d.handlers:
                    continue
                with self._lock:
                    if d.link != self._link or d not in self._deferred:
                        continue  # the link changed: the broker sends it again
                    self._deferred.remove(d)
                self._client.ack(d.mid, d.qos)

    def deferred(self) -> int:
        """Messages received but not yet stored, so not acknowledged (manual acks)."""
        with self._lock:
            return len(self._deferred)


def _unshared(sub: str) -> str:
    """``$share/GROUP/a/+/b`` -> ``a/+/b``: the filter a shared subscription's messages match."""
    if sub.startswith("$share/"):
        parts = sub.split("/", 2)
        return parts[2] if len(parts) == 3 else sub
    return sub


def wait_until(pred: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll ``pred`` until true or ``timeout_s`` passes (CLI and tests)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step_s)
    return pred()
