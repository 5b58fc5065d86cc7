"""The real text path with the default BirdNET bundle: `alerts add "siren"` on the server, an FM siren
played into the device from a file, the detection stored on the server (BirdNET: CC BY-NC-SA 4.0)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.cli import main as cli_main
from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.device.daemon import Daemon
from tests.mqtt_helpers import Recorder, device_config, start_server, wait_for


def fm_siren(seconds: float, rate: int = 48000) -> np.ndarray:
    """A wailing siren: a 700-1500 Hz sweep (4 s period) with two harmonics."""
    t = np.arange(int(seconds * rate)) / rate
    f = 1100 + 400 * np.sin(2 * np.pi * 0.25 * t)
    phase = 2 * np.pi * np.cumsum(f) / rate
    return (0.4 * np.sin(phase) + 0.15 * np.sin(2 * phase) + 0.08 * np.sin(3 * phase)).astype(np.float32)


@pytest.mark.slow
def test_siren_alert_through_birdnet(tmp_path, broker, birdnet_bundle, capsys) -> None:
    priv, pub = generate(tmp_path / "keys")
    db = tmp_path / "server.sqlite"
    srv, store = start_server(broker.url, db)
    rc = cli_main(["alerts", "add", "siren", "--threshold", "0.3", "--device", "dev-bn", "--bundle",
                   str(birdnet_bundle.root), "--broker", broker.url, "--db", str(db), "--key", str(priv)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Siren" in out.out  # shows what the text resolved to
    alert_id = out.out.split()[1].rstrip(":")

    rng = np.random.default_rng(0)
    quiet = lambda s: (0.003 * rng.standard_normal(int(s * 48000))).astype(np.float32)  # noqa: E731
    audio = tmp_path / "siren.wav"
    sf.write(str(audio), np.concatenate([quiet(6), fm_siren(9), quiet(6)]), 48000)
    _, cfg = device_config(tmp_path, broker.url, birdnet_bundle.root, audio, device_id="dev-bn", groups=(),
                           public_key=pub, realtime=False)
    from edge_retrieval.device.agent import DeviceAgent

    rec = Recorder()
    daemon = Daemon.from_config(cfg, sinks=[rec])
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.start()
    wait_for(lambda: len(daemon.matcher) == 1, 20, "the siren query on the device")
    daemon.start()
    daemon.join(120)
    finals = [e for e in rec.events if e.final]
    assert finals, daemon.health()
    wait_for(lambda: any(r["final"] for r in store.detections()), 20, "the detection at the server")
    rows = store.detections()
    assert {r["event_id"] for r in rows} == {e.event_id for e in finals}
    best = max(rows, key=lambda r: r["score"])
    assert best["query_id"] == alert_id and best["score"] > 0.5
    assert 3.0 <= best["start_s"] <= 12.0  # the siren, not the quiet lead-in
    print(json.dumps({k: best[k] for k in ("query", "score", "start_s", "end_s")}))
    agent.stop()
    srv.stop()
