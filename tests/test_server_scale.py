"""The server on PostgreSQL: same store interface, idempotent upserts, and two server processes
sharing the fleet through MQTT 5 shared subscriptions on a real Mosquitto, one killed mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_retrieval.benchmarks.server_bench import run_case

from edge_retrieval.errors import StoreError
from edge_retrieval.protocol import Event, Status, new_event_id, utcnow
from edge_retrieval.server.store_pg import PgServerStore, open_store, redact


def _event(eid: str, score: float, final: bool, end_s: float = 1.0) -> Event:
    return Event(event_id=eid, device="dev-1", query_id="q", query="chainsaw", score=score, start_s=0.0,
                 end_s=end_s, time=utcnow(), source="test", final=final)


def test_postgres_store_upserts_once_and_keeps_the_merge_rules(postgres_url: str) -> None:
    store = open_store(postgres_url)
    assert isinstance(store, PgServerStore)
    eid = new_event_id()
    assert store.upsert_event(_event(eid, 0.6, final=False)) is True
    assert store.upsert_event(_event(eid, 0.9, final=True, end_s=4.0)) is False
    assert store.upsert_event(_event(eid, 0.5, final=False, end_s=2.0)) is False  # a late onset undoes nothing
    rows = store.detections()
    assert len(rows) == 1 and rows[0]["score"] == 0.9 and rows[0]["final"] is True and rows[0]["end_s"] == 4.0
    assert rows[0]["messages"] == 3
    notices = store.apply_status(Status(device="dev-1", type="state", state="offline", time=utcnow()))
    assert [n["kind"] for n in notices] == ["offline"] and store.device("dev-1")["state"] == "offline"
    assert [n["kind"] for n in store.notices(device="dev-1")] == ["offline"]
    store.close()


def test_a_bad_postgres_url_is_one_line_without_the_password(postgres_server: str) -> None:
    url = postgres_server.replace("postgres@", "postgres:s3cret@") + "/no_such_db"
    with pytest.raises(StoreError) as err:
        open_store(url)
    assert "s3cret" not in str(err.value) and "no_such_db" in str(err.value)
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


@pytest.mark.slow
def test_two_servers_share_the_fleet_and_a_killed_one_loses_nothing(broker, postgres_url: str,
                                                                    tmp_path: Path) -> None:
    r = run_case(broker.url, postgres_url, tmp_path, servers=2, devices=1000, rate_hz=0.5, seconds=12.0,
                 kill_at_s=4.0, restart_after_s=2.0, duplicates=200, settle_s=30.0)
    assert r["killed_at_s"] is not None and r["restarted_at_s"] is not None
    assert r["unacked_by_broker"] == 0
    assert r["lost"] == 0 and r["stored_twice"] == 0, r
    # both servers stored a part: the survivor's count is well under the total
    line = r["server_lines"]["srv-0"]
    assert "new detections" in line
    survivor = int(line.split("(")[1].split()[0])
    assert 0 < survivor < r["published"], line


def test_servers_starting_together_create_the_schema_once(postgres_url: str) -> None:
    """CREATE TABLE IF NOT EXISTS races in PostgreSQL; the store serialises it with an advisory lock."""
    import threading

    errors: list[BaseException] = []
    stores: list[PgServerStore] = []

    def open_one() -> None:
        try:
            stores.append(PgServerStore(postgres_url))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 6
    for s in stores:
        s.close()


def _dev_event(device: str, eid: str, score: float) -> Event:
    return Event(event_id=eid, device=device, query_id="q", query="chainsaw", score=score, start_s=0.0,
                 end_s=1.0, time=utcnow(), source="test", final=False)


def test_postgres_store_keys_by_device_and_serves_what_fleet_and_console_call(postgres_url: str,
                                                                              tmp_path: Path) -> None:
    """Every ServerStore method the fleet, alerts and console call runs on PostgreSQL with the SQLite
    store's results: one device cannot touch another's detection or clip by reusing its event id."""
    from edge_retrieval.server import ServerStore

    pg, lite = open_store(postgres_url), ServerStore(tmp_path / "s.sqlite")
    eid = new_event_id()
    for store in (pg, lite):
        assert store.upsert_event(_dev_event("dev-a", eid, 0.7)) is True
        assert store.upsert_event(_dev_event("dev-b", eid, 0.4)) is True  # same id, other device: its own row
        assert store.has_detection("dev-a", eid) and not store.has_detection("dev-c", eid)
        store.save_clip(eid, "dev-b", tmp_path / "b.flac", 10)
        assert sorted(store.detection_devices()) == ["dev-a", "dev-b"]
    for store in (pg, lite):
        a, b = store.detection("dev-a", eid), store.detection("dev-b", eid)
        assert a is not None and b is not None and a["score"] == 0.7 and b["score"] == 0.4
        assert a["clip_path"] is None and b["clip_path"] == str(tmp_path / "b.flac")
        changed = store.changed_detections(device="dev-b")
        assert [r["device"] for r in changed] == ["dev-b"] and changed[0]["changed"] >= changed[0]["updated"]
        assert store.prune_clips("dev-b", max_bytes=5, max_age_days=90) == [tmp_path / "b.flac"]
        assert store.detection("dev-b", eid)["clip_path"] is None
    assert [{k: v for k, v in r.items() if k not in ("received", "updated", "time")} for r in pg.detections()] == \
        [{k: v for k, v in r.items() if k not in ("received", "updated", "time")} for r in lite.detections()]
    pg.close()
    lite.close()


def test_postgres_tables_keyed_by_event_id_alone_are_rekeyed(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute("CREATE TABLE detections (event_id TEXT PRIMARY KEY, device TEXT NOT NULL, query_id TEXT NOT NULL, "
                    "query TEXT NOT NULL, score DOUBLE PRECISION NOT NULL, start_s DOUBLE PRECISION NOT NULL, "
                    "end_s DOUBLE PRECISION NOT NULL, time TEXT NOT NULL, clock TEXT NOT NULL, source TEXT NOT NULL, "
                    "final INTEGER NOT NULL, clip TEXT, site TEXT, lat DOUBLE PRECISION, lon DOUBLE PRECISION, "
                    "received TEXT NOT NULL, updated TEXT NOT NULL, messages INTEGER NOT NULL)")
        con.execute("INSERT INTO detections VALUES ('e1','dev-a','q','x',0.5,0,1,'t','unknown','s',0,NULL,NULL,NULL,"
                    "NULL,'r','u',1)")
    store = open_store(postgres_url)
    assert store.upsert_event(_dev_event("dev-b", "e1", 0.3)) is True  # no longer collides with dev-a's e1
    assert sorted(r["device"] for r in store.detections()) == ["dev-a", "dev-b"]
    store.close()


def test_readers_do_not_create_a_postgres_store(postgres_url: str) -> None:
    from edge_retrieval.cli import main as cli_main

    with pytest.raises(StoreError, match="no server tables"):
        open_store(postgres_url, create=False)
    assert cli_main(["detections", "--db", postgres_url]) != 0
    open_store(postgres_url).close()  # the server creates the tables; now a reader opens them
    assert cli_main(["detections", "--db", postgres_url]) == 0


def test_postgres_alert_versions_are_64_bit(postgres_url: str) -> None:
    """Alert versions are milliseconds since the epoch: an alerts table made with 32-bit versions
    (before this was found) is widened on open, and a revision's version is stored as it is."""
    import psycopg

    from edge_retrieval.protocol import SCHEMA, QueryMessage, encode_sparse
    from edge_retrieval.server.alerts import next_version

    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute("CREATE TABLE alerts (id TEXT PRIMARY KEY, text TEXT NOT NULL, target_kind TEXT NOT NULL, "
                    "target TEXT NOT NULL, version INTEGER NOT NULL, threshold DOUBLE PRECISION NOT NULL, "
                    "policy TEXT, message TEXT NOT NULL, created TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)")
    store = open_store(postgres_url)
    version = next_version(1)
    assert version > 2**31
    msg = QueryMessage.model_validate({
        "schema": SCHEMA, "query_id": "q", "version": version, "text": "x", "space_id": "0" * 64,
        "vectors": [encode_sparse("e", [1], [1.0]).model_dump(exclude_none=True)], "weights": [1.0],
        "threshold": 0.3})
    store.save_alert("q", "x", "group", "g", msg)
    held = store.alert("q")
    assert held is not None and held["version"] == version
    store.close()
