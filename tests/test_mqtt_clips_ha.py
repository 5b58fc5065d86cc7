"""Detection clips on their own topic, and Home Assistant MQTT discovery, over a real Mosquitto.

The real daemon writes FLAC clips, the device agent queues them durably (SQLite row -> file) and
deletes a row only after the broker acknowledges the clip (an outage in the middle included); the server
stores them next to its database and ``detections --json`` names the file. Discovery configs
and ON/OFF states are read back by an outside client (mosquitto_sub).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from edge_retrieval.cli import main as cli_main
from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.config import load_config
from edge_retrieval.device.clip_outbox import ClipOutbox
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.protocol import clip_topic, status_topic
from edge_retrieval.server import FleetServer, HaDiscovery, ServerStore
from edge_retrieval.transport import MqttTransport
from tests.mqtt_helpers import MosquittoSub, Recorder, beep_scene, device_config, start_server, wait_for


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate(tmp_path / "keys")


def _add_alert(capsys, bundle: Path, url: str, db: Path, key: Path, text: str = "beep") -> dict:
    rc = cli_main(["alerts", "add", text, "--threshold", "0.5", "--group", "site-a", "--bundle", str(bundle),
                   "--broker", url, "--db", str(db), "--key", str(key), "--cooldown-s", "0", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def _device(tmp_path: Path, url: str, bundle: Path, pub: Path, beeps: int, clips: bool):
    from edge_retrieval.device.agent import DeviceAgent

    audio = beep_scene(tmp_path / "beeps.wav", beeps=beeps)
    p, _ = device_config(tmp_path, url, bundle, audio, public_key=pub, realtime=False)
    if clips:
        p.write_text(p.read_text() + f'[clips]\nenabled = true\ndir = "{tmp_path / "dev-clips"}"\n'
                     "pre_s = 0.5\npost_s = 0.5\n")
    cfg = load_config(p)
    rec = Recorder()
    daemon = Daemon.from_config(cfg, sinks=[rec])
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.transport.set_backoff(1, 2)
    return daemon, agent, rec


def test_clips_survive_an_outage_and_decode_at_the_server(tmp_path, broker, tiny_bundle, keys, capsys) -> None:
    priv, pub = keys
    db = tmp_path / "srv" / "server.sqlite"
    srv, store = start_server(broker.url, db)
    _add_alert(capsys, tiny_bundle.root, broker.url, db, priv)
    daemon, agent, rec = _device(tmp_path, broker.url, tiny_bundle.root, pub, beeps=3, clips=True)
    agent.start()
    wait_for(lambda: len(daemon.matcher) == 1, 15, "the retained query to reach the device")
    broker.stop()  # the whole detection run happens while the broker is down
    daemon.start()
    daemon.join(60)
    finals = {e.event_id: e for e in rec.events if e.final}
    assert len(finals) == 3 and all(e.clip for e in finals.values())
    assert agent.clip_outbox.depth() == 3  # queued on disk, nothing lost
    broker.start()
    wait_for(lambda: len([r for r in store.detections() if r["clip_path"]]) == 3, 40,
             "every clip at the server after the outage")
    clips = daemon.clips
    for r in store.detections():
        ev = finals[r["event_id"]]
        path = Path(r["clip_path"])
        assert path.parent == tmp_path / "srv" / "clips" / "dev-1"  # next to the database
        assert path.read_bytes() == (clips.dir / ev.clip).read_bytes()
        a, b = clips.span(ev.start_s, ev.end_s)
        info = sf.info(str(path))
        data, rate = sf.read(str(path))
        assert info.format == "FLAC" and abs(len(data) / rate - (b - a)) < 0.02, (len(data) / rate, a, b)
    sizes = [Path(r["clip_path"]).stat().st_size for r in store.detections()]
    print(f"3 clips queued during the outage, all stored: {sizes} bytes, "
          f"{[round(sf.info(r['clip_path']).duration, 2) for r in store.detections()]} s")
    wait_for(lambda: agent.clip_outbox.depth() == 0, 10, "an empty clip queue")
    assert agent.clip_outbox.stats()["sent"] >= 3 and srv.counts["bad_clips"] == 0
    agent.stop()
    srv.stop()
    store.close()
    # the CLI shows where each clip is
    capsys.readouterr()
    assert cli_main(["detections", "--db", str(db), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(Path(x["clip_path"]).is_file() for x in rows)


def test_clip_over_the_byte_cap_is_skipped_and_counted(tmp_path, broker) -> None:
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    from edge_retrieval.protocol import Event

    # the server keeps clips of its detections only (issue 12 item 4)
    store.upsert_event(Event(event_id="e-small", device="dev-x", query_id="q", query="beep", score=0.5, start_s=0,
                             end_s=1, time="2026-01-01T00:00:00Z", source="file:x", final=True))
    tr = MqttTransport(broker.url, "dev-x", clean_session=True)
    q = ClipOutbox(tmp_path / "q.sqlite", tr, max_bytes=1000)
    big, small, gone = tmp_path / "big.flac", tmp_path / "small.flac", tmp_path / "gone.flac"
    import numpy as np

    sf.write(str(big), np.random.default_rng(0).uniform(-0.5, 0.5, 16000), 16000, format="FLAC")
    sf.write(str(small), np.zeros(100), 16000, format="FLAC")
    assert big.stat().st_size > 1000 >= small.stat().st_size
    q.put("e-big", clip_topic("dev-x", "e-big"), big)
    q.put("e-gone", clip_topic("dev-x", "e-gone"), gone)
    q.put("e-small", clip_topic("dev-x", "e-small"), small)
    tr.start()
    q.start()
    wait_for(lambda: q.depth() == 0, 15, "the queue to drain")
    st = q.stats()
    assert (st["sent"], st["skipped_large"], st["missing"]) == (1, 1, 1)
    wait_for(lambda: srv.counts["clips"] == 1, 10, "the small clip at the server")
    assert (tmp_path / "clips" / "dev-x" / "e-small.flac").read_bytes() == small.read_bytes()
    # a payload that is not FLAC is refused by the server, not stored
    tr.publish(clip_topic("dev-x", "e-bad"), b"not a flac file", qos=1)
    wait_for(lambda: srv.counts["bad_clips"] == 1, 10, "the refusal")
    assert not (tmp_path / "clips" / "dev-x" / "e-bad.flac").exists()
    q.close()
    tr.stop()
    srv.stop()
    store.close()


def test_home_assistant_discovery(tmp_path, broker, tiny_bundle, keys, capsys) -> None:
    priv, pub = keys
    db = tmp_path / "server.sqlite"
    sub = MosquittoSub(broker.port, tmp_path / "ha.txt", topic="homeassistant/#")
    store = ServerStore(db)
    tr = MqttTransport(broker.url, "edge-retrieval-server", clean_session=False, max_backoff_s=2)
    ha = HaDiscovery(tr, store, off_delay_s=45)
    srv = FleetServer(store, tr, ha=ha)
    srv.start()
    wait_for(lambda: tr.connected, 10, "server connection")
    alert = _add_alert(capsys, tiny_bundle.root, broker.url, db, priv)
    daemon, agent, rec = _device(tmp_path, broker.url, tiny_bundle.root, pub, beeps=2, clips=False)
    agent.start()
    wait_for(lambda: len(daemon.matcher) == 1, 15, "the query")
    oid = f"edge_retrieval_dev-1_{alert['id']}"
    cfg_topic = f"homeassistant/binary_sensor/{oid}/config"
    state_topic = f"homeassistant/binary_sensor/{oid}/state"
    wait_for(lambda: any(t == cfg_topic and p for _, t, p in sub.messages()), 15, "the discovery config")
    cfg = json.loads(next(p for _, t, p in sub.messages() if t == cfg_topic and p))
    assert cfg["name"] == "beep" and cfg["unique_id"] == oid and cfg["state_topic"] == state_topic
    assert cfg["device_class"] == "sound" and cfg["off_delay"] == 45
    assert cfg["availability"][0]["topic"] == status_topic("dev-1")
    assert cfg["device"]["identifiers"] == ["edge_retrieval_dev-1"]
    # retained: a client that connects later gets it
    retained = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", "homeassistant/#", "-v",
                               "--retained-only", "-W", "1"], capture_output=True, text=True)
    assert cfg_topic in retained.stdout

    daemon.start()
    daemon.join(60)
    finals = [e for e in rec.events if e.final]
    assert len(finals) == 2
    wait_for(lambda: [p for _, t, p in sub.messages() if t == state_topic].count(b"OFF") == 2, 15, "OFF states")
    states = [p for r, t, p in sub.messages() if t == state_topic]
    assert states == [b"ON", b"OFF", b"ON", b"OFF"], states
    assert not any(r for r, t, _ in sub.messages() if t == state_topic)  # states are not retained

    # removing the alert clears the retained config (empty payload)
    assert cli_main(["alerts", "remove", alert["id"], "--broker", broker.url, "--db", str(db), "--key", str(priv)]) == 0
    capsys.readouterr()
    wait_for(lambda: any(t == cfg_topic and p == b"" for _, t, p in sub.messages()), 15, "the cleared config")
    retained = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", "homeassistant/#", "-v",
                               "--retained-only", "-W", "1"], capture_output=True, text=True)
    assert cfg_topic not in retained.stdout
    agent.stop()
    sub.close()
    srv.stop()
    store.close()


def test_example_acl_allows_clips_and_discovery(tmp_path, tls_broker, tls_material) -> None:
    """The shipped ACL: a device writes its own clips but no discovery; the server writes
    discovery; the Home Assistant user reads configs and the devices' availability."""
    from edge_retrieval.protocol import Status
    from edge_retrieval.server import AlertManager
    from edge_retrieval.transport import TlsFiles, Will
    from tests.test_mqtt_security import _query

    mat = tls_material

    def tls(user: str) -> TlsFiles:
        return TlsFiles(mat.ca, mat.client_cert[user], mat.client_key[user])

    store = ServerStore(tmp_path / "server.sqlite")
    tr = MqttTransport(tls_broker.url, "edge-retrieval-server", tls=tls("server"),
                       credentials=("server", mat.passwords["server"]), clean_session=False, max_backoff_s=2)
    srv = FleetServer(store, tr, ha=HaDiscovery(tr, store))
    srv.start()
    seen: list[tuple[str, bytes]] = []
    hac = MqttTransport(tls_broker.url, "ha", tls=tls("homeassistant"),
                        credentials=("homeassistant", mat.passwords["homeassistant"]), clean_session=True)
    for t in ("homeassistant/#", status_topic("+")):
        hac.subscribe(t, lambda t, p, r: seen.append((t, p)))
    hac.start()
    online = Will(status_topic("dev-1"), Status(type="state", state="online", device="dev-1").to_json().encode())
    dev = MqttTransport(tls_broker.url, "dev-1", tls=tls("dev-1"), credentials=("dev-1", mat.passwords["dev-1"]),
                        online=online, clean_session=True)
    dev.start()
    wait_for(lambda: tr.connected and hac.connected and dev.connected, 15, "three TLS links")
    wait_for(lambda: any(t == status_topic("dev-1") for t, _ in seen), 10, "availability readable by HA")
    # a device may not write discovery; the server's config arrives, the device's never does
    dev.publish_wait("homeassistant/binary_sensor/evil/config", b'{"name": "evil"}', qos=1, retain=True)
    wait_for(lambda: store.device("dev-1") is not None, 10, "the device seen at the server")
    AlertManager(store, tr).publish(_query("0" * 64, 10), "group", "site-a")
    cfg_topic = "homeassistant/binary_sensor/edge_retrieval_dev-1_beep/config"
    wait_for(lambda: any(t == cfg_topic and p for t, p in seen), 10, "the server's discovery config")
    assert not any("evil" in t for t, _ in seen)
    # a device writes its own clip topic; the server stores it
    import numpy as np

    f = tmp_path / "c.flac"
    sf.write(str(f), np.zeros(800), 8000, format="FLAC")
    from edge_retrieval.protocol import Event, detections_topic

    ev = Event(event_id="e1", device="dev-1", query_id="beep", query="beep", score=0.6, start_s=0, end_s=1,
               time="2026-01-01T00:00:00Z", source="file:x", final=True)
    dev.publish_wait(detections_topic("dev-1"), ev.to_json(), qos=1)  # clips only of its own detections
    dev.publish_wait(clip_topic("dev-1", "e1"), f.read_bytes(), qos=1)
    wait_for(lambda: srv.counts["clips"] == 1, 10, "the clip at the server")
    for t in (dev, hac):
        t.stop()
    srv.stop()
    store.close()


def test_server_cli_refuses_a_bad_ha_prefix(tmp_path, capsys) -> None:
    rc = cli_main(["server", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "s.sqlite"),
                   "--ha-discovery", "--ha-prefix", "home assistant/#"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and "--ha-prefix 'home assistant/#' is not valid" in err
