"""Retrieval metrics as in Oncescu et al. 2021: Recall@K, median rank of the first relevant item,
mAP@10, with bootstrap confidence intervals and paired tests over queries."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranks_and_ap(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per query: rank (1-based) of the first relevant item, and average precision over the top ``k``.

    ``scores`` and ``relevant`` are [Q, I]. Ties are broken pessimistically (irrelevant items
    first), so a model that scores everything alike earns nothing. AP@k is normalised by
    min(#relevant, k), as in the paper's code.
    """
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, bool)
    if scores.shape != relevant.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and relevant {relevant.shape} must both be [Q, I]")
    q, n = scores.shape
    if n == 0:
        raise ValueError("no items to rank")
    # lexsort: last key is primary -> order by -score, then irrelevant first, then index
    first = np.zeros(q, np.int64)
    ap = np.zeros(q, np.float64)
    idx = np.arange(n)
    for i in range(q):
        if not relevant[i].any():
            raise ValueError(f"query {i} has no relevant item")
        order = np.lexsort((idx, relevant[i].astype(np.int8), -scores[i]))
        rel = relevant[i][order]
        first[i] = int(np.argmax(rel)) + 1
        top = rel[:k].astype(np.float64)
        prec = np.cumsum(top) / np.arange(1, top.size + 1)
        ap[i] = float((prec * top).sum() / min(int(relevant[i].sum()), k))
    return first, ap


def summarize(first: np.ndarray, ap: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (fraction of queries whose first relevant item is in the top K), median rank, mAP@10."""
    first = np.asarray(first)
    out = {f"R@{k}": float(np.mean(first <= k)) for k in ks}
    out["mAP@10"] = float(np.mean(ap))
    out["median_rank"] = float(np.median(first))
    out["mean_rank"] = float(np.mean(first))
    return out


def bootstrap_ci(
    first: np.ndarray, ap: np.ndarray, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals over queries (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    q = len(first)
    samples: dict[str, list[float]] = {}
    for _ in range(int(n)):
        i = rng.integers(0, q, q)
        for k, v in summarize(first[i], ap[i]).items():
            samples.setdefault(k, []).append(v)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    return {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()}


def paired_bootstrap(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of (b - a) over the same resampled queries: delta, CI, two-sided p.

    p is twice the smaller tail fraction of resampled deltas on either side of zero (capped at 1).
    """
    if len(a[0]) != len(b[0]):
        raise ValueError(f"paired bootstrap needs the same queries: {len(a[0])} vs {len(b[0])}")
    base_a, base_b = summarize(*a), summarize(*b)
    rng = np.random.default_rng(seed)
    q = len(a[0])
    deltas: dict[str, list[float]] = {}
    for _ in range(int(n)):
        i = rng.integers(0, q, q)
        sa, sb = summarize(a[0][i], a[1][i]), summarize(b[0][i], b[1][i])
        for k in sa:
            deltas.setdefault(k, []).append(sb[k] - sa[k])
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out = {}
    for k, d in deltas.items():
        arr = np.asarray(d)
        p = min(1.0, 2 * min(float(np.mean(arr <= 0)), float(np.mean(arr >= 0))))
        out[k] = {
            "delta": base_b[k] - base_a[k],
            "ci_low": float(np.percentile(arr, lo)),
            "ci_high": float(np.percentile(arr, hi)),
            "p": p,
        }
    return out


def recall_curve(first: np.ndarray, max_k: int) -> np.ndarray:
    """Recall@K for K = 1..max_k (for plots)."""
    first = np.asarray(first)
    return np.asarray([float(np.mean(first <= k)) for k in range(1, max_k + 1)])
