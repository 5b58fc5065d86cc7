"""The fleet server: one module per job (store, alerts, webhook, Home Assistant, the MQTT wiring)."""

from __future__ import annotations

from .alerts import AlertManager, load_private_key, new_alert_id, next_version, query_topic
from .fleet import SERVER_CLIENT_ID, FleetServer
from .homeassistant import HaDiscovery
from .store import DETECTION_COLUMNS, EVENT_COLUMNS, ServerStore, parse_since
from .webhook import Webhook

__all__ = [
    "DETECTION_COLUMNS",
    "EVENT_COLUMNS",
    "SERVER_CLIENT_ID",
    "AlertManager",
    "FleetServer",
    "HaDiscovery",
    "ServerStore",
    "Webhook",
    "load_private_key",
    "new_alert_id",
    "next_version",
    "parse_since",
    "query_topic",
]
