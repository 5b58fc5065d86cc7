"""A real ``edge-retrieval run`` is killed with SIGKILL while detections wait in its outbox:
after a restart they reach the server, each once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.protocol import QueryMessage, encode_sparse
from edge_retrieval.server import AlertManager, load_private_key
from tests.mqtt_helpers import beep_scene, device_config, start_server, wait_for


def outbox_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return [json.loads(p) for (p,) in con.execute("SELECT payload FROM outbox ORDER BY id")]
        finally:
            con.close()
    except sqlite3.Error:
        return []


def run_device(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "edge_retrieval.cli", "-v", "run", "--config", str(config)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_sigkill_with_unsent_detections(tmp_path, broker, tiny_bundle) -> None:
    priv, pub = generate(tmp_path / "keys")
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    beep = QueryMessage.model_validate({
        "schema": 1, "query_id": "beep", "version": 1, "text": "beep", "space_id": tiny_bundle.manifest.space.id,
        "vectors": [encode_sparse("tones", np.array([1]), np.array([1.0])).model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5, "policy": {"cooldown_s": 0},
    })
    AlertManager(store, srv.transport, load_private_key(priv)).publish(beep, "group", "site-a")

    state = tmp_path / "state"
    audio = beep_scene(tmp_path / "long.wav", beeps=30, lead_s=2.0)  # ~77 s in real time
    cfg_path, _ = device_config(tmp_path, broker.url, tiny_bundle.root, audio, public_key=pub, storage=state)
    log = tmp_path / "device.log"
    p = run_device(cfg_path, log)
    try:
        wait_for(lambda: store.detections(), 40, f"a first detection ({log.read_text(errors='replace')[-2000:]})")
        broker.stop()  # from here on detections pile up in the outbox
        outbox = state / "outbox.sqlite"
        wait_for(lambda: len({r["event_id"] for r in outbox_rows(outbox)}) >= 3, 40, "three queued detections")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    queued = outbox_rows(outbox)
    queued_ids = {r["event_id"] for r in queued}
    before = {r["event_id"] for r in store.detections()}
    fresh = queued_ids - before  # events the server has never heard of
    assert len(fresh) >= 2

    # restart the broker and the device (now listening to silence): the outbox drains
    broker.start()
    quiet = tmp_path / "quiet.wav"
    sf.write(str(quiet), (0.01 * np.random.default_rng(1).standard_normal(16000 * 8)).astype(np.float32), 16000)
    cfg2, _ = device_config(tmp_path, broker.url, tiny_bundle.root, quiet, public_key=pub, storage=state,
                            name="device2.toml")
    p2 = run_device(cfg2, log)
    try:
        wait_for(lambda: queued_ids <= {r["event_id"] for r in store.detections()}, 60,
                 f"the killed device's detections ({log.read_text(errors='replace')[-2000:]})")
        p2.wait(60)
    finally:
        if p2.poll() is None:
            p2.kill()
            p2.wait()
    rows = store.detections()
    assert len(rows) == len({r["event_id"] for r in rows})
    assert outbox_rows(outbox) == []
    finals = {r["event_id"] for r in rows if r["final"]}
    assert {r["event_id"] for r in queued if r["final"]} <= finals
    print(f"killed with {len(queued)} unsent messages ({len(queued_ids)} events); "
          f"server now holds {len(rows)} detections")
    srv.stop()
