"""Thousands of malformed, oversized and random payloads on a running device's query topics:
the daemon keeps listening, the link stays up, every payload is refused and reported, and a
genuine signed query still applies afterwards."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.device.agent import REPORT_BURST, DeviceAgent
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.protocol import (
    MAX_QUERY_BYTES,
    QueryMessage,
    device_query_topic,
    encode_sparse,
    group_query_topic,
    parse_status,
    sign_message,
    status_topic,
)
from edge_retrieval.server import load_private_key
from edge_retrieval.transport import MqttTransport
from tests.mqtt_helpers import beep_scene, device_config, wait_for

N_FUZZ = int(os.environ.get("EDGE_RETRIEVAL_FUZZ_N", "2500"))  # 10000 by hand (README)


def _valid(space: str, version: int, qid: str = "real") -> QueryMessage:
    return QueryMessage.model_validate({
        "schema": 1, "query_id": qid, "version": version, "text": "beep", "space_id": space,
        "vectors": [encode_sparse("tones", np.array([1]), np.array([1.0])).model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5, "topic": group_query_topic("site-a", qid),
    })


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=15)


@pytest.mark.slow
def test_fuzzed_query_topics(tmp_path, broker, tiny_bundle) -> None:
    priv, pub = generate(tmp_path / "keys")
    key = load_private_key(priv)
    space = tiny_bundle.manifest.space.id
    good = json.loads(_valid(space, 1).to_json())
    audio = beep_scene(tmp_path / "long.wav", beeps=40)  # ~100 s in real time: the daemon is busy meanwhile
    _, cfg = device_config(tmp_path, broker.url, tiny_bundle.root, audio, public_key=pub, health_s=1.0)
    daemon = Daemon.from_config(cfg)
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.start()
    daemon.start()
    wait_for(lambda: agent.transport.connected, 10, "the device link")

    reports: list[bytes] = []
    lock = threading.Lock()
    watcher = MqttTransport(broker.url, "watcher", clean_session=True)

    def on_status(topic: str, payload: bytes, retained: bool) -> None:
        with lock:
            reports.append(payload)

    watcher.subscribe(status_topic("dev-1"), on_status)
    watcher.start()
    wait_for(lambda: watcher.connected, 10, "the watcher")
    pub_client = MqttTransport(broker.url, "fuzzer", clean_session=True)
    pub_client.start()
    wait_for(lambda: pub_client.connected, 10, "the fuzzer")

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        d = json.loads(json.dumps(good))
        k = draw(st.sampled_from(sorted(d) + ["extra"]))
        if draw(st.booleans()) and k in d:
            d.pop(k)
        else:
            d[k] = draw(json_any)
        if draw(st.booleans()):
            d["signature"] = draw(st.text(max_size=100))
        return json.dumps(d).encode()

    payloads = st.one_of(
        st.binary(min_size=1, max_size=400),
        json_any.map(lambda v: json.dumps(v).encode()),
        mutated(),
        st.just(json.dumps(good).encode()),  # valid but unsigned
        st.sampled_from([b"NaN", b"[" * 4000, b'{"schema":1,"version":1e999}', b"\xff\xfe\x00"]),
        st.integers(1, 3).map(lambda k: b'{"pad":"' + b"x" * (MAX_QUERY_BYTES + k * 1000) + b'"}'),
    )
    topics = st.one_of(
        st.just(group_query_topic("site-a", "real")),
        st.from_regex(r"\A[A-Za-z0-9_.-]{1,20}\Z").map(lambda q: group_query_topic("site-a", q)),
        st.from_regex(r"\A[A-Za-z0-9_.-]{1,20}\Z").map(lambda q: device_query_topic("dev-1", q)),
    )
    sent = [0]

    @settings(max_examples=N_FUZZ, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(topic=topics, payload=payloads, retain=st.booleans())
    def fire(topic: str, payload: bytes, retain: bool) -> None:
        assert pub_client.publish(topic, payload, qos=1, retain=retain) is not None
        sent[0] += 1

    fire()
    n = sent[0]
    counts = agent.queries.counts
    wait_for(lambda: counts["rejected"] + counts["ignored"] + counts["unchanged"] >= n, 120,
             f"the device to process {n} payloads ({counts})")
    assert counts["applied"] == 0 and counts["rejected"] >= n - 5
    assert len(daemon.matcher) == 0
    # still alive: the link is up, the daemon thread keeps encoding audio
    assert agent.transport.connected and daemon._thread is not None and daemon._thread.is_alive()
    w0 = daemon.windows
    wait_for(lambda: daemon.windows > w0, 10, "the daemon to keep processing audio")
    # a genuine signed query still applies, live
    pub_client.publish(group_query_topic("site-a", "real"), sign_message(_valid(space, 7), key).to_json(),
                       qos=1, retain=True)
    wait_for(lambda: len(daemon.matcher) == 1, 10, "the genuine query")
    # rejections were reported on the status topic (rate-limited) and counted in health
    with lock:
        rej = [s for s in map(parse_status, reports) if s.type == "rejection"]
    assert len(rej) >= REPORT_BURST and all(s.reason for s in rej)
    wait_for(lambda: any(s.type == "health" and s.health["query_counts"]["rejected"] >= n - 5
                         for s in map(parse_status, list(reports))), 10, "a health message with the counts")
    print(f"fuzzed {n} payloads: {counts}; {len(rej)} rejection reports published, "
          f"{agent.rejections_unreported} only counted")
    daemon.stop()
    agent.stop(drain_s=0)
    watcher.stop()
    pub_client.stop()
