"""Outbox: durable, bounded, deleted only on the broker's acknowledgement (real Mosquitto)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_retrieval.device.outbox import Outbox
from edge_retrieval.transport import MqttTransport, wait_until


class Collector:
    """An independent paho client that records what arrives on a topic filter."""

    def __init__(self, url_port: int, topic: str, client_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"collector-{id(self)}",
                        clean_session=client_id is None)
        c.reconnect_delay_set(1, 2)
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(topic, qos=1), None)[1]
        c.on_subscribe = lambda *a: self.ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", url_port)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_rows_survive_reopen(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_events=100)
    for i in range(7):
        ob.put("t/x", json.dumps({"i": i}), key=f"e{i}")
    ob.close()
    again = Outbox(tmp_path / "o.sqlite", max_events=100)
    assert again.depth() == 7
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    again.close()


def test_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite", max_events=10)
    for i in range(25):
        ob.put("t/x", json.dumps({"i": i}), key=f"e{i}")
    assert ob.depth() == 10
    assert ob.dropped() == 15
    left = [json.loads(r[0])["i"] for r in ob._db.execute("SELECT payload FROM outbox ORDER BY id")]
    assert left == list(range(15, 25))
    ob.close()
    assert Outbox(tmp_path / "o.sqlite", max_events=10).dropped() == 15  # persisted counter


def test_unsent_update_replaces_onset(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put("t/x", b'{"event_id":"a","final":false}', key="a")
    ob.put("t/x", b'{"event_id":"b","final":false}', key="b")
    ob.put("t/x", b'{"event_id":"a","final":true}', key="a")
    rows = ob._db.execute("SELECT key, payload FROM outbox ORDER BY id").fetchall()
    assert [k for k, _ in rows] == ["a", "b"]
    assert json.loads(rows[0][1])["final"] is True
    ob.close()


def _link(tmp_path: Path, broker, name: str = "ob") -> tuple[Outbox, MqttTransport]:
    ob = Outbox(tmp_path / f"{name}.sqlite", max_events=1000, window=8)
    tr = MqttTransport(broker.url, f"outbox-test-{name}", min_backoff_s=1, max_backoff_s=2)
    tr.add_connect_callback(ob.on_connected)
    tr.add_disconnect_callback(ob.on_disconnected)
    tr.add_publish_callback(ob.on_ack)
    ob.attach(lambda topic, payload: tr.publish_tracked(topic, payload, qos=1))
    return ob, tr


def test_delivered_then_deleted(tmp_path: Path, broker) -> None:
    col = Collector(broker.port, "t/#")
    ob, tr = _link(tmp_path, broker)
    tr.start()
    for i in range(60):
        ob.put("t/x", json.dumps({"i": i}), key=f"e{i}")
    assert wait_until(lambda: ob.depth() == 0, 20), ob.stats()
    assert wait_until(lambda: len(col.payloads()) >= 60, 10)
    got = sorted({json.loads(p)["i"] for p in col.payloads()})
    assert got == list(range(60))
    tr.stop()
    ob.close()
    col.close()


def test_broker_down_then_up_delivers_everything(tmp_path: Path, broker) -> None:
    col = Collector(broker.port, "t/#", client_id="persistent-collector")  # session kept by the broker
    broker.stop()
    ob, tr = _link(tmp_path, broker)
    tr.start()
    for i in range(40):
        ob.put("t/x", json.dumps({"i": i}), key=f"e{i}")
    assert not tr.connected and ob.depth() == 40
    broker.start()
    assert wait_until(lambda: ob.depth() == 0, 30), (ob.stats(), tr.state)
    assert wait_until(lambda: len({json.loads(p)["i"] for p in col.payloads()}) == 40, 10)
    tr.stop()
    ob.close()
    col.close()
