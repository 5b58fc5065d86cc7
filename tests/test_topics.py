"""Topics are built and taken apart in one module (protocol): every builder round-trips."""

from __future__ import annotations

import pytest

from edge_retrieval.protocol import (
    Topic,
    clip_topic,
    detections_topic,
    device_query_topic,
    group_query_topic,
    parse_topic,
    status_topic,
)


def test_every_builder_round_trips() -> None:
    assert parse_topic(group_query_topic("north", "saw")) == Topic("query", "groups", "north", "saw")
    assert parse_topic(device_query_topic("pi-7", "saw")) == Topic("query", "devices", "pi-7", "saw")
    assert parse_topic(detections_topic("pi-7")) == Topic("detections", "devices", "pi-7")
    assert parse_topic(status_topic("pi-7")) == Topic("status", "devices", "pi-7")
    assert parse_topic(clip_topic("pi-7", "ab12")) == Topic("clip", "devices", "pi-7", "ab12")


@pytest.mark.parametrize("topic", [
    "other/v1/devices/pi-7/status",  # another root
    "edge-retrieval/v1/devices/pi-7",  # too short
    "edge-retrieval/v1/devices//status",  # empty level
    "edge-retrieval/v1/groups/north/status",  # groups carry queries only
    "edge-retrieval/v1/devices/pi-7/queries/saw/extra",
    "edge-retrieval/v1/devices/pi-7/clips",
])
def test_foreign_topics_are_none(topic: str) -> None:
    assert parse_topic(topic) is None
