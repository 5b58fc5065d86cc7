"""The matcher from 1 to 100,000 registered queries, dense (joint, 512-d) and sparse (labels).

Per size, both kinds are timed in the same interleaved rounds on one window (batch 1):
``score`` is ``Snapshot.score`` (one product per expert), ``match`` adds the threshold compare
(what decides a hit). We also report the snapshot build time (``Matcher.add``/``remove`` rebuild
the whole snapshot, so this is the cost of one query change at that size), the snapshot's
matrix bytes, and the detector's per-window step (a Python loop over queries: not the matcher,
but what follows it in the daemon) up to ``detector_max`` queries.

Queries are synthetic: dense = random unit vectors; sparse = ``k`` (<= 64) random label indices
out of 6,522 with softmax weights, like the label bridge makes. Built straight into a snapshot
(``matcher._build``), since adding 100,000 queries one by one rebuilds the snapshot each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from ..pipeline.detector import Detector
from ..pipeline.matcher import CompiledQuery, Snapshot, _build
from .timing import interleaved, ratio, summaries

SIZES = (1, 10, 100, 1000, 10000, 100000)
DENSE_DIM = 512
N_LABELS = 6522
SPARSE_K = 64


def dense_queries(n: int, dim: int = DENSE_DIM, seed: int = 0) -> tuple[CompiledQuery, ...]:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return tuple(
        CompiledQuery(f"d{i}", 1, f"dense {i}", 0.3, None, {"clap": 1.0}, {"clap": v[i]}, {}) for i in range(n)
    )


def sparse_queries(n: int, n_labels: int = N_LABELS, k: int = SPARSE_K, seed: int = 1) -> tuple[CompiledQuery, ...]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        idx = np.sort(rng.choice(n_labels, size=k, replace=False)).astype(np.int64)
        z = rng.standard_normal(k).astype(np.float32) / np.float32(0.5)
        w = np.exp(z - z.max())
        w = (w / w.sum()).astype(np.float32)
        out.append(CompiledQuery(f"s{i}", 1, f"sparse {i}", 0.2, None, {"birdnet": 1.0}, {}, {"birdnet": (idx, w)}))
    return tuple(out)


def _match(snap: Snapshot, vectors: dict[str, np.ndarray]) -> np.ndarray:
    return snap.score(vectors) >= snap.thresholds


def _matrix_bytes(snap: Snapshot) -> int:
    """Bytes of the snapshot's scoring arrays (dense matrix, or CSR labels/weights/starts)."""
    total = 0
    for e in snap.experts.values():
        for name in ("rows", "labels", "weights", "starts"):
            a = getattr(e, name, None)
            total += 0 if a is None else int(a.nbytes)
    return total


def bench_matcher(
    sizes: Sequence[int] = SIZES,
    repeats: int = 50,
    warmup: int = 3,
    sparse_k: int = SPARSE_K,
    detector_max: int = 10000,
    progress: Callable[[str], None] | None = None,
    blas_threads: int | None = None,
) -> dict[str, Any]:
    """Latency per window of scoring n queries, dense and sparse, interleaved per size.

    ``blas_threads`` limits numpy's BLAS pool for the run (threadpoolctl); None = as installed.
    On a small loaded board the BLAS pool's threads fight the rest for the cores.
    """
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=int(blas_threads), user_api="blas"):
            out = bench_matcher(sizes, repeats, warmup, sparse_k, detector_max, progress, None)
        out["blas_threads"] = int(blas_threads)
        return out
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(7)
    xd = rng.standard_normal((1, DENSE_DIM)).astype(np.float32)
    xd /= np.linalg.norm(xd)
    xs = (1.0 / (1.0 + np.exp(-rng.standard_normal((1, N_LABELS)) * 3 + 4))).astype(np.float32)
    out: dict[str, Any] = {
        "dense": f"joint space, {DENSE_DIM}-d unit vectors",
        "sparse": f"labels space, {sparse_k} of {N_LABELS} labels per query",
        "batch": 1,
        "blas": blas_info(),
        "repeats": repeats,
        "warmup": warmup,
        "sizes": {},
    }
    for n in sizes:
        say(f"matcher: {n} queries")
        entry: dict[str, Any] = {}
        snaps: dict[str, Snapshot] = {}
        qs: dict[str, tuple[CompiledQuery, ...]] = {}
        for kind, make, dims in (
            ("dense", dense_queries, {"clap": DENSE_DIM}),
            ("sparse", partial(sparse_queries, k=sparse_k), {"birdnet": N_LABELS}),
        ):
            qs[kind] = make(n)
            t = time.perf_counter()
            snaps[kind] = _build(qs[kind], dims)
            entry[f"{kind}_build_ms"] = round((time.perf_counter() - t) * 1e3, 3)
            entry[f"{kind}_matrix_bytes"] = _matrix_bytes(snaps[kind])
        vd, vs = {"clap": xd}, {"birdnet": xs}
        variants: dict[str, Callable[[], Any]] = {
            "dense_score": partial(snaps["dense"].score, vd),
            "sparse_score": partial(snaps["sparse"].score, vs),
            "dense_match": partial(_match, snaps["dense"], vd),
            "sparse_match": partial(_match, snaps["sparse"], vs),
        }
        s = interleaved(variants, repeats, warmup)
        entry["variants"] = summaries(s)
        entry["ratios"] = {"sparse_match/dense_match": ratio(s, "sparse_match", "dense_match")}
        if n <= detector_max:
            det = Detector(None)
            row = snaps["sparse"].score(vs)[0]
            reps = max(2, min(repeats, 20_000 // max(n, 1)))
            step = partial(_detector_step, det, qs["sparse"], row)
            d = interleaved({"detector_step": step}, reps, 1)
            entry["variants"]["detector_step"] = d["detector_step"].summary()
        else:
            entry["detector_step"] = f"not timed above {detector_max} queries"
        out["sizes"][str(n)] = entry
        del snaps, qs
    return out


def blas_info() -> list[dict[str, Any]] | str:
    """numpy's BLAS libraries and their thread counts (threadpoolctl), if it is installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    return [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()
            if i.get("user_api") == "blas"]


class _Clock:
    t = 0.0


def _detector_step(det: Detector, queries: tuple[CompiledQuery, ...], row: np.ndarray) -> None:
    _Clock.t += 1.0
    det.step(queries, _Clock.t, _Clock.t + 3.0, row)
