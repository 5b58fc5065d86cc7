"""``edge-retrieval evaluate``: text-to-audio retrieval quality as in Oncescu et al. 2021.

Every caption is a query ranked against every clip (a clip's score is the max over its windows):
Recall@1/5/10, median rank of the first relevant clip, and mAP@10. ``--compare DIR2`` evaluates a
second bundle on the same data in the same run (e.g. fp32 vs int8) with a paired bootstrap over
queries; ``--bootstrap N`` adds 95% confidence intervals; ``--plot DIR`` draws PNGs. ``--temporal``
reads sequence captions ("a gunshot followed by an engine") with the temporal grammar.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, load_bundle
from ..errors import ConfigError, QueryRejected
from ..offline.metrics import bootstrap_ci, paired_bootstrap, ranks_and_ap, recall_curve, summarize
from ..offline.retrieval import (
    FileEmbedder,
    QueryVectors,
    clip_scores,
    is_labels_expert,
    query_matrix,
    text_queries,
    window_scores,
)
from ..offline.temporal_search import best_pairs
from ..text.temporal import TemporalQuery, parse_temporal
from .datasets import FORMATS, Dataset, read_dataset

METRICS = ("R@1", "R@5", "R@10", "mAP@10", "median_rank", "mean_rank")


@dataclass
class EvalResult:
    """One bundle on one dataset: per-query first-relevant rank and AP@10, and their summary."""

    bundle: str
    name: str
    first: np.ndarray
    ap: np.ndarray
    summary: dict[str, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)


def relevance(ds: Dataset) -> np.ndarray:
    rel = np.zeros((len(ds.queries), len(ds.items)), bool)
    for i, q in enumerate(ds.queries):
        rel[i, sorted(q.relevant)] = True
    return rel


def score_matrix(
    bundle: Bundle,
    ds: Dataset,
    queries: list[QueryVectors],
    threads: int = 1,
    progress: Callable[[Iterable[int], int, str], Iterable[int]] | None = None,
    temporal: list[tuple[int, int, TemporalQuery]] | None = None,
    rank: str = "dot",
) -> np.ndarray:
    """[queries, items] clip scores; each clip is embedded once and scored against all queries.
    ``rank`` "cosine" scores labels experts as archive search ranks (``retrieval.window_scores``).

    ``temporal`` (part A's row, part B's row, query) replaces row A by the temporal score: the
    best pair of windows of A and B in the relation (``offline.temporal_search.best_pairs``).
    """
    mats = {e: query_matrix(queries, e) for e in bundle.manifest.expert_names}
    cosine = [e for e in mats if rank == "cosine" and is_labels_expert(bundle.manifest, e)]
    emb = FileEmbedder(bundle, threads=threads)
    window_s = max(e.window_s for e in bundle.manifest.device.experts)
    out = np.zeros((len(queries), len(ds.items)), np.float32)
    cols: Iterable[int] = range(len(ds.items))
    if progress is not None:
        cols = progress(cols, len(ds.items), bundle.manifest.name)
    for j in cols:
        fv = emb.embed_file(ds.items[j].path)
        if not temporal:
            out[:, j] = clip_scores(fv, mats, cosine)
            continue
        w = window_scores(fv, mats, cosine)
        out[:, j] = w.max(axis=0)
        for a, b, tq in temporal:
            pairs = best_pairs(fv.offsets_s, w[:, a], w[:, b], window_s, tq)
            out[a, j] = max((p[0] for p in pairs), default=float(min(w[:, a].min(), w[:, b].min())))
    return out


def evaluate_scores(scores: np.ndarray, ds: Dataset, bundle: str, name: str, n_boot: int = 0, seed: int = 0) -> EvalResult:
    first, ap = ranks_and_ap(scores, relevance(ds), k=10)
    res = EvalResult(bundle, name, first, ap, summarize(first, ap))
    if n_boot > 0:
        res.ci = bootstrap_ci(first, ap, n=n_boot, seed=seed)
    return res


def temporal_plan(texts: list[str]) -> tuple[list[str], list[tuple[int, int, TemporalQuery]], int]:
    """Captions read with the temporal grammar: (texts to embed, (row A, row B, query) per temporal
    caption, captions that did not parse and stay plain). Row A is the caption's own row; part B
    is appended after all captions."""
    flat, plan, bad = list(texts), [], 0
    for i, t in enumerate(texts):
        try:
            tq = parse_temporal(t)
        except QueryRejected:
            bad += 1
            continue
        if tq is not None:
            flat[i] = tq.first
            plan.append((i, len(flat), tq))
            flat.append(tq.second)
    return flat, plan, bad


def evaluate_bundle(
    bundle: Bundle, ds: Dataset, threads: int = 1, n_boot: int = 0, seed: int = 0,
    progress: Callable[[Iterable[int], int, str], Iterable[int]] | None = None, temporal: bool = False,
    rank: str = "dot",
) -> EvalResult:
    texts = [q.text for q in ds.queries]
    plan: list[tuple[int, int, TemporalQuery]] = []
    if temporal:
        texts, plan, bad = temporal_plan(texts)
        print(f"edge-retrieval evaluate: {len(plan)} temporal caption(s)"
              + (f", {bad} with relation words that do not parse, scored as plain" if bad else ""), file=sys.stderr)
    queries = text_queries(bundle, texts)
    scores = score_matrix(bundle, ds, queries, threads, progress, plan, rank)[: len(ds.queries)]
    return evaluate_scores(scores, ds, str(bundle.root), bundle.manifest.name, n_boot, seed)


# --------------------------------------------------------------------------- output


def result_json(ds: Dataset, res: list[EvalResult], paired: dict[str, dict[str, float]] | None) -> dict[str, object]:
    a = res[0]
    out: dict[str, object] = {
        "dataset": ds.name,
        "bundle": a.bundle,
        "name": a.name,
        **{k: a.summary[k] for k in METRICS},
        "queries": len(ds.queries),
        "items": len(ds.items),
        "missing": len(ds.missing),
    }
    if a.ci:
        out["ci95"] = {k: list(v) for k, v in a.ci.items()}
    if len(res) > 1:
        b = res[1]
        cmp: dict[str, object] = {"bundle": b.bundle, "name": b.name, **{k: b.summary[k] for k in METRICS}}
        if b.ci:
            cmp["ci95"] = {k: list(v) for k, v in b.ci.items()}
        out["compare"] = cmp
        out["delta"] = {k: b.summary[k] - a.summary[k] for k in METRICS}
        out["R@10_loss"] = a.summary["R@10"] - b.summary["R@10"]
        if paired:
            out["paired_bootstrap"] = paired
    return out


def _cell(res: EvalResult, k: str) -> str:
    v = res.summary[k]
    s = f"{v:.1f}" if "rank" in k else f"{v:.3f}"
    if k in res.ci:
        lo, hi = res.ci[k]
        s += f" [{lo:.1f}, {hi:.1f}]" if "rank" in k else f" [{lo:.3f}, {hi:.3f}]"
    return s


def table(ds: Dataset, res: list[EvalResult], paired: dict[str, dict[str, float]] | None) -> str:
    head = ["metric", *(r.name for r in res)]
    if len(res) > 1:
        head.append("delta (2nd - 1st)")
    rows = [head]
    for k in METRICS:
        row = [k, *(_cell(r, k) for r in res)]
        if len(res) > 1:
            d = res[1].summary[k] - res[0].summary[k]
            cell = f"{d:+.1f}" if "rank" in k else f"{d:+.3f}"
            if paired and k in paired:
                p = paired[k]
                fmt = "{:+.1f}" if "rank" in k else "{:+.3f}"
                cell += f" [{fmt.format(p['ci_low'])}, {fmt.format(p['ci_high'])}] p={p['p']:.3f}"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"dataset {ds.name}: {len(ds.queries)} queries, {len(ds.items)} items"
             + (f" ({len(ds.missing)} named clips have no audio)" if ds.missing else "")]
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if len(res) > 1:
        lines.append(f"R@10 loss of {res[1].name} vs {res[0].name}: {res[0].summary['R@10'] - res[1].summary['R@10']:+.3f}")
    return "\n".join(lines)


def plot(out_dir: Path, ds: Dataset, res: list[EvalResult]) -> list[Path]:
    """Recall@K curve and rank histogram (matplotlib, imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("matplotlib is not installed; install it with: pip install 'edge-retrieval[bench]'") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    max_k = min(len(ds.items), 50)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in res:
        ax.plot(range(1, max_k + 1), recall_curve(r.first, max_k), marker=".", label=r.name)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.set_title(f"Text-to-audio recall: {ds.name} ({len(ds.queries)} queries, {len(ds.items)} clips)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "recall_at_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.arange(1, len(ds.items) + 2) - 0.5 if len(ds.items) <= 60 else 30
    for r in res:
        ax.hist(r.first, bins=bins, alpha=0.5, label=r.name)
    ax.set_xlabel("rank of the first relevant clip")
    ax.set_ylabel("queries")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "rank_hist.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="bundle to evaluate (needs its text side)")
    p.add_argument("--dataset", required=True, type=Path, help="captions CSV (Clotho, AudioCaps or path,caption[,category])")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="dataset format (default: from the header)")
    p.add_argument("--audio-dir", type=Path, default=None, help="folder of the audio files (default: the CSV's folder)")
    p.add_argument("--compare", type=Path, default=None, metavar="DIR2", help="a second bundle on the same data")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG plots to DIR")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap resamples for 95%% CIs (e.g. 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    p.add_argument("--per-query", type=Path, default=None, metavar="CSV", help="write each query's rank and AP@10")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--rank", choices=("dot", "cosine"), default="dot",
                   help="clip scores: dot (default; the detection score) or cosine (as `search` ranks labels windows)")
    p.add_argument("--temporal", action="store_true",
                   help="read captions with a relation ('A followed by B', 'A while B') as temporal queries: "
                        "a clip scores its best pair of part windows in that relation")


def main(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap {args.bootstrap!r} must be >= 0")
    ds = read_dataset(args.dataset, args.format, args.audio_dir)
    if ds.missing:
        print(f"edge-retrieval evaluate: {len(ds.missing)} clip(s) named in {args.dataset} have no audio; "
              f"evaluating {len(ds.items)} (first missing: {ds.missing[0]!r})", file=sys.stderr)
    bundles = [load_bundle(args.bundle, part="all")]
    if args.compare is not None:
        bundles.append(load_bundle(args.compare, part="all"))

    def progress(it, total, name):  # noqa: ANN001, ANN202
        if args.quiet:
            return it
        from tqdm import tqdm

        return tqdm(it, total=total, unit="clip", desc=name, file=sys.stderr)

    res = [evaluate_bundle(b, ds, args.threads, args.bootstrap, args.seed, progress, args.temporal, args.rank)
           for b in bundles]
    if len(res) == 2 and res[0].name == res[1].name:
        res[1].name += " (2)"
    paired = None
    if len(res) == 2 and args.bootstrap > 0:
        paired = paired_bootstrap((res[0].first, res[0].ap), (res[1].first, res[1].ap), n=args.bootstrap, seed=args.seed)
    obj = result_json(ds, res, paired)
    obj["rank"] = args.rank
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    if args.per_query:
        with open(args.per_query, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["query", "relevant", *(f"{k}_{r.name}" for r in res for k in ("rank", "ap10"))])
            for i, q in enumerate(ds.queries):
                w.writerow([q.text, len(q.relevant), *(v for r in res for v in (int(r.first[i]), round(float(r.ap[i]), 4)))])
    if args.plot:
        for p in plot(args.plot, ds, res):
            print(f"wrote {p}", file=sys.stderr)
    print(json.dumps(obj) if args.json else table(ds, res, paired))
    return 0
