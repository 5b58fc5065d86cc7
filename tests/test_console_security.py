"""Console access rules against the real app and a real database (no broker needed here).

Every route without a session -> 401 (API, changes) or a redirect to /login (pages); a change
without its CSRF token -> 403; a viewer cannot add alerts or give feedback; a device-supplied
string with ``<script>`` is escaped; login is rate-limited; logout ends the session.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from edge_retrieval.console import Console, make_app  # noqa: E402
from edge_retrieval.console.app import ROUTES  # noqa: E402
from edge_retrieval.protocol import Event, Status  # noqa: E402
from edge_retrieval.server import AlertManager, ServerStore  # noqa: E402
from edge_retrieval.server.feedback import Feedback  # noqa: E402
from edge_retrieval.server.store_pg import open_store  # noqa: E402
from edge_retrieval.server.users import Users  # noqa: E402

PASSWORD = "correct horse battery"
EVIL = '<script>alert("x")</script>'


@pytest.fixture(params=["sqlite", "postgresql"])
def app(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    """The console on the server's own database: a SQLite file, or a real PostgreSQL (tests/fixtures_postgres)."""
    if request.param == "sqlite":
        store = ServerStore(tmp_path / "server.sqlite")
        db: str | Path = store.path
    else:
        db = request.getfixturevalue("postgres_url")
        store = open_store(db)
    alerts = AlertManager(store, None)
    users = Users(db)
    users.add("ranger1", "ranger", PASSWORD)
    users.add("viewer1", "viewer", PASSWORD)
    fb = Feedback(db, alerts)
    ev = Event(event_id="e1", device="dev1", query_id="q1", query=EVIL, score=0.9, start_s=1, end_s=4,
               time="2026-01-01T00:00:00Z", source=EVIL, final=True, site=EVIL)
    store.upsert_event(ev)
    store.apply_status(Status(type="health", device="dev1", state="online", health={"rtf": 0.1, "clock": "synced"}))
    return make_app(Console(store, alerts, fb, users))


def login(client: TestClient, name: str, password: str = PASSWORD) -> int:
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"csrf": token, "name": name, "password": password, "next": "/"},
                    follow_redirects=False)
    return r.status_code


def csrf_of(client: TestClient) -> str:
    return client.get("/api/me").json()["csrf"]


def _concrete(path: str) -> str:
    return path.replace("{device}", "dev1").replace("{event_id}", "e1").replace("{alert_id}", "q1")


def test_every_route_needs_a_session(app) -> None:  # noqa: ANN001
    client = TestClient(app)
    checked = 0
    for route in ROUTES:
        assert isinstance(route, Route)
        if route.path == "/login":
            continue
        for method in sorted(route.methods - {"HEAD"}):
            r = client.request(method, _concrete(route.path), follow_redirects=False)
            if method == "GET" and not route.path.startswith("/api/"):
                assert r.status_code == 303 and r.headers["location"].startswith("/login"), (method, route.path)
            else:
                assert r.status_code == 401, (method, route.path, r.status_code)
            checked += 1
    assert checked >= 20
    assert client.get("/static/htmx.min.js").status_code == 200  # static files stay public


def test_forms_without_csrf_are_refused(app) -> None:  # noqa: ANN001
    client = TestClient(app)
    assert login(client, "ranger1") == 303
    for path, data in (("/alerts/preview", {"text": "siren", "threshold": "0.3", "target": "g"}),
                       ("/detections/dev1/e1/feedback", {"kind": "false_alarm"}),
                       ("/alerts/q1/threshold", {"threshold": "0.5"}), ("/alerts/q1/remove", {}), ("/logout", {})):
        assert client.post(path, data=data).status_code == 403, path
        assert client.post(path, data={**data, "csrf": "wrong"}).status_code == 403, path
    assert client.delete("/api/alerts/q1").status_code == 403
    # the login form has its own token
    assert client.post("/login", data={"name": "ranger1", "password": PASSWORD}).status_code == 403
    # with the token the same request gets past CSRF (and fails on the missing alert instead)
    r = client.post("/alerts/q1/remove", data={"csrf": csrf_of(client)}, headers={"hx-request": "1"})
    assert r.status_code == 400 and "no active alert" in r.text


def test_device_strings_render_as_text(app) -> None:  # noqa: ANN001
    client = TestClient(app)
    login(client, "viewer1")
    for page in ("/detections", "/devices"):
        html = client.get(page).text
        assert "<script>alert" not in html, page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in client.get("/detections").text
    assert "script-src 'self'" in client.get("/detections").headers["content-security-policy"]


def test_viewer_reads_but_cannot_change(app) -> None:  # noqa: ANN001
    client = TestClient(app)
    assert login(client, "viewer1") == 303
    token = csrf_of(client)
    assert client.get("/api/detections").json()[0]["event_id"] == "e1"
    assert client.get("/api/devices").json()[0]["state"] == "online"
    h = {"X-CSRF-Token": token}
    assert client.post("/api/alerts", json={"text": "siren", "threshold": 0.3, "target": "g"}, headers=h).status_code == 403
    assert client.post("/alerts/preview", data={"csrf": token, "text": "siren", "threshold": "0.3",
                                                "target": "g"}).status_code == 403
    assert client.post("/api/detections/dev1/e1/feedback", json={"kind": "false_alarm"}, headers=h).status_code == 403
    assert client.patch("/api/alerts/q1", json={"threshold": 0.5}, headers=h).status_code == 403
    assert "False alarm" not in client.get("/detections").text


def test_login_is_rate_limited(app) -> None:  # noqa: ANN001
    client = TestClient(app)
    for _ in range(5):
        assert login(client, "ranger1", "wrong password!") == 401
    assert login(client, "ranger1") == 429  # even the right password, for a while
    assert login(client, "viewer1") == 429  # and other names from the same address


def test_logout_ends_the_session(app) -> None:  # noqa: ANN001
    other = TestClient(app)
    assert login(other, "viewer1") == 303
    cookie = other.cookies.get("er_session")
    page = other.get("/detections")
    assert page.status_code == 200
    assert "httponly" in other.get("/login").headers["set-cookie"].lower()
    r = other.post("/logout", data={"csrf": csrf_of(other)}, follow_redirects=False)
    assert r.status_code == 303
    fresh = TestClient(app, cookies={"er_session": cookie})  # the old cookie no longer works
    assert fresh.get("/api/me").status_code == 401


def test_session_cookie_flags(app) -> None:  # noqa: ANN001
    client = TestClient(app)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"csrf": token, "name": "viewer1", "password": PASSWORD}, follow_redirects=False)
    cookie = [c for c in r.headers.get_list("set-cookie") if c.startswith("er_session=")][0].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_users_cli(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from edge_retrieval.cli import main as cli_main

    db = tmp_path / "s.sqlite"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    assert cli_main(["users", "add", "alice", "--role", "ranger", "--password-file", str(pw), "--db", str(db)]) == 0
    assert cli_main(["users", "add", "alice", "--password-file", str(pw), "--db", str(db)]) == 1
    assert "exists" in capsys.readouterr().err
    pw.write_text("short\n")
    assert cli_main(["users", "add", "bob", "--password-file", str(pw), "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert "at least 10" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["users", "list", "--db", str(db)]) == 0
    assert "alice" in capsys.readouterr().out and Users(db).verify("alice", PASSWORD)
    assert not Users(db).verify("alice", "wrong password")
    assert "$argon2id$" in __import__("sqlite3").connect(db).execute("SELECT hash FROM users").fetchone()[0]
