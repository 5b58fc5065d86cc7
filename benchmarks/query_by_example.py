"""Query by example on the real fixture clips: does an example find itself, and what else fires?

    python -m edge_retrieval.benchmarks.query_by_example --bundle BUNDLE [--split dev|test]

Every clip of the split is used as an example against all clips of the split (clip score = max
over its windows, as on the device). Rows: the example's mean probabilities as weights (the
construction before issue 17), their square (``run --query-audio``), and the cosine ranking of
``search --audio`` (through a real archive index). Columns: how often the example ranks itself
first, its median and worst rank, mAP@10 with the clips of its category as relevant, and for the
run construction, at threshold = alpha x self-score, the fraction of same-category and of
other-category clips that reach it. The choices (power 2, alpha 0.8) were made on the dev half.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from edge_retrieval.bundle import load_bundle
from edge_retrieval.offline.archive import ArchiveIndex, index_folder
from edge_retrieval.offline.metrics import ranks_and_ap
from edge_retrieval.offline.query_audio import EXAMPLE_ALPHA, example_query, self_score
from edge_retrieval.offline.retrieval import FileEmbedder, clip_scores, query_matrix
from edge_retrieval.offline.scenes import read_fixture

REPO = Path(__file__).resolve().parent.parent
ALPHAS = (0.5, EXAMPLE_ALPHA)


def _rank_stats(scores: np.ndarray, cats: list[str]) -> tuple[float, float, int, float]:
    """scores [Q, Q] (row = example): self rank-1 rate, median and worst self rank, mAP@10 (others of its category)."""
    n = len(cats)
    self_rank = np.array([1 + int(np.sum(np.delete(scores[i], i) > scores[i, i])) for i in range(n)])
    rel = np.array([[cats[j] == cats[i] and j != i for j in range(n)] for i in range(n)])
    keep = rel.any(axis=1)
    masked = np.where(np.eye(n, dtype=bool), -np.inf, scores)  # the example itself is not a result
    _, ap = ranks_and_ap(masked[keep], rel[keep])
    return float(np.mean(self_rank == 1)), float(np.median(self_rank)), int(self_rank.max()), float(np.mean(ap))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--fixture", type=Path, default=REPO / "data" / "fixture.csv")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle, part="device")
    clips = [c for c in read_fixture(args.fixture) if c.split == args.split]
    cats = [c.category for c in clips]
    emb = FileEmbedder(bundle)
    fvs = [emb.embed_file(c.path) for c in clips]
    print(f"{args.split} half: {len(clips)} clips, {len(set(cats))} categories; bundle {bundle.manifest.name}\n")
    print("| construction | self rank 1 | median / worst self rank | mAP@10 | "
          + " | ".join(f"fires at {a:g} x self: same / other category" for a in ALPHAS) + " |")
    print("|---|---|---|---|" + "---|" * len(ALPHAS))
    for name, sharpen in (("mean probabilities (before)", 1.0), ("mean probabilities ^ 2 (run --query-audio)", 2.0)):
        qs = [example_query(fv, bundle.manifest, sharpen) for fv in fvs]
        mats = {e: query_matrix(qs, e) for e in qs[0].experts}
        scores = np.stack([clip_scores(fv, mats) for fv in fvs], axis=1)  # [example, clip]
        own = np.array([self_score(q, fv) for q, fv in zip(qs, fvs, strict=True)])
        r1, med, worst, m = _rank_stats(scores, cats)
        cols = []
        for a in ALPHAS:
            fire = scores >= a * own[:, None]
            same = np.array([[cats[i] == cats[j] and i != j for j in range(len(cats))] for i in range(len(cats))])
            other = np.array([[cats[i] != cats[j] for j in range(len(cats))] for i in range(len(cats))])
            cols.append(f"{fire[same].mean():.2f} / {fire[other].mean():.3f}")
        print(f"| {name} | {r1:.2f} | {med:g} / {worst} | {m:.3f} | " + " | ".join(cols) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        rec = Path(tmp) / "rec"
        rec.mkdir()
        for c in clips:
            (rec / c.path.name).symlink_to(c.path.resolve())
        with ArchiveIndex(Path(tmp) / "index", create=True) as index:
            index_folder(rec, bundle, index)
            n_windows = int(index.stats()["windows"])
            pos = {(rec / c.path.name).resolve().as_posix(): i for i, c in enumerate(clips)}
            scores = np.full((len(clips), len(clips)), -np.inf)
            for i, fv in enumerate(fvs):
                for h in index.search(example_query(fv, bundle.manifest, 1.0), top=n_windows, cosine=True):
                    j = pos[Path(h.path).resolve().as_posix()]
                    scores[i, j] = max(scores[i, j], h.score)
    r1, med, worst, m = _rank_stats(scores, cats)
    print(f"| cosine of mean probabilities (search --audio) | {r1:.2f} | {med:g} / {worst} | {m:.3f} | "
          + " | ".join("-" for _ in ALPHAS) + " |")


if __name__ == "__main__":
    main()
