"""Server store (SQLite, WAL): detections upserted by ``(device, event_id)``, device status, alerts,
notices, clips.

An onset and its final update merge; a late or repeated onset never undoes a final update. A
detection and its clip are keyed by the device that sent them too, so one device can never touch
another device's detection by reusing its event id.
Notices record a device that went offline, low disk, an unsynchronised clock, a refused query.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StoreError
from ..protocol import (
    Event,
    QueryMessage,
    Status,
    utcnow,
)
from .side_db import SqliteDb

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- store


_SCHEMA = """
CREATE TABLE IF NOT EXISTS detections (
    event_id TEXT NOT NULL, device TEXT NOT NULL, query_id TEXT NOT NULL, query TEXT NOT NULL,
    score REAL NOT NULL, start_s REAL NOT NULL, end_s REAL NOT NULL, time TEXT NOT NULL,
    clock TEXT NOT NULL, source TEXT NOT NULL, final INTEGER NOT NULL, clip TEXT,
    site TEXT, lat REAL, lon REAL, received TEXT NOT NULL, updated TEXT NOT NULL, messages INTEGER NOT NULL,
    PRIMARY KEY (device, event_id)
);
CREATE INDEX IF NOT EXISTS detections_received ON detections(received);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, last_seen TEXT NOT NULL, offline_since TEXT,
    low_disk INTEGER NOT NULL DEFAULT 0, clock TEXT NOT NULL DEFAULT 'unknown', health TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY, text TEXT NOT NULL, target_kind TEXT NOT NULL, target TEXT NOT NULL,
    version INTEGER NOT NULL, threshold REAL NOT NULL, policy TEXT, message TEXT NOT NULL,
    created TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clips (
    event_id TEXT NOT NULL, device TEXT NOT NULL, path TEXT NOT NULL, bytes INTEGER NOT NULL, received TEXT NOT NULL,
    PRIMARY KEY (device, event_id)
);
CREATE TABLE IF NOT EXISTS notices (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
    detail TEXT
);
"""

EVENT_COLUMNS = ("event_id", "device", "query_id", "query", "score", "start_s", "end_s", "time", "clock",
                 "source", "final", "clip", "site", "lat", "lon", "received", "updated", "messages")
# what ``detections`` returns: the event columns and the stored clip file (None until it arrives)
DETECTION_COLUMNS = (*EVENT_COLUMNS, "clip_path")


class ServerStore:
    """The server's SQLite database (WAL: the CLI reads while the server writes)."""

    SCALAR_MAX = "max"  # SQL's scalar maximum of two values (PostgreSQL spells it GREATEST)

    def __init__(self, path: str | Path, create: bool = True) -> None:
        """``create=False`` for readers: a mistyped path must fail, not leave an empty database."""
        self.path = Path(path).expanduser()
        if not create and not self.path.is_file():
            raise StoreError(f"no server database at {str(self.path)!r} (expected the --db the server writes; "
                             "set --db or $EDGE_RETRIEVAL_DB)")
        self._sql = SqliteDb(self.path, _SCHEMA, settings=("PRAGMA synchronous=NORMAL",), prepare=self._migrate)
        self._db, self._lock = self._sql.conn, self._sql.lock  # upsert_event runs two statements under the lock

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Databases written before detections and clips were keyed by (device, event_id): rebuild
        those two tables with the new key, rows kept."""
        for table in ("detections", "clips"):
            pk = [r[1] for r in db.execute(f"PRAGMA table_info({table})") if r[5]]
            if pk != ["event_id"]:
                continue
            cols = ", ".join(r[1] for r in db.execute(f"PRAGMA table_info({table})"))
            db.execute(f"ALTER TABLE {table} RENAME TO {table}_v0")
            db.execute("DROP INDEX IF EXISTS detections_received")
            db.executescript(_SCHEMA)
            db.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {table}_v0")
            db.execute(f"DROP TABLE {table}_v0")
            log.info("server database: %s now keyed by (device, event_id)", table)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._sql.exec(sql, args)

    # ------------------------------------------------------------------ detections

    def upsert_event(self, ev: Event) -> bool:
        """Insert or merge by ``(device, event_id)``; True when the event is new. Merging keeps the highest
        score, the latest end, and ``final`` once set (a late onset never undoes an update)."""
        now = utcnow()
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO detections VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1) "
                    "ON CONFLICT(device, event_id) DO UPDATE SET "
                    "score=max(score, excluded.score), "
                    "end_s=CASE WHEN excluded.final >= final THEN max(end_s, excluded.end_s) ELSE end_s END, "
                    "final=max(final, excluded.final), clip=coalesce(excluded.clip, clip), "
                    "updated=excluded.updated, messages=messages+1 "
                    "RETURNING messages",
                    (ev.event_id, ev.device, ev.query_id, ev.query, ev.score, ev.start_s, ev.end_s, ev.time,
                     ev.clock, ev.source, int(ev.final), ev.clip, ev.site, ev.lat, ev.lon, now, now),
                )
                row = cur.fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"server database {str(self.path)!r}: cannot store event: {exc}") from exc
        return row is not None and int(row[0]) == 1

    def detection_devices(self) -> list[str]:
        return [r[0] for r in self._exec("SELECT DISTINCT device FROM detections").fetchall()]

    def has_detection(self, device: str, event_id: str) -> bool:
        return self._exec("SELECT 1 FROM detections WHERE device=? AND event_id=?", (device, event_id)).fetchone() is not None

    def save_clip(self, event_id: str, device: str, path: Path, size: int) -> None:
        """Record a received clip of one of ``device``'s detections."""
        self._exec("INSERT INTO clips VALUES (?,?,?,?,?) ON CONFLICT(device, event_id) DO UPDATE SET "
                   "path=excluded.path, bytes=excluded.bytes, received=excluded.received",
                   (event_id, device, str(path), int(size), utcnow()))

    def prune_clips(self, device: str, max_bytes: int, max_age_days: float) -> list[Path]:
        """Forget ``device``'s clips older than ``max_age_days`` and its oldest beyond ``max_bytes``
        (bytes, over all its clips); returns their files for the caller to delete."""
        cutoff = (datetime.now(timezone.utc) - timedelta(days=max_age_days)).isoformat(timespec="milliseconds")
        cutoff = cutoff.replace("+00:00", "Z")
        rows = self._exec("SELECT event_id, path, bytes, received FROM clips WHERE device=? "
                          "ORDER BY received DESC, event_id", (device,)).fetchall()
        total, gone = 0, []
        for eid, path, size, received in rows:
            total += int(size)
            if total > max_bytes or received < cutoff:
                gone.append((eid, path))
        for eid, _ in gone:
            self._exec("DELETE FROM clips WHERE device=? AND event_id=?", (device, eid))
        return [Path(p) for _, p in gone]

    def detections(self, since: datetime | None = None, limit: int = 100_000) -> list[dict[str, Any]]:
        cols = ", ".join(f"d.{c}" for c in EVENT_COLUMNS)
        sql = (f"SELECT {cols}, c.path FROM detections d "
               "LEFT JOIN clips c ON c.device = d.device AND c.event_id = d.event_id")
        args: tuple[Any, ...] = ()
        if since is not None:
            sql += " WHERE d.received >= ?"
            args = (since.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),)
        sql += " ORDER BY d.received, d.event_id, d.device LIMIT ?"
        rows = self._exec(sql, (*args, limit)).fetchall()
        out = []
        for r in rows:
            d = dict(zip(DETECTION_COLUMNS, r, strict=True))
            d["final"] = bool(d["final"])
            out.append(d)
        return out

    def detection(self, device: str, event_id: str) -> dict[str, Any] | None:
        rows = self.changed_detections(device=device, event_id=event_id, limit=1)
        return rows[0] if rows else None

    def changed_detections(self, after: str = "", *, device: str | None = None, query_id: str | None = None,
                           since: str | None = None, event_id: str | None = None,
                           limit: int = 200) -> list[dict[str, Any]]:
        """Detections changed (an update or their clip received) at or after ``after`` (ISO), the
        latest change first, each with ``changed``; ``since`` filters on the event's own time.
        What the console lists and streams."""
        cols = ", ".join(f"d.{c}" for c in EVENT_COLUMNS)
        changed = f"{self.SCALAR_MAX}(d.updated, coalesce(c.received, ''))"
        sql = (f"SELECT {cols}, c.path, {changed} FROM detections d LEFT JOIN clips c "
               f"ON c.device = d.device AND c.event_id = d.event_id "
               f"WHERE {changed} >= ?")
        args: list[Any] = [after]
        for col, val in (("device", device), ("query_id", query_id), ("event_id", event_id)):
            if val is not None:
                sql += f" AND d.{col} = ?"
                args.append(val)
        if since is not None:
            sql += " AND d.time >= ?"
            args.append(since)
        rows = self._exec(sql + f" ORDER BY {changed} DESC, d.event_id, d.device LIMIT ?", (*args, int(limit))).fetchall()
        out = []
        for r in rows:
            d = dict(zip(DETECTION_COLUMNS, r[:-1], strict=True))
            d["final"] = bool(d["final"])
            d["changed"] = r[-1]
            out.append(d)
        return out

    # ------------------------------------------------------------------ devices and notices

    def device(self, device: str) -> dict[str, Any] | None:
        r = self._exec("SELECT device, state, last_seen, offline_since, low_disk, clock, health FROM devices "
                       "WHERE device=?", (device,)).fetchone()
        if r is None:
            return None
        return {"device": r[0], "state": r[1], "last_seen": r[2], "offline_since": r[3], "low_disk": bool(r[4]),
                "clock": r[5], "health": json.loads(r[6]) if r[6] else None}

    def devices(self) -> list[dict[str, Any]]:
        names = [r[0] for r in self._exec("SELECT device FROM devices ORDER BY device").fetchall()]
        return [d for n in names if (d := self.device(n)) is not None]

    def add_notice(self, device: str, kind: str, detail: Any = None) -> dict[str, Any]:
        n = {"time": utcnow(), "device": device, "kind": kind, "detail": detail}
        self._exec("INSERT INTO notices (time, device, kind, detail) VALUES (?,?,?,?)",
                   (n["time"], device, kind, json.dumps(detail) if detail is not None else None))
        return n

    def notices(self, device: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT time, device, kind, detail FROM notices WHERE 1=1", []
        if device is not None:
            sql += " AND device=?"
            args.append(device)
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        rows = self._exec(sql + " ORDER BY id", tuple(args)).fetchall()
        return [{"time": t, "device": d, "kind": k, "detail": json.loads(x) if x else None} for t, d, k, x in rows]

    def apply_status(self, st: Status, notice: bool = True) -> list[dict[str, Any]]:
        """Record a status message; returns the notices it raised (state changes, not repeats).
        ``notice=False`` records a rejection without a notice row (the caller's rate limit)."""
        prev = self.device(st.device)
        notices: list[dict[str, Any]] = []
        now = utcnow()
        if st.type == "rejection":
            if notice:
                notices.append(self.add_notice(st.device, "rejection", {"query_id": st.query_id, "reason": st.reason}))
            if prev is None:
                self._exec("INSERT INTO devices (device, state, last_seen) VALUES (?,?,?)", (st.device, "online", now))
            else:
                self._exec("UPDATE devices SET last_seen=? WHERE device=?", (now, st.device))
            return notices
        state = st.state or "online"
        was = prev["state"] if prev else None
        # strict: only JSON true is true (bool("no") would raise a false low-disk notice)
        low_disk = st.health.get("low_disk") is True if st.health else (prev["low_disk"] if prev else False)
        clock = st.health.get("clock") if st.health else (prev["clock"] if prev else "unknown")
        if clock not in ("synced", "unsynced", "unknown"):
            clock = "unknown"
        offline_since = prev["offline_since"] if prev else None
        if state == "offline" and was != "offline":
            offline_since = now
            notices.append(self.add_notice(st.device, "offline", {"since": now}))
        elif state == "online":
            if was == "offline":
                notices.append(self.add_notice(st.device, "online", {"offline_since": offline_since}))
            offline_since = None
        if st.health is not None:
            if low_disk and not (prev and prev["low_disk"]):
                free = st.health.get("free_mb")
                free = free if isinstance(free, int | float) and not isinstance(free, bool) else None
                notices.append(self.add_notice(st.device, "low_disk", {"free_mb": free}))
            if clock == "unsynced" and not (prev and prev["clock"] == "unsynced"):
                notices.append(self.add_notice(st.device, "clock_unsynced", None))
        health = json.dumps(st.health) if st.health is not None else (json.dumps(prev["health"]) if prev and prev["health"] else None)
        self._exec(
            "INSERT INTO devices (device, state, last_seen, offline_since, low_disk, clock, health) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(device) DO UPDATE SET state=excluded.state, last_seen=excluded.last_seen, "
            "offline_since=excluded.offline_since, low_disk=excluded.low_disk, clock=excluded.clock, health=excluded.health",
            (st.device, state, now, offline_since, int(low_disk), clock, health),
        )
        return notices

    # ------------------------------------------------------------------ alerts

    def save_alert(self, alert_id: str, text: str, target_kind: str, target: str, msg: QueryMessage,
                   deleted: bool = False) -> None:
        self._exec(
            "INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET text=excluded.text, "
            "target_kind=excluded.target_kind, target=excluded.target, version=excluded.version, "
            "threshold=excluded.threshold, policy=excluded.policy, message=excluded.message, deleted=excluded.deleted",
            (alert_id, text, target_kind, target, msg.version, _threshold(msg),
             msg.policy.model_dump_json(exclude_none=True) if msg.policy else None, msg.to_json().decode(),
             utcnow(), int(deleted)),
        )

    def alert(self, alert_id: str) -> dict[str, Any] | None:
        rows = [a for a in self.alerts(include_deleted=True) if a["id"] == alert_id]
        return rows[0] if rows else None

    def alerts(self, include_deleted: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT id, text, target_kind, target, version, threshold, policy, message, created, deleted FROM alerts"
        if not include_deleted:
            sql += " WHERE deleted=0"
        rows = self._exec(sql + " ORDER BY created, id").fetchall()
        keys = ("id", "text", "target_kind", "target", "version", "threshold", "policy", "message", "created", "deleted")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["deleted"] = bool(d["deleted"])
            d["policy"] = json.loads(d["policy"]) if d["policy"] else None
            out.append(d)
        return out

    def close(self) -> None:
        self._sql.close()



def parse_since(text: str) -> datetime:
    """``30m``, ``1h``, ``2d``, ``45s`` or an ISO 8601 time -> an aware UTC datetime."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if m:
        n, unit = float(m.group(1)), m.group(2)
        secs = n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
        return datetime.now(timezone.utc) - timedelta(seconds=secs)
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"--since {text!r} is not valid (expected e.g. 30m, 1h, 2d or an ISO 8601 time)") from exc
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _threshold(msg: QueryMessage) -> float:
    """The threshold column: the query's, a temporal query's lowest part threshold, 0 for a tombstone."""
    if msg.threshold is not None:
        return float(msg.threshold)
    if msg.temporal is not None:
        return min(p.threshold for p in msg.temporal.parts)
    return 0.0
