"""Ablation of the mixture of audio experts on the validation packages (prints a markdown table).

    python -m edge_retrieval.benchmarks.moee_ablation --data data/captions.csv --base BUNDLE \
        [--seed 0] [--epochs 60] [--boot 1000] [--json benchmarks/results/moee_ablation.json]

Same split, features and queries as ``edge-retrieval train``: one query per distinct caption of a
validation clip, relevant = the clips of its caption class (``export.train.caption_class``: the
caption without the spoken item). Rows: each expert alone (trained projection), the label bridge
(the packaged default), caption-kNN (training-free: clips ranked by similarity to the training
clips whose captions are nearest the query; k chosen on dev), and the ensemble with equal weights
and with gating. Every trained row picks its training cap, temperature and dimension on dev (grid
``GRID``; epochs by early stopping on dev); equal vs gated is picked on dev too. Clip score = max
over its windows, as on the device. Paired bootstrap (over queries) of the picked ensemble
against every other row. Speech (templated spoken-word captions) and sound-effect queries are
also reported apart.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from edge_retrieval.export import train as T

from edge_retrieval.offline.metrics import bootstrap_ci, paired_bootstrap, ranks_and_ap, summarize


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


GRID = {"cap_per_class": (0, 20, 5), "temperature": (0.03, 0.05, 0.1), "dim": (128, 256)}


def _configs() -> list[dict[str, Any]]:
    keys = list(GRID)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*GRID.values())]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every row's settings are chosen on dev (grid below, early stopping on dev mAP@10); the
    validation packages are scored once per row at the end."""
    from edge_retrieval.export.moee import TrainConfig, np_gates

    prep = T.prepare(args, T.cache_dir(args) / "work")
    sp = prep["splits"]
    tr, dev, val = sp["train"], sp["dev"], sp["val"]
    has_bn = "probs" in val.windows
    emb = [e for e in (T.BIRDNET_EMB, T.AISFX) if e in val.windows]
    rows: dict[str, np.ndarray] = {}
    dev_rows: dict[str, float] = {}
    notes: dict[str, Any] = {"grid": {k: list(v) for k, v in GRID.items()}, "chosen": {}, "dev_grid": {}}
    grid = _configs() if not args.no_grid else [{"cap_per_class": args.cap_per_class, "temperature": args.temperature,
                                                  "dim": args.dim}]

    def select(name: str, experts: list[str], bridge: bool, gating: bool) -> None:
        """Train ``name`` under every grid setting; keep the one with the best dev mAP@10."""
        best: tuple[float, Any, Any, dict[str, Any]] | None = None
        tried = []
        for g in grid:
            trn = T.cap_per_class(tr, g["cap_per_class"], args.seed)
            cfg = TrainConfig(dim=g["dim"], epochs=args.epochs, seed=args.seed, gating=gating, temperature=g["temperature"])
            m = T.fit_model(trn, dev, experts, bridge, cfg)
            d = max(h.get("val_mAP@10", 0.0) for h in m.history)
            tried.append({**g, "dev_mAP@10": round(d, 4), "best_epoch": m.best_epoch})
            if best is None or d > best[0] + 1e-9:
                best = (d, m, trn, g)
        assert best is not None
        d, m, trn, g = best
        rows[name] = T.mixture_scores(m, val, T.queries_of(val, trn))
        dev_rows[name] = d
        notes["chosen"][name] = {**g, "best_epoch": m.best_epoch, "dev_mAP@10": d}
        notes["dev_grid"][name] = tried
        if gating:
            qv = T.queries_of(val, trn)
            notes.setdefault("mean_gate_val", {})[name] = dict(zip(m.gate_names, np_gates(m, qv.text, qv.fits).mean(0).round(3).tolist(), strict=True))

    qd, qv = T.queries_of(dev, tr), T.queries_of(val, tr)
    for e in emb:
        select(f"{e} alone (trained projection)", [e], False, False)
    if has_bn:
        rows["label bridge (default bundle)"] = T.clip_max(T.bridge_window_scores(val, qv), val.seg)
        dev_rows["label bridge (default bundle)"] = T.map_at_10(T.clip_max(T.bridge_window_scores(dev, qd), dev.seg), qd.relevant)
    knn = CaptionKnn(tr, emb)
    ks = [1, 3, 5, 10, 20, 50]
    dev_map = {k: T.map_at_10(knn.scores(dev, qd, k), qd.relevant) for k in ks}
    k_best = max(ks, key=lambda k: (dev_map[k], -k))
    notes["caption_knn_dev_mAP"] = dev_map
    knn_name = f"caption-kNN (k={k_best})"
    rows[knn_name] = knn.scores(val, qv, k_best)
    dev_rows[knn_name] = dev_map[k_best]
    eq, gt = "ensemble, equal weights", "ensemble, gated (MoEE)"
    select(eq, emb, has_bn, False)
    select(gt, emb, has_bn, True)
    if has_bn:
        select("ensemble (gated), no bridge", emb, False, True)
    ref = eq if dev_rows[eq] >= dev_rows[gt] else gt  # the shipped mixture is picked on dev
    notes["ensemble_picked_on_dev"] = ref

    results: dict[str, Any] = {}
    ranked = {}
    for name, sc in rows.items():
        first, ap = ranks_and_ap(sc, qv.relevant)
        ranked[name] = (first, ap)
        results[name] = {"dev_mAP@10": dev_rows[name], "summary": summarize(first, ap),
                         "ci": bootstrap_ci(first, ap, n=args.boot, seed=args.seed),
                         "by_kind": {kind: summarize(first[m], ap[m]) for kind, m in
                                     (("speech", qv.speech), ("sound effects", ~qv.speech)) if m.any()}}
    paired = {name: paired_bootstrap(ranked[name], ranked[ref], n=args.boot, seed=args.seed)
              for name in rows if name != ref}
    return {
        "data": str(args.data), "data_sha256": prep["data_sha256"], "seed": args.seed,
        "relevance": "one query per distinct caption; relevant = clips of the same caption_class() (export/train.py)",
        "clips": {k: len(v.clips) for k, v in sp.items()},
        "queries": {"dev": len(qd.texts), "val": len(qv.texts), "val_speech": int(qv.speech.sum()),
                    "val_sound_effects": int((~qv.speech).sum())},
        "packages": {k: sorted(p for p, s in prep["split_of"].items() if s == k) for k in ("train", "dev", "val")},
        "reference": ref, "results": results, "paired_vs_reference": paired, "notes": notes,
    }


def table(out: dict[str, Any]) -> str:
    ref = out["reference"]
    lines = [f"Validation: {out['clips']['val']} clips, {out['queries']['val']} queries "
             f"({out['queries']['val_speech']} speech, {out['queries']['val_sound_effects']} sound effects; "
             f"packages {', '.join(out['packages']['val'])}); train {out['clips']['train']} clips, "
             f"dev {out['clips']['dev']} clips. 95% bootstrap CIs over queries.", "",
             f"| method | dev mAP@10 | R@1 | R@5 | R@10 | mAP@10 | mAP@10 speech / SFX | Δ mAP@10 ({ref} − row) [95% CI] |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in out["results"].items():
        s, ci = r["summary"], r["ci"]
        cells = [f"{s[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" for k in ("R@1", "R@5", "R@10", "mAP@10")]
        bk = r["by_kind"]
        kinds = " / ".join(f"{bk[k]['mAP@10']:.3f}" if k in bk else "—" for k in ("speech", "sound effects"))
        p = out["paired_vs_reference"].get(name, {}).get("mAP@10")
        delta = f"{p['delta']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p else "(reference)"
        lines.append(f"| {name} | {r['dev_mAP@10']:.3f} | " + " | ".join(cells) + f" | {kinds} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moee_ablation", description=__doc__.splitlines()[0])
    T.add_arguments(p)
    for action in p._actions:  # the ablation writes no bundle
        if action.dest == "out":
            action.required = False
    p.add_argument("--boot", type=int, default=1000)
    p.add_argument("--json", type=Path)
    p.add_argument("--no-grid", action="store_true", help="train each row once with --dim/--temperature/--cap-per-class")
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
