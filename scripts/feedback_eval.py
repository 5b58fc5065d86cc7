"""What one "false alarm" click per query buys: feedback learnt on the DEV half, measured on TEST.

The fixed detection queries (``scenes.DETECTION_QUERIES``) run with the bundle's tuned thresholds
and policy (``defaults.tuned_for``) through the device's ``Pipeline`` over the dev stream (dev
clips of data/fixture.csv shuffled with seed 0, ``scenes.build_stream``, as tune_defaults; the
test stream as tests/test_fixture_quality.py, seed 1). For each query the
first event that matches no clip of its categories (a false alarm, ``scenes.match_events``)
gives the windows a device sends with the event (``Pipeline.event_examples``: the peak, then
windows spread over it, ``protocol.FEEDBACK_WINDOWS`` in all) as the query's negatives. The test stream is then run once with each query twice:
as shipped, and with its negative (pipeline/feedback.py decides suppression). Printed: per
query and in total, false events before/after (share removed) and true events and clips found
before/after (share lost). Nothing here asserts; the README quotes the table.

A second table replays the dev stream with EVERY dev false alarm marked (the same sounds heard
again, as a ranger's click is meant to work): false events removed and true events lost there.

Usage: .venv/bin/python scripts/feedback_eval.py [--bundle DIR] [--fixture data/fixture.csv]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

from edge_retrieval.bundle import Bundle, load_bundle
from edge_retrieval.cli.commands.demo import DEFAULT_BUNDLE
from edge_retrieval.defaults import default_policy, default_threshold
from edge_retrieval.offline.scenes import (
    DETECTION_QUERIES,
    Segment,
    build_stream,
    event_scores,
    match_events,
    read_fixture,
)
from edge_retrieval.pipeline import Pipeline
from edge_retrieval.protocol import MAX_EXAMPLES, Example, QueryMessage
from edge_retrieval.text import QueryBuilder

REPO = Path(__file__).resolve().parent.parent
BLOCK_S = 5.0


def run(bundle: Bundle, x: np.ndarray, rate: int, msgs: list[QueryMessage]) -> tuple[dict[str, list], dict[str, int]]:
    """Feed ``x`` through one Pipeline: query id -> [(start_s, end_s, [Example])] of its events."""
    pipe = Pipeline(bundle, msgs, default_policy(bundle), sample_rate=rate, keep_vectors=1_000_000)
    out: dict[str, list] = {m.query_id: [] for m in msgs}
    step = int(BLOCK_S * rate)
    trs = []
    for i in range(0, x.size, step):
        trs.extend(pipe.feed(x[i : i + step]))
    trs.extend(pipe.close())
    for tr in trs:
        if tr.final:
            out[tr.event.query_id].append((tr.event.start_s, tr.event.end_s, pipe.event_examples(tr.event)))
    return out, dict(pipe.suppressed)


def stream(bundle: Bundle, fixture: Path, split: str) -> tuple[np.ndarray, list[Segment], int]:
    """The stream of one half, built as tune_defaults (dev, seed 0) and the fixture test (test, seed 1)."""
    clips = [c for c in read_fixture(fixture) if c.split == split]
    if not clips:
        raise SystemExit(f"feedback_eval: no {split} clips on disk for {fixture} (run scripts/fetch_sounds.py)")
    seed = 0 if split == "dev" else 1
    random.Random(seed).shuffle(clips)
    rate = bundle.manifest.device.experts[0].sample_rate
    x, segs = build_stream(clips, rate, seed=seed)
    return x, segs, rate


def table(msgs: list[QueryMessage], texts: list[str], events: dict[str, list], segs: list[Segment],
          cats: dict[str, tuple[str, ...]], marked: set[str], suppressed: dict[str, int]) -> None:
    """Per query and in total: false / true events and clips found, as shipped and with feedback."""
    spans = {q: [(a, b) for a, b, _ in evs] for q, evs in events.items()}
    before = event_scores({m.query_id: spans[m.query_id] for m in msgs}, segs, cats)
    after = event_scores({m.query_id: spans["f" + m.query_id[1:] if m.query_id in marked else m.query_id]
                          for m in msgs}, segs, cats)
    print(f"{'query':<16} {'neg':>3} {'false before':>12} {'after':>6} {'true before':>11} {'after':>6} "
          f"{'found before':>12} {'after':>6} {'windows suppressed':>18}")
    tot = dict.fromkeys(("fp0", "fp1", "tp0", "tp1", "f0", "f1"), 0)
    for m, text in zip(msgs, texts, strict=True):
        b, a = before[m.query_id], after[m.query_id]
        sup = suppressed.get("f" + m.query_id[1:], 0)
        print(f"{text:<16} {'yes' if m.query_id in marked else 'no':>3} {b['fp']:>12} {a['fp']:>6} {b['tp']:>11} "
              f"{a['tp']:>6} {b['found']:>8}/{b['truth']:<3} {a['found']:>6} {sup:>18}")
        for k, v in (("fp0", b["fp"]), ("fp1", a["fp"]), ("tp0", b["tp"]), ("tp1", a["tp"]),
                     ("f0", b["found"]), ("f1", a["found"])):
            tot[k] += v

    def share(x0: int, x1: int) -> str:
        return f"{(x0 - x1) / x0:.0%}" if x0 else "n/a"

    print(f"total: false events {tot['fp0']} -> {tot['fp1']} (removed {share(tot['fp0'], tot['fp1'])}); "
          f"true events {tot['tp0']} -> {tot['tp1']} (lost {share(tot['tp0'], tot['tp1'])}); "
          f"clips found {tot['f0']} -> {tot['f1']} (lost {share(tot['f0'], tot['f1'])})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--fixture", type=Path, default=REPO / "data" / "fixture.csv")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle, part="all")
    qb = QueryBuilder(bundle)
    texts = list(DETECTION_QUERIES)
    msgs = [qb.build(t, f"q{i}", default_threshold(bundle, t))[0] for i, t in enumerate(texts)]
    cats = {f"q{i}": c for i, c in enumerate(DETECTION_QUERIES.values())}

    x, segs, rate = stream(bundle, args.fixture, "dev")
    dev, _ = run(bundle, x, rate, msgs)
    negatives: dict[str, list[Example]] = {}
    for qid, evs in dev.items():
        truth = [(s.start_s, s.end_s) for s in segs if s.clip.category in cats[qid]]
        for a, b, exs in sorted(evs, key=lambda e: e[0]):
            if match_events([(a, b)], truth)[1] and exs:  # a false positive on its own
                negatives[qid] = exs
                break
    print(f"dev: {x.size / rate:.0f} s; a false alarm to mark for {len(negatives)} of {len(msgs)} queries",
          file=sys.stderr)

    fb = [m.model_copy(update={"query_id": "f" + m.query_id[1:], "negatives": negatives[m.query_id]})
          for m in msgs if m.query_id in negatives]
    xt, segs_t, _ = stream(bundle, args.fixture, "test")
    test, suppressed = run(bundle, xt, rate, msgs + fb)
    print(f"test: {xt.size / rate:.0f} s, bundle {bundle.manifest.name}; one false alarm marked per query (its first "
          "false alarm on dev)")
    table(msgs, texts, test, segs_t, cats, set(negatives), suppressed)

    every: dict[str, list[Example]] = {}
    for qid, evs in dev.items():
        truth = [(s.start_s, s.end_s) for s in segs if s.clip.category in cats[qid]]
        every[qid] = [ex for a, b, exs in evs if match_events([(a, b)], truth)[1] for ex in exs][-MAX_EXAMPLES:]
    fb_all = [m.model_copy(update={"query_id": "f" + m.query_id[1:], "negatives": every[m.query_id]})
              for m in msgs if every[m.query_id]]
    again, suppressed = run(bundle, x, rate, msgs + fb_all)
    print(f"\ndev replayed: {x.size / rate:.0f} s; every dev false alarm marked "
          f"({sum(len(v) for v in every.values())} negatives), the same sounds heard again")
    table(msgs, texts, again, segs, cats, {q for q, v in every.items() if v}, suppressed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
