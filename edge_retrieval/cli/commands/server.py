"""``edge-retrieval server``: the fleet server (MQTT + SQLite + optional webhook).

Broker, database and key options are shared with ``alerts`` and ``detections``; each has an
environment default (EDGE_RETRIEVAL_BROKER, _DB, _KEY, _BUNDLE) so field scripts stay short.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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
                        manual_ack: bool = False, mqtt_v5: bool = False) -> MqttTransport:
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
                         manual_ack=manual_ack, mqtt_v5=mqtt_v5)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=os.environ.get("EDGE_RETRIEVAL_BUNDLE"),
                   help="model bundle (checks that stored alerts fit its space)")
    add_broker_arguments(p, "Ed25519 private key (PEM) that signs queries (only used to check it loads)")
    p.add_argument("--webhook", help="POST detections and device notices as JSON to this http(s) URL")
    p.add_argument("--client-id", default="edge-retrieval-server",
                   help="MQTT client id of the persistent session (the example broker config replaces it by the "
                        "account name, so no other account can take this session over)")
    p.add_argument("--share", default=None, metavar="GROUP",
                   help="run as one of several servers: MQTT 5 shared subscriptions $share/GROUP/...; give each "
                        "server its own --client-id and one --db postgresql://... for all")
    p.add_argument("--webhook-queue", type=Path, default=None, metavar="FILE",
                   help="the webhook's persistent queue (default: --db + '.webhook' for SQLite; for PostgreSQL "
                        "CLIENT_ID.webhook beside the clips folder, one per server)")
    p.add_argument("--clips-dir", type=Path, help="where received detection clips go (default: clips/ next to --db)")
    p.add_argument("--clip-quota-mb", type=float, default=500.0,
                   help="per device: its oldest clips are deleted beyond this many MB (default 500)")
    p.add_argument("--clip-retention-days", type=float, default=90.0,
                   help="clips older than this are deleted (default 90 days)")
    p.add_argument("--ha-discovery", action="store_true",
                   help="publish Home Assistant MQTT discovery: one binary_sensor per alert x device")
    p.add_argument("--ha-prefix", default="homeassistant", help="Home Assistant discovery prefix (default homeassistant)")
    p.add_argument("--ha-off-delay-s", type=float, default=30.0,
                   help="Home Assistant turns a sensor off after this many seconds without OFF (default 30)")
    p.add_argument("--http", default=os.environ.get("EDGE_RETRIEVAL_HTTP"), metavar="HOST:PORT",
                   help="serve the ranger console here, e.g. 127.0.0.1:8080 (default $EDGE_RETRIEVAL_HTTP; "
                        "needs the console extra and an account: edge-retrieval users add)")
    p.add_argument("--http-cert", type=Path, help="TLS certificate (PEM) for the console (https)")
    p.add_argument("--http-key", type=Path, help="TLS private key (PEM) for the console")
    p.add_argument("--http-behind-tls", action="store_true",
                   help="the console sits behind a TLS reverse proxy: session cookies are marked Secure")


def _console(args: argparse.Namespace, store: object, srv: object) -> object:
    """The console over this server's store and alerts; alerts can be added when --bundle has its text side."""
    from ...console import Console, HttpServer, make_app
    from ...server.feedback import Feedback
    from ...server.users import Users

    builder = None
    if args.bundle:
        from ...bundle import load_bundle
        from ...errors import BundleError
        from ...text import QueryBuilder

        try:
            builder = QueryBuilder(load_bundle(args.bundle, part="all"))
        except BundleError as exc:
            log.warning("console: alerts cannot be added (%s)", exc)
    users = Users(args.db)  # the console's tables live in the server's own --db, SQLite or PostgreSQL
    if not users.list():
        log.warning("console: no account yet; create one with: edge-retrieval users add NAME --role ranger")
    fb = Feedback(args.db, srv.alerts)  # type: ignore[attr-defined]
    srv.event_listeners.append(fb.on_event)  # type: ignore[attr-defined]
    console = Console(store, srv.alerts, fb, users, builder=builder,  # type: ignore[arg-type, attr-defined]
                      secure_cookies=bool(args.http_cert) or args.http_behind_tls)
    return HttpServer(make_app(console), args.http, args.http_cert, args.http_key)


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
    postgres = is_postgres_url(args.db)
    store = open_store(args.db)
    # manual acks: a detection is acknowledged to the broker only once it is in the database
    transport = transport_from_args(args, args.client_id, clean_session=False, manual_ack=True,
                                    mqtt_v5=args.share is not None)
    clips_dir = Path(args.clips_dir).expanduser() if args.clips_dir else store.path.parent / "clips"
    queue = args.webhook_queue
    if queue is None:
        # one queue per server process (several may share the PostgreSQL store and the clips folder)
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", args.client_id)
        queue = (clips_dir.parent / f"{safe_id}.webhook" if postgres
                 else store.path.with_name(store.path.name + ".webhook"))
    webhook = Webhook(args.webhook, queue) if args.webhook else None
    if args.ha_off_delay_s <= 0:
        raise ConfigError(f"--ha-off-delay-s {args.ha_off_delay_s!r} is not valid (expected seconds > 0)")
    ha = HaDiscovery(transport, store, args.ha_prefix, args.ha_off_delay_s) if args.ha_discovery else None
    if args.clip_quota_mb <= 0 or args.clip_retention_days <= 0:
        raise ConfigError(f"--clip-quota-mb {args.clip_quota_mb!r} / --clip-retention-days {args.clip_retention_days!r} "
                          "are not valid (expected numbers > 0)")
    srv = FleetServer(store, transport, webhook=webhook, alerts=AlertManager(store, transport, key),
                      space_id=space_id, clips_dir=clips_dir, ha=ha, share_group=args.share,
                      clip_quota_bytes=int(args.clip_quota_mb * 1e6), clip_retention_days=args.clip_retention_days)
    http = _console(args, store, srv) if args.http else None
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    srv.start()
    if http is not None:
        http.start()
    db_name = redact(args.db) if postgres else store.path
    print(f"edge-retrieval server: {transport.address.url}, database {db_name}"
          + (f", webhook {webhook.display}" if webhook else "") + f", clips {srv.clips_dir}"
          + (f", Home Assistant discovery under {args.ha_prefix}/" if ha else "")
          + (f", console {http.url}" if http else ""), flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        if http is not None:
            http.stop()
        srv.stop()
        store.close()
    c = srv.counts
    print(f"edge-retrieval server: stopped ({c['new_events']} new detections, {c['events']} messages, "
          f"{c['notices']} notices, {c['clips']} clips)", flush=True)
    return 0
