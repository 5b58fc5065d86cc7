"""``edge-retrieval search "rain on a tin roof" --index INDEX``: rank indexed windows by a text query.

Prints file, offset and (when the recording carries its start time) the absolute UTC time of
the best windows. ``--audio FILE`` searches by example instead of by text. A temporal query
("gunshot followed by car engine within 60 s") ranks time spans where the pattern occurs
(``offline.temporal_search``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from ...bundle import load_bundle
from ...errors import ConfigError
from ...offline.archive import ArchiveIndex, open_search_bundle, parse_when
from ...offline.query_audio import example_query
from ...offline.retrieval import FileEmbedder, fmt_offset, text_queries
from ...offline.temporal_search import SpanHit, temporal_search
from ...text.temporal import parse_temporal

# best score at or below this (float16 storage) counts as "nothing scored"
NOTHING_SCORED = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", default=None, help="what to look for, in words")
    p.add_argument("--index", required=True, type=Path, help="index directory (from edge-retrieval index)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle (default: the one the index was built with)")
    p.add_argument("--audio", type=Path, default=None, help="search by example: a recording instead of text")
    p.add_argument("--top", type=int, default=10, help="how many windows (default 10)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV on stdout")
    fmt.add_argument("--json", action="store_true", help="JSON on stdout")
    p.add_argument("--since", default=None, help="only windows at or after this UTC date/time (YYYY-MM-DD[THH:MM])")
    p.add_argument("--until", default=None, help="only windows before this date/time (a bare date includes that day)")
    p.add_argument("--site", default=None, help="only recordings of this site")
    p.add_argument("--rank", choices=("cosine", "dot"), default="cosine",
                   help="cosine (default): the windows most about the query; dot: the detection score, "
                        "which favours windows loud on the query's labels whatever else they hold")


def main(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.audio is None):
        raise ConfigError("give either a query text or --audio FILE (not both)")
    if args.top < 1:
        raise ConfigError(f"--top {args.top!r} must be >= 1")
    since = parse_when(args.since) if args.since else None
    until = parse_when(args.until, end_of_day=True) if args.until else None
    with ArchiveIndex(args.index) as index:
        if args.audio is not None:
            path = args.bundle or index.bundle_path
            if not path:
                raise ConfigError("no --bundle given and the index does not record one")
            bundle = load_bundle(path, part="device")
            index.check_space(bundle.manifest)
            # nearest windows by cosine with the mean probabilities (sharpen 1): an example finds
            # itself, where the linear score prefers louder sounds (README, "Query by example")
            query = example_query(FileEmbedder(bundle).embed_file(args.audio), bundle.manifest, sharpen=1.0)
        else:
            tq = parse_temporal(args.text)  # "A followed by B": rank spans, not windows
            bundle = open_search_bundle(index, args.bundle)
            if tq is not None:
                spans = temporal_search(index, bundle, tq, top=args.top, since=since, until=until, site=args.site)
                return _print_spans(args, tq.describe(), spans)
            query = text_queries(bundle, [args.text])[0]
        # an example is always matched by cosine (the nearest sound: README, "Query by example")
        hits = index.search(query, top=args.top, since=since, until=until, site=args.site,
                            cosine=args.audio is not None or args.rank == "cosine")
        stats = index.stats()
    if not hits and (since is not None or until is not None) and not stats["timed_files"]:
        raise ConfigError(
            f"none of the {stats['files']} indexed files carries a start time, so --since/--until match nothing "
            "(give recordings a start time: a GUANO Timestamp, a BWF bext origination time, the AudioMoth "
            "comment, or a file name like 20240101_063000.wav; then re-run edge-retrieval index)"
        )
    if hits and max(h.score for h in hits) <= NOTHING_SCORED:
        print(f"edge-retrieval search: warning: no window scored above {NOTHING_SCORED:g} for "
              f"{query.text!r}: nothing indexed sounds like what it resolved to (see: edge-retrieval explain)",
              file=sys.stderr)
    rows = [h.as_dict() for h in hits]
    if args.json:
        print(json.dumps({"query": query.text, "hits": rows}, indent=2))
    elif args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=["rank", "score", "file", "offset_s", "end_s", "time", "site"])
        w.writeheader()
        for i, r in enumerate(rows, 1):
            w.writerow({"rank": i, **r})
    else:
        if not rows:
            print("no matching windows")
        for i, h in enumerate(hits, 1):
            extra = "  ".join(x for x in (h.time or "", h.site or "") if x)
            print(f"{i:>3}  {h.score:.4f}  {h.path}  @{fmt_offset(h.offset_s)}  {extra}".rstrip())
    return 0


def _print_spans(args: argparse.Namespace, relation: str, spans: list[SpanHit]) -> int:
    rows = [h.as_dict() for h in spans]
    if args.json:
        print(json.dumps({"query": args.text.strip(), "relation": relation, "hits": rows}, indent=2))
    elif args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=["rank", "score", "file", "offset_s", "end_s", "time", "site", "parts"])
        w.writeheader()
        for i, r in enumerate(rows, 1):
            w.writerow({"rank": i, **r, "parts": json.dumps(r["parts"])})
    else:
        print(f"temporal query: {relation}")
        if not rows:
            print("no matching spans")
        for i, h in enumerate(spans, 1):
            parts = ", ".join(f"{t!r} @{fmt_offset(o)} {sc:.3f}" for t, o, sc in h.parts)
            extra = "  ".join(x for x in (h.time or "", h.site or "") if x)
            print(f"{i:>3}  {h.score:.4f}  {h.path}  @{fmt_offset(h.start_s)}-{fmt_offset(h.end_s)}  {parts}  {extra}".rstrip())
    return 0
