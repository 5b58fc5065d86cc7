"""The console on a fleet server whose database is PostgreSQL (issue 13 with issue 16's scale-out).

Two real server processes (``server --db postgresql://... --http``, a real Mosquitto, a real
PostgreSQL) share one database: an account made with ``users add --db postgresql://...`` logs in
on either, a session opened on one is valid on the other, a detection a device sends with its
window vectors can be marked a false alarm from either console, and the alert is re-signed with a
new version carrying that negative. Logging out on one ends the session on both.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from edge_retrieval.cli import main as cli_main  # noqa: E402
from edge_retrieval.protocol import (  # noqa: E402
    SCHEMA,
    Event,
    QueryMessage,
    detections_topic,
    encode_dense,
    encode_sparse,
)
from edge_retrieval.server import AlertManager  # noqa: E402
from edge_retrieval.server.store_pg import open_store  # noqa: E402
from edge_retrieval.server.users import Users  # noqa: E402
from edge_retrieval.transport import MqttTransport  # noqa: E402
from tests.fixtures_broker import free_port  # noqa: E402
from tests.mqtt_helpers import wait_for  # noqa: E402

PASSWORD = "correct horse battery"


def _server(tmp_path: Path, name: str, broker_url: str, db: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_retrieval.cli", "server", "--broker", broker_url, "--db", db,
         "--client-id", name, "--clips-dir", str(tmp_path / "clips"), "--http", f"127.0.0.1:{port}"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, f"http://127.0.0.1:{port}", log


def _login(client: httpx.Client) -> None:
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"csrf": token, "name": "ranger1", "password": PASSWORD, "next": "/"})
    assert r.status_code == 303, r.text


def test_console_on_a_postgres_fleet(tmp_path: Path, broker, postgres_url: str) -> None:  # noqa: ANN001
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    assert cli_main(["users", "add", "ranger1", "--role", "ranger", "--password-file", str(pw),
                     "--db", postgres_url]) == 0
    assert Users(postgres_url).verify("ranger1", PASSWORD)  # in PostgreSQL, argon2id-hashed

    # an alert, stored in the shared database and published (by an operator's process, not a server)
    store = open_store(postgres_url)
    link = MqttTransport(broker.url, "operator", clean_session=True)
    link.start()
    wait_for(lambda: link.connected, 10, "operator connection")
    alerts = AlertManager(store, link)
    msg = QueryMessage.model_validate({
        "schema": SCHEMA, "query_id": "saw", "version": 1, "text": "chainsaw", "space_id": "0" * 64,
        "vectors": [encode_sparse("tones", [1, 2], [0.6, 0.4]).model_dump(exclude_none=True),
                    encode_dense("bands", np.ones(4), "f32").model_dump(exclude_none=True)],
        "weights": [0.5, 0.5], "threshold": 0.3})
    alerts.publish(msg, "group", "site-a")

    servers = [_server(tmp_path, f"srv-{i}", broker.url, postgres_url) for i in range(2)]
    try:
        for proc, _, log in servers:
            wait_for(lambda log=log, proc=proc: "console http" in log.read_text() or proc.poll() is not None, 60,
                     "a server with its console")
            assert proc.poll() is None, log.read_text()
        (_, base_a, _), (_, base_b, _) = servers

        # a device's detection, final, with its window's vectors
        vec = [encode_sparse("tones", [3], [1.0]), encode_dense("bands", np.arange(4.0), "f16")]
        ev = Event(event_id="e1", device="dev-1", query_id="saw", query="chainsaw", score=0.7, start_s=1.0,
                   end_s=4.0, time="2026-01-01T00:00:00Z", source="mic", final=True, vectors=vec)
        dev = MqttTransport(broker.url, "dev-1", clean_session=True)
        dev.start()
        wait_for(lambda: dev.connected, 10, "device connection")
        dev.publish(detections_topic("dev-1"), ev.to_json(), qos=1)

        with httpx.Client(base_url=base_a) as a, httpx.Client(base_url=base_b) as b:
            assert a.get("/api/detections").status_code == 401  # no session yet
            _login(a)
            # the session lives in PostgreSQL: server B honours A's cookie
            b.cookies.set("er_session", a.cookies.get("er_session"))
            me = b.get("/api/me")
            assert me.status_code == 200 and me.json()["name"] == "ranger1"
            wait_for(lambda: any(d["event_id"] == "e1" for d in b.get("/api/detections").json()), 20,
                     "the detection in either console")
            # "false alarm" on server B, with A's session and CSRF token
            r = b.post("/api/detections/dev-1/e1/feedback", json={"kind": "false_alarm"},
                       headers={"X-CSRF-Token": me.json()["csrf"]})
            assert r.status_code == 200, r.text
            version = r.json()["version"]
            assert r.json() == {"alert": "saw", "version": version, "kind": "false_alarm"}
            assert version > 2**31  # milliseconds since the epoch: needs PostgreSQL's BIGINT
            held = store.alert("saw")
            assert held is not None and held["version"] == version
            negs = json.loads(held["message"])["negatives"]
            assert [n["event_id"] for n in negs] == ["e1"]
            assert {v["expert"] for v in negs[0]["vectors"]} == {"tones", "bands"}
            # server A reads the same feedback count
            row = next(x for x in a.get("/api/alerts").json() if x["id"] == "saw")
            assert row["version"] == version and row["negatives"] == 1
            assert row["feedback"] == {"false_alarm": 1, "correct": 0}

            # logging out on A ends the session on B too
            csrf = a.get("/api/me").json()["csrf"]
            assert a.post("/logout", data={"csrf": csrf}).status_code in (200, 303)
            assert b.get("/api/me").status_code == 401
        dev.stop()
    finally:
        link.stop()
        for proc, _, _ in servers:
            proc.terminate()
        for proc, _, _ in servers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.close()
