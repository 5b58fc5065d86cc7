"""Archive search for temporal queries: rank time spans where "A followed by B" (or "A while B") occurs.

Each part is scored on every indexed window like a plain query (``ArchiveIndex.window_scores``);
a span pairs a window ``i`` of part A with a window ``j`` of part B that satisfy the relation:

- sequence: ``j`` starts after ``i`` and at most ``within_s`` after ``i``'s window ends;
- overlap: the two windows overlap in time, or lie at most ``within_s`` apart (``i == j`` counts).

A span's score is ``min(score_A[i], score_B[j])`` (both parts must be heard); per file the best
span for each window of B is kept, spans overlapping a better one of the same file are dropped,
and the best ``top`` over all files are returned, best first.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from ..text.temporal import TemporalQuery
from .archive import ArchiveIndex, iso_utc
from .retrieval import text_queries


@dataclass
class SpanHit:
    """A ranked time span of one file and where each part was heard in it."""

    score: float
    path: str
    start_s: float
    end_s: float
    time: str | None
    site: str | None
    parts: list[tuple[str, float, float]]  # (part text, window offset_s, part score), in the query's order

    def as_dict(self) -> dict[str, object]:
        return {
            "score": round(self.score, 6),
            "file": self.path,
            "offset_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "time": self.time,
            "site": self.site,
            "parts": [{"text": t, "offset_s": round(o, 3), "score": round(s, 6)} for t, o, s in self.parts],
        }


def best_pairs(offsets: np.ndarray, a: np.ndarray, b: np.ndarray, window_s: float, tq: TemporalQuery) -> list[tuple[float, int, int]]:
    """For each window j of part B, the best window i of part A it pairs with: [(score, i, j)]."""
    out = []
    for j in range(offsets.size):
        if tq.relation == "sequence":
            ok = (offsets < offsets[j]) & (offsets + window_s + tq.within_s >= offsets[j])
        else:
            ok = np.abs(offsets - offsets[j]) < window_s + tq.within_s
        ok &= np.isfinite(a)
        if not ok.any() or not np.isfinite(b[j]):
            continue
        cand = np.where(ok, a, -np.inf)
        i = int(np.argmax(cand))
        out.append((float(min(a[i], b[j])), i, j))
    return out


def temporal_search(
    index: ArchiveIndex,
    bundle: Bundle,
    tq: TemporalQuery,
    top: int = 10,
    since: float | None = None,
    until: float | None = None,
    site: str | None = None,
) -> list[SpanHit]:
    """The ``top`` best spans over the index (see module doc)."""
    parts = text_queries(bundle, list(tq.parts))
    wlen = index.window_s()
    heap: list[tuple[float, int, int, SpanHit]] = []  # min-heap of (score, -file id, -j, hit)
    for fs in index.window_scores(parts, since, until, site):
        a = np.where(fs.keep, fs.scores[:, 0], -np.inf)
        b = np.where(fs.keep, fs.scores[:, 1], -np.inf)
        taken: list[tuple[float, float]] = []
        for score, i, j in sorted(best_pairs(fs.offsets, a, b, wlen, tq), reverse=True):
            lo, hi = float(min(fs.offsets[i], fs.offsets[j])), float(max(fs.offsets[i], fs.offsets[j])) + wlen
            if any(lo < t_hi and hi > t_lo for t_lo, t_hi in taken):
                continue
            taken.append((lo, hi))
            if len(heap) >= top and score <= heap[0][0]:
                break  # sorted: nothing later in this file can enter
            hit = SpanHit(
                score, fs.path, lo, hi, iso_utc(fs.start + lo) if fs.start is not None else None, fs.site,
                [(tq.first, float(fs.offsets[i]), float(a[i])), (tq.second, float(fs.offsets[j]), float(b[j]))],
            )
            item = (score, -fs.file_id, -j, hit)
            if len(heap) < top:
                heapq.heappush(heap, item)
            else:
                heapq.heapreplace(heap, item)
    return [h for *_, h in sorted(heap, key=lambda t: t[:3], reverse=True)]
