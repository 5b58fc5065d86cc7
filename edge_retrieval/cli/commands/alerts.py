"""``edge-retrieval alerts add|list|remove``: text alerts for the fleet.

``add`` resolves the text with the bundle's text side, shows what it resolved to (and warns when
nothing in the bundle fits), signs the query and publishes it retained, QoS 1, on the group's or
the device's topic; ``remove`` publishes a signed tombstone and clears the topic. Both record the
alert in the server's database (``--db``); ``list`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from ...errors import ConfigError
from .server import add_broker_arguments, add_db_argument, transport_from_args

KEY_HELP = "Ed25519 private key (PEM) that signs the query (default $EDGE_RETRIEVAL_KEY; unsigned without it)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="register a text alert for a group or one device")
    a.add_argument("text", help='what to listen for, e.g. "chainsaw sound"')
    a.add_argument("--threshold", type=float,
                   help="score threshold (default: the tuned default for this text and bundle, as in run)")
    tgt = a.add_mutually_exclusive_group(required=True)
    tgt.add_argument("--group", help="every device whose config names this group")
    tgt.add_argument("--device", help="one device id")
    a.add_argument("--id", dest="alert_id", help="alert id (default: from the text); an existing id is updated")
    a.add_argument("--bundle", type=Path, default=os.environ.get("EDGE_RETRIEVAL_BUNDLE"),
                   help="full model bundle with its text side (default $EDGE_RETRIEVAL_BUNDLE)")
    a.add_argument("--min-hits", type=int, help="policy: N windows over threshold ...")
    a.add_argument("--of-windows", type=int, help="policy: ... out of M")
    a.add_argument("--cooldown-s", type=float, help="policy: quiet seconds after an event")
    a.add_argument("--hysteresis", type=float, help="policy: stay on until score < threshold - this")
    a.add_argument("--expires", help="expiry: ISO 8601 time or a duration like 12h, 7d")
    a.add_argument("--json", action="store_true", help="print the alert as JSON")
    add_broker_arguments(a, KEY_HELP)
    ls = sub.add_parser("list", help="list active alerts (from the database)")
    ls.add_argument("--all", action="store_true", help="include removed alerts")
    ls.add_argument("--json", action="store_true")
    add_db_argument(ls)
    r = sub.add_parser("remove", help="remove an alert (signed tombstone, then the retained topic is cleared)")
    r.add_argument("alert_id", metavar="ID")
    add_broker_arguments(r, KEY_HELP)


def _expires(text: str | None) -> str | None:
    if not text:
        return None
    from ...server import parse_since

    try:
        since = parse_since(text)  # a duration counts back from now: mirror it forward
        now = datetime.now(timezone.utc)
        if since < now and text.strip()[-1] in "smhdw":
            return (now + (now - since)).isoformat(timespec="seconds").replace("+00:00", "Z")
        return since.isoformat(timespec="seconds").replace("+00:00", "Z")
    except ConfigError as exc:
        raise ConfigError(f"--expires {text!r} is not valid (expected e.g. 12h, 7d or an ISO 8601 time)") from exc


def _manager(args: argparse.Namespace, builder=None):  # noqa: ANN001, ANN202
    from ...server import AlertManager, load_private_key
    from ...server.store_pg import open_store

    key = load_private_key(args.key) if args.key else None
    store = open_store(args.db)
    transport = transport_from_args(args, f"edge-retrieval-alerts-{os.getpid()}", clean_session=True)
    transport.start()
    return AlertManager(store, transport, key, builder), store, transport


def main(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list(args)
    if args.action == "add":
        return _add(args)
    return _remove(args)


def _add(args: argparse.Namespace) -> int:
    from ...bundle import load_bundle
    from ...policy import PolicyOverlay
    from ...text import QueryBuilder, query_warnings
    from ...text.temporal import parse_temporal

    parse_temporal(args.text)  # a bad temporal text ("A followed by") fails before any broker connection
    if not args.bundle:
        raise ConfigError("--bundle is required (the full bundle with its text side, or set $EDGE_RETRIEVAL_BUNDLE)")
    bundle = load_bundle(args.bundle, part="server")
    threshold = args.threshold
    if threshold is None:  # the same default `run --query` gives (tuned per query and space)
        from ...defaults import default_threshold

        threshold = default_threshold(bundle, args.text)
    try:
        policy = PolicyOverlay(min_hits=args.min_hits, of_windows=args.of_windows, cooldown_s=args.cooldown_s,
                               hysteresis=args.hysteresis)
    except ValueError as exc:
        raise ConfigError(f"policy options: {exc}") from exc
    has_policy = any(v is not None for v in policy.model_dump().values())
    builder = QueryBuilder(bundle)
    mgr, store, transport = _manager(args, builder)
    try:
        alert, res = mgr.add(args.text, float(threshold), group=args.group, device=args.device,
                             policy=policy if has_policy else None, alert_id=args.alert_id,
                             expires=_expires(args.expires))
    finally:
        transport.stop()
        store.close()
    if args.json:
        print(json.dumps({k: v for k, v in alert.items() if k != "message"}))
    else:
        print(f"alert {alert['id']}: {alert['text']!r} -> {alert['target_kind']} {alert['target']} "
              f"(threshold {alert['threshold']:g}, version {alert['version']}, "
              f"{'signed' if mgr.private_key is not None else 'UNSIGNED'})")
        for r in res:
            top = ", ".join(f"{lab} {w:.2f}" for lab, w in r.top[:5])
            print(f"  {r.expert}: {top}  (fit {r.fit:.2f})")
    for w in query_warnings(args.text, res):
        print(f"edge-retrieval alerts: warning: {w}", file=sys.stderr)
    return 0


def _remove(args: argparse.Namespace) -> int:
    mgr, store, transport = _manager(args)
    try:
        alert = mgr.remove(args.alert_id)
    finally:
        transport.stop()
        store.close()
    print(f"alert {alert['id']} removed (tombstone version {alert['version']}; retained topic cleared)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from ...server.store_pg import open_store

    store = open_store(args.db, create=False)
    try:
        rows = store.alerts(include_deleted=args.all)
    finally:
        store.close()
    if args.json:
        for a in rows:
            print(json.dumps({k: v for k, v in a.items() if k != "message"}))
        return 0
    if not rows:
        print("no alerts")
        return 0
    print(f"{'id':<32} {'target':<22} {'thr':>5}  {'version':>13}  text")
    for a in rows:
        tgt = f"{a['target_kind']}:{a['target']}"
        flag = " (removed)" if a["deleted"] else ""
        print(f"{a['id']:<32} {tgt:<22} {a['threshold']:>5.2f}  {a['version']:>13}  {a['text']}{flag}")
    return 0
