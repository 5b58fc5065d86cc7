"""Retrieval metrics (Recall@K, median rank, mAP@10, bootstrap) against a brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_retrieval.offline.metrics import (
    bootstrap_ci,
    paired_bootstrap,
    ranks_and_ap,
    recall_curve,
    summarize,
)


def brute_force(scores: list[float], rel: list[bool], k: int = 10) -> tuple[int, float]:
    """Rank of each relevant item from pairwise comparisons; pessimistic ties (irrelevant first)."""
    n = len(scores)

    def rank(i: int) -> int:
        r = 1
        for j in range(n):
            if j == i:
                continue
            if scores[j] > scores[i]:
                r += 1
            elif scores[j] == scores[i] and (not rel[j] or j < i):  # ties: irrelevant first, then index
                r += 1
        return r

    ranks = sorted(rank(i) for i in range(n) if rel[i])
    first = ranks[0]
    ap = 0.0
    for m, r in enumerate(ranks, start=1):  # m relevant items at or above rank r
        if r <= k:
            ap += m / r
    return first, ap / min(len(ranks), k)


def check(scores: np.ndarray, rel: np.ndarray, k: int = 10) -> None:
    first, ap = ranks_and_ap(scores, rel, k=k)
    for i in range(scores.shape[0]):
        f, a = brute_force(list(scores[i]), list(rel[i]), k)
        assert first[i] == f
        assert ap[i] == pytest.approx(a)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 25),
    st.integers(0, 10_000),
    st.sampled_from([3, 5, 10]),
)
def test_ranks_and_ap_match_brute_force(q: int, n: int, seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(q, n)).astype(np.float64)  # few levels: many ties
    rel = rng.random((q, n)) < 0.3
    rel[np.arange(q), rng.integers(0, n, q)] = True
    check(scores, rel, k)


def test_summary_counts_queries_by_first_rank() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random((40, 30))
    rel = np.zeros_like(scores, bool)
    rel[np.arange(40), rng.integers(0, 30, 40)] = True
    first, ap = ranks_and_ap(scores, rel)
    s = summarize(first, ap)
    firsts = [brute_force(list(scores[i]), list(rel[i]))[0] for i in range(40)]
    for kk in (1, 5, 10):
        assert s[f"R@{kk}"] == sum(f <= kk for f in firsts) / 40
    assert s["median_rank"] == float(np.median(firsts))
    # single relevant item: AP@10 is 1/rank inside the top 10, else 0
    assert s["mAP@10"] == pytest.approx(np.mean([1 / f if f <= 10 else 0.0 for f in firsts]))
    assert np.allclose(recall_curve(first, 30)[[0, 4, 9]], [s["R@1"], s["R@5"], s["R@10"]])


def test_ties_are_pessimistic_and_perfect_scores_are_perfect() -> None:
    rel = np.eye(4, dtype=bool)
    first, ap = ranks_and_ap(np.zeros((4, 4)), rel)
    assert list(first) == [4, 4, 4, 4]  # all tied: every irrelevant item goes first
    first, ap = ranks_and_ap(np.eye(4) + 0.1, rel)
    assert list(first) == [1, 1, 1, 1] and np.allclose(ap, 1.0)


def test_map_normalises_by_min_relevant_and_k() -> None:
    # 12 relevant items filling the top 10: AP@10 = 1 (normalised by 10, not 12)
    scores = np.arange(20, 0, -1, dtype=float)[None, :]
    rel = np.zeros((1, 20), bool)
    rel[0, :12] = True
    _, ap = ranks_and_ap(scores, rel)
    assert ap[0] == pytest.approx(1.0)
    # relevant at ranks 2 and 4 of 2 relevant: (1/2 + 2/4) / 2
    rel = np.zeros((1, 20), bool)
    rel[0, [1, 3]] = True
    _, ap = ranks_and_ap(scores, rel)
    assert ap[0] == pytest.approx(brute_force(list(scores[0]), list(rel[0]))[1])


def test_bad_shapes_and_queries_without_relevant_items_are_refused() -> None:
    with pytest.raises(ValueError, match="must both be"):
        ranks_and_ap(np.zeros((2, 3)), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="no relevant"):
        ranks_and_ap(np.zeros((1, 3)), np.zeros((1, 3), bool))


def test_bootstrap_interval_brackets_the_estimate() -> None:
    rng = np.random.default_rng(3)
    first = rng.integers(1, 30, 200)
    ap = np.where(first <= 10, 1.0 / first, 0.0)
    ci = bootstrap_ci(first, ap, n=300, seed=0)
    s = summarize(first, ap)
    for key in ("R@1", "R@5", "R@10", "mAP@10", "median_rank"):
        lo, hi = ci[key]
        assert lo <= s[key] <= hi
    lo, hi = ci["R@10"]
    assert hi - lo > 0  # 200 queries with mixed outcomes: a real interval


def test_paired_bootstrap_sees_identical_and_better_systems() -> None:
    rng = np.random.default_rng(4)
    first = rng.integers(1, 30, 100)
    ap = np.where(first <= 10, 1.0 / first, 0.0)
    same = paired_bootstrap((first, ap), (first.copy(), ap.copy()), n=200)
    assert same["R@10"]["delta"] == 0 and same["R@10"]["ci_low"] == 0 == same["R@10"]["ci_high"]
    assert same["R@10"]["p"] == 1.0
    better_first = np.maximum(1, first - 8)
    better_ap = np.where(better_first <= 10, 1.0 / better_first, 0.0)
    d = paired_bootstrap((first, ap), (better_first, better_ap), n=200)
    assert d["R@10"]["delta"] > 0 and d["R@10"]["ci_low"] > 0 and d["R@10"]["p"] < 0.05
    assert d["median_rank"]["delta"] < 0
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap((first, ap), (first[:5], ap[:5]))


def test_brute_force_reference_agrees_with_exhaustive_orderings() -> None:
    """The reference itself: AP over the pessimistic total order, by listing the order explicitly."""
    scores = [0.5, 0.2, 0.5, 0.9, 0.2]
    for rel in itertools.product([False, True], repeat=5):
        if not any(rel):
            continue
        order = sorted(range(5), key=lambda j: (-scores[j], rel[j], j))
        hits, ap = 0, 0.0
        for pos, j in enumerate(order[:3], start=1):
            if rel[j]:
                hits += 1
                ap += hits / pos
        first = next(p for p, j in enumerate(order, start=1) if rel[j])
        assert brute_force(scores, list(rel), k=3) == (first, pytest.approx(ap / min(sum(rel), 3)))
