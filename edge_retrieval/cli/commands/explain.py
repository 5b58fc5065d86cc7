"""``edge-retrieval explain "rain" --bundle DIR``: what a text query resolves to, per expert.

Shows the top labels (labels space) or nearest captions with their weights, the fit (best
similarity of the text to anything the expert knows, explained under the table), the warnings,
and the threshold ``run`` and ``alerts add`` give the query when none is passed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...bundle import load_bundle
from ...defaults import default_threshold
from ...errors import QueryRejected


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the query text, e.g. 'chainsaw sound'")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle directory (with its text side)")
    p.add_argument("--top", type=int, default=10, help="how many labels/weights to show per expert")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    from ...text import FIT_MEANING, QueryBuilder, query_warnings

    if not args.text.strip():
        raise QueryRejected("query text is empty (expected a few words, e.g. 'chainsaw sound')")
    if args.top < 1:
        raise QueryRejected(f"--top {args.top!r} must be >= 1")
    bundle = load_bundle(args.bundle, part="all")
    qb = QueryBuilder(bundle)
    res = qb.resolve(args.text)
    weights = qb.expert_weights(args.text, res)
    threshold = default_threshold(bundle, args.text)
    warnings = query_warnings(args.text, res)
    if args.json:
        out = {
            "text": args.text.strip(),
            "bundle": bundle.manifest.name,
            "space_id": bundle.manifest.space.id,
            "default_threshold": threshold,
            "warnings": warnings,
            "experts": [
                {
                    "expert": r.expert,
                    "weight": round(w, 4),
                    "fit": round(float(r.fit), 4),
                    "fits": r.fits,
                    "warning": r.warning,
                    "top": [[name, round(float(v), 4)] for name, v in r.top[: args.top]],
                }
                for r, w in zip(res, weights, strict=True)
            ],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"query {args.text.strip()!r} on bundle {bundle.manifest.name} ({bundle.manifest.space.kind} space)")
    print(f"default threshold {threshold:g} (what run and alerts add use without --threshold)")
    for r, w in zip(res, weights, strict=True):
        print(f"\nexpert {r.expert} (weight {w:.2f}), fit {r.fit:.3f}" + ("" if r.fits else " (below its floor)"))
        if r.warning:
            print(f"  warning: {r.warning}")
        if w <= 0.0:  # the bundle gives this expert no say for this text: its labels would only mislead
            print("  (not used for this query: the other expert's labels carry it)")
            continue
        width = max((len(n) for n, _ in r.top[: args.top]), default=10)
        for name, v in r.top[: args.top]:
            print(f"  {name:<{width}}  {v:.4f}")
    for line in warnings:
        if not any(line == f"{r.expert}: {r.warning}" for r in res):  # per-expert ones are shown above
            print(f"\nwarning: {line}")
    print(f"\n{FIT_MEANING}")
    return 0
