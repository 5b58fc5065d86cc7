"""Feedback and revisions of an alert: re-sign the stored query message with a new version.

A detection's final update carries a few of its windows' vectors (``Event.windows``: the peak
first, the others spread over the event; an older device sends only the peak, ``Event.vectors``);
they are kept beside the detection. "false alarm" adds them all to the alert's ``negatives``,
"correct" to its ``positives`` (the newest ``MAX_EXAMPLES`` are kept, fewer when the signed message
would pass ``MAX_QUERY_BYTES``), and the alert is published again with a higher version, so every
device swaps the query in place (pipeline/feedback.py decides what a negative suppresses). A new
threshold is the same revision path.

Windows come from devices and are untrusted: one whose experts or encodings do not match the
alert's own vectors is left out (and a detection with none left is refused), so a bad device can
never publish a query that the fleet would reject.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ..bundle import Manifest
from ..errors import ConfigError, QueryRejected
from ..pipeline.feedback import decode_example
from ..protocol import MAX_EXAMPLES, MAX_QUERY_BYTES, Event, Example, QueryMessage, VectorPayload, utcnow
from .alerts import AlertManager, next_version
from .side_db import open_side_db

log = logging.getLogger(__name__)

Kind = Literal["false_alarm", "correct"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS event_vectors (
    device TEXT NOT NULL, event_id TEXT NOT NULL, vectors TEXT NOT NULL, PRIMARY KEY (device, event_id)
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, "user" TEXT NOT NULL, device TEXT NOT NULL,
    event_id TEXT NOT NULL, alert_id TEXT NOT NULL, kind TEXT NOT NULL, version INTEGER NOT NULL
);
"""
# versions are milliseconds since the epoch (alerts.next_version): 64-bit in PostgreSQL
_PG_SCHEMA = _SCHEMA.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY").replace(
    "version INTEGER", "version BIGINT")


class Feedback:
    """Event vectors, feedback records and alert revisions (own connection to the server's ``--db``)."""

    def __init__(self, db: str | Path, alerts: AlertManager) -> None:
        self.alerts = alerts
        self._sql = open_side_db(db, _SCHEMA, _PG_SCHEMA)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._sql.exec(sql, args)

    def on_event(self, ev: Event, new: bool) -> None:
        """FleetServer listener: keep the windows an event carries (its final update has them)."""
        windows = [list(w.vectors) for w in ev.windows] if ev.windows else [list(ev.vectors)] if ev.vectors else []
        if windows:
            payload = json.dumps({"windows": [[v.model_dump(mode="json", exclude_none=True) for v in w]
                                              for w in windows]})
            self._exec("INSERT INTO event_vectors VALUES (?,?,?) ON CONFLICT(device, event_id) DO UPDATE SET "
                       "vectors=excluded.vectors", (ev.device, ev.event_id, payload))

    def examples(self, device: str, event_id: str) -> list[Example]:
        """The windows kept for a detection, the peak first ([] when none arrived)."""
        r = self._exec("SELECT vectors FROM event_vectors WHERE device=? AND event_id=?", (device, event_id)).fetchone()
        if r is None:
            return []
        doc = json.loads(r[0])
        windows = doc["windows"] if isinstance(doc, dict) else [doc]  # a list: one window (before windows)
        return [Example(vectors=[VectorPayload.model_validate(v) for v in w], event_id=event_id) for w in windows]

    def given(self, device: str, event_id: str) -> list[dict[str, Any]]:
        rows = self._exec("SELECT time, \"user\", kind, version FROM feedback WHERE device=? AND event_id=? ORDER BY id",
                          (device, event_id)).fetchall()
        return [{"time": t, "user": u, "kind": k, "version": v} for t, u, k, v in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """alert id -> {"false_alarm": n, "correct": n} given so far."""
        out: dict[str, dict[str, int]] = {}
        for a, k, n in self._exec("SELECT alert_id, kind, count(*) FROM feedback GROUP BY alert_id, kind").fetchall():
            out.setdefault(a, {"false_alarm": 0, "correct": 0})[k] = n
        return out

    # ------------------------------------------------------------------ revisions

    def revise(self, alert_id: str, *, threshold: float | None = None, negative: Sequence[Example] = (),
               positive: Sequence[Example] = ()) -> dict[str, Any]:
        """Publish the alert again, re-signed with a new version, with the given changes."""
        held = self.alerts.store.alert(alert_id)
        if held is None or held["deleted"]:
            raise ConfigError(f"no active alert {alert_id!r}")
        msg = QueryMessage.model_validate_json(held["message"])
        upd: dict[str, Any] = {"version": next_version(held["version"]), "created": utcnow(), "signature": None}
        if threshold is not None:
            lo = -1.0 if msg.vectors and all(v.encoding != "sparse" for v in msg.vectors) else 0.0
            if not lo <= threshold <= 1.0:
                raise QueryRejected(f"threshold {threshold!r} is out of range [{lo}, 1]")
            upd["threshold"] = float(threshold)
        if negative or positive:
            if not msg.vectors:
                raise QueryRejected(f"alert {alert_id!r} is a temporal query: feedback applies to plain queries")
            builder = self.alerts.builder
            manifest = builder.bundle.manifest if builder is not None else None
            negative, positive = fitting(msg, negative, manifest), fitting(msg, positive, manifest)
            if not negative and not positive:
                raise QueryRejected(f"the detection's windows do not match alert {alert_id!r}'s experts "
                                    f"({sorted(v.expert for v in msg.vectors)})")
            upd["negatives"] = [*msg.negatives, *negative][-MAX_EXAMPLES:]
            upd["positives"] = [*msg.positives, *positive][-MAX_EXAMPLES:]
        new = QueryMessage.model_validate({**msg.model_dump(by_alias=True), **upd})
        while len(new.to_json()) > MAX_QUERY_BYTES - 1024 and (new.negatives or new.positives):  # room to sign
            field = "negatives" if len(new.negatives) >= len(new.positives) else "positives"
            new = new.model_copy(update={field: list(getattr(new, field))[1:]})  # the oldest goes first
        return self.alerts.publish(new, held["target_kind"], held["target"])

    def give(self, user: str, detection: dict[str, Any], kind: Kind) -> dict[str, Any]:
        """Apply "false alarm" or "correct" to a stored detection; returns the revised alert."""
        if kind not in ("false_alarm", "correct"):
            raise ConfigError(f"feedback kind {kind!r} is not valid (expected false_alarm or correct)")
        exs = self.examples(detection["device"], detection["event_id"])
        if not exs:
            raise QueryRejected(f"detection {detection['event_id']!r} carries no window vector yet "
                                "(its final update has not arrived, or its device predates feedback)")
        alert = self.revise(detection["query_id"], negative=exs if kind == "false_alarm" else (),
                            positive=exs if kind == "correct" else ())
        self._exec("INSERT INTO feedback (time, \"user\", device, event_id, alert_id, kind, version) VALUES (?,?,?,?,?,?,?)",
                   (utcnow(), user, detection["device"], detection["event_id"], detection["query_id"], kind,
                    alert["version"]))
        log.info("feedback %s on %s by %s: alert %s now v%d", kind, detection["event_id"][:8], user,
                 detection["query_id"], alert["version"])
        return alert

    def close(self) -> None:
        self._sql.close()


def fitting(msg: QueryMessage, examples: Sequence[Example], manifest: Manifest | None = None) -> list[Example]:
    """The examples a device will accept on ``msg``: the same experts, each sparse where the query's
    vector is sparse and of its dimension where dense; with the bundle of ``msg``'s space, decoded
    exactly as the device does (label indices in range, no all-zero vector)."""
    want = {v.expert: (v.encoding == "sparse", v.dim) for v in msg.vectors}
    ok = [ex for ex in examples if len(ex.vectors) == len(want)
          and {v.expert: (v.encoding == "sparse", v.dim) for v in ex.vectors} == want]
    if manifest is None or manifest.space.id != msg.space_id:
        return ok
    out = []
    for ex in ok:
        try:
            decode_example(ex, manifest, "feedback window")
        except QueryRejected as exc:
            log.warning("feedback window of %s left out: %s", ex.event_id, exc)
            continue
        out.append(ex)
    return out
