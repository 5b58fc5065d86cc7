"""The daemon end to end on a real (tiny) ONNX bundle: events, gate, overload, clips, queries."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.bundle import load_bundle
from edge_retrieval.device.clips import ClipWriter
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.sinks import JsonLinesSink, ListSink
from edge_retrieval.device.sources import FileSource, StdinSource
from edge_retrieval.errors import QueryRejected
from edge_retrieval.offline.query_audio import query_from_audio
from edge_retrieval.policy import PolicyOverlay
from edge_retrieval.protocol import parse_event
from edge_retrieval.text import QueryBuilder
from tests.fixtures_audio import write_scene

POLICY = PolicyOverlay(cooldown_s=0)
SCENE = [("noise", 6), ("1000", 3), ("noise", 5), ("3000", 2), ("noise", 4)]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.flac", SCENE, 44100, channels=2)


def make(bundle, source, queries=("beep", "whistle", "chirp"), **kw) -> tuple[Daemon, ListSink]:
    full = load_bundle(bundle.root, part="all")
    sink = ListSink()
    kw.setdefault("policy", POLICY)
    d = Daemon(full, source, device_id="dev1", sinks=[sink], **kw)
    qb = QueryBuilder(full)
    for i, text in enumerate(queries):
        msg, _ = qb.build(text, f"q{i}", 0.5)
        d.apply_query(msg)
    return d, sink


def spans(sink: ListSink) -> list[tuple[str, float, float]]:
    return sorted((e.query, e.start_s, e.end_s) for e in sink.finals())


@pytest.mark.parametrize("ens", [False, True])
def test_events_at_the_right_times(tiny_bundle, tiny_ensemble, scene, ens: bool) -> None:
    d, sink = make(tiny_ensemble if ens else tiny_bundle, FileSource(scene))
    d.run()
    assert spans(sink) == [("beep", 6.0, 9.0), ("whistle", 14.0, 16.0)]
    onsets = [e for e in sink.events if not e.final]
    assert {e.event_id for e in onsets} == {e.event_id for e in sink.finals()}
    h = d.health()
    assert h["windows"] == 20 and h["encoded"] == 20 and h["dropped"] == 0 and h["events"] == 2
    assert h["rtf"] is not None and h["rtf"] > 0


def test_json_lines_follow_the_event_contract(tiny_bundle, scene) -> None:
    buf = io.StringIO()
    d, _ = make(tiny_bundle, FileSource(scene), site="north", lat=51.5, lon=-0.1)
    d.add_sink(JsonLinesSink(buf))
    d.run()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2  # one object per event
    for line in lines:
        ev = parse_event(line)
        assert ev.final and ev.device == "dev1" and ev.site == "north" and ev.source == "file:scene.flac"
        assert ev.time.endswith("Z") and 0.9 < ev.score <= 1.0
        assert set(json.loads(line)) >= {"event_id", "device", "query_id", "query", "score", "start_s", "end_s", "time"}


def test_gate_skips_silence_and_counts(tiny_bundle, tmp_path) -> None:
    rate = 16000
    x = np.zeros(12 * rate, np.float32)
    x[4 * rate : 6 * rate] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(2 * rate) / rate)
    f = tmp_path / "quiet.wav"
    sf.write(f, x, rate)
    d, sink = make(tiny_bundle, FileSource(f), gate_dbfs=-60)
    d.run()
    h = d.health()
    assert h["gated"] == 10 and h["encoded"] == 2
    assert spans(sink) == [("beep", 4.0, 6.0)]


def test_overload_drops_oldest_and_stays_bounded(tiny_bundle, tmp_path) -> None:
    """A live source that delivers faster than inference: windows are dropped and counted."""
    f = write_scene(tmp_path / "long.wav", [("noise", 300)], 16000)
    src = FileSource(f, block_s=2.0)
    src.live = True  # behave like a microphone: the capture thread never waits
    d, _ = make(tiny_bundle, src, overlap=0.9, max_batch=2, max_queue_s=1.0, gate_dbfs=None)
    d.run()
    h = d.health()
    total = 2991  # ticks of 0.1 s over 300 s (last window padded)
    assert h["dropped"] > 0
    assert h["windows"] + h["dropped"] == total
    assert h["queue_max"] == 10


def test_non_live_source_never_drops(tiny_bundle, tmp_path) -> None:
    f = write_scene(tmp_path / "long.wav", [("noise", 60)], 16000)
    d, _ = make(tiny_bundle, FileSource(f, block_s=5.0), overlap=0.5, max_batch=1, max_queue_s=1.0)
    d.run()
    h = d.health()
    assert h["dropped"] == 0 and h["windows"] == 119


def test_stdin_source_through_the_daemon(tiny_bundle) -> None:
    rate = 8000
    x = np.concatenate([0.01 * np.random.default_rng(0).standard_normal(3 * rate),
                        0.5 * np.sin(2 * np.pi * 3000 * np.arange(2 * rate) / rate),
                        0.01 * np.random.default_rng(1).standard_normal(2 * rate)])
    raw = (x * 32767).astype("<i2").tobytes()
    d, sink = make(tiny_bundle, StdinSource(rate=rate, fmt="s16le", stream=io.BytesIO(raw)))
    d.run()
    assert spans(sink) == [("whistle", 3.0, 5.0)]


def test_query_by_example(tiny_bundle, scene, tmp_path) -> None:
    ex = write_scene(tmp_path / "example.ogg", [("1000", 2.5)], 48000, format="OGG", subtype="VORBIS")
    msg = query_from_audio(tiny_bundle, ex, "like-example", 0.3)
    v = msg.vectors[0]
    assert v.encoding == "sparse" and v.indices[0] == 1  # "beep" carries the most weight
    assert sum(v.weights) == pytest.approx(1.0, abs=1e-3)
    d, sink = make(tiny_bundle, FileSource(scene), queries=())
    d.apply_query(msg)
    d.run()
    assert [(e.start_s, e.end_s) for e in sink.finals()] == [(6.0, 9.0)]


def test_query_by_example_embedding_expert(tiny_ensemble, tmp_path) -> None:
    ex = write_scene(tmp_path / "whistle.wav", [("3000", 2.0)], 22050)
    msg = query_from_audio(tiny_ensemble, ex, "w", 0.3)
    dense = msg.vectors[1].dense(4)
    assert msg.vectors[1].expert == "bands" and np.argmax(dense) == 2
    assert np.linalg.norm(dense) == pytest.approx(1.0, abs=1e-4)


def test_clips_are_written_and_capped(tiny_bundle, scene, tmp_path) -> None:
    clips = ClipWriter(tmp_path / "clips", max_mb=10, pre_s=1, post_s=1, max_clip_s=10)
    d, sink = make(tiny_bundle, FileSource(scene), clips=clips)
    d.run()
    finals = sink.finals()
    assert len(finals) == 2 and all(e.clip for e in finals)
    for e in finals:
        y, rate = sf.read(tmp_path / "clips" / e.clip)
        assert rate == 44100
        assert y.shape[0] / rate == pytest.approx(e.end_s - e.start_s + 2, abs=0.05)
    # a cap smaller than two clips keeps only the newest
    one = (tmp_path / "clips" / finals[0].clip).stat().st_size
    small = ClipWriter(tmp_path / "clips2", max_mb=one * 1.5 / 1e6, pre_s=1, post_s=1, max_clip_s=10)
    d2, sink2 = make(tiny_bundle, FileSource(scene), clips=small)
    d2.run()
    left = sorted(p.name for p in (tmp_path / "clips2").glob("*.flac"))
    assert small.deleted >= 1 and len(left) == 1


def test_queries_change_while_running(tiny_bundle, scene) -> None:
    src = FileSource(scene, realtime=False)
    d, sink = make(tiny_bundle, src, queries=())
    with pytest.raises(QueryRejected, match="space id"):
        other = QueryBuilder(load_bundle(tiny_bundle.root, part="all")).build("beep", "x", 0.5)[0]
        d.apply_query(other.model_copy(update={"space_id": "f" * 64}))
    d.run()  # no queries: nothing is encoded (power saving), windows are counted as idle
    assert d.health()["idle"] == 20 and d.health()["encoded"] == 0 and not sink.events


def test_broken_sink_does_not_stop_detection(tiny_bundle, scene) -> None:
    class Broken:
        def emit(self, event) -> None:
            raise RuntimeError("disk on fire")

        def close(self) -> None:
            pass

    d, sink = make(tiny_bundle, FileSource(scene))
    d.add_sink(Broken())
    d.run()
    assert len(sink.finals()) == 2 and d.health()["sink_errors"] == 4


def test_start_stop_closes_open_events(tiny_bundle, tmp_path) -> None:
    f = write_scene(tmp_path / "beep.wav", [("1000", 30)], 16000)
    d, sink = make(tiny_bundle, FileSource(f, realtime=True, block_s=0.1))
    d.start()
    deadline = time.monotonic() + 20
    while not any(not e.final for e in sink.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    d.stop()
    d.join(timeout=10)
    assert d.error is None
    finals = sink.finals()
    assert len(finals) == 1 and finals[0].end_s < 30  # closed at stop, not at the end of the file


def test_corrupt_midway_reports_and_keeps_what_it_had(tiny_bundle, scene, tmp_path) -> None:
    data = scene.read_bytes()
    cut = tmp_path / "truncated.flac"
    cut.write_bytes(data[: len(data) // 2] + b"\x00garbage" * 2000)
    d, sink = make(tiny_bundle, FileSource(cut))
    d.run()
    assert d.health()["windows"] >= 6
    # the beep at 6-9 s lies in the first half: found, whatever happened later
    assert ("beep", 6.0, 9.0) in spans(sink) or d.source_error


def test_live_event_times_follow_a_clock_step_after_start(tiny_bundle, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A board without an RTC: NTP steps the wall clock after the daemon started; later events
    must carry the corrected time (offset through the monotonic clock), not the boot-time guess."""
    import time as _time
    from datetime import datetime

    from edge_retrieval.device import daemon as daemon_mod
    from edge_retrieval.pipeline.detector import ActiveEvent, Transition

    wav = tmp_path / "quiet.wav"
    sf.write(str(wav), np.zeros(16000, np.float32), 16000)
    d = Daemon(tiny_bundle, FileSource(wav, realtime=True), device_id="t")
    assert d.source.live
    d.t0_mono = _time.monotonic() - 10.0  # stream offset 0 was 10 s ago
    d.t0_wall = _time.time() - 10.0 - 3600.0  # the wall clock at start was an hour off (no RTC)
    ev = ActiveEvent(event_id="e", query_id="q", query="q", start_s=4.0, end_s=5.0, peak=0.9)
    got = datetime.fromisoformat(d._event(Transition(ev, final=True)).time.replace("Z", "+00:00")).timestamp()
    assert abs(got - (_time.time() - 6.0)) < 0.5  # 6 s ago by the current (synced) clock
    step = 120.0  # NTP steps the clock forward by two minutes
    real_time = _time.time
    monkeypatch.setattr(daemon_mod.time, "time", lambda: real_time() + step)
    got2 = datetime.fromisoformat(d._event(Transition(ev, final=True)).time.replace("Z", "+00:00")).timestamp()
    assert abs(got2 - (real_time() + step - 6.0)) < 0.5
