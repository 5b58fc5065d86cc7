#!/usr/bin/env python3
"""Each device profile's windowing and detection policy, measured on the DEV half of data/fixture.csv.

A profile sets ``[windows] overlap`` and may set ``[detection.policy]``, which wins over the
bundle's tuned policy (docs/architecture.md, "Detection policy precedence"); the thresholds are
always the bundle's tuned ones (edge_retrieval/data/default_policy.json), chosen at the bundle's
own hop without overlap. This script scores the dev clips in a row with noise gaps
(``scenes.build_stream``) in several orders (seeds; a sound's score depends on where the hop grid
falls on it, so one order is a noisy measure), once per overlap, and replays the detector for every
candidate (overlap, policy) and for every shipped profile (firmware_config/profiles/*.toml, merged
over the bundle's tuned policy as the daemon merges them). It prints and writes, per row, event
recall, precision and F1 (mean over the orders, with the range of F1) and false events per stream.

The candidate list is fixed in CANDIDATES. The test half is never read here.
Usage: .venv/bin/python scripts/profile_policies.py [--bundle DIR] [--seeds 0,1,2]
       [--json benchmarks/results/profile_policies_dev.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tomllib
from tune_defaults import evaluate, f1, score_stream  # same folder: the stream and replay of the tuning

from edge_retrieval.bundle import load_bundle
from edge_retrieval.cli.commands.demo import DEFAULT_BUNDLE
from edge_retrieval.defaults import default_policy, default_threshold
from edge_retrieval.offline.scenes import DETECTION_QUERIES, read_fixture, totals
from edge_retrieval.pipeline.matcher import compile_query
from edge_retrieval.policy import PolicyOverlay, resolve
from edge_retrieval.text import QueryBuilder

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "firmware_config" / "profiles"
OUT = REPO / "benchmarks" / "results" / "profile_policies_dev.json"

# (name, overlap, policy overlay over the bundle's tuned policy); fixed before the run whose
# numbers the profiles quote. The last three rows were added after that first table.
CANDIDATES: list[tuple[str, float, dict]] = [
    ("bundle's tuned policy, no overlap", 0.0, {}),
    ("no overlap, 1 of 1, cooldown 15", 0.0, {"min_hits": 1, "of_windows": 1, "cooldown_s": 15}),
    ("no overlap, cooldown 10", 0.0, {"cooldown_s": 10}),
    ("no overlap, cooldown 15", 0.0, {"cooldown_s": 15}),
    ("50 % overlap, bundle's policy", 0.5, {}),
    ("50 % overlap, 2 of 3, cooldown 10", 0.5, {"min_hits": 2, "of_windows": 3, "cooldown_s": 10}),
    ("50 % overlap, 3 of 5", 0.5, {"min_hits": 3, "of_windows": 5}),
    ("50 % overlap, 4 of 5", 0.5, {"min_hits": 4, "of_windows": 5}),
    ("75 % overlap, bundle's policy", 0.75, {}),
    ("75 % overlap, 3 of 4, cooldown 10", 0.75, {"min_hits": 3, "of_windows": 4, "cooldown_s": 10}),
    ("75 % overlap, 5 of 9", 0.75, {"min_hits": 5, "of_windows": 9}),
    ("75 % overlap, 3 of 4", 0.75, {"min_hits": 3, "of_windows": 4}),
    ("50 % overlap, 2 of 2", 0.5, {"min_hits": 2, "of_windows": 2}),
    ("no overlap, 2 of 2", 0.0, {"min_hits": 2, "of_windows": 2}),
]


def profile_settings(path: Path) -> tuple[float, dict]:
    """(overlap, [detection.policy]) a profile sets; overlap 0 and {} where it sets none."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    overlap = float(data.get("windows", {}).get("overlap", 0.0))
    return overlap, dict(data.get("detection", {}).get("policy", {}))


def effective(bundle, overlay: dict) -> dict:  # noqa: ANN001
    """The policy a daemon runs: the overlay over the bundle's tuned policy over the built-in one."""
    return resolve(PolicyOverlay.model_validate(overlay) if overlay else None, default_policy(bundle)).model_dump()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--fixture", type=Path, default=REPO / "data" / "fixture.csv")
    ap.add_argument("--seeds", default="0,1,2", help="stream orders (comma-separated seeds)")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    bundle = load_bundle(args.bundle, part="all")
    clips = [c for c in read_fixture(args.fixture) if c.split == "dev"]
    if not clips:
        print(f"profile_policies: no dev clips on disk for {args.fixture} (run scripts/fetch_sounds.py)", file=sys.stderr)
        return 1
    seeds = [int(s) for s in args.seeds.split(",")]
    texts = list(DETECTION_QUERIES)
    qb = QueryBuilder(bundle)
    msgs = [qb.build(t, f"q{i}", 0.5)[0] for i, t in enumerate(texts)]
    compiled = [compile_query(m, bundle.manifest) for m in msgs]
    cats = {f"q{i}": c for i, c in enumerate(DETECTION_QUERIES.values())}
    thresholds = {f"q{i}": default_threshold(bundle, t) for i, t in enumerate(texts)}

    rows = [{"name": n, "overlap": ov, "overlay": pol} for n, ov, pol in CANDIDATES]
    profiles: dict[str, str] = {}
    for path in sorted(PROFILES.glob("*.toml")):
        ov, pol = profile_settings(path)
        eff = effective(bundle, pol)
        same = next((r for r in rows if r["overlap"] == ov and effective(bundle, r["overlay"]) == eff), None)
        if same is None:
            same = {"name": f"profile {path.stem}", "overlap": ov, "overlay": pol}
            rows.append(same)
        profiles[path.stem] = same["name"]

    results: dict[str, list] = {r["name"]: [] for r in rows}
    for seed in seeds:
        for ov in sorted({r["overlap"] for r in rows}):
            t0 = time.time()
            sc = score_stream(bundle, clips, seed, msgs, args.threads, overlap=ov)
            print(f"profile_policies: order {seed}, overlap {ov:g}: {len(sc.starts)} windows in {time.time() - t0:.0f} s",
                  file=sys.stderr, flush=True)
            for r in (r for r in rows if r["overlap"] == ov):
                per = evaluate(sc, compiled, cats, PolicyOverlay.model_validate(effective(bundle, r["overlay"])), thresholds)
                rec, prec = totals(per)
                results[r["name"]].append((rec, prec, f1(rec, prec), sum(v["fp"] for v in per.values())))

    table = []
    for r in rows:
        a = np.asarray(results[r["name"]])
        table.append({
            "name": r["name"], "overlap": r["overlap"], "policy": r["overlay"],
            "effective_policy": effective(bundle, r["overlay"]),
            "recall": round(float(a[:, 0].mean()), 4), "precision": round(float(a[:, 1].mean()), 4),
            "f1": round(float(a[:, 2].mean()), 4), "f1_min": round(float(a[:, 2].min()), 4),
            "f1_max": round(float(a[:, 2].max()), 4), "false_events_per_stream": round(float(a[:, 3].mean()), 2),
        })
    width = max(len(t["name"]) for t in table)
    print(f"{'setting':<{width}}  recall precision     F1 (range)      false events/stream")
    for t in table:
        mark = " <- " + ", ".join(p for p, n in profiles.items() if n == t["name"]) if t["name"] in profiles.values() else ""
        print(f"{t['name']:<{width}}  {t['recall']:6.3f} {t['precision']:9.3f}  {t['f1']:.3f} "
              f"({t['f1_min']:.3f}-{t['f1_max']:.3f})  {t['false_events_per_stream']:5.1f}{mark}")
    out = {
        "bundle": bundle.manifest.name, "space_id": bundle.manifest.space.id,
        "chosen_on": f"dev half of data/fixture.csv: {len(clips)} clips, stream orders {seeds}",
        "thresholds": "the bundle's tuned ones (edge_retrieval/data/default_policy.json)",
        "command": "python scripts/profile_policies.py", "rows": table, "profiles": profiles,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"profile_policies: wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
