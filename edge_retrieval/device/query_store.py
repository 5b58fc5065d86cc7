"""Device side of query messages: verify, order by version, apply to the daemon, report refusals.

Every payload that arrives on a query topic goes through ``QueryStore.handle``: parse
(protocol.parse_query_message), check the signature when a public key is configured, check
that the version is newer than the one held (persisted in SQLite, so a replay after a restart
is still refused), then ``daemon.apply_query`` (which compiles against the bundle) or, for a
signed tombstone, ``daemon.remove_query``. Every refusal is counted and handed to ``report``
(the agent publishes it on the device's status topic). Nothing here raises to the caller.

A signed message must name the topic it arrived on (its target and id are covered by the
signature). Expiry is enforced continuously: ``tick()`` (called every second by the agent)
removes applied queries whose ``expires`` has passed. A message ``created`` more than
``MAX_CLOCK_SKEW_S`` ahead of this device's clock means the clock is behind (no RTC, no NTP yet):
it is refused, reported, and tried again by ``tick()`` once the clock has caught up, because a
clock that is behind would also keep expired queries alive.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import QueryRejected, StoreError
from ..protocol import (
    MAX_CLOCK_SKEW_S,
    QueryMessage,
    Status,
    parse_query_message,
    parse_time,
    parse_topic,
    verify_signature,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

MAX_WAITING = 256  # messages held for a clock that is behind (messages)


class QueryTarget(Protocol):
    """What the store drives: edge_retrieval.device.daemon.Daemon."""

    def apply_query(self, msg: QueryMessage) -> None: ...

    def remove_query(self, query_id: str) -> None: ...


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``edge-retrieval keys generate``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from ..errors import ConfigError

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"public key {str(path)!r} cannot be read (expected an Ed25519 PEM public key): {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {str(path)!r} is {type(key).__name__}, expected an Ed25519 public key")
    return key


def query_id_from_topic(topic: str) -> str | None:
    """``<root>/groups/<g>/queries/<id>`` or ``<root>/devices/<d>/queries/<id>`` -> ``<id>``."""
    t = parse_topic(topic)
    return t.item if t is not None and t.kind == "query" else None


class QueryStore:
    """Per-query version state (SQLite) and the queries applied in this process."""

    def __init__(
        self,
        path: str | Path,
        target: QueryTarget,
        *,
        device: str,
        public_key: Ed25519PublicKey | None = None,
        report: Callable[[Status], None] | None = None,
    ) -> None:
        self.target = target
        self.device = device
        self.public_key = public_key
        self.report = report
        self.applied: dict[str, int] = {}  # query id -> version applied in this process
        self.expires: dict[str, datetime] = {}  # applied query id -> when it expires
        self.waiting: dict[str, tuple[str, bytes]] = {}  # query id -> (topic, payload) held for the clock
        self.clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)  # tests move it
        self.counts = {"applied": 0, "removed": 0, "unchanged": 0, "ignored": 0, "rejected": 0, "expired": 0}
        self.last_rejection: str | None = None
        self._lock = threading.Lock()
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS versions (query_id TEXT PRIMARY KEY, version INTEGER NOT NULL, "
                "deleted INTEGER NOT NULL, digest TEXT NOT NULL, updated REAL NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open query store {str(path)!r}: {exc}") from exc

    # ------------------------------------------------------------------ entry point

    def handle(self, topic: str, payload: bytes) -> str:
        """Process one message from a query topic; returns the outcome (for logs and tests)."""
        with self._lock:
            try:
                return self._handle(topic, payload)
            except QueryRejected as exc:
                return self._reject(topic, str(exc))
            except Exception as exc:  # noqa: BLE001 - the subscriber must survive anything
                log.exception("query on %s could not be handled", topic)
                return self._reject(topic, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")

    def _handle(self, topic: str, payload: bytes) -> str:
        qid = query_id_from_topic(topic)
        if qid is None:
            raise QueryRejected(f"topic {topic[:200]!r} is not a query topic")
        if not payload:
            return self._empty(topic, qid)
        msg = parse_query_message(payload)
        if msg.query_id != qid:
            raise QueryRejected(f"message for query {msg.query_id!r} arrived on the topic of {qid!r}", )
        if self.public_key is not None:
            verify_signature(msg, self.public_key)
            if msg.topic is None:
                raise QueryRejected(f"query {qid!r} v{msg.version} does not name its topic (expected a message "
                                    "signed by a server that binds it to its target)")
        if msg.topic is not None and msg.topic != topic:
            raise QueryRejected(f"query {qid!r} v{msg.version} was signed for {msg.topic[:200]!r}, not this topic "
                                "(replayed on another target)")
        self.waiting.pop(qid, None)
        digest = hashlib.sha256(msg.signing_bytes()).hexdigest()
        held = self._held(qid)
        if held is not None:
            h_version, h_deleted, h_digest = held
            if msg.version < h_version:
                raise QueryRejected(
                    f"query {qid!r} v{msg.version} is older than v{h_version} held here (replayed or stale)"
                )
            if msg.version == h_version:
                if digest != h_digest:
                    raise QueryRejected(f"query {qid!r} v{msg.version} differs from the v{h_version} held here")
                if h_deleted or self.applied.get(qid) == msg.version:
                    self.counts["unchanged"] += 1
                    return "unchanged"
        if msg.deleted:
            self._drop(qid)
            self._record(qid, msg.version, True, digest)
            self.counts["removed"] += 1
            log.info("query %s removed (tombstone v%d)", qid, msg.version)
            return "removed"
        now = self.clock()
        ahead = msg.created_ahead_s(now)
        if ahead > MAX_CLOCK_SKEW_S:
            if len(self.waiting) < MAX_WAITING or qid in self.waiting:
                self.waiting[qid] = (topic, bytes(payload))
            raise QueryRejected(f"query {qid!r} v{msg.version} was created {ahead:.0f} s ahead of this device's clock "
                                "(clock behind?); held until the clock catches up")
        if msg.expired(now):
            self._drop(qid)
            raise QueryRejected(f"query {qid!r} v{msg.version} expired at {msg.expires}")
        self.target.apply_query(msg)  # compiles against the bundle; raises QueryRejected
        self.applied[qid] = msg.version
        if msg.expires:
            self.expires[qid] = parse_time(msg.expires)
        else:
            self.expires.pop(qid, None)
        self._record(qid, msg.version, False, digest)
        self.counts["applied"] += 1
        log.info("query %s v%d applied: %r (threshold %s)", qid, msg.version, msg.text, msg.threshold)
        return "applied"

    def _drop(self, qid: str) -> None:
        if qid in self.applied:
            self.target.remove_query(qid)
            self.applied.pop(qid, None)
        self.expires.pop(qid, None)

    def tick(self) -> None:
        """Remove applied queries that have expired; retry messages held for a clock that was behind."""
        now = self.clock()
        with self._lock:
            for qid in [q for q, t in self.expires.items() if now >= t]:
                self._drop(qid)
                self.counts["expired"] += 1
                log.info("query %s expired; removed", qid)
            for qid, (topic, payload) in list(self.waiting.items()):
                try:
                    if parse_query_message(payload).created_ahead_s(now) > MAX_CLOCK_SKEW_S:
                        continue
                except (QueryRejected, ValueError):
                    pass
                self.waiting.pop(qid, None)
                try:
                    self._handle(topic, payload)
                except QueryRejected as exc:
                    self._reject(topic, str(exc))
                except Exception as exc:  # noqa: BLE001 - the ticker must survive anything
                    log.exception("held query %s could not be handled", qid)
                    self._reject(topic, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")

    def _empty(self, topic: str, qid: str) -> str:
        """A cleared retained topic. With a key it removes nothing by itself (tombstones do)."""
        if self.public_key is None:
            if qid in self.applied:
                self._drop(qid)
                self.counts["removed"] += 1
                return "removed"
            self.counts["ignored"] += 1
            return "ignored"
        if qid in self.applied:
            raise QueryRejected(
                f"empty retained payload for query {qid!r} ignored: removal needs a signed tombstone"
            )
        self.counts["ignored"] += 1  # the usual clear after a tombstone we already applied
        return "ignored"

    # ------------------------------------------------------------------ state

    def _held(self, qid: str) -> tuple[int, bool, str] | None:
        row = self._db.execute("SELECT version, deleted, digest FROM versions WHERE query_id=?", (qid,)).fetchone()
        return None if row is None else (int(row[0]), bool(row[1]), str(row[2]))

    def _record(self, qid: str, version: int, deleted: bool, digest: str) -> None:
        try:
            self._db.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?) ON CONFLICT(query_id) DO UPDATE SET "
                "version=excluded.version, deleted=excluded.deleted, digest=excluded.digest, updated=excluded.updated",
                (qid, version, int(deleted), digest, time.time()),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"query store: cannot record {qid!r} v{version}: {exc}") from exc

    def _reject(self, topic: str, reason: str) -> str:
        self.counts["rejected"] += 1
        self.last_rejection = reason
        log.warning("query rejected on %s: %s", topic[:200], reason)
        if self.report is not None:
            qid = query_id_from_topic(topic)
            try:
                self.report(Status(type="rejection", device=self.device, topic=topic[:300],
                                   query_id=qid if qid and len(qid) <= 200 else None, reason=reason[:500]))
            except Exception:  # noqa: BLE001 - reporting is best effort
                log.exception("cannot report a rejection")
        return "rejected"

    def held_versions(self) -> dict[str, int]:
        with self._lock:
            return {r[0]: int(r[1]) for r in self._db.execute("SELECT query_id, version FROM versions")}

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
