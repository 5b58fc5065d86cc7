"""``edge-retrieval server``: the fleet server (MQTT + SQLite + optional webhook).

Broker, database and key options are shared with ``alerts`` and ``detections``; each has an
environment default (EDGE_RETRIEVAL_BROKER, _DB, _KEY, _BUNDLE) so field scripts stay short.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from ...errors import ConfigError
from ...protocol import NAME_RE
from ...transport import MqttTransport, TlsFiles, read_credentials_file

DEFAULT_DB = "~/.local/state/edge-retrieval/server.sqlite"
log = logging.getLogger("edge_retrieval.server")


def add_db_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("EDGE_RETRIEVAL_DB", DEFAULT_DB),
                   help=f"server database: a SQLite file or postgresql://user@host/db (default $EDGE_RETRIEVAL_DB "
                        f"or {DEFAULT_DB})")


def add_broker_arguments(p: argparse.ArgumentParser, key_help: str) -> None:
    p.add_argument("--broker", default=os.environ.get("EDGE_RETRIEVAL_BROKER"),
                   help="broker URL mqtt://host:1883 or mqtts://host:8883 (default $EDGE_RETRIEVAL_BROKER)")
    p.add_argument("--ca", type=Path, help="TLS CA certificate (PEM) for mqtts://")
    p.add_argument("--cert", type=Path, help="TLS client certificate (PEM)")
    p.add_argument("--cert-key", type=Path, help="TLS client private key (PEM)")
    p.add_argument("--credentials", type=Path, help="file with user and password (two lines, or user:password)")
    p.add_argument("--key", type=Path, default=os.environ.get("EDGE_RETRIEVAL_KEY"), help=key_help)
    add_db_argument(p)


def transport_from_args(args: argparse.Namespace, client_id: str, clean_session: bool,
                        mqtt_v5: bool = False) -> MqttTransport:
    if not args.broker:
        raise ConfigError("--broker is required (expected mqtt://host:1883 or mqtts://host:8883, or set $EDGE_RETRIEVAL_BROKER)")
    tls = None
    if args.ca or args.cert or args.cert_key:
        if args.ca is None:
            raise ConfigError("--cert/--cert-key need --ca (the CA that signed the broker's certificate)")
        if (args.cert is None) != (args.cert_key is None):
            raise ConfigError("give both --cert and --cert-key, or neither")
        tls = TlsFiles(args.ca, args.cert, args.cert_key)
    creds = read_credentials_file(args.credentials) if args.credentials else None
    return MqttTransport(args.broker, client_id, tls=tls, credentials=creds, clean_session=clean_session,
                         mqtt_v5=mqtt_v5)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=os.environ.get("EDGE_RETRIEVAL_BUNDLE"),
                   help="model bundle (checks that stored alerts fit its space)")
    add_broker_arguments(p, "Ed25519 private key (PEM) that signs queries (only used to check it loads)")
    p.add_argument("--webhook", help="POST detections and device notices as JSON to this http(s) URL")
    p.add_argument("--client-id", default="edge-retrieval-server", help="MQTT client id (persistent session)")
    p.add_argument("--share", default=None, metavar="GROUP",
                   help="run as one of several servers: MQTT 5 shared subscriptions $share/GROUP/...; give each "
                        "server its own --client-id and one --db postgresql://... for all")
    p.add_argument("--clips-dir", type=Path, help="where received detection clips go (default: clips/ next to --db)")
    p.add_argument("--ha-discovery", action="store_true",
                   help="publish Home Assistant MQTT discovery: one binary_sensor per alert x device")
    p.add_argument("--ha-prefix", default="homeassistant", help="Home Assistant discovery prefix (default homeassistant)")
    p.add_argument("--ha-off-delay-s", type=float, default=30.0,
                   help="Home Assistant turns a sensor off after this many seconds without OFF (default 30)")


def main(args: argparse.Namespace) -> int:
    from ...server import AlertManager, FleetServer, HaDiscovery, Webhook, load_private_key

    space_id = None
    if args.bundle:
        from ...bundle import read_manifest

        space_id = read_manifest(args.bundle).space.id
    key = load_private_key(args.key) if args.key else None
    from ...server.store_pg import is_postgres_url, open_store, redact

    if args.share is not None and not NAME_RE.fullmatch(args.share):
        raise ConfigError(f"--share {args.share!r} is not a group name (expected letters, digits, '-', '_')")
    store = open_store(args.db)
    transport = transport_from_args(args, args.client_id, clean_session=False, mqtt_v5=args.share is not None)
    webhook = Webhook(args.webhook) if args.webhook else None
    if args.ha_off_delay_s <= 0:
        raise ConfigError(f"--ha-off-delay-s {args.ha_off_delay_s!r} is not valid (expected seconds > 0)")
    ha = HaDiscovery(transport, store, args.ha_prefix, args.ha_off_delay_s) if args.ha_discovery else None
    srv = FleetServer(store, transport, webhook=webhook, alerts=AlertManager(store, transport, key),
                      space_id=space_id, clips_dir=args.clips_dir, ha=ha, share_group=args.share)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    srv.start()
    db_name = redact(args.db) if is_postgres_url(args.db) else store.path
    print(f"edge-retrieval server: {transport.address.url}, database {db_name}"
          + (f", webhook {args.webhook}" if args.webhook else "") + f", clips {srv.clips_dir}"
          + (f", Home Assistant discovery under {args.ha_prefix}/" if ha else ""), flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        srv.stop()
        store.close()
    c = srv.counts
    print(f"edge-retrieval server: stopped ({c['new_events']} new detections, {c['events']} messages, "
          f"{c['notices']} notices, {c['clips']} clips)", flush=True)
    return 0
