"""Temporal alerts on generated sequence streams of real recordings (prints a table).

    python -m edge_retrieval.benchmarks.temporal --bundle BUNDLE --split dev [--reps 2] [--seed 0]

Streams are built from one half of data/fixture.csv (``offline.scenes.build_stream``: clips in a
row with a low noise floor between them, seeded). For every ordered pair (A, B) of the fixture's
detection categories and each repetition (random clips of A and B):

- **near**: A, a gap of ``--near`` seconds (uniform), B: the pattern "A followed by B within
  ``--within`` s" occurs once; for every other temporal query it does not;
- **far**: A, a gap of ``--far`` seconds, B: no sequence query may fire;
- **mixed** (unordered pairs): B with A added one second after B starts: "A while B" occurs;
  near and far streams hold no overlap. Mixed streams are not scored for sequence queries
  (overlapping sounds neither make nor break "A followed by B").

Every stream runs all temporal queries (``"A followed by B within N s"`` for every ordered pair,
``"A while B"`` for every unordered pair) through one ``Pipeline`` with the part queries as plain
queries beside them (same texts, thresholds and policy: the tuned defaults), so the parts'
own events are seen too. A firing is right when the stream holds the pattern and each part's
time overlaps its clip (1.5 s of slack, as ``scenes.match_events``); otherwise it is a false
positive. Reported per relation: precision (right firings / firings), recall (patterns found /
patterns), the parts' joint recall (patterns where both plain part queries had an event on their
clips) and recall / joint recall. Gaps stay clear of the limit by more than a window on each side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import load_bundle
from ..defaults import default_policy, default_threshold
from ..offline.scenes import DETECTION_QUERIES, Segment, build_stream, load_clip, read_fixture
from ..pipeline import Pipeline
from ..protocol import QueryMessage
from ..text import QueryBuilder

TOL_S = 1.5  # slack when matching a part's event to its clip (seconds), as scenes.match_events


@dataclass
class Tally:
    fired: int = 0
    right: int = 0
    patterns: int = 0
    found: int = 0
    joint: int = 0
    wrong: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        prec = self.right / self.fired if self.fired else float("nan")
        rec = self.found / self.patterns if self.patterns else float("nan")
        joint = self.joint / self.patterns if self.patterns else float("nan")
        return {
            "firings": self.fired, "right": self.right, "patterns": self.patterns, "found": self.found,
            "precision": round(prec, 4), "recall": round(rec, 4), "joint_recall": round(joint, 4),
            "recall_vs_joint": round(self.found / self.joint, 4) if self.joint else float("nan"),
        }


def _overlaps(a: float, b: float, seg: Segment) -> bool:
    return a < seg.end_s + TOL_S and b > seg.start_s - TOL_S


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--fixture", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "fixture.csv")
    p.add_argument("--split", choices=("dev", "test"), required=True)
    p.add_argument("--reps", type=int, default=2, help="streams per ordered pair and kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--within", type=float, default=30.0, help="the sequence queries' limit (seconds)")
    p.add_argument("--near", type=float, nargs=2, default=(2.0, 20.0), help="gap range inside the limit (s)")
    p.add_argument("--far", type=float, nargs=2, default=(45.0, 80.0), help="gap range outside the limit (s)")
    p.add_argument("--json", type=Path, help="also write the numbers, per query, and every wrong firing here")
    p.add_argument("--skip", action="append", default=[], metavar="CAT,CAT",
                   help="also report without the queries pairing these two categories (parts that fire on each "
                        "other's sounds; e.g. engine,power_tool: chosen on the dev half)")
    a = p.parse_args(argv)

    bundle = load_bundle(a.bundle, part="all")
    rate = bundle.manifest.device.experts[0].sample_rate
    qb = QueryBuilder(bundle)
    policy = default_policy(bundle)
    texts = {cats[0]: text for text, cats in DETECTION_QUERIES.items() if cats}  # category -> query text
    clips = {c: [x for x in read_fixture(a.fixture) if x.split == a.split and x.category == c] for c in texts}
    if not all(clips.values()):
        print(f"no {a.split} clips for {[c for c, v in clips.items() if not v]} (scripts/fetch_sounds.py)", file=sys.stderr)
        return 1
    cats = sorted(texts)
    plain: list[QueryMessage] = [qb.build(texts[c], f"part-{c}", default_threshold(bundle, texts[c]))[0] for c in cats]
    temporal: dict[str, tuple[str, str, str]] = {}  # query id -> (relation, first category, second category)
    msgs = list(plain)

    def add(qid: str, text: str, rel: str, first: str, second: str) -> None:
        tq_thr = [default_threshold(bundle, texts[first]), default_threshold(bundle, texts[second])]
        msgs.append(qb.build(text, qid, 0.0, part_thresholds=tq_thr, temporal=True)[0])
        temporal[qid] = (rel, first, second)

    for x, y in itertools.permutations(cats, 2):
        add(f"seq-{x}-{y}", f"{texts[x]} followed by {texts[y]} within {a.within:g} s", "sequence", x, y)
    for x, y in itertools.combinations(cats, 2):
        add(f"ovl-{x}-{y}", f"{texts[x]} while {texts[y]}", "overlap", x, y)

    pipe = Pipeline(bundle, msgs, policy, sample_rate=rate)
    rng = np.random.default_rng(a.seed)
    tallies = {"sequence": Tally(), "overlap": Tally()}
    per_query = {qid: Tally() for qid in temporal}
    streams = 0
    plan: list[tuple[str, str, str, float]] = []  # (kind, first category, second category, gap)
    for x, y in itertools.permutations(cats, 2):
        for _ in range(a.reps):
            plan.append(("near", x, y, float(rng.uniform(*a.near))))
            plan.append(("far", x, y, float(rng.uniform(*a.far))))
    for x, y in itertools.combinations(cats, 2):
        for _ in range(a.reps):
            plan.append(("mixed", x, y, 0.0))
    for kind, x, y, gap in plan:
        cx, cy = clips[x][rng.integers(len(clips[x]))], clips[y][rng.integers(len(clips[y]))]
        seed = int(rng.integers(1 << 31))
        if kind == "mixed":
            samples, (seg_y,) = build_stream([cy], rate, gap_s=8.0, lead_s=8.0, seed=seed)
            shot = load_clip(cx.path, rate, 20.0)
            at = int((seg_y.start_s + 1.0) * rate)
            shot = shot[: samples.size - at]
            samples[at : at + shot.size] += shot
            seg_x = Segment(cx, at / rate, (at + shot.size) / rate)
        else:
            samples, (seg_x, seg_y) = build_stream([cx, cy], rate, gap_s=gap, lead_s=8.0, seed=seed)
        seg = {x: seg_x, y: seg_y}
        pipe.reset()
        finals = [t.event for t in pipe.feed(samples) + pipe.close() if t.final]
        streams += 1
        plain_hit = {c: any(e.query_id == f"part-{c}" and _overlaps(e.start_s, e.end_s, seg[c]) for e in finals)
                     for c in (x, y)}
        for qid, (rel, f, s) in temporal.items():
            if kind == "mixed" and rel == "sequence":
                continue  # overlapping sounds neither make nor break "A followed by B"
            pattern = (kind == "near" and rel == "sequence" and (f, s) == (x, y)) or (
                kind == "mixed" and rel == "overlap" and {f, s} == {x, y})
            t, tq_ = tallies[rel], per_query[qid]
            if pattern:
                for u in (t, tq_):
                    u.patterns += 1
                    u.joint += plain_hit[f] and plain_hit[s]
            right_here = 0
            for e in (e for e in finals if e.query_id == qid):
                t.fired += 1
                tq_.fired += 1
                parts = e.parts  # type: ignore[attr-defined]
                ok = pattern and all(
                    _overlaps(pe.start_s, pe.end_s, seg[c]) for pe, c in zip(parts, (f, s), strict=True)
                ) if rel == "sequence" else pattern
                t.right += bool(ok)
                tq_.right += bool(ok)
                right_here += bool(ok)
                if not ok:
                    t.wrong.append(f"{qid} on {kind} {cx.clip_id} -> {cy.clip_id} gap {gap:.1f}s at {e.start_s:.1f}-{e.end_s:.1f}")
            t.found += pattern and right_here > 0
            tq_.found += pattern and right_here > 0
        print(f"\r{streams}/{len(plan)} streams", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = {rel: t.row() for rel, t in tallies.items()}
    skips = [tuple(sorted(x.split(","))) for x in a.skip]
    for rel in ("sequence", "overlap"):
        for pair in skips:
            keep = [per_query[q] for q, (r, f, s) in temporal.items() if r == rel and tuple(sorted((f, s))) != pair]
            rows[f"{rel} w/o {'+'.join(pair)}"] = Tally(
                sum(k.fired for k in keep), sum(k.right for k in keep), sum(k.patterns for k in keep),
                sum(k.found for k in keep), sum(k.joint for k in keep)).row()
    if "seq-gunshot-engine" in per_query:
        rows["gunshot followed by car engine"] = per_query["seq-gunshot-engine"].row()
    print(f"temporal alerts, {a.split} half, {streams} streams (reps {a.reps}, seed {a.seed}, within {a.within:g} s, "
          f"near gaps {a.near[0]:g}-{a.near[1]:g} s, far {a.far[0]:g}-{a.far[1]:g} s), bundle {bundle.manifest.name}")
    print(f"{'relation':<32} {'firings':>7} {'right':>5} {'patterns':>8} {'found':>5} {'precision':>9} {'recall':>6} "
          f"{'joint':>6} {'rec/joint':>9}")
    for rel, r in rows.items():
        print(f"{rel:<32} {r['firings']:>7} {r['right']:>5} {r['patterns']:>8} {r['found']:>5} {r['precision']:>9.3f} "
              f"{r['recall']:>6.3f} {r['joint_recall']:>6.3f} {r['recall_vs_joint']:>9.3f}")
    for rel, t in tallies.items():
        for w in t.wrong[:20]:
            print(f"  wrong ({rel}): {w}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                                      "rows": rows, "per_query": {q: t.row() for q, t in per_query.items()},
                                      "wrong": {r: t.wrong for r, t in tallies.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
