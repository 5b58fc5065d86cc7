"""Server store: upsert by event_id (updates merge, late onsets never undo them), device notices."""

from __future__ import annotations

from edge_retrieval.protocol import Event, Status
from edge_retrieval.server import ServerStore, next_version, parse_since


def ev(final: bool, score: float, end_s: float, eid: str = "e1") -> Event:
    return Event(event_id=eid, device="dev-1", query_id="q", query="chainsaw", score=score, start_s=1.0,
                 end_s=end_s, time="2026-01-01T00:00:01.000Z", source="mic", final=final)


def test_upsert_merges_and_never_regresses(tmp_path) -> None:
    s = ServerStore(tmp_path / "s.sqlite")
    assert s.upsert_event(ev(False, 0.6, 1.0)) is True
    assert s.upsert_event(ev(True, 0.9, 7.5)) is False
    assert s.upsert_event(ev(False, 0.6, 1.0)) is False  # the onset again, late (re-sent after an outage)
    (row,) = s.detections()
    assert row["final"] and row["score"] == 0.9 and row["end_s"] == 7.5 and row["messages"] == 3
    s.upsert_event(ev(True, 0.5, 3.0, eid="e2"))
    assert len(s.detections()) == 2
    assert len(s.detections(parse_since("1h"))) == 2


def test_status_transitions_raise_notices_once(tmp_path) -> None:
    s = ServerStore(tmp_path / "s.sqlite")
    health = {"low_disk": False, "clock": "synced", "free_mb": 900}
    s.apply_status(Status(type="health", state="online", device="d", health=health))
    assert s.notices("d") == []
    low = {**health, "low_disk": True, "free_mb": 50, "clock": "unsynced"}
    kinds = [n["kind"] for n in s.apply_status(Status(type="health", state="online", device="d", health=low))]
    assert kinds == ["low_disk", "clock_unsynced"]
    assert s.apply_status(Status(type="health", state="online", device="d", health=low)) == []  # no repeats
    assert [n["kind"] for n in s.apply_status(Status(type="state", state="offline", device="d"))] == ["offline"]
    assert s.device("d")["state"] == "offline" and s.device("d")["offline_since"]
    assert s.apply_status(Status(type="state", state="offline", device="d")) == []
    assert [n["kind"] for n in s.apply_status(Status(type="state", state="online", device="d"))] == ["online"]
    assert s.device("d")["offline_since"] is None and s.device("d")["low_disk"]


def test_versions_are_monotonic_without_the_database() -> None:
    assert next_version(None) > 1_600_000_000_000
    big = 10**14
    assert next_version(big) == big + 1
