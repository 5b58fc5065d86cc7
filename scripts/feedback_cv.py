"""DEV ONLY: which similarity floor lets one "false alarm" click generalise (the rule's choice).

Feedback (pipeline/feedback.py) suppresses a window whose cosine to a negative is at least
MIN_NEGATIVE_SIMILARITY and above its cosine to the query. This script chose that floor on the
fixture's DEV half only: the dev clips are split in two folds by package (so the folds hold
different recordings, as dev and test do); for each query (the fixed detection queries plus one
per remaining fixture category) the first false event of fold A gives its negatives, the windows
a device sends with it (``Pipeline.event_examples``: the peak, then windows spread over the
event, K in all), and fold B is scored without and with them (then B -> A). Rules are
simulated on cached per-window vectors with the real matcher and detector; printed per rule: the
false events of those queries before -> after and the true events before -> after.

K, the number of windows an event carries (``protocol.FEEDBACK_WINDOWS``), was chosen with this
grid on the default bundle: the smallest K that reaches the most false events removed without a
true event lost (K = 1, the peak alone, removed 3 of 11; K = 4 removed 5).

Also printed: the same with a floor on the experts' EMBEDDING outputs (cosine of the 1,024-d
embeddings, mixed with the query's expert weights), the alternative considered and not taken
(a fixed embedding floor costs many more true events on dev for the false events it removes).

With --write, the labels floor chosen goes to edge_retrieval/data/default_policy.json as the
space's ``feedback_floor`` (with the dev numbers): at K = FEEDBACK_WINDOWS, of the floors that
lose no true event on dev, the one that removes the most false events; among equals, the highest
(the most cautious).

Usage: .venv/bin/python scripts/feedback_cv.py [--bundle DIR] [--cache FILE] [--write]
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import pickle
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from edge_retrieval.bundle import load_bundle
from edge_retrieval.cli.commands.demo import DEFAULT_BUNDLE
from edge_retrieval.defaults import default_policy, default_threshold
from edge_retrieval.offline.scenes import DETECTION_QUERIES, build_stream, match_events, read_fixture
from edge_retrieval.pipeline import Pipeline
from edge_retrieval.pipeline.core import run_detector
from edge_retrieval.pipeline.detector import Detector
from edge_retrieval.pipeline.expert import AudioExpert
from edge_retrieval.pipeline.feedback import decode_example, window_example
from edge_retrieval.pipeline.matcher import compile_query
from edge_retrieval.protocol import FEEDBACK_WINDOWS
from edge_retrieval.text import QueryBuilder

_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
_ap.add_argument("--cache", type=Path, default=None, help="pickle of the folds' vectors (reused when present)")
_ap.add_argument("--write", action="store_true", help="write the chosen floor into the tuned defaults")
ARGS = _ap.parse_args()
B = ARGS.bundle
CACHE = ARGS.cache
REPO = Path(__file__).resolve().parent.parent
EXTRA = dict(DETECTION_QUERIES)
EXTRA.update({
    "car horn": ("car_horn",), "explosion": ("explosion",), "a cow or other farm animal": ("farm_animal",),
    "frogs or insects": ("frog_insect",), "a person screaming": ("scream",), "people talking": ("speech",),
    "thunder": ("thunder",), "running water": ("distractor_water",), "wind blowing": ("distractor_wind",),
})

bundle = load_bundle(B, part="all")
qb = QueryBuilder(bundle)
texts = list(EXTRA)
msgs = [qb.build(t, f"q{i}", default_threshold(bundle, t))[0] for i, t in enumerate(texts)]
cats = {f"q{i}": c for i, c in enumerate(EXTRA.values())}
cqs = [compile_query(m, bundle.manifest) for m in msgs]

PKG = {r["clip_id"]: r["package"] for r in csv.DictReader(open(REPO / "data" / "fixture.csv", encoding="utf-8"))}
clips = [c for c in read_fixture(REPO / "data" / "fixture.csv") if c.split == "dev"]
pk = sorted({PKG[c.clip_id] for c in clips})
# two folds by package, balanced greedily by clip count
cnt = defaultdict(int)
for c in clips:
    cnt[PKG[c.clip_id]] += 1
folds: list[list[str]] = [[], []]
sizes = [0, 0]
for p in sorted(pk, key=lambda p: -cnt[p]):
    i = int(sizes[1] < sizes[0])
    folds[i].append(p)
    sizes[i] += cnt[p]


def encode_fold(fi: int):
    fc = [c for c in clips if PKG[c.clip_id] in folds[fi]]
    random.Random(0).shuffle(fc)
    rate = bundle.manifest.device.experts[0].sample_rate
    x, segs = build_stream(fc, rate, seed=0)
    pipe = Pipeline(bundle, msgs, default_policy(bundle), sample_rate=rate)
    exps = [AudioExpert(bundle, s, extra_outputs=list(s.extra_outputs)) for s in bundle.manifest.device.experts]
    ticks = pipe.push(x) + pipe.flush()
    keep = set(pipe.gate_ticks(ticks))
    spans = [(t.start_s, t.end_s) for t in ticks]
    lab = {e.name: [] for e in exps}
    emb = {e.name: [] for e in exps}
    idx = [i for i in range(len(ticks)) if i in keep]
    for j in range(0, len(idx), 16):
        part = idx[j:j + 16]
        for e in exps:
            w = np.stack([ticks[i].windows[e.name] for i in part])
            v, extra = e.embed(w, with_extra=True)
            lab[e.name].append(v)
            if extra:
                emb[e.name].append(extra[0].astype(np.float32))
    lab = {k: np.concatenate(v) for k, v in lab.items()}
    emb = {k: np.concatenate(v) for k, v in emb.items() if v}
    truth = {q: [(s.start_s, s.end_s) for s in segs if s.clip.category in c] for q, c in cats.items()}
    return dict(spans=spans, idx=idx, lab=lab, emb=emb, truth=truth, n=len(fc), secs=x.size / rate)


if CACHE is not None and CACHE.exists():
    data = pickle.loads(CACHE.read_bytes())
else:
    data = [encode_fold(0), encode_fold(1)]
    if CACHE is not None:
        CACHE.write_bytes(pickle.dumps(data))
print("folds", folds, [d["n"] for d in data], [round(d["secs"]) for d in data], file=sys.stderr)

snap_pipe = Pipeline(bundle, msgs, default_policy(bundle))
snap = snap_pipe.matcher.snapshot
order = [q.query_id for q in snap.queries]
col = {q: order.index(q) for q in cats}
scores_f = [snap.score(d["lab"]) for d in data]  # [kept, nq]


def events(fi: int, mask: np.ndarray | None):
    """query id -> [(a, b, peak kept-row)] for fold fi; mask [kept, nq] True = suppressed."""
    d = data[fi]
    sc = scores_f[fi].copy()
    if mask is not None:
        sc = np.where(mask, np.nan, sc)
    rows = [None] * len(d["spans"])
    for j, i in enumerate(d["idx"]):
        rows[i] = sc[j]
    det = Detector(default_policy(bundle))
    trs = run_detector(det, snap.queries, d["spans"], rows)
    pos = {i: j for j, i in enumerate(d["idx"])}
    out = defaultdict(list)
    for tr in trs:
        if not tr.final:
            continue
        ev = tr.event
        c = col[ev.query_id]
        best, bj = -1.0, None
        for i, (a, b) in enumerate(d["spans"]):
            if b <= ev.start_s or a >= ev.end_s or i not in pos:
                continue
            s = sc[pos[i], c]
            if s == s and s > best:
                best, bj = s, pos[i]
        out[ev.query_id].append((ev.start_s, ev.end_s, bj))
    return out


base = [events(0, None), events(1, None)]


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def label_unit(fi, j):
    """Labels vectors of kept row j as an event carries them (top 32, decoded), dense unit."""
    d = data[fi]
    ex = window_example(bundle.manifest, {k: v[j] for k, v in d["lab"].items()})
    dec = decode_example(ex, bundle.manifest, "x")
    out = {}
    for s in bundle.manifest.device.experts:
        i, w = dec[s.name]
        v = np.zeros(s.dim, np.float32)
        v[i] = w
        out[s.name] = v
    return out


def sims(fi, cq, neg):
    """Per-window similarity to one negative (fold fi rows): dict of named similarity arrays."""
    d = data[fi]
    out = {}
    lab = 0
    for s in bundle.manifest.device.experts:
        xn = unit(d["lab"][s.name])
        c = xn @ neg["lab"][s.name]
        lab = lab + cq.weights[s.name] * c
    out["lab"] = lab
    # anchor cosine (the query's own label vector), mixed as the score is
    anc = 0
    for s in bundle.manifest.device.experts:
        i, w = cq.sparse[s.name]
        a = np.zeros(s.dim, np.float32)
        a[i] = w
        a = unit(a)
        anc = anc + cq.weights[s.name] * (unit(d["lab"][s.name]) @ a)
    out["anchor"] = anc
    emb = 0
    for s in bundle.manifest.device.experts if neg["emb"] else ():
        c = unit(d["emb"][s.name]) @ unit(neg["emb"][s.name])
        emb = emb + cq.weights[s.name] * c
    out["emb"] = emb
    return out


def event_rows(fi: int, s: float, e: float, peak: int, k: int) -> list[int]:
    """The kept rows a device sends for the event [s, e) (``Pipeline.event_examples``): the peak,
    then up to k - 1 more spread evenly over the event's windows."""
    d = data[fi]
    pos = {i: j for j, i in enumerate(d["idx"])}
    held = [pos[i] for i, (a, b) in enumerate(d["spans"]) if a < e and b > s and i in pos]
    picks = list(range(len(held)))
    if len(picks) > k:
        picks = sorted({int(round(t)) for t in np.linspace(0, len(held) - 1, k)})
    p = held.index(peak)
    if p not in picks:
        picks = picks[: k - 1]
    return [peak] + [held[i] for i in picks if i != p]


def rule(space: str, floor: float, s: dict[str, np.ndarray]) -> np.ndarray:
    """Suppressed windows: labels as on the device (floor and above the query), or embeddings."""
    if space == "lab":
        return (s["lab"] >= floor) & (s["lab"] > s["anchor"])
    return s["emb"] >= floor


def score_rule(rule, k: int = FEEDBACK_WINDOWS, verbose=False):
    """Sum over (A->B) of false events before/after, true events before/after (k windows a click)."""
    tot = dict(fp0=0, fp1=0, tp0=0, tp1=0, nneg=0)
    per = []
    for a, b in ((0, 1), (1, 0)):
        mask = np.zeros_like(scores_f[b], dtype=bool)
        negs = {}
        for q in cats:
            truth = data[a]["truth"][q]
            for s, e, j in sorted(base[a][q]):
                if j is not None and match_events([(s, e)], truth)[1]:
                    negs[q] = [dict(lab=label_unit(a, r), emb={n: v[r] for n, v in data[a]["emb"].items()})
                               for r in event_rows(a, s, e, j, k)]
                    break
        for q, rows in negs.items():
            cq = cqs[int(q[1:])]
            for neg in rows:
                mask[:, col[q]] |= rule(sims(b, cq, neg))
            tot["nneg"] += len(rows)
        after = events(b, mask)
        for q in negs:
            truth = data[b]["truth"][q]
            t0, f0, _ = match_events([(s, e) for s, e, _ in base[b][q]], truth)
            t1, f1, _ = match_events([(s, e) for s, e, _ in after[q]], truth)
            tot["fp0"] += f0
            tot["fp1"] += f1
            tot["tp0"] += t0
            tot["tp1"] += t1
            per.append((a, b, texts[int(q[1:])], f0, f1, t0, t1))
    if verbose:
        for p in per:
            print("   ", p)
    return tot


if __name__ == "__main__":
    for fi in (0, 1):
        for q in cats:
            t, f, _ = match_events([(s, e) for s, e, _ in base[fi][q]], data[fi]["truth"][q])
            print(fi, texts[int(q[1:])], "tp", t, "fp", f)
    floors = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    rules: dict[str, tuple[str, float]] = {f"labels>={fl} & >query": ("lab", fl) for fl in floors}
    if all(s.extra_outputs for s in bundle.manifest.device.experts):
        rules.update({f"embeddings>={fl}": ("emb", fl) for fl in floors})
    results = {}
    for k in sorted({1, 2, 3, 4, 5, 6, 8, FEEDBACK_WINDOWS}):
        for name, (space, fl) in rules.items():
            if space == "emb" and k != FEEDBACK_WINDOWS:
                continue
            t = score_rule(functools.partial(rule, space, fl), k)
            results[(k, space, fl)] = t
            fr = (t["fp0"] - t["fp1"]) / max(t["fp0"], 1)
            tl = (t["tp0"] - t["tp1"]) / max(t["tp0"], 1)
            print(f"K={k} {name:<24} negs {t['nneg']} fp {t['fp0']}->{t['fp1']} ({fr:.0%} removed) "
                  f"tp {t['tp0']}->{t['tp1']} ({tl:.1%} lost)")
    safe = {key: t["fp0"] - t["fp1"] for key, t in results.items() if key[1] == "lab" and t["tp1"] >= t["tp0"]}
    if not safe:
        raise SystemExit("feedback_cv: every labels floor loses a true event on dev; nothing chosen")
    best_k = min(k for (k, _, _), n in safe.items() if n == max(safe.values()))
    print(f"the smallest K removing the most without loss ({max(safe.values())} false events): {best_k} "
          f"(protocol.FEEDBACK_WINDOWS = {FEEDBACK_WINDOWS})")
    at_k = [(n, fl) for (k, _, fl), n in safe.items() if k == FEEDBACK_WINDOWS]
    if not at_k:
        raise SystemExit(f"feedback_cv: at K={FEEDBACK_WINDOWS} every labels floor loses a true event on dev")
    floor = max(at_k)[1]
    t = results[(FEEDBACK_WINDOWS, "lab", floor)]
    print(f"chosen: labels floor {floor} at K={FEEDBACK_WINDOWS} (dev folds: false events {t['fp0']} -> "
          f"{t['fp1']}, true events {t['tp0']} -> {t['tp1']})")
    if ARGS.write:
        out = REPO / "edge_retrieval" / "data" / "default_policy.json"
        doc = json.loads(out.read_text("utf-8"))
        entry = doc.setdefault("spaces", {}).setdefault(bundle.manifest.space.id, {"bundle": bundle.manifest.name})
        entry["feedback_floor"] = floor
        entry["feedback_cv"] = {
            "method": "scripts/feedback_cv.py: dev half in 2 folds by package, first false event of each "
                      "query in one fold as its negatives (its windows a device sends), scored on the other "
                      "(both ways)",
            "windows": FEEDBACK_WINDOWS, "queries": len(texts), "negatives": t["nneg"],
            "false_events": [t["fp0"], t["fp1"]],
            "true_events": [t["tp0"], t["tp1"]],
        }
        out.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
        print(f"wrote feedback_floor {floor} for space {bundle.manifest.space.id[:12]} to {out}")
