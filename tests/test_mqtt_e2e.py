"""Server -> device -> server over a real Mosquitto, with the real daemon and the tiny bundle.

An alert is added with the real CLI (`alerts add`, text side of the tiny bundle), the device
agent applies the signed retained query, a recording with beeps is played into the daemon from a
file, and the detections land in the server's SQLite. An outside client (mosquitto_sub) checks
the documented payloads; a local HTTP server receives the webhook posts.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_retrieval.cli import main as cli_main
from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.query_store import load_public_key
from edge_retrieval.protocol import (
    Status,
    detections_topic,
    parse_event,
    parse_query_message,
    parse_status,
    status_topic,
    verify_signature,
)
from edge_retrieval.server import Webhook
from tests.mqtt_helpers import MosquittoSub, Recorder, beep_scene, device_config, start_server, wait_for


class _Hook(http.server.BaseHTTPRequestHandler):
    posts: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        n = int(self.headers.get("Content-Length", 0))
        type(self).posts.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def webhook_url():
    _Hook.posts = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/hook"
    httpd.shutdown()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate(tmp_path / "keys")


def _add_alert(capsys, bundle: Path, url: str, db: Path, key: Path, text: str = "beep",
               target: tuple[str, str] = ("--group", "site-a")) -> dict:
    rc = cli_main(["alerts", "add", text, "--threshold", "0.5", *target, "--bundle", str(bundle),
                   "--broker", url, "--db", str(db), "--key", str(key), "--cooldown-s", "0", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_alert_to_device_to_server(tmp_path, broker, tiny_bundle, keys, capsys, webhook_url) -> None:
    priv, pub = keys
    db = tmp_path / "server.sqlite"
    sub = MosquittoSub(broker.port, tmp_path / "sub.txt")
    srv, store = start_server(broker.url, db, webhook=Webhook(webhook_url))
    alert = _add_alert(capsys, tiny_bundle.root, broker.url, db, priv)
    assert alert["target_kind"] == "group" and alert["target"] == "site-a"

    audio = beep_scene(tmp_path / "beeps.wav", beeps=3)
    _, cfg = device_config(tmp_path, broker.url, tiny_bundle.root, audio, public_key=pub, realtime=False)
    from edge_retrieval.device.agent import DeviceAgent

    rec = Recorder()
    daemon = Daemon.from_config(cfg, sinks=[rec])
    agent = DeviceAgent(cfg, daemon)
    daemon.add_sink(agent)
    agent.start()
    wait_for(lambda: len(daemon.matcher) == 1, 15, "the retained query to reach the device")
    daemon.start()
    daemon.join(60)
    finals = {e.event_id for e in rec.events if e.final}
    assert len(finals) == 3, [(e.start_s, e.score) for e in rec.events]
    wait_for(lambda: {r["event_id"] for r in store.detections() if r["final"]} == finals, 20,
             "the detections to reach the server")
    rows = store.detections()
    assert len(rows) == 3 and all(r["device"] == "dev-1" and r["query_id"] == alert["id"] for r in rows)
    assert all(r["score"] > 0.5 for r in rows)

    # the device's health reached the server; a graceful stop is recorded as offline
    wait_for(lambda: (d := store.device("dev-1")) and d["health"] and d["health"].get("queries") == 1, 10,
             "health with the applied query")
    agent.stop()
    wait_for(lambda: store.device("dev-1")["state"] == "offline", 10, "the offline state")
    assert [n["kind"] for n in store.notices("dev-1")][-1] == "offline"

    # webhook: one post per detection, and the offline notice
    wait_for(lambda: sum(p["type"] == "detection" for p in _Hook.posts) == 3, 10, "webhook detections")
    wait_for(lambda: any(p["type"] == "notice" and p["kind"] == "offline" for p in _Hook.posts), 10, "notice")

    # the outside client saw the documented payloads
    msgs = sub.messages()
    sub.close()
    srv.stop()
    q = [parse_query_message(p) for r, t, p in msgs if t.endswith(f"/queries/{alert['id']}") and p]
    assert q and q[0].text == "beep" and q[0].space_id == tiny_bundle.manifest.space.id
    verify_signature(q[0], load_public_key(pub))
    evs = [parse_event(p) for _, t, p in msgs if t == detections_topic("dev-1")]
    assert {e.event_id for e in evs if e.final} == finals
    sts = [parse_status(p) for _, t, p in msgs if t == status_topic("dev-1")]
    kinds = [(s.type, s.state) for s in sts]
    assert ("state", "online") in kinds and ("health", "online") in kinds and kinds[-1] == ("state", "offline")


def test_alerts_cli_list_remove_and_detections(tmp_path, broker, tiny_bundle, keys, capsys) -> None:
    priv, pub = keys
    db = tmp_path / "server.sqlite"
    a = _add_alert(capsys, tiny_bundle.root, broker.url, db, priv, "whistle", ("--device", "dev-9"))
    # nothing fits: the alert is still made, with a warning
    rc = cli_main(["alerts", "add", "zebra crossing", "--threshold", "0.5", "--group", "g", "--bundle",
                   str(tiny_bundle.root), "--broker", broker.url, "--db", str(db), "--key", str(priv)])
    out = capsys.readouterr()
    assert rc == 0 and "warning" in out.err and "matches no label" in out.err
    assert "signed" in out.out
    assert cli_main(["alerts", "list", "--db", str(db), "--json"]) == 0
    listed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["id"] for x in listed} >= {a["id"]} and len(listed) == 2
    # removal: a signed tombstone that stays retained (devices booting later learn the removal)
    assert cli_main(["alerts", "remove", a["id"], "--broker", broker.url, "--db", str(db), "--key", str(priv)]) == 0
    capsys.readouterr()
    assert cli_main(["alerts", "list", "--db", str(db), "--json"]) == 0
    assert a["id"] not in capsys.readouterr().out
    retained = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", "edge-retrieval/v1/#", "-v",
                               "--retained-only", "-W", "1"], capture_output=True, text=True)
    kept = [ln.split(" ", 1) for ln in retained.stdout.splitlines() if a["id"] in ln]
    assert len(kept) == 1 and json.loads(kept[0][1])["deleted"] is True and json.loads(kept[0][1])["topic"] == kept[0][0]
    # a bad id: one line, non-zero
    assert cli_main(["alerts", "remove", "nope", "--broker", broker.url, "--db", str(db)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no active alert 'nope'" in err
    # detections from an empty store, and a bad --since
    assert cli_main(["detections", "--db", str(db), "--csv"]) == 0
    assert capsys.readouterr().out.startswith("event_id,device")
    assert cli_main(["detections", "--db", str(db), "--since", "yesterday"]) == 1
    assert "--since 'yesterday' is not valid" in capsys.readouterr().err


def test_keys_generate_permissions(tmp_path, capsys) -> None:
    assert cli_main(["keys", "generate", "--out", str(tmp_path / "k")]) == 0
    priv = tmp_path / "k" / "query-signing.key"
    assert priv.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes()
    assert b"PUBLIC KEY" in (tmp_path / "k" / "query-signing.pub").read_bytes()
    assert cli_main(["keys", "generate", "--out", str(tmp_path / "k")]) == 1  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_broker_outage_loses_and_duplicates_nothing(tmp_path, broker, tiny_bundle, keys, capsys) -> None:
    priv, pub = keys
    db = tmp_path / "server.sqlite"
    srv, store = start_server(broker.url, db)
    _add_alert(capsys, tiny_bundle.root, broker.url, db, priv)
    audio = beep_scene(tmp_path / "beeps.wav", beeps=6)  # 16 s played in real time
    _, cfg = device_config(tmp_path, broker.url, tiny_bundle.root, audio, public_key=pub, realtime=True)
    from edge_retrieval.device.agent import DeviceAgent

    rec = Recorder()
    daemon = Daemon.from_config(cfg, sinks=[rec])
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.transport.set_backoff(1, 2)
    agent.start()
    wait_for(lambda: len(daemon.matcher) == 1, 15, "the query")
    daemon.start()
    wait_for(lambda: store.detections(), 20, "a first detection at the server")
    broker.stop()
    down = time.monotonic()
    daemon.join(60)
    queued = agent.outbox.depth()
    time.sleep(2.0)
    broker.start()
    outage = time.monotonic() - down
    finals = {e.event_id for e in rec.events if e.final}
    assert len(finals) == 6 and queued > 0
    wait_for(lambda: {r["event_id"] for r in store.detections() if r["final"]} == finals, 40,
             "every detection after the outage")
    rows = store.detections()
    assert len(rows) == 6 and len({r["event_id"] for r in rows}) == 6
    wait_for(lambda: agent.outbox.depth() == 0, 10, "an empty outbox")
    print(f"outage {outage:.1f} s, {queued} messages queued on the device, {len(rec.events)} emitted, "
          f"{sum(r['messages'] for r in rows)} received, {len(rows)} stored")
    agent.stop()
    srv.stop()


def test_last_will_marks_a_killed_device_offline(tmp_path, broker) -> None:
    srv, store = start_server(broker.url, tmp_path / "server.sqlite")
    code = (
        "import sys, time\n"
        "from edge_retrieval.transport import MqttTransport, Will\n"
        "from edge_retrieval.protocol import Status, status_topic\n"
        "d = 'dev-k'\n"
        "off = Will(status_topic(d), Status(type='state', state='offline', device=d).to_json().encode())\n"
        "on = Will(status_topic(d), Status(type='state', state='online', device=d).to_json().encode())\n"
        "t = MqttTransport(sys.argv[1], d, will=off, online=on)\n"
        "t.start(); t.wait_connected(10); print('up', flush=True); time.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, broker.url], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == b"up"
    wait_for(lambda: (d := store.device("dev-k")) and d["state"] == "online", 10, "online")
    p.kill()
    p.wait()
    wait_for(lambda: store.device("dev-k")["state"] == "offline", 15, "the last will")
    assert store.device("dev-k")["offline_since"]
    assert Status  # the will is a documented status message
    srv.stop()
