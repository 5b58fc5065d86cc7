"""Archive search at 10^5 to 10^7 windows: the shard index against the version-1 SQLite scan.

Window vectors are synthetic but drawn from real ones: the fixture recordings are embedded once
with the BirdNET bundle (class probabilities and the 1,024-d embedding per 3 s window, 1 s hop),
then each synthetic window copies a random real window and perturbs it (labels: 10% of a
window's top-64 labels swapped for labels drawn by their
popularity in the real windows; noise N(0, 0.5) added to the logit); embeddings: Gaussian noise, re-normalised). Recordings are one
minute long (60 windows), dated one after another, on 10 sites.

Measured per size: index size on disk, build time, search latency p50/p95 over text queries
(labels space, exact) and by-example queries (embedding space, IVF-PQ + exact re-rank), recall@10
of the embedding search against exact search, and the v1 scan at the sizes it can do. Run by hand
(``edge-retrieval bench --archive`` or ``python -m edge_retrieval.benchmarks.archive_bench``);
prints a table and writes JSON. Never asserts timings.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..offline.archive import ArchiveIndex, expert_storage, storage_of
from ..offline.archive_v1 import V1Index
from ..offline.retrieval import text_queries
from ..offline.shards import SHARD_WINDOWS, ShardBuilder, ShardFile, directory_size, search_shards
from .board import board_info, load_average

TEXTS = [
    "a dog barking", "birds singing at dawn", "a car horn", "a chainsaw cutting wood", "an engine running",
    "an explosion", "frogs croaking at night", "a siren", "gunshots", "rain and wind", "a cow mooing",
    "insects buzzing", "an owl hooting", "a woodpecker drumming", "people talking", "fireworks",
    "a crow cawing", "a rooster crowing", "water running in a stream", "a helicopter",
]
FILE_WINDOWS = 60  # one-minute recordings at a 1 s hop
SITES = 10


def real_windows(bundle_dir: Path, sounds: Path, cache: Path) -> dict[str, np.ndarray]:
    """Probabilities [N, labels] float16 and unit embeddings [N, 1024] float32 of the fixture windows."""
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    import soundfile as sf
    import soxr

    from ..bundle import load_bundle
    from ..pipeline.expert import AudioExpert

    b = load_bundle(bundle_dir, part="device")
    spec = b.manifest.device.experts[0]
    ex = AudioExpert(b, spec, threads=2, extra_outputs=["EMBEDDING"])
    rate, win = spec.sample_rate, ex.window_samples
    probs, embs = [], []
    for wav in sorted(sounds.glob("*/*.wav")):
        x, sr = sf.read(str(wav), dtype="float32", always_2d=True)
        x = soxr.resample(x.mean(axis=1), sr, rate) if sr != rate else x.mean(axis=1)
        starts = range(0, max(1, len(x) - win + rate), rate)
        w = np.stack([np.pad(x[s:s + win], (0, max(0, win - len(x[s:s + win])))) for s in starts])
        for i in range(0, len(w), 16):
            p, (e,) = ex.embed(w[i:i + 16], with_extra=True)
            probs.append(p.astype(np.float16))
            embs.append(e.astype(np.float32))
    e = np.concatenate(embs)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    out = {"probs": np.concatenate(probs), "emb": e}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


class Synth:
    """Synthetic windows drawn from real ones (module doc), reproducible from a seed."""

    def __init__(self, real: dict[str, np.ndarray], k: int, seed: int = 0) -> None:
        p = real["probs"].astype(np.float32)
        self.top_idx = np.argsort(-p, axis=1, kind="stable")[:, :k].astype(np.uint16)
        self.top_p = np.take_along_axis(p, self.top_idx.astype(np.int64), axis=1)
        pop = np.bincount(self.top_idx.ravel(), minlength=p.shape[1]).astype(np.float64) + 0.1
        self.pop = pop / pop.sum()
        self.emb = real["emb"]
        self.rng = np.random.default_rng(seed)

    def labels(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.rng.integers(0, len(self.top_idx), n)
        idx = self.top_idx[r].copy()
        # noise in logit space (as a model's own variation): no probability is pushed to 1 by clipping
        p0 = np.clip(self.top_p[r], 1e-6, 1 - 1e-4)
        logit = np.log(p0 / (1 - p0)) + self.rng.normal(0, 0.5, p_shape := idx.shape)
        p = 1.0 / (1.0 + np.exp(-logit))
        orig = idx.copy()
        swap = self.rng.random(p_shape) < 0.1
        idx[swap] = self.rng.choice(len(self.pop), size=int(swap.sum()), p=self.pop).astype(np.uint16)
        # a window lists each label once (a top-k does): a row whose swap repeated a label keeps its own
        srt = np.sort(idx, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        idx[dup] = orig[dup]
        return idx, p.astype(np.float16)

    def dense(self, n: int, noise: float = 0.02) -> np.ndarray:
        r = self.rng.integers(0, len(self.emb), n)
        v = self.emb[r] + self.rng.normal(0, noise, (n, self.emb.shape[1])).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v.astype(np.float16)


def _file(i: int, n: int) -> ShardFile:
    return ShardFile(f"/archive/site{i % SITES:02d}/{i:08d}.wav", 0, 0, float(n), 48000, 1.7e9 + 60.0 * i,
                     "filename", f"site{i % SITES:02d}", n)


def build(index: ArchiveIndex, synth: Synth, n_windows: int, kinds: dict[str, str], v1: V1Index | None) -> float:
    """Fill ``index`` (and ``v1``) with ``n_windows`` synthetic windows; returns seconds spent."""
    from ..offline.archive_v1 import _pack

    t0 = time.perf_counter()
    experts = storage_of(index.experts())
    n_files = -(-n_windows // FILE_WINDOWS)
    per_shard = SHARD_WINDOWS // FILE_WINDOWS  # files per shard
    for first in range(0, n_files, per_shard):
        files = [(i, min(FILE_WINDOWS, n_windows - i * FILE_WINDOWS)) for i in range(first, min(n_files, first + per_shard))]
        total = sum(k for _, k in files)
        # drawn for the whole shard at once, then cut per file (the per-file path is the same builder)
        top_all = {name: synth.labels(total) for name, kind in kinds.items() if kind == "top"}
        dense_all = {name: synth.dense(total) for name, kind in kinds.items() if kind != "top"}
        builder = ShardBuilder(experts)
        at = 0
        for i, n in files:
            top = {name: (a[at:at + n], b[at:at + n]) for name, (a, b) in top_all.items()}
            dense = {name: v[at:at + n] for name, v in dense_all.items()}
            at += n
            off = np.arange(n, dtype=np.float64)
            f = _file(i, n)
            builder.add_windows(f, off, top=top, dense=dense)
            if v1 is not None:
                packed = {}
                for name, (idx, p) in top.items():
                    packed[name] = ("top", int(experts[name]["dim"]), idx.shape[1], p.astype("<f2").tobytes(),
                                    idx.astype("<u2").tobytes())
                for name, v in dense.items():
                    packed[name] = _pack(v.astype(np.float32), labels=False)
                v1.add_packed(f.path, f.duration_s, f.start_epoch, f.site, off, packed)
        del top_all, dense_all
        index.register(builder.write(index.shards_dir))
        del builder
        gc.collect()
    return time.perf_counter() - t0


def _pcts(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2),
            "n": len(xs)}


def _time(fn: Any, queries: list[Any], rounds: int) -> tuple[list[float], list[Any]]:
    for q in queries[:2]:
        fn(q)  # warm: page cache, faiss index load
    times, outs = [], []
    for _ in range(rounds):
        for q in queries:
            t = time.perf_counter()
            outs.append(fn(q))
            times.append(time.perf_counter() - t)
    return times, outs


def bench_size(n: int, bundle_dir: Path, real: dict[str, np.ndarray], work: Path, dense: bool, v1_max: int,
               rounds: int, say: Any) -> dict[str, Any]:
    from ..bundle import load_bundle

    bundle = load_bundle(bundle_dir, part="all")
    m = bundle.manifest
    spec = m.device.experts[0]
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"windows": n, "files": -(-n // FILE_WINDOWS)}
    # labels space (the default bundle): exact posting-list search
    d = work / f"labels-{n}"
    shutil.rmtree(d, ignore_errors=True)
    synth = Synth(real, k=int(expert_storage(m)[spec.name]["k"]))
    with ArchiveIndex(d, create=True) as index:
        index.bind(bundle)
        (work / f"v1-{n}.sqlite").unlink(missing_ok=True)  # a leftover of an interrupted run
        v1 = V1Index(work / f"v1-{n}.sqlite") if n <= v1_max else None
        if v1 is not None:
            with v1.db:
                for k2, v in index.db.execute("SELECT key, value FROM meta WHERE key != 'schema'"):
                    v1.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k2, v))
            v1.space_id = index.space_id
        say(f"{n:,} labels windows: building")
        out["labels_build_s"] = round(build(index, synth, n, {spec.name: "top"}, v1), 1)
        out["labels_index_bytes"] = directory_size(d)
        queries = text_queries(bundle, TEXTS)
        say(f"{n:,} labels windows: searching")
        times, hits = _time(lambda q: index.search(q, top=10, cosine=False), queries, rounds)
        out["labels_search"] = _pcts(times)
        times_c, _ = _time(lambda q: index.search(q, top=10), queries, rounds)
        out["labels_search_cosine"] = _pcts(times_c)  # the CLI's default ranking: posting-list scan
        times_f, _ = _time(lambda q: index.search(q, top=10, site="site03", since=1.7e9 + 60.0 * n / 120, cosine=False),
                           queries, 1)
        out["labels_search_filtered"] = _pcts(times_f)
        if v1 is not None:
            out["v1_index_bytes"] = (work / f"v1-{n}.sqlite").stat().st_size
            say(f"{n:,} labels windows: v1 scan")
            vq = queries[: max(3, len(queries) // (1 + n // 100_000))]
            t_v1, v1_hits = _time(lambda q: v1.search(q, top=10), vq, 1)
            out["v1_search"] = _pcts(t_v1)
            same = [[(h.path, h.offset_s) for h in hits[i]] == [(p, o) for _, p, o, _, _ in v1_hits[i]]
                    for i in range(len(vq))]
            diff = max(abs(h.score - w[0]) for i in range(len(vq)) for h, w in zip(hits[i], v1_hits[i], strict=True))
            # the v1 scan sums in float64, shards in float32: near-ties may swap places, scores agree
            out["v1_same_hits"] = f"{sum(same)}/{len(same)}"
            out["v1_max_score_diff_by_rank"] = float(diff)
            out["speedup_vs_v1_p50"] = round(out["v1_search"]["p50_ms"] / out["labels_search"]["p50_ms"], 1)
            v1.close()
    shutil.rmtree(d, ignore_errors=True)
    (work / f"v1-{n}.sqlite").unlink(missing_ok=True)
    gc.collect()
    if dense:
        out.update(bench_dense(n, real, work, rounds, say))
    return out


def bench_dense(n: int, real: dict[str, np.ndarray], work: Path, rounds: int, say: Any) -> dict[str, Any]:
    """Embedding windows (1,024-d): IVF-PQ candidates + exact re-rank against the exact scan."""
    out: dict[str, Any] = {}
    synth = Synth(real, k=64, seed=1)
    dim = real["emb"].shape[1]
    experts = {"emb": {"kind": "dense", "dim": dim, "k": dim}}
    d = work / f"dense-{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    say(f"{n:,} embedding windows: building (IVF-PQ per shard)")
    t0 = time.perf_counter()
    from ..offline.shards import Shard

    shards = []
    left, i = n, 0
    while left > 0:
        b = ShardBuilder(experts)
        take = min(left, SHARD_WINDOWS)
        for j in range(0, take, FILE_WINDOWS):
            k = min(FILE_WINDOWS, take - j)
            b.add_windows(_file(i, k), np.arange(k, dtype=np.float64), top={}, dense={"emb": synth.dense(k)})
            i += 1
        shards.append(Shard(d / b.write(d)))
        left -= take
        del b
        gc.collect()
    out["dense_build_s"] = round(time.perf_counter() - t0, 1)
    out["dense_index_bytes"] = directory_size(d)
    out["dense_ann_bytes"] = sum(p.stat().st_size for p in d.rglob("*.faiss"))
    rng = np.random.default_rng(5)
    qs = []
    for _ in range(20):
        q = real["emb"][rng.integers(len(real["emb"]))] + rng.normal(0, 0.02, dim)
        qs.append((q / np.linalg.norm(q)).astype(np.float32))
    say(f"{n:,} embedding windows: searching")
    for nprobe in (16, 32, 64):
        times, res = _time(lambda q, p=nprobe: search_shards(shards, [None] * len(shards), ("emb",), (q,), (1.0,),
                                                             10, nprobe=p)[:10], qs, rounds)
        exact_t, exact = _time(lambda q: _exact(shards, q), qs, 1)
        rec = [len({(c.shard, c.row) for c in r} & e) / 10 for r, e in zip(res, exact * rounds, strict=True)]
        out[f"dense_search_nprobe{nprobe}"] = {**_pcts(times), "recall_at_10": round(float(np.mean(rec)), 3)}
    out["dense_exact_scan"] = _pcts(exact_t)
    shutil.rmtree(d, ignore_errors=True)
    return out


def _exact(shards: list[Any], q: np.ndarray) -> set[tuple[int, int]]:
    best: list[tuple[float, int, int]] = []
    for si, s in enumerate(shards):
        sc = s.dense_scores("emb", q)
        top = np.argpartition(-sc, 9)[:10]
        best.extend((float(sc[r]), si, int(r)) for r in top)
    best.sort(reverse=True)
    return {(si, r) for _, si, r in best[:10]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    say("embedding the fixture windows (cached after the first run)")
    real = real_windows(args.archive_bundle, args.sounds, args.work / "real_windows.npz")
    results: dict[str, Any] = {
        "schema": 1, "part": "archive",
        "board": board_info(args.board or "unnamed", args.note),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"real_windows": int(len(real["emb"])), "file_windows": FILE_WINDOWS,
                     "shard_windows": SHARD_WINDOWS, "text_queries": len(TEXTS), "rounds": args.rounds,
                     "v1_max": args.v1_max, "dense_max": args.dense_max},
        "sizes": [],
    }
    for n in args.archive_sizes:
        results["sizes"].append(bench_size(n, args.archive_bundle, real, args.work, n <= args.dense_max,
                                           args.v1_max, args.rounds, say))
        print(render(results), file=sys.stderr)
        if getattr(args, "json", None):  # after every size: a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    results["board"]["load_average_end"] = load_average()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def render(results: dict[str, Any]) -> str:
    lines = [f"{'windows':>11} {'size MB':>8} {'p50 ms':>7} {'p95 ms':>7} {'v1 p50 ms':>10} {'x v1':>6} "
             f"{'emb p50 ms':>10} {'emb R@10':>8} {'emb MB':>8}"]
    for r in results["sizes"]:
        dn = r.get("dense_search_nprobe32", {})
        lines.append(
            f"{r['windows']:>11,} {r['labels_index_bytes'] / 1e6:>8.1f} {r['labels_search']['p50_ms']:>7.1f} "
            f"{r['labels_search']['p95_ms']:>7.1f} {r.get('v1_search', {}).get('p50_ms', float('nan')):>10.1f} "
            f"{r.get('speedup_vs_v1_p50', float('nan')):>6.1f} {dn.get('p50_ms', float('nan')):>10.1f} "
            f"{dn.get('recall_at_10', float('nan')):>8.3f} {r.get('dense_index_bytes', float('nan')) / 1e6:>8.1f}")
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated window counts (e.g. 1e5,1e6)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive-sizes", type=_sizes, default=[100_000, 1_000_000, 10_000_000],
                   help="window counts (default 1e5,1e6,1e7)")
    p.add_argument("--archive-bundle", type=Path, default=Path("/work/bundle-cache/birdnet"),
                   help="BirdNET bundle (labels space; its EMBEDDING output gives the embedding windows)")
    p.add_argument("--work", type=Path, default=Path("/tmp/edge-retrieval-archive-bench"),
                   help="scratch folder for the indexes (needs ~8 GB at 1e7)")
    p.add_argument("--v1-max", type=int, default=1_000_000, help="largest size the v1 scan is run at")
    p.add_argument("--dense-max", type=int, default=1_000_000, help="largest size for embedding windows")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds over the queries (default 3)")


def main(argv: list[str] | None = None) -> int:
    from .report import standalone_main

    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sounds", type=Path, default=Path.home() / ".cache" / "edge-retrieval" / "sounds")
        p.add_argument("--quiet", action="store_true")

    return standalone_main("archive_bench", __doc__.splitlines()[0], add_arguments, run, render, argv, extra)


if __name__ == "__main__":
    sys.exit(main())
