"""A false alarm teaches with several windows of the event, not only its peak.

The device's final update carries up to ``FEEDBACK_WINDOWS`` windows (the peak first, the others
spread over the event: a long false alarm does not sound the same throughout); the server adds
every window that a device would accept to the alert's negatives, leaves out the ones that do not
fit the alert (untrusted input), still takes an older device's single peak window, and keeps the
re-signed message under the query size limit. Real daemon and tiny ONNX bundle; real Mosquitto.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.bundle import load_bundle
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.sinks import ListSink
from edge_retrieval.device.sources import FileSource
from edge_retrieval.errors import QueryRejected
from edge_retrieval.pipeline.feedback import window_example
from edge_retrieval.policy import PolicyOverlay
from edge_retrieval.protocol import (
    FEEDBACK_WINDOWS,
    MAX_DEVICE_MESSAGE_BYTES,
    MAX_QUERY_BYTES,
    SCHEMA,
    Event,
    Example,
    QueryMessage,
    encode_dense,
    encode_sparse,
    parse_event,
    parse_query_message,
)
from edge_retrieval.server import AlertManager, ServerStore
from edge_retrieval.server.feedback import Feedback
from edge_retrieval.text import QueryBuilder
from edge_retrieval.transport import MqttTransport
from tests.fixtures_audio import noise, tone
from tests.mqtt_helpers import wait_for

RATE = 16000
# a 9 s beep under a whistle that grows louder each second: every window of the event differs
WHISTLE = [0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.008, 0.012, 0.02]


def _scene(path: Path) -> Path:
    beep = np.concatenate([tone(1000.0, 1.0, RATE) + tone(3000.0, 1.0, RATE, amp=a) for a in WHISTLE])
    x = np.concatenate([noise(4.0, RATE, seed=1), beep + noise(beep.size / RATE, RATE, seed=2), noise(4.0, RATE, seed=3)])
    sf.write(str(path), x, RATE)
    return path


def test_the_final_update_carries_windows_spread_over_the_event(tiny_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    full = load_bundle(tiny_bundle.root, part="all")
    sink = ListSink()
    d = Daemon(full, FileSource(_scene(tmp_path / "beep.wav")), device_id="dev1", sinks=[sink],
               policy=PolicyOverlay(cooldown_s=0))
    msg, _ = QueryBuilder(full).build("beep", "q0", 0.5)
    d.apply_query(msg)
    d.run()
    finals = sink.finals()
    assert len(finals) == 1 and finals[0].end_s - finals[0].start_s >= 8
    ev = finals[0]
    assert ev.windows is not None and len(ev.windows) == FEEDBACK_WINDOWS and ev.vectors is None
    # the peak first: the held window of the event that scored highest for the query
    held = [(float(row[ids.index("q0")]), vecs) for a, b, ids, row, vecs in d.pipeline._recent
            if b > ev.start_s and a < ev.end_s and "q0" in ids]
    assert len(held) >= 8
    peak = max(held, key=lambda h: h[0])[1]
    assert ev.windows[0] == window_example(full.manifest, peak)
    forms = [w.model_dump_json() for w in ev.windows]
    assert len(set(forms)) == len(forms)  # different windows
    whistle = []
    for w in ev.windows:
        (v,) = w.vectors
        assert v.encoding == "sparse"
        whistle.append(dict(zip(v.indices or [], v.weights or [], strict=True)).get(2, 0.0))  # label 2: whistle
    assert max(whistle) > 10 * max(min(whistle), 1e-6)  # early and late windows of the event both sent
    assert parse_event(ev.to_json()).windows == ev.windows and len(ev.to_json()) < MAX_DEVICE_MESSAGE_BYTES
    assert not any(e.windows for e in sink.events if not e.final)  # the onset carries none


def _sparse_window(idx: list[int], w: list[float]) -> Example:
    return Example(vectors=[encode_sparse("tones", np.array(idx), np.array(w)),
                            encode_dense("bands", np.array(idx + [0] * (4 - len(idx)), float) + 0.5, "f16")])


def test_a_false_alarm_adds_every_window_that_fits(tmp_path: Path, broker, tiny_ensemble) -> None:  # noqa: ANN001
    full = load_bundle(tiny_ensemble.root, part="all")
    store = ServerStore(tmp_path / "server.sqlite")
    link = MqttTransport(broker.url, "server", clean_session=True)
    link.start()
    wait_for(lambda: link.connected, 10, "server connection")
    try:
        alerts = AlertManager(store, link, builder=QueryBuilder(full))
        fb = Feedback(store.path, alerts)
        alerts.add("beep", 0.5, group="site-a", alert_id="beep")
        peak, other = _sparse_window([1, 2], [0.7, 0.3]), _sparse_window([1, 3], [0.6, 0.4])
        wrong_expert = Example(vectors=[encode_sparse("tones", np.array([1]), np.array([1.0]))])  # no "bands"
        out_of_range = _sparse_window([1, 9], [0.5, 0.5])  # label 9 of a 4-label expert
        kw = dict(device="dev1", query_id="beep", query="beep", score=0.9, start_s=1.0, end_s=9.0,
                  time="2026-01-01T00:00:00Z", source="mic", final=True)
        fb.on_event(Event(event_id="e1", vectors=list(peak.vectors),
                          windows=[peak, wrong_expert, other, out_of_range], **kw), True)
        det = {"device": "dev1", "event_id": "e1", "query_id": "beep"}
        alert = fb.give("ranger1", det, "false_alarm")
        negs = QueryMessage.model_validate_json(alert["message"]).negatives
        assert [n.event_id for n in negs] == ["e1", "e1"]
        assert [n.vectors for n in negs] == [peak.vectors, other.vectors]  # the peak first; misfits left out

        # an older device: the peak only, in ``vectors``
        fb.on_event(Event(event_id="e2", vectors=list(other.vectors), **kw), True)
        alert = fb.give("ranger1", {**det, "event_id": "e2"}, "correct")
        back = parse_query_message(alert["message"].encode())  # what a device reads
        assert len(back.negatives) == 2 and [p.event_id for p in back.positives] == ["e2"]

        # a row stored by the previous server version: one window as a plain list
        legacy = json.dumps([v.model_dump(mode="json", exclude_none=True) for v in peak.vectors])
        fb._exec("INSERT INTO event_vectors VALUES (?,?,?)", ("dev1", "e0", legacy))
        assert [e.vectors for e in fb.examples("dev1", "e0")] == [peak.vectors]
        assert fb.examples("dev1", "nope") == []

        # nothing that fits: refused with the reason, the alert unchanged
        fb.on_event(Event(event_id="e3", windows=[wrong_expert, out_of_range], **kw), True)
        with pytest.raises(QueryRejected, match="do not match alert 'beep'"):
            fb.give("ranger1", {**det, "event_id": "e3"}, "false_alarm")
        assert store.alert("beep")["version"] == alert["version"]
    finally:
        link.stop()


def test_revisions_stay_under_the_query_size_limit(tmp_path: Path, broker) -> None:  # noqa: ANN001
    """Many large windows: the oldest negatives go first so the signed message stays readable."""
    store = ServerStore(tmp_path / "server.sqlite")
    link = MqttTransport(broker.url, "server", clean_session=True)
    link.start()
    wait_for(lambda: link.connected, 10, "server connection")
    try:
        alerts = AlertManager(store, link)
        fb = Feedback(store.path, alerts)
        dim = 4096  # f32: ~22 kB of base64 per window
        alerts.publish(QueryMessage.model_validate({
            "schema": SCHEMA, "query_id": "big", "version": 1, "text": "big", "space_id": "0" * 64,
            "vectors": [encode_dense("emb", np.ones(dim), "f32").model_dump(exclude_none=True)],
            "weights": [1.0], "threshold": 0.3}), "group", "site-a")
        rng = np.random.default_rng(0)
        for i in range(16):
            win = Example(vectors=[encode_dense("emb", rng.standard_normal(dim), "f32")])
            fb.on_event(Event(event_id=f"e{i}", device="dev1", query_id="big", query="big", score=0.9, start_s=1.0,
                              end_s=4.0, time="2026-01-01T00:00:00Z", source="mic", final=True, windows=[win]), True)
            alert = fb.give("ranger1", {"device": "dev1", "event_id": f"e{i}", "query_id": "big"}, "false_alarm")
        raw = alert["message"].encode()
        assert len(raw) <= MAX_QUERY_BYTES
        negs = parse_query_message(raw).negatives
        assert 5 <= len(negs) < 16 and negs[-1].event_id == "e15"  # the newest kept, the oldest dropped
        assert [n.event_id for n in negs] == [f"e{i}" for i in range(16 - len(negs), 16)]
        assert json.loads(raw)["version"] == store.alert("big")["version"]
    finally:
        link.stop()
