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
