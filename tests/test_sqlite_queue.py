"""The one durable queue under both outboxes: bounded, ordered, and its drop count survives a restart."""

from __future__ import annotations

from pathlib import Path

from edge_retrieval.device.sqlite_queue import SqliteQueue


def _queue(path: Path, max_rows: int = 3) -> SqliteQueue:
    return SqliteQueue(path, "items", "name TEXT NOT NULL", max_rows, what="test queue", unit="items")


def test_full_queue_drops_the_oldest_and_remembers_it(tmp_path: Path) -> None:
    q = _queue(tmp_path / "q.sqlite")
    for i in range(5):
        q.append({"name": f"n{i}"})
    assert q.depth() == 3 and q.dropped() == 2
    assert [r[1] for r in q.first("name", 10)] == ["n2", "n3", "n4"]  # oldest first
    rid = q.first("name", 1)[0][0]
    assert q.delete(rid) and [r[1] for r in q.first("name", 10, skip=[rid + 1])] == ["n4"]
    q.close()
    again = _queue(tmp_path / "q.sqlite")  # a restart: rows and the drop count are on disk
    assert again.depth() == 2 and again.dropped() == 2
    again.close()
