"""Bundles against the training-free baselines on the captions split of ``edge-retrieval train``.

    python -m edge_retrieval.benchmarks.captions_eval --data data/captions.csv --audio-root DIR \\
        --base BIRDNET_BUNDLE --bundle DEFAULT_BUNDLE [--bundle OTHER ...] --split val \\
        [--boot 1000] [--json benchmarks/results/captions_val.json]

Same packages, queries and relevance as the mixture-of-experts ablation (benchmarks/moee_ablation.py,
issue 7): one query per distinct caption of the split's clips, relevant = the clips of its caption
class. Rows: each ``--bundle`` through its own text side and device path (FileEmbedder: the
daemon's windowing at the bundle's hop, clip score = max over windows, the first ``--max-clip-s``
seconds of each clip as in training), the BirdNET label bridge of ``--base`` on the same path, and
caption-kNN (k chosen on dev, features as in the ablation). The first ``--bundle`` is the
reference of the paired bootstrap over queries. ``--split dev`` is for choices; ``--split val``
is looked at once, at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from edge_retrieval.export import train as T

from edge_retrieval.bundle import Bundle, load_bundle
from edge_retrieval.offline.metrics import bootstrap_ci, paired_bootstrap, ranks_and_ap, summarize
from edge_retrieval.offline.retrieval import (
    FileEmbedder,
    FileVectors,
    clip_scores,
    is_labels_expert,
    query_matrix,
    text_queries,
)

from .moee_ablation import CaptionKnn


def _cropped(path: Path, max_s: float, tmp: Path) -> Path:
    """The first ``max_s`` seconds of a file (as the training features see it)."""
    info = sf.info(str(path))
    if info.duration <= max_s:
        return path
    x, rate = sf.read(str(path), frames=int(max_s * info.samplerate), dtype="float32", always_2d=True)
    out = tmp / (hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".wav")
    sf.write(str(out), x, rate, subtype="FLOAT")
    return out


def bundle_vectors(bundle: Bundle, files: list[Path], max_s: float, cache: Path, threads: int) -> list[FileVectors]:
    """Window vectors of every file for one bundle, cached by space id (the device path)."""
    key = hashlib.sha256(json.dumps([bundle.manifest.space.id, bundle.manifest.device.hop_s, max_s,
                                     [str(f) for f in files]]).encode()).hexdigest()[:16]
    path = cache / f"vectors-{key}.npz"
    names = bundle.manifest.expert_names
    if path.is_file():
        z = np.load(path)
        return [FileVectors(str(f), 0.0, 0, z[f"starts_{i}"], {e: z[f"{e}_{i}"] for e in names})
                for i, f in enumerate(files)]
    emb = FileEmbedder(bundle, threads=threads)
    out, arrays = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(files):
            fv = emb.embed_file(_cropped(f, max_s, Path(tmp)))
            out.append(fv)
            arrays[f"starts_{i}"] = fv.offsets_s
            for e in names:
                arrays[f"{e}_{i}"] = fv.vectors[e].astype(np.float16 if fv.vectors[e].shape[1] > 2000 else np.float32)
            if (i + 1) % 100 == 0:
                print(f"  {bundle.manifest.name}: {i + 1}/{len(files)} clips", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return out


def bundle_scores(bundle: Bundle, texts: list[str], vectors: list[FileVectors], rank: str = "dot") -> np.ndarray:
    """[queries, clips]: each text through the bundle's text side, clip score = max over windows
    (``rank`` "cosine": labels experts scored as archive search ranks)."""
    queries = text_queries(bundle, texts)
    mats = {e: query_matrix(queries, e) for e in bundle.manifest.expert_names}
    cosine = [e for e in mats if rank == "cosine" and is_labels_expert(bundle.manifest, e)]
    return np.stack([clip_scores(fv, mats, cosine) for fv in vectors], axis=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.subset, args.val_packages = None, None
    prep = T.prepare(args, T.cache_dir(args) / "work")
    sp = prep["splits"]
    tr, dev = sp["train"], sp["dev"]
    target = sp[args.split]
    q = T.queries_of(target, tr)
    emb = [e for e in (T.BIRDNET_EMB, T.AISFX) if e in target.windows]
    knn = CaptionKnn(tr, emb)
    ks = [1, 3, 5, 10, 20, 50]
    qd = T.queries_of(dev, tr)
    dev_map = {k: T.map_at_10(knn.scores(dev, qd, k), qd.relevant) for k in ks}
    k_best = max(ks, key=lambda k: (dev_map[k], -k))

    audio_root = Path(args.audio_root) if args.audio_root else T.default_audio_root()
    csv_dir = Path(args.data).resolve().parent
    files = [T.resolve_audio(c, audio_root, csv_dir) for c in target.clips]
    cache = T.cache_dir(args) / "bundle-vectors"
    rows: dict[str, np.ndarray] = {}
    for b in args.bundle:
        bundle = load_bundle(b, part="all")
        rows[f"{bundle.manifest.name} ({b.name})"] = bundle_scores(
            bundle, q.texts, bundle_vectors(bundle, files, args.max_clip_s, cache, args.threads), args.rank)
    base = prep["base"]
    base_name = f"BirdNET label bridge ({base.manifest.name})"
    rows[base_name] = bundle_scores(base, q.texts, bundle_vectors(base, files, args.max_clip_s, cache, args.threads),
                                    args.rank)
    rows[f"caption-kNN (k={k_best})"] = knn.scores(target, q, k_best)

    ref = next(iter(rows))
    ranked = {name: ranks_and_ap(sc, q.relevant) for name, sc in rows.items()}
    results = {name: {"summary": summarize(*ranked[name]), "ci": bootstrap_ci(*ranked[name], n=args.boot, seed=args.seed),
                      "by_kind": {kind: summarize(ranked[name][0][m], ranked[name][1][m])
                                  for kind, m in (("speech", q.speech), ("sound effects", ~q.speech)) if m.any()}}
               for name in rows}
    paired = {name: paired_bootstrap(ranked[name], ranked[ref], n=args.boot, seed=args.seed) for name in rows if name != ref}
    return {"data": str(args.data), "data_sha256": prep["data_sha256"], "split": args.split, "seed": args.seed,
            "rank": args.rank,
            "clips": len(target.clips), "queries": len(q.texts), "queries_speech": int(q.speech.sum()),
            "caption_knn_dev_mAP": dev_map, "reference": ref, "results": results, "paired_vs_reference": paired,
            "relevance": "one query per distinct caption; relevant = clips of the same caption_class() (export/train.py)"}


def table(out: dict[str, Any]) -> str:
    ref = out["reference"]
    lines = [f"captions {out['split']} split: {out['clips']} clips, {out['queries']} queries "
             f"({out['queries_speech']} speech); reference {ref}",
             "| row | R@1 | R@5 | R@10 | mAP@10 [95% CI] | mAP@10 of reference minus row [95% CI] |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in out["results"].items():
        s, ci = r["summary"], r["ci"]["mAP@10"]
        p = out["paired_vs_reference"].get(name, {}).get("mAP@10")
        d = f"{p['delta']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]" if p else "-"
        lines.append(f"| {name} | {s['R@1']:.3f} | {s['R@5']:.3f} | {s['R@10']:.3f} | "
                     f"{s['mAP@10']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {d} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="captions_eval", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="captions CSV: path,caption,package,licence")
    p.add_argument("--base", required=True, help="the BirdNET bundle (label-bridge row, caption-kNN features)")
    p.add_argument("--audio-root", help="folder of extracted packages (as for edge-retrieval train)")
    p.add_argument("--cache", help="feature cache folder (default: ~/.cache/edge-retrieval/moee)")
    p.add_argument("--seed", type=int, default=0, help="split seed (0: the split of issue 7's training)")
    p.add_argument("--hop", type=float, default=3.0, help="hop of the caption-kNN features (as in training)")
    p.add_argument("--max-clip-s", type=float, default=10.0, help="seconds of each clip embedded")
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--bundle", type=Path, action="append", required=True, help="bundle to score (repeatable)")
    p.add_argument("--split", choices=["dev", "val"], default="dev")
    p.add_argument("--rank", choices=["dot", "cosine"], default="dot",
                   help="clip scores of the bundle rows: dot (detection score) or cosine (as search ranks)")
    p.add_argument("--boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = run(args)
    print(table(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
