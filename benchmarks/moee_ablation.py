"""Ablation of the mixture of audio experts on the validation packages (prints a markdown table).

    python -m edge_retrieval.benchmarks.moee_ablation --data data/captions.csv --base BUNDLE \
        [--seed 0] [--epochs 60] [--boot 1000] [--json benchmarks/results/moee_ablation.json]

Same split, features and queries as ``edge-retrieval train`` (one query per distinct caption of a
validation clip; relevant = the clips with that caption). Rows: each expert alone (trained
projection), the label bridge (the packaged default), caption-kNN (training-free: clips ranked by
similarity to the training clips whose captions are nearest the query; k chosen on dev), and the
ensemble without and with gating. Clip score = max over its windows, as on the device.
Paired bootstrap (over queries) of the gated ensemble against every other row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from edge_retrieval.export import train as T

from edge_retrieval.retrieval import bootstrap_ci, paired_bootstrap, ranks_and_ap, summarize


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CaptionKnn:
    """Training-free baseline: score = similarity to the audio of the k captions nearest the query."""

    def __init__(self, train: T.Split, experts: list[str]) -> None:
        self.experts = experts
        self.mu = {e: train.windows[e].mean(0) for e in experts}
        self.sd = {e: train.windows[e].std(0) + 1e-6 for e in experts}
        self.train_text = train.text
        self.train_audio = self.rep(train.clip_mean)

    def rep(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return _unit(np.concatenate([_unit((feats[e] - self.mu[e]) / self.sd[e]) for e in self.experts], axis=1))

    def scores(self, split: T.Split, q: T.Queries, k: int) -> np.ndarray:
        sims = q.text @ self.train_text.T  # [Q, Ntr]
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        w = np.maximum(np.take_along_axis(sims, top, axis=1), 0.0) + 1e-6
        w = w / w.sum(axis=1, keepdims=True)
        proto = np.einsum("qk,qkd->qd", w, self.train_audio[top])  # weighted mean of neighbour clips
        return T.clip_max(proto @ self.rep(split.windows).T, split.seg)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from edge_retrieval.export.moee import TrainConfig

    prep = T.prepare(args, T.cache_dir(args) / "work")
    sp = prep["splits"]
    tr, dev, val = sp["train"], sp["dev"], sp["val"]
    qd, qv = T.queries_of(dev, tr), T.queries_of(val, tr)
    has_bn = "probs" in val.windows
    emb = [e for e in (T.BIRDNET_EMB, T.AISFX) if e in val.windows]
    rows: dict[str, np.ndarray] = {}
    notes: dict[str, Any] = {}

    def cfg(gating: bool) -> TrainConfig:
        return TrainConfig(dim=args.dim, epochs=args.epochs, seed=args.seed, gating=gating)

    for e in emb:
        m = T.fit_model(tr, dev, [e], False, cfg(False))
        rows[f"{e} alone (trained projection)"] = T.mixture_scores(m, val, qv)
        notes[f"{e}_best_epoch"] = m.best_epoch
    if has_bn:
        rows["label bridge (default)"] = T.clip_max(T.bridge_window_scores(val, qv), val.seg)
    knn = CaptionKnn(tr, emb)
    ks = [1, 3, 5, 10, 20, 50]
    dev_map = {k: T.map_at_10(knn.scores(dev, qd, k), qd.relevant) for k in ks}
    k_best = max(ks, key=lambda k: (dev_map[k], -k))
    notes["caption_knn_k"] = k_best
    notes["caption_knn_dev_mAP"] = dev_map
    rows[f"caption-kNN (k={k_best})"] = knn.scores(val, qv, k_best)
    ungated = T.fit_model(tr, dev, emb, has_bn, cfg(False))
    rows["ensemble, equal weights"] = T.mixture_scores(ungated, val, qv)
    gated = T.fit_model(tr, dev, emb, has_bn, cfg(True))
    rows["ensemble, gated (MoEE)"] = T.mixture_scores(gated, val, qv)
    notes["gated_best_epoch"] = gated.best_epoch
    if has_bn:
        g_nb = T.fit_model(tr, dev, emb, False, cfg(True))
        rows["ensemble, gated, no bridge"] = T.mixture_scores(g_nb, val, qv)
        from edge_retrieval.export.moee import np_gates

        g = np_gates(gated, qv.text, qv.fits)
        notes["mean_gate"] = dict(zip(gated.gate_names, g.mean(0).round(3).tolist(), strict=True))

    results: dict[str, Any] = {}
    ranked = {}
    for name, s in rows.items():
        first, ap = ranks_and_ap(s, qv.relevant)
        ranked[name] = (first, ap)
        results[name] = {"summary": summarize(first, ap), "ci": bootstrap_ci(first, ap, n=args.boot, seed=args.seed)}
    ref = "ensemble, gated (MoEE)"
    paired = {name: paired_bootstrap(ranked[name], ranked[ref], n=args.boot, seed=args.seed)
              for name in rows if name != ref}
    return {
        "data": str(args.data), "data_sha256": prep["data_sha256"], "seed": args.seed,
        "clips": {k: len(v.clips) for k, v in sp.items()}, "queries": {"dev": len(qd.texts), "val": len(qv.texts)},
        "packages": {k: sorted(p for p, s in prep["split_of"].items() if s == k) for k in ("train", "dev", "val")},
        "results": results, "paired_vs_gated": paired, "notes": notes,
    }


def table(out: dict[str, Any]) -> str:
    lines = [f"Validation: {out['clips']['val']} clips, {out['queries']['val']} queries "
             f"(packages {', '.join(out['packages']['val'])}); train {out['clips']['train']} clips, "
             f"dev {out['clips']['dev']} clips. 95% bootstrap CIs.", "",
             "| method | R@1 | R@5 | R@10 | mAP@10 | ΔmAP@10 gated − row [95% CI] |", "|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        s, ci = r["summary"], r["ci"]
        cells = [f"{s[k]:.3f} [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" for k in ("R@1", "R@5", "R@10", "mAP@10")]
        p = out["paired_vs_gated"].get(name, {}).get("mAP@10")
        delta = f"{p['delta']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moee_ablation", description=__doc__.splitlines()[0])
    T.add_arguments(p)
    for action in p._actions:  # the ablation writes no bundle
        if action.dest == "out":
            action.required = False
    p.add_argument("--boot", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = run(args)
    print(table(out))
    print(json.dumps(out["notes"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
