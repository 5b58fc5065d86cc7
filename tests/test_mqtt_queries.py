"""Device-side query store: signatures, versions (persisted across restarts), tombstones, empty clears.

Runs against the real Daemon with the tiny bundle (compile errors come from the real matcher).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_retrieval.bundle import Bundle
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.query_store import QueryStore, query_id_from_topic
from edge_retrieval.device.sources import FileSource
from edge_retrieval.protocol import (
    QueryMessage,
    Status,
    device_query_topic,
    encode_sparse,
    group_query_topic,
    sign_message,
)

TOPIC = group_query_topic("site-a", "beep-1")


def query(bundle: Bundle, version: int, qid: str = "beep-1", label: int = 1, **kw: object) -> QueryMessage:
    d: dict[str, object] = {
        "schema": 1, "query_id": qid, "version": version, "text": "beep", "space_id": bundle.manifest.space.id,
        "vectors": [encode_sparse("tones", np.array([label]), np.array([1.0])).model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5, "topic": group_query_topic("site-a", qid),
    }
    d.update(kw)
    return QueryMessage.model_validate(d)


def tomb(version: int, qid: str = "beep-1") -> QueryMessage:
    return QueryMessage.model_validate({"schema": 1, "query_id": qid, "version": version, "deleted": True,
                                        "topic": group_query_topic("site-a", qid)})


@pytest.fixture
def daemon(tiny_bundle: Bundle, audio_files: dict[str, Path]) -> Daemon:
    return Daemon(tiny_bundle, FileSource(audio_files["flac"], realtime=False), device_id="dev-1")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def store(tmp_path: Path, daemon: Daemon, key: Ed25519PrivateKey | None, reports: list[Status]) -> QueryStore:
    return QueryStore(tmp_path / "q.sqlite", daemon, device="dev-1",
                      public_key=key.public_key() if key else None, report=reports.append)


def test_topic_parsing() -> None:
    assert query_id_from_topic(TOPIC) == "beep-1"
    assert query_id_from_topic(device_query_topic("dev-1", "x")) == "x"
    assert query_id_from_topic("edge-retrieval/v1/devices/dev-1/status") is None
    assert query_id_from_topic("other/v1/groups/a/queries/x") is None


def test_signed_query_applies_and_forgeries_are_refused(tmp_path, daemon, key, tiny_bundle) -> None:
    reports: list[Status] = []
    qs = store(tmp_path, daemon, key, reports)
    assert qs.handle(TOPIC, query(tiny_bundle, 1).to_json()) == "rejected"  # unsigned
    assert "unsigned" in reports[-1].reason
    forged = sign_message(query(tiny_bundle, 1), Ed25519PrivateKey.generate())
    assert qs.handle(TOPIC, forged.to_json()) == "rejected"
    assert "bad signature" in reports[-1].reason
    assert len(daemon.matcher) == 0
    assert qs.handle(TOPIC, sign_message(query(tiny_bundle, 1), key).to_json()) == "applied"
    assert len(daemon.matcher) == 1
    # the same retained message again (reconnect) changes nothing and is not a rejection
    n = len(reports)
    assert qs.handle(TOPIC, sign_message(query(tiny_bundle, 1), key).to_json()) == "unchanged"
    assert len(reports) == n
    assert all(r.type == "rejection" and r.device == "dev-1" and r.query_id == "beep-1" for r in reports)


def test_versions_are_monotonic_across_restarts(tmp_path, tiny_bundle, audio_files, key) -> None:
    reports: list[Status] = []
    d1 = Daemon(tiny_bundle, FileSource(audio_files["flac"], realtime=False), device_id="dev-1")
    qs = store(tmp_path, d1, key, reports)
    v1 = sign_message(query(tiny_bundle, 1), key).to_json()
    v2 = sign_message(query(tiny_bundle, 2, threshold=0.7), key).to_json()
    assert qs.handle(TOPIC, v1) == "applied"
    assert qs.handle(TOPIC, v2) == "applied"
    assert d1.matcher.get("beep-1").version == 2
    assert qs.handle(TOPIC, v1) == "rejected" and "older" in reports[-1].reason
    # same version, different content: refused too
    other = sign_message(query(tiny_bundle, 2, threshold=0.1), key).to_json()
    assert qs.handle(TOPIC, other) == "rejected" and "differs" in reports[-1].reason
    qs.close()
    # restart: a fresh daemon and store on the same file still refuse the replay,
    # and accept the retained current version (applied again: the daemon is new)
    d2 = Daemon(tiny_bundle, FileSource(audio_files["flac"], realtime=False), device_id="dev-1")
    qs2 = store(tmp_path, d2, key, reports)
    assert qs2.handle(TOPIC, v1) == "rejected"
    assert len(d2.matcher) == 0
    assert qs2.handle(TOPIC, v2) == "applied"
    assert d2.matcher.get("beep-1").version == 2


def test_tombstones_and_empty_payloads(tmp_path, daemon, key, tiny_bundle) -> None:
    reports: list[Status] = []
    qs = store(tmp_path, daemon, key, reports)
    assert qs.handle(TOPIC, sign_message(query(tiny_bundle, 1), key).to_json()) == "applied"
    # an empty retained payload removes nothing when a key is configured, and is reported
    assert qs.handle(TOPIC, b"") == "rejected"
    assert "signed tombstone" in reports[-1].reason and len(daemon.matcher) == 1
    # an unsigned tombstone is refused
    assert qs.handle(TOPIC, tomb(2).to_json()) == "rejected" and len(daemon.matcher) == 1
    # a signed tombstone with an old version is refused
    assert qs.handle(TOPIC, sign_message(tomb(1), key).to_json()) == "rejected"
    assert qs.handle(TOPIC, sign_message(tomb(2), key).to_json()) == "removed"
    assert len(daemon.matcher) == 0
    # the server's clear afterwards is silently ignored; a replay of v1 stays refused
    assert qs.handle(TOPIC, b"") == "ignored"
    assert qs.handle(TOPIC, sign_message(query(tiny_bundle, 1), key).to_json()) == "rejected"
    assert len(daemon.matcher) == 0


def test_without_key_empty_clear_removes(tmp_path, daemon, tiny_bundle) -> None:
    qs = store(tmp_path, daemon, None, [])
    assert qs.handle(TOPIC, query(tiny_bundle, 1).to_json()) == "applied"
    assert qs.handle(TOPIC, b"") == "removed"
    assert len(daemon.matcher) == 0


def test_bundle_mismatches_are_rejected_by_the_daemon(tmp_path, daemon, tiny_bundle) -> None:
    reports: list[Status] = []
    qs = store(tmp_path, daemon, None, reports)
    cases = {
        "space": query(tiny_bundle, 1, space_id="cd" * 32),
        "expert": query(tiny_bundle, 1, vectors=[encode_sparse("nope", np.array([1]), np.array([1.0]))
                                                 .model_dump(exclude_none=True)]),
        "range": query(tiny_bundle, 1, vectors=[encode_sparse("tones", np.array([9]), np.array([1.0]))
                                                .model_dump(exclude_none=True)]),
    }
    for name, msg in cases.items():
        assert qs.handle(TOPIC, msg.to_json()) == "rejected", name
    assert len(daemon.matcher) == 0 and qs.counts["rejected"] == 3
    # the topic names one query and the message another: refused
    assert qs.handle(group_query_topic("site-a", "other"), query(tiny_bundle, 1).to_json()) == "rejected"
    assert "arrived on the topic" in reports[-1].reason
    # a rejection does not record a version: the correct message still applies
    assert qs.handle(TOPIC, query(tiny_bundle, 1).to_json()) == "applied"
