"""Issue 12 regressions on a real Mosquitto: session takeover, replay after removal, a full server
database, a day of health traffic through the outbox, fuzzed server topics, a broker outage.

Long runs by hand (README, "Hardening"): EDGE_RETRIEVAL_OUTAGE_S=300 and EDGE_RETRIEVAL_FUZZ_N=10000.
"""

from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pytest

from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.device.agent import DeviceAgent
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.protocol import (
    QueryMessage,
    clip_topic,
    detections_topic,
    encode_sparse,
    group_query_topic,
    new_event_id,
    sign_message,
    status_topic,
)
from edge_retrieval.server import SERVER_CLIENT_ID, AlertManager, load_private_key
from edge_retrieval.transport import MqttTransport, TlsFiles
from tests.mqtt_helpers import Recorder, beep_scene, device_config, start_server, wait_for

OUTAGE_S = float(os.environ.get("EDGE_RETRIEVAL_OUTAGE_S", "12"))
FUZZ_N = int(os.environ.get("EDGE_RETRIEVAL_FUZZ_N", "1500"))


def _event(device: str = "dev-1", eid: str | None = None, **kw: object) -> dict:
    d: dict[str, object] = dict(schema=1, event_id=eid or new_event_id(), device=device, query_id="q", query="beep",
                                score=0.5, start_s=1.0, end_s=2.0, time="2026-01-01T00:00:00Z", source="mic:x")
    d.update(kw)
    return d


def _query(space: str, version: int, topic: str, qid: str = "beep") -> QueryMessage:
    return QueryMessage.model_validate({
        "schema": 1, "query_id": qid, "version": version, "text": "beep", "space_id": space,
        "vectors": [encode_sparse("tones", np.array([1]), np.array([1.0])).model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5, "topic": topic,
    })


def _client(url: str, cid: str, **kw: object) -> MqttTransport:
    t = MqttTransport(url, cid, clean_session=True, max_backoff_s=2, **kw)  # type: ignore[arg-type]
    t.start()
    wait_for(lambda: t.connected, 10, f"client {cid}")
    return t


# --------------------------------------------------------------------------- item 1


def test_no_account_takes_over_the_server_session(tmp_path, tls_broker, tls_material) -> None:
    """With the shipped example config, a device (or the alerts account) connecting with the server's
    client id gets its own session: the server stays connected and keeps receiving detections."""
    mat = tls_material

    def tls(user: str) -> TlsFiles:
        return TlsFiles(mat.ca, mat.client_cert[user], mat.client_key[user])

    srv, store = start_server(tls_broker.url, tmp_path / "server.sqlite", tls=tls("server"),
                              credentials=("server", mat.passwords["server"]))
    intruders = [_client(tls_broker.url, SERVER_CLIENT_ID, tls=tls(user), credentials=(user, mat.passwords[user]))
                 for user in ("dev-1", "alerts", "homeassistant")]
    time.sleep(1.0)
    assert srv.transport.connected and srv.transport.disconnects == 0, tls_broker.log_text()[-2000:]
    dev2 = _client(tls_broker.url, "dev-2", tls=tls("dev-2"), credentials=("dev-2", mat.passwords["dev-2"]))
    eid = new_event_id()
    dev2.publish_wait(detections_topic("dev-2"), json.dumps(_event("dev-2", eid)), qos=1)
    wait_for(lambda: any(r["event_id"] == eid for r in store.detections()), 10, "dev-2's detection at the server")
    # and a device's link cannot be knocked off by another account using its client id
    knock = _client(tls_broker.url, "dev-2", tls=tls("dev-1"), credentials=("dev-1", mat.passwords["dev-1"]))
    time.sleep(1.0)
    assert dev2.connected and dev2.disconnects == 0
    for c in (*intruders, knock, dev2):
        c.stop()
    srv.stop()


# --------------------------------------------------------------------------- item 2


def test_removed_query_cannot_be_replayed_to_a_new_device(tmp_path, broker, tiny_bundle) -> None:
    priv, pub = generate(tmp_path / "keys")
    key = load_private_key(priv)
    space = tiny_bundle.manifest.space.id
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    alerts = AlertManager(store, srv.transport, key)
    topic = group_query_topic("site-a", "beep")
    old = sign_message(_query(space, 5, topic), key).to_json()  # captured by an eavesdropper
    alerts.publish(_query(space, 5, topic), "group", "site-a")
    alerts.remove("beep")
    attacker = _client(broker.url, "attacker")
    # a device that never saw the query (new or re-flashed) boots now
    audio = beep_scene(tmp_path / "a.wav", beeps=1)
    _, cfg = device_config(tmp_path, broker.url, tiny_bundle.root, audio, public_key=pub)
    daemon = Daemon.from_config(cfg)
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.start()
    wait_for(lambda: agent.queries.counts["removed"] == 1, 10, "the retained tombstone at the new device")
    attacker.publish_wait(topic, old, qos=1, retain=False)
    wait_for(lambda: agent.queries.counts["rejected"] >= 1, 10, "the replay's rejection")
    assert "older" in (agent.queries.last_rejection or "") and len(daemon.matcher) == 0
    # replaying a device-targeted message on a group topic is refused as well
    dev_msg = sign_message(_query(space, 10**13, "edge-retrieval/v1/devices/dev-9/queries/beep"), key).to_json()
    attacker.publish_wait(topic, dev_msg, qos=1)
    wait_for(lambda: agent.queries.counts["rejected"] >= 2, 10, "the cross-target replay's rejection")
    assert "signed for" in (agent.queries.last_rejection or "") and len(daemon.matcher) == 0
    agent.stop(drain_s=0)
    attacker.stop()
    srv.stop()


# --------------------------------------------------------------------------- item 8 / reliability


def test_full_database_loses_no_detection(tmp_path, broker) -> None:
    """The server's database refuses writes (full): the detection is not acknowledged, and it is stored
    once writes work again, also across a server restart."""
    db = tmp_path / "server.sqlite"
    srv, store = start_server(broker.url, db)
    dev = _client(broker.url, "dev-1")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # a real SQLITE_FULL on the next insert
    eids = [new_event_id() for _ in range(30)]
    for e in eids[:15]:
        dev.publish_wait(detections_topic("dev-1"), json.dumps(_event("dev-1", e, query="x" * 400)), qos=1)
    wait_for(lambda: srv.transport.deferred() >= 1, 10, "the server to hold back its acknowledgement")
    assert len(store.detections()) < 15
    store._db.execute("PRAGMA max_page_count = 1073741823")  # the disk has room again
    wait_for(lambda: len(store.detections()) == 15, 20, "the held detections stored")
    # again, then the server stops before the database heals: the broker keeps them for its session
    store._db.execute(f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0]}")
    for e in eids[15:]:
        dev.publish_wait(detections_topic("dev-1"), json.dumps(_event("dev-1", e, query="y" * 400)), qos=1)
    wait_for(lambda: srv.transport.deferred() >= 1, 10, "held acknowledgements")
    srv.stop()
    store.close()
    srv, store = start_server(broker.url, db)
    wait_for(lambda: len(store.detections()) == 30, 20, "every detection after the restart")
    rows = store.detections()
    assert sorted(r["event_id"] for r in rows) == sorted(eids) and all(r["device"] == "dev-1" for r in rows)
    dev.stop()
    srv.stop()


# --------------------------------------------------------------------------- item 6 / reliability


def test_a_day_of_health_traffic_never_stalls_the_outbox(tmp_path, broker, tiny_bundle) -> None:
    """24 h of health at 60 s (1,440 messages, accelerated: published back to back) and clips'
    worth of other publishes, with a pump slowed as on a busy Pi Zero (acks overtake it):
    every event is delivered, nothing stays in flight, and message ids wrap safely."""
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    audio = beep_scene(tmp_path / "a.wav", beeps=1)
    _, cfg = device_config(tmp_path, broker.url, tiny_bundle.root, audio, health_s=3600)
    daemon = Daemon.from_config(cfg)
    agent = DeviceAgent(cfg, daemon)
    fast = agent.outbox._publish
    assert fast is not None

    def slow(topic: str, payload: bytes):  # the PUBACK arrives before the pump has noted the publish
        info = fast(topic, payload)
        time.sleep(0.003)
        return info

    agent.outbox._publish = slow
    agent.start()
    wait_for(lambda: agent.transport.connected, 10, "the device link")
    from edge_retrieval.protocol import Event

    sent: list[str] = []
    for i in range(1440):
        agent.publish_health()
        if i % 6 == 0:
            e = Event(**_event("dev-1"))
            agent.emit(e)
            sent.append(e.event_id)
    # on the code before issue 12 the outbox stalled here: 64 rows in flight forever, until a reconnect
    wait_for(lambda: agent.outbox.depth() == 0, 30, f"the outbox to drain after a day ({agent.outbox.stats()})")
    assert agent.transport.connects == 1  # drained without the help of a reconnect
    # message ids wrap (65,535): other publishes on the same link in between
    for _ in range(66_000):
        agent.transport.publish("edge-retrieval/v1/devices/dev-1/status/x", b"", qos=0)
    for _ in range(40):
        e = Event(**_event("dev-1"))
        agent.emit(e)
        sent.append(e.event_id)
    wait_for(lambda: agent.outbox.depth() == 0, 60, f"the outbox to drain ({agent.outbox.stats()})")
    assert agent.outbox.inflight() == 0
    wait_for(lambda: len(store.detections()) == len(sent), 30, "every event at the server")
    assert {r["event_id"] for r in store.detections()} == set(sent)
    agent.stop(drain_s=0)
    srv.stop()


# --------------------------------------------------------------------------- fuzzing the server's topics


def _fuzz_payloads(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    """``n`` (topic, payload) pairs for the topics a server reads; a few valid, most not."""
    good_ev = _event("dev-1")
    good_st = {"schema": 1, "type": "health", "device": "dev-1", "health": {"low_disk": False}}
    junk: list[object] = [None, True, "no", -1, 1e308, "x" * 600, [], {}, {"a": [1] * 50}, "\x1b[2J", "=1+1"]
    out = []
    for _ in range(n):
        kind = rng.choice(("detections", "status", "clip"))
        dev = rng.choice(("dev-1", "dev-2", "a" * 64))
        if kind == "clip":
            topic = clip_topic(dev, rng.choice((good_ev["event_id"], new_event_id(), "x" * 70)))
            body = rng.choice((b"fLaC" + rng.randbytes(rng.randint(0, 300)), rng.randbytes(rng.randint(1, 300))))
        else:
            topic = detections_topic(dev) if kind == "detections" else status_topic(dev)
            base = dict(good_ev if kind == "detections" else good_st)
            r = rng.random()
            if r < 0.15:
                body = rng.randbytes(rng.randint(1, 400))
            elif r < 0.2:
                body = rng.choice((b"NaN", b"[" * 5000, b'{"score": Infinity}', b"\xff\xfe", b"{" + b" " * 70_000))
            else:
                for _ in range(rng.randint(0 if r < 0.3 else 1, 3)):
                    k = rng.choice([*sorted(base), "extra"])
                    base[k] = rng.choice(junk)
                text = json.dumps(base)
                if rng.random() < 0.1:
                    text = text.replace("0.5", rng.choice(("NaN", "Infinity", "-Infinity")))
                body = text.encode()
        out.append((topic, body))
    return out


def test_fuzzed_server_topics(tmp_path, broker) -> None:
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    fuzzer = _client(broker.url, "fuzzer")
    payloads = _fuzz_payloads(random.Random(12), FUZZ_N)
    for topic, body in payloads:
        assert fuzzer.publish(topic, body, qos=1) is not None
        time.sleep(0.0005)
    c = srv.counts
    read = ("events", "bad_events", "status", "bad_status", "clips", "bad_clips")
    wait_for(lambda: sum(c[k] for k in read) >= len(payloads), 120,
             f"the server to read {len(payloads)} payloads ({c})")
    time.sleep(0.5)
    assert sum(c[k] for k in read) == len(payloads), c  # every payload counted once, stored or refused
    assert c["bad_events"] > 0 and c["bad_status"] > 0 and c["bad_clips"] > 0
    assert srv.transport.connected and srv.transport.deferred() == 0
    # still serving: a genuine detection is stored
    eid = new_event_id()
    fuzzer.publish_wait(detections_topic("dev-2"), json.dumps(_event("dev-2", eid)), qos=1)
    wait_for(lambda: any(r["event_id"] == eid for r in store.detections()), 10, "a genuine detection afterwards")
    print(f"fuzzed {len(payloads)} server payloads: {c}")
    fuzzer.stop()
    srv.stop()


# --------------------------------------------------------------------------- broker outage mid-stream


@pytest.mark.slow
def test_broker_outage_mid_stream(tmp_path, broker, tiny_bundle) -> None:
    """The real daemon streams a recording with beeps; the broker is down for OUTAGE_S seconds in the
    middle. Every final event the daemon emitted is at the server once: none lost, none doubled."""
    priv, pub = generate(tmp_path / "keys")
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    space = tiny_bundle.manifest.space.id
    msg = QueryMessage.model_validate({**json.loads(_query(space, 1, group_query_topic("site-a", "beep")).to_json()),
                                       "policy": {"cooldown_s": 0}})
    AlertManager(store, srv.transport, load_private_key(priv)).publish(msg, "group", "site-a")
    beeps = max(12, int(OUTAGE_S / 2.5) + 10)
    audio = beep_scene(tmp_path / "long.wav", beeps=beeps)
    _, cfg = device_config(tmp_path, broker.url, tiny_bundle.root, audio, public_key=pub)
    daemon = Daemon.from_config(cfg)
    rec = Recorder()
    daemon.add_sink(rec)
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.start()
    wait_for(lambda: len(daemon.matcher) == 1, 15, "the alert at the device")
    daemon.start()
    wait_for(lambda: len(store.detections()) >= 2, 40, "detections before the outage")
    broker.stop()
    down_from = len(rec.ids())
    time.sleep(OUTAGE_S)
    assert len(rec.ids()) > down_from, "the daemon kept detecting while the broker was down"
    broker.start()
    daemon.join(OUTAGE_S + 400)
    finals = {e.event_id for e in rec.events if e.final}
    wait_for(lambda: {r["event_id"] for r in store.detections() if r["final"]} == finals, 60,
             "every final event at the server")
    rows = store.detections()
    assert len(rows) == len({r["event_id"] for r in rows}) == len(finals)  # none doubled, none lost
    print(f"outage {OUTAGE_S:g} s: {len(finals)} detections emitted, {len(rows)} stored, "
          f"{srv.counts['events']} messages, outbox {agent.outbox.stats()}")
    agent.stop(drain_s=0)
    daemon.stop()
    srv.stop()
