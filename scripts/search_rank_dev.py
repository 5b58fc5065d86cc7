#!/usr/bin/env python3
"""How archive search should rank text queries, measured on the DEV half of data/fixture.csv only.

The dev clips (every category, distractors included) and nine synthetic background files (white
and brown noise at -70, -50, -30 and -15 dBFS, and digital silence; 10 s each) are indexed with the
bundle (``edge-retrieval index``'s own path: ``index_folder`` into an ``ArchiveIndex``). For each
of the archive test's fixed queries (tests/test_archive_fixture.py, fixed before any score) the
index is searched by the dot product (the detection score) and by the cosine (search's default);
printed per ranking: how many queries find their category first, the mean reciprocal rank of the
first window of their category, and which windows came first where they missed (a ``bg_noise``
or ``distractor_*`` first is a background window outranking the sounds).

``--heldout`` instead indexes the fixture clips that the committed mixture of experts
(export/data/moee) never saw in training or model selection, as
tests/test_train.py::test_committed_ensemble_on_held_out_fixture_clips does, so the bundle can be
compared with the ensemble's number there (this includes test-half clips: a held-out look).

Usage: .venv/bin/python scripts/search_rank_dev.py [--bundle DIR] [--heldout]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from edge_retrieval.bundle import load_bundle
from edge_retrieval.cli.commands.demo import DEFAULT_BUNDLE
from edge_retrieval.offline.archive import ArchiveIndex, index_folder
from edge_retrieval.offline.retrieval import text_queries
from edge_retrieval.offline.scenes import read_fixture

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.test_archive_fixture import FIXED_QUERIES  # noqa: E402  (one list of fixed queries)

RATE = 48_000
BACKGROUND_S = 10.0


def background(root: Path) -> None:
    """Synthetic background files under root/bg_noise/ (seeded)."""
    rng = np.random.default_rng(0)
    d = root / "bg_noise"
    d.mkdir(parents=True)
    n = int(BACKGROUND_S * RATE)
    for level in (-70, -50, -30, -15):
        gain = 10 ** (level / 20)
        sf.write(d / f"white{level}.wav", (gain * rng.standard_normal(n)).astype(np.float32), RATE)
        brown = np.cumsum(rng.standard_normal(n))
        brown -= np.convolve(brown, np.ones(4801) / 4801, "same")  # no drift below ~10 Hz
        sf.write(d / f"brown{level}.wav", (gain * brown / np.abs(brown).max()).astype(np.float32), RATE)
    sf.write(d / "silence.wav", np.zeros(n, np.float32), RATE)


def heldout_rows() -> list[dict[str, str]]:
    weights = REPO / "export" / "data" / "moee"
    recipe = json.loads((weights / "recipe.json").read_text())
    split = {p: s for s, ps in recipe["packages"].items() for p in ps}
    with open(REPO / "data" / "captions.csv", newline="", encoding="utf-8") as f:
        seen = {r["path"] for r in csv.DictReader(f) if split.get(r["package"]) in ("train", "dev")}
    with open(REPO / "data" / "fixture.csv", newline="", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if f"{r['package']}:{r['path_in_package']}" not in seen]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--fixture", type=Path, default=REPO / "data" / "fixture.csv")
    ap.add_argument("--heldout", action="store_true", help="the ensemble's held-out fixture clips instead of dev")
    ap.add_argument("--depth", type=int, default=200, help="windows ranked per query for the reciprocal rank")
    args = ap.parse_args(argv)
    bundle = load_bundle(args.bundle, part="all")
    clips = read_fixture(args.fixture)
    if args.heldout:
        keep = {r["clip_id"] for r in heldout_rows()}
        clips = [c for c in clips if c.clip_id in keep]
    else:
        clips = [c for c in clips if c.split == "dev"]
    if not clips:
        print(f"search_rank_dev: no clips on disk for {args.fixture} (run scripts/fetch_sounds.py)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        for c in clips:
            (root / c.category).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(c.path, root / c.category / c.path.name)
        if not args.heldout:
            background(root)
        cats = [c for c in FIXED_QUERIES if (root / c).is_dir()]
        queries = text_queries(bundle, [FIXED_QUERIES[c] for c in cats])
        with ArchiveIndex(Path(tmp) / "idx", create=True) as index:
            report = index_folder(root, bundle, index)
            print(f"search_rank_dev: {report.added} files, {report.windows} windows "
                  f"({'held-out clips of the ensemble' if args.heldout else 'dev half + 9 background files'})",
                  file=sys.stderr)
            out = {}
            for name, cosine in (("dot", False), ("cosine", True)):
                firsts, misses = [], []
                for cat, q in zip(cats, queries, strict=True):
                    got = [Path(h.path).parent.name for h in index.search(q, top=args.depth, cosine=cosine)]
                    first = got.index(cat) + 1 if cat in got else args.depth + 1
                    firsts.append(first)
                    if first != 1:
                        misses.append(f"{cat} -> {got[0]}")
                out[name] = {"top1": sum(f == 1 for f in firsts), "queries": len(cats),
                             "mrr": round(float(np.mean([1 / f for f in firsts])), 3), "misses": misses}
                print(f"  {name:6s}: right category first {out[name]['top1']}/{len(cats)}, MRR {out[name]['mrr']:.3f}; "
                      f"missed: {', '.join(misses) or 'none'}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
