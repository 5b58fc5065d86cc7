"""The embeddable Pipeline: samples in, events out, no threads; the daemon gives the same events."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import edge_retrieval
from edge_retrieval import Pipeline
from edge_retrieval.bundle import load_bundle
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.sinks import ListSink
from edge_retrieval.device.sources import FileSource
from edge_retrieval.policy import PolicyOverlay
from edge_retrieval.text import QueryBuilder
from tests.fixtures_audio import write_scene

POLICY = PolicyOverlay(cooldown_s=0)
SCENE = [("noise", 6), ("1000", 3), ("noise", 5), ("3000", 2), ("noise", 4)]
RATE = 44100


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.flac", SCENE, RATE, channels=2)


def _queries(bundle) -> list:
    qb = QueryBuilder(bundle)
    return [qb.build(text, f"q{i}", 0.5)[0] for i, text in enumerate(("beep", "whistle", "chirp"))]


def _feed(bundle, samples: np.ndarray, chunk: int) -> list[tuple[str, float, float, float]]:
    pipe = Pipeline(bundle, _queries(bundle), POLICY, sample_rate=RATE)
    threads = threading.active_count()
    trs = []
    for i in range(0, samples.size, chunk):
        trs += pipe.feed(samples[i : i + chunk])
    trs += pipe.close()
    assert threading.active_count() == threads  # embeddable: nothing runs behind the caller's back
    onsets = {t.event.event_id for t in trs if not t.final}
    finals = [t.event for t in trs if t.final]
    assert onsets == {e.event_id for e in finals}  # every event: one onset, then one final update
    return sorted((e.query, e.start_s, e.end_s, float(e.peak)) for e in finals)


def test_public_name() -> None:
    assert "Pipeline" in edge_retrieval.__all__ and edge_retrieval.Pipeline is Pipeline


def test_feed_finds_the_sounds_whatever_the_block_size(tiny_bundle, scene) -> None:
    full = load_bundle(tiny_bundle.root, part="all")
    x = np.concatenate(list(FileSource(scene).blocks()))
    small = _feed(full, x, int(0.37 * RATE))
    assert [(q, a, b) for q, a, b, _ in small] == [("beep", 6.0, 9.0), ("whistle", 14.0, 16.0)]
    assert _feed(full, x, x.size) == small  # one call or many: the same events


def test_daemon_runs_the_same_pipeline(tiny_bundle, scene) -> None:
    full = load_bundle(tiny_bundle.root, part="all")
    x = np.concatenate(list(FileSource(scene).blocks()))
    sink = ListSink()
    d = Daemon(full, FileSource(scene), device_id="dev1", sinks=[sink], policy=POLICY)
    for msg in _queries(full):
        d.apply_query(msg)
    d.run()
    daemon = sorted((e.query, e.start_s, e.end_s, e.score) for e in sink.finals())
    piped = _feed(full, x, int(0.5 * RATE))
    assert daemon == [(q, a, b, round(p, 4)) for q, a, b, p in piped]  # the event carries 4 decimals
