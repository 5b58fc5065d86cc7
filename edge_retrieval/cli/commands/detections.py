"""``edge-retrieval detections``: read what arrived at the server (table, JSON lines or CSV)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from ...protocol import printable
from ...server import DETECTION_COLUMNS
from .server import add_db_argument

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet runs a cell starting with these


def csv_cell(value: Any) -> Any:
    """A device-supplied string made safe for a spreadsheet: control characters escaped and a
    leading formula character quoted with ``'`` (numbers stay numbers)."""
    if not isinstance(value, str):
        return value
    v = printable(value, 10_000)
    return "'" + v if v.startswith(FORMULA_PREFIXES) else v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="only detections received in the last 30m, 1h, 2d ... or after an ISO time")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON object per line")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument("--limit", type=int, default=100_000, help="at most this many rows (default 100000)")
    add_db_argument(p)


def main(args: argparse.Namespace) -> int:
    from ...server import parse_since
    from ...server.store_pg import open_store

    since = parse_since(args.since) if args.since else None
    store = open_store(args.db, create=False)
    try:
        rows = store.detections(since, limit=args.limit)
    finally:
        store.close()
    if args.json:
        for r in rows:
            print(json.dumps(r))
    elif args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=list(DETECTION_COLUMNS))
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    else:
        if not rows:
            print("no detections")
            return 0
        print(f"{'time (UTC)':<25} {'device':<16} {'score':>5}  {'start_s':>9} {'end_s':>9}  {'':<5} query")
        for r in rows:
            state = "final" if r["final"] else "open"
            print(f"{printable(r['time'], 40):<25} {printable(r['device'], 64):<16} {r['score']:>5.2f}  "
                  f"{r['start_s']:>9.1f} {r['end_s']:>9.1f}  {state:<5} {printable(r['query'], 500)}")
    return 0
