"""``edge-retrieval explain "rain" --bundle DIR``: what a text query resolves to, per expert.

Shows the top labels (labels space) or nearest captions with their weights, the fit (best
similarity of the text to anything the expert knows, explained under the table), the warnings,
and the threshold ``run`` and ``alerts add`` give the query when none is passed. A temporal
query ("gunshot followed by car engine within 30 s") shows its relation and the same for each part.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ...bundle import Bundle, load_bundle
from ...defaults import default_threshold
from ...errors import QueryRejected
from .bundle_arg import find_bundle


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the query text, e.g. 'chainsaw sound'")
    p.add_argument("--bundle", type=Path, default=None,
                   help="model bundle directory with its text side (default $EDGE_RETRIEVAL_BUNDLE, else the demo's default bundle)")
    p.add_argument("--top", type=int, default=10, help="how many labels/weights to show per expert")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _resolve(qb: Any, bundle: Bundle, text: str, top: int) -> dict[str, Any]:
    """One plain text: its default threshold, warnings and per-expert resolution."""
    from ...text import query_warnings

    res = qb.resolve(text)
    weights = qb.expert_weights(text, res)
    return {
        "text": text.strip(),
        "default_threshold": default_threshold(bundle, text),
        "warnings": query_warnings(text, res),
        "experts": [
            {
                "expert": r.expert,
                "weight": round(w, 4),
                "fit": round(float(r.fit), 4),
                "fits": r.fits,
                "warning": r.warning,
                "top": [[name, round(float(v), 4)] for name, v in r.top[:top]],
            }
            for r, w in zip(res, weights, strict=True)
        ],
    }


def _print(q: dict[str, Any], indent: str = "") -> None:
    print(f"{indent}default threshold {q['default_threshold']:g} (what run and alerts add use without --threshold)")
    for e in q["experts"]:
        print(f"\n{indent}expert {e['expert']} (weight {e['weight']:.2f}), fit {e['fit']:.3f}"
              + ("" if e["fits"] else " (below its floor)"))
        if e["warning"]:
            print(f"{indent}  warning: {e['warning']}")
        if e["weight"] <= 0.0:  # the bundle gives this expert no say for this text: its labels would mislead
            print(f"{indent}  (not used for this query: the other expert's labels carry it)")
            continue
        width = max((len(n) for n, _ in e["top"]), default=10)
        for name, v in e["top"]:
            print(f"{indent}  {name:<{width}}  {v:.4f}")
    for line in q["warnings"]:
        if not any(line == f"{e['expert']}: {e['warning']}" for e in q["experts"]):  # per-expert ones shown above
            print(f"\n{indent}warning: {line}")


def main(args: argparse.Namespace) -> int:
    from ...text import FIT_MEANING, QueryBuilder
    from ...text.temporal import parse_temporal

    if not args.text.strip():
        raise QueryRejected("query text is empty (expected a few words, e.g. 'chainsaw sound')")
    if args.top < 1:
        raise QueryRejected(f"--top {args.top!r} must be >= 1")
    tq = parse_temporal(args.text)  # a bad temporal text fails here, before the bundle loads
    bundle = load_bundle(find_bundle(args.bundle), part="all")
    qb = QueryBuilder(bundle)
    out: dict[str, Any] = {"text": args.text.strip(), "bundle": bundle.manifest.name, "space_id": bundle.manifest.space.id}
    if tq is None:
        out.update(_resolve(qb, bundle, args.text, args.top))
    else:
        out["relation"] = {"kind": tq.relation, "word": tq.word, "within_s": tq.within_s}
        out["parts"] = [_resolve(qb, bundle, t, args.top) for t in tq.parts]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"query {args.text.strip()!r} on bundle {bundle.manifest.name} ({bundle.manifest.space.kind} space)")
    if tq is None:
        _print(out)
    else:
        print(f"temporal query ({tq.relation}, {tq.word!r}): {tq.describe()}")
        for n, part in enumerate(out["parts"], 1):
            print(f"\npart {n}: {part['text']!r}")
            _print(part, indent="  ")
    print(f"\n{FIT_MEANING}")
    return 0
