"""Issue 12 regressions that need no broker: wire bounds, the server store's keys and quota, the
webhook's queue and failure handling, escaping, query binding and expiry on the device."""

from __future__ import annotations

import csv
import http.server
import io
import json
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.cli.commands.detections import csv_cell
from edge_retrieval.device.query_store import QueryStore
from edge_retrieval.errors import QueryRejected
from edge_retrieval.protocol import (
    Event,
    QueryMessage,
    encode_sparse,
    group_query_topic,
    parse_event,
    parse_status,
    printable,
    sign_message,
)
from edge_retrieval.server import ServerStore, Webhook
from edge_retrieval.server.webhook import redact_url
from edge_retrieval.transport import wait_until


def _event(device: str = "dev-1", eid: str = "e1", **kw: object) -> Event:
    d: dict[str, object] = dict(event_id=eid, device=device, query_id="q", query="beep", score=0.5, start_s=1.0,
                                end_s=2.0, time="2026-01-01T00:00:00Z", source="mic:x")
    d.update(kw)
    return Event(**d)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- item 8: NaN, inf, bools


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_scores_refused(raw: str) -> None:
    good = _event().to_json()
    with pytest.raises(QueryRejected, match="score"):
        parse_event(good.replace('"score": 0.5', f'"score": {raw}'))


def test_bools_are_strict() -> None:
    good = json.loads(_event().to_json())
    with pytest.raises(QueryRejected, match="final"):
        parse_event(json.dumps({**good, "final": "no"}))


def test_low_disk_only_on_true(tmp_path: Path) -> None:
    store = ServerStore(tmp_path / "s.sqlite")
    st = parse_status(json.dumps({"schema": 1, "type": "health", "device": "dev-1", "health": {"low_disk": "no"}}))
    assert store.apply_status(st) == [] and store.device("dev-1")["low_disk"] is False
    st = parse_status(json.dumps({"schema": 1, "type": "health", "device": "dev-1", "health": {"low_disk": True}}))
    assert [n["kind"] for n in store.apply_status(st)] == ["low_disk"]


# --------------------------------------------------------------------------- item 4: bounds


@pytest.mark.parametrize(("field", "value"), [("query", "x" * 501), ("source", "s" * 257), ("site", "s" * 257),
                                              ("device", "a/b"), ("event_id", "e" * 65), ("lat", 91.0)])
def test_event_fields_are_bounded(field: str, value: object) -> None:
    d = json.loads(_event().to_json())
    d[field] = value
    with pytest.raises(QueryRejected, match=field):
        parse_event(json.dumps(d))


def test_oversized_status_refused() -> None:
    body = json.dumps({"schema": 1, "type": "health", "device": "dev-1", "health": {"x": "y" * 70_000}})
    with pytest.raises(QueryRejected, match="limit"):
        parse_status(body)


# --------------------------------------------------------------------------- item 3: keys


def test_another_device_cannot_touch_a_detection(tmp_path: Path) -> None:
    store = ServerStore(tmp_path / "s.sqlite")
    assert store.upsert_event(_event("dev-1", "e1", score=0.4))
    # dev-2 reuses the event id on its own topic: a separate row, dev-1's row unchanged
    assert store.upsert_event(_event("dev-2", "e1", score=0.99, final=True, clip="evil.flac"))
    store.save_clip("e1", "dev-2", tmp_path / "evil.flac", 10)
    rows = {r["device"]: r for r in store.detections()}
    assert rows["dev-1"]["score"] == 0.4 and rows["dev-1"]["final"] is False
    assert rows["dev-1"]["clip"] is None and rows["dev-1"]["clip_path"] is None
    assert rows["dev-2"]["clip_path"] == str(tmp_path / "evil.flac")


def test_old_database_migrates_to_device_keys(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "old.sqlite"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE detections (event_id TEXT PRIMARY KEY, device TEXT NOT NULL, query_id TEXT NOT NULL, "
              "query TEXT NOT NULL, score REAL NOT NULL, start_s REAL NOT NULL, end_s REAL NOT NULL, time TEXT NOT NULL, "
              "clock TEXT NOT NULL, source TEXT NOT NULL, final INTEGER NOT NULL, clip TEXT, site TEXT, lat REAL, "
              "lon REAL, received TEXT NOT NULL, updated TEXT NOT NULL, messages INTEGER NOT NULL)")
    c.execute("INSERT INTO detections VALUES ('e1','dev-1','q','beep',0.5,1,2,'t','unknown','s',1,NULL,NULL,NULL,"
              "NULL,'2026-01-01T00:00:00.000Z','r',1)")
    c.commit()
    c.close()
    store = ServerStore(db)
    assert [r["event_id"] for r in store.detections()] == ["e1"]
    assert store.upsert_event(_event("dev-2", "e1"))  # a new row: the key now includes the device


def test_clip_quota_and_retention(tmp_path: Path) -> None:
    store = ServerStore(tmp_path / "s.sqlite")
    for i in range(5):
        store.upsert_event(_event("dev-1", f"e{i}"))
        store.save_clip(f"e{i}", "dev-1", tmp_path / f"e{i}.flac", 100)
    store.save_clip("x", "dev-2", tmp_path / "x.flac", 1000)
    gone = store.prune_clips("dev-1", max_bytes=250, max_age_days=90)
    assert len(gone) == 3  # the newest two fit in 250 bytes
    time.sleep(0.01)
    assert len(store.prune_clips("dev-1", max_bytes=10**9, max_age_days=0)) == 2  # retention 0 days: all go
    assert store.prune_clips("dev-2", max_bytes=10**9, max_age_days=90) == []  # another device is untouched


# --------------------------------------------------------------------------- items 5, 4, 9: webhook


class _Gateway(http.server.BaseHTTPRequestHandler):
    """A phone gateway that misbehaves in turn: ``script`` lists what each POST gets."""

    script: list[str] = []
    got: list[tuple[str, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.script.pop(0) if self.script else "ok"
        if action == "garbage":
            self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")  # a malformed reply: BadStatusLine
            return
        if action == "close":
            self.close_connection = True  # no reply at all: RemoteDisconnected
            return
        if action == "redirect":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
            self.end_headers()
            return
        if action == "500":
            self.send_response(500)
            self.end_headers()
            return
        type(self).got.append(("POST", body))
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        type(self).got.append(("GET", {}))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway():
    _Gateway.script, _Gateway.got = [], []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


def test_webhook_survives_bad_replies_and_refuses_redirects(gateway, tmp_path: Path) -> None:
    _Gateway.script = ["garbage", "close", "redirect", "500"]
    url = f"http://127.0.0.1:{gateway.server_address[1]}/hook/SECRET-TOKEN?key=SECRET"
    wh = Webhook(url, tmp_path / "q.sqlite", min_backoff_s=0.05, max_backoff_s=0.2)
    wh.post({"type": "detection", "event": {"device": "dev-1", "n": 1}})
    assert wait_until(lambda: wh.sent == 1, 20), (wh.sent, wh.attempts_failed)
    assert wh.attempts_failed == 4 and wh._thread.is_alive()
    assert _Gateway.got == [("POST", {"type": "detection", "event": {"device": "dev-1", "n": 1}})]  # no GET
    assert "SECRET" not in wh.display and wh.display == f"http://127.0.0.1:{gateway.server_address[1]}/..."
    wh.close()


def test_webhook_queue_persists_and_is_fair(gateway, tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/unreachable"  # nothing listens: every attempt fails
    wh = Webhook(url, tmp_path / "q.sqlite", per_device=50, min_backoff_s=60)
    for i in range(200):
        wh.post({"type": "detection", "event": {"device": "noisy", "n": i}})
    wh.post({"type": "detection", "event": {"device": "quiet", "n": 0}})
    wh.post({"type": "notice", "device": "bad", "detail": float("nan")})  # not JSON: dropped, counted
    assert wh.depth() == 51 and wh.dropped == 151
    wh.close()
    # the same queue, now with a working gateway: everything waiting is delivered, devices in turn
    wh = Webhook(f"http://127.0.0.1:{gateway.server_address[1]}/hook", tmp_path / "q.sqlite")
    assert wait_until(lambda: wh.sent == 51, 20), wh.sent
    devices = [b["event"]["device"] for _, b in _Gateway.got]
    assert devices.index("quiet") <= 1  # not behind the noisy device's 50
    assert [b["event"]["n"] for _, b in _Gateway.got if b["event"]["device"] == "noisy"] == list(range(150, 200))
    wh.close()


def test_redact_url() -> None:
    assert redact_url("https://user:pw@hooks.example.com:8443/t/ABC?x=1") == "https://hooks.example.com:8443/..."
    assert redact_url("http://gw.local") == "http://gw.local"


# --------------------------------------------------------------------------- item 9: escaping


def test_device_strings_escaped_in_logs_terminal_and_csv(tmp_path: Path) -> None:
    assert printable("a\nFAKE LOG LINE\x1b[2J\u202e") == "a\\nFAKE LOG LINE\\x1b[2J\\u202e"
    for bad in ("=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)"):
        assert csv_cell(bad).startswith("'")
    assert csv_cell(-0.25) == -0.25 and csv_cell("beep") == "beep"
    store = ServerStore(tmp_path / "s.sqlite")
    store.upsert_event(_event(query="=cmd|' /C calc'!A0\x1b[31m"))
    store.close()
    import subprocess

    r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "detections", "--db", str(tmp_path / "s.sqlite"),
                        "--csv"], capture_output=True, text=True, timeout=60)
    row = next(csv.DictReader(io.StringIO(r.stdout)))
    assert row["query"].startswith("'=") and "\x1b" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "detections", "--db", str(tmp_path / "s.sqlite")],
                       capture_output=True, text=True, timeout=60)
    assert "\x1b" not in r.stdout and "\\x1b[31m" in r.stdout


# --------------------------------------------------------------------------- items 2 and 7 on the device


class _Target:
    def __init__(self) -> None:
        self.active: dict[str, int] = {}

    def apply_query(self, msg: QueryMessage) -> None:
        self.active[msg.query_id] = msg.version

    def remove_query(self, query_id: str) -> None:
        self.active.pop(query_id, None)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _msg(where: str, version: int, **kw: object) -> QueryMessage:
    d: dict[str, object] = {
        "schema": 1, "query_id": "beep", "version": version, "text": "beep", "space_id": "0" * 64,
        "vectors": [encode_sparse("tones", np.array([1]), np.array([1.0])).model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5, "topic": where, "created": _iso(datetime.now(timezone.utc)),
    }
    d.update(kw)
    return QueryMessage.model_validate(d)


@pytest.fixture
def keys():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    k = Ed25519PrivateKey.generate()
    return k, k.public_key()


def test_signed_query_bound_to_its_topic(tmp_path: Path, keys) -> None:
    priv, pub = keys
    target = _Target()
    qs = QueryStore(tmp_path / "q.sqlite", target, device="dev-1", public_key=pub)
    dev_topic = "edge-retrieval/v1/devices/dev-2/queries/beep"
    replay = sign_message(_msg(dev_topic, 5), priv).to_json()
    assert qs.handle(group_query_topic("site-a", "beep"), replay) == "rejected"
    assert "signed for" in (qs.last_rejection or "") and target.active == {}
    unbound = sign_message(_msg(group_query_topic("site-a", "beep"), 5, topic=None), priv).to_json()
    assert qs.handle(group_query_topic("site-a", "beep"), unbound) == "rejected"
    ok = sign_message(_msg(group_query_topic("site-a", "beep"), 5), priv).to_json()
    assert qs.handle(group_query_topic("site-a", "beep"), ok) == "applied"


def test_expiry_enforced_while_running(tmp_path: Path, keys) -> None:
    priv, pub = keys
    target = _Target()
    qs = QueryStore(tmp_path / "q.sqlite", target, device="dev-1", public_key=pub)
    now = datetime.now(timezone.utc)
    topic = group_query_topic("site-a", "beep")
    msg = sign_message(_msg(topic, 5, expires=_iso(now + timedelta(minutes=5))), priv).to_json()
    assert qs.handle(topic, msg) == "applied"
    qs.clock = lambda: now + timedelta(minutes=4)
    qs.tick()
    assert target.active == {"beep": 5}
    qs.clock = lambda: now + timedelta(minutes=6)
    qs.tick()
    assert target.active == {} and qs.counts["expired"] == 1


def test_clock_behind_holds_the_query(tmp_path: Path, keys) -> None:
    priv, pub = keys
    target = _Target()
    qs = QueryStore(tmp_path / "q.sqlite", target, device="dev-1", public_key=pub)
    real_now = datetime.now(timezone.utc) + timedelta(days=2)  # the server's time; this device is 2 days behind
    topic = group_query_topic("site-a", "beep")
    msg = sign_message(_msg(topic, 5, created=_iso(real_now), expires=_iso(real_now + timedelta(hours=1))), priv)
    assert qs.handle(topic, msg.to_json()) == "rejected" and "clock behind" in (qs.last_rejection or "")
    qs.tick()  # still behind
    assert target.active == {}
    qs.clock = lambda: real_now  # the clock caught up (NTP): the held message applies
    qs.tick()
    assert target.active == {"beep": 5}
    qs.clock = lambda: real_now + timedelta(hours=2)
    qs.tick()
    assert target.active == {}


def test_alerts_stored_before_topic_binding_are_re_signed(tmp_path: Path, keys) -> None:
    from edge_retrieval.protocol import verify_signature
    from edge_retrieval.server import AlertManager
    from edge_retrieval.transport import MqttTransport

    priv, pub = keys
    store = ServerStore(tmp_path / "s.sqlite")
    old = sign_message(_msg(group_query_topic("site-a", "beep"), 5, topic=None), priv)
    store.save_alert("beep", "beep", "group", "site-a", old)
    link = MqttTransport("mqtt://127.0.0.1:1", "unused")  # never started: publishes are skipped
    AlertManager(store, link, priv).republish()
    msg = QueryMessage.model_validate_json(store.alert("beep")["message"])
    verify_signature(msg, pub)
    assert msg.topic == group_query_topic("site-a", "beep") and msg.version > 5
