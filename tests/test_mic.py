"""The microphone path with a real PortAudio device: PulseAudio's null sink, whose monitor is
the default source, records what ``paplay`` plays (no sound hardware needed)."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from edge_retrieval.bundle import load_bundle
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.sinks import ListSink
from edge_retrieval.device.sources import MicSource
from edge_retrieval.policy import PolicyOverlay
from edge_retrieval.text import QueryBuilder
from tests.fixtures_audio import write_scene

pytestmark = pytest.mark.slow


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_mic_source_records_a_played_tone(pulse_null_sink, tmp_path) -> None:
    f = write_scene(tmp_path / "tone.wav", [("1000", 1.5)], 44100)
    src = MicSource(device="pulse", rate=16000, block_s=0.05)
    got: list[np.ndarray] = []
    it = src.blocks()
    player = None
    t0 = time.monotonic()
    done_at = None
    for b in it:
        got.append(b)
        if player is None:
            player = pulse_null_sink(f)
        if done_at is None and player.poll() is not None:
            done_at = time.monotonic()
        if (done_at is not None and time.monotonic() - done_at > 1.0) or time.monotonic() - t0 > 20:
            break
    src.stop()
    it.close()
    player.wait(timeout=10)
    x = np.concatenate(got)
    assert src.sample_rate == 16000 and x.dtype == np.float32
    loud = x[np.abs(x) > 0.05]
    assert loud.size > 8000  # the tone came back through PortAudio
    seg = x[np.argmax(np.abs(x) > 0.05) :][:8000]
    spec = np.abs(np.fft.rfft(seg * np.hanning(seg.size)))
    assert np.argmax(spec) * 16000 / seg.size == pytest.approx(1000, abs=4)
    assert src.stats()["state"] == "closed"


def test_daemon_detects_from_the_microphone(pulse_null_sink, tiny_bundle, tmp_path) -> None:
    f = write_scene(tmp_path / "whistle.wav", [("3000", 3.0)], 48000)
    full = load_bundle(tiny_bundle.root, part="all")
    sink = ListSink()
    d = Daemon(full, MicSource(device="pulse", block_s=0.05), device_id="mic1", sinks=[sink],
               policy=PolicyOverlay(cooldown_s=0), gate_dbfs=-60)
    qb = QueryBuilder(full)
    for i, text in enumerate(["whistle", "beep"]):
        d.apply_query(qb.build(text, f"q{i}", 0.5)[0])
    d.start()
    try:
        assert _wait(lambda: d.windows >= 1, 15)
        p = pulse_null_sink(f)
        p.wait(timeout=15)
        assert _wait(lambda: any(e.final for e in sink.events), 15)
    finally:
        d.stop()
        d.join(timeout=10)
    assert d.error is None
    finals = sink.finals()
    assert [e.query for e in finals] == ["whistle"]
    assert 1.0 <= finals[0].end_s - finals[0].start_s <= 4.0
    h = d.health()
    assert h["source"]["name"].startswith("mic:") and h["gated"] >= 1  # the silent null sink was gated


def test_mic_reopens_after_the_server_goes_away(pulse_null_sink, tmp_path) -> None:
    """Kill PulseAudio under a running capture: the source keeps running and reopens with backoff."""
    src = MicSource(device="pulse", rate=16000, block_s=0.05, backoff_s=0.2, max_backoff_s=1.0)
    src.stall_s = 1.0
    n = {"blocks": 0}

    def consume() -> None:
        for _ in src.blocks():
            n["blocks"] += 1

    import threading

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    try:
        assert _wait(lambda: n["blocks"] > 5, 10)
        subprocess.run(["pulseaudio", "--kill"], capture_output=True, timeout=20)
        assert _wait(lambda: src.state != "open", 15)
        subprocess.run(["pulseaudio", "--start", "--exit-idle-time=-1"], capture_output=True, timeout=30)
        pulse_null_sink.state["started"] = True  # ours now: the fixture stops it at the end
        subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={pulse_null_sink.sink}"],
                       capture_output=True, timeout=10)
        before = n["blocks"]
        assert _wait(lambda: src.reopens >= 1 and n["blocks"] > before + 5, 30)
        assert t.is_alive()
    finally:
        src.stop()
        t.join(timeout=10)
