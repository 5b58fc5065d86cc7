"""``edge-retrieval explain "rain" --bundle DIR``: what a text query resolves to, per expert.

A temporal query ("gunshot followed by car engine within 30 s") shows its relation and, for
each part, what that part resolves to. Shows the top labels (labels space) or nearest captions with their weights, the fit (best
similarity of the text to anything the expert knows) and the text side's warning, if any.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ...bundle import load_bundle
from ...errors import QueryRejected


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the query text, e.g. 'chainsaw sound'")
    p.add_argument("--bundle", type=Path, required=True, help="model bundle directory (with its text side)")
    p.add_argument("--top", type=int, default=10, help="how many labels/weights to show per expert")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _experts(qb: Any, text: str, top: int) -> list[dict[str, Any]]:
    res = qb.resolve(text)
    weights = qb.expert_weights(text, res)
    return [
        {
            "expert": r.expert,
            "weight": round(w, 4),
            "fit": round(float(r.fit), 4),
            "warning": r.warning,
            "top": [[name, round(float(v), 4)] for name, v in r.top[:top]],
        }
        for r, w in zip(res, weights, strict=True)
    ]


def _print_experts(experts: list[dict[str, Any]], indent: str = "") -> None:
    for e in experts:
        print(f"\n{indent}expert {e['expert']} (weight {e['weight']:.2f}), fit {e['fit']:.3f}")
        if e["warning"]:
            print(f"{indent}  warning: {e['warning']}")
        width = max((len(n) for n, _ in e["top"]), default=10)
        for name, v in e["top"]:
            print(f"{indent}  {name:<{width}}  {v:.4f}")


def main(args: argparse.Namespace) -> int:
    from ...text import QueryBuilder
    from ...text.temporal import parse_temporal

    if not args.text.strip():
        raise QueryRejected("query text is empty (expected a few words, e.g. 'chainsaw sound')")
    if args.top < 1:
        raise QueryRejected(f"--top {args.top!r} must be >= 1")
    tq = parse_temporal(args.text)  # a bad temporal text fails here, before the bundle loads
    bundle = load_bundle(args.bundle, part="all")
    qb = QueryBuilder(bundle)
    out: dict[str, Any] = {"text": args.text.strip(), "bundle": bundle.manifest.name, "space_id": bundle.manifest.space.id}
    if tq is None:
        out["experts"] = _experts(qb, args.text, args.top)
    else:
        out["relation"] = {"kind": tq.relation, "word": tq.word, "within_s": tq.within_s}
        out["parts"] = [{"text": t, "experts": _experts(qb, t, args.top)} for t in tq.parts]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"query {args.text.strip()!r} on bundle {bundle.manifest.name} ({bundle.manifest.space.kind} space)")
    if tq is None:
        _print_experts(out["experts"])
        return 0
    print(f"temporal query ({tq.relation}, {tq.word!r}): {tq.describe()}")
    for n, part in enumerate(out["parts"], 1):
        print(f"\npart {n}: {part['text']!r}")
        _print_experts(part["experts"], indent="  ")
    return 0
