"""Detector: per-query score streams -> events (onset, then one final update).

Per query and window (``raw`` = the matcher's score, ``base`` = its background baseline):

- **hit**: ``raw >= threshold`` and, when adaptation is on, ``raw - base >= adapt_margin``.
- **onset**: ``min_hits`` hits among the last ``of_windows`` windows (N of M), outside the
  cooldown. The event starts at the earliest of those hit windows.
- **stay on** (hysteresis): ``raw >= threshold - hysteresis`` and, adapting,
  ``raw - base >= max(0, adapt_margin - hysteresis)``. Consecutive windows that stay on are
  merged into the one event; the first window that does not ends it (``final`` update with
  ``end_s`` and the peak score). An event longer than ``max_event_s`` is closed and, if the
  sound goes on, a new one starts.
- **cooldown**: no onset for windows starting before ``end_s + cooldown_s`` of the last event.
- **background adaptation**: ``base`` is the ``adapt_quantile`` of the last ``adapt_windows``
  non-detection scores (windows that are neither a hit nor part of an event). One exception:
  while the query has learnt fewer than ``WARMUP`` background scores, the windows of an event
  that has already lasted more than ``WARMUP`` windows enter the history too. A score that is
  high from the very start (BirdNET's woodpecker on plain noise) then gives one short event and
  becomes the baseline, instead of an event that never ends; a short real sound heard first
  (a quiet, gated site) does not poison the baseline.
- A gated (near-silent, not encoded) window counts as a miss and leaves the baseline alone; so
  does a NaN score (a window the query's feedback suppressed, pipeline/feedback.py).

Policy per query: ``policy.resolve(query policy, device default)`` (query > config > built-in).

Implementation: the step is vectorised over queries (a per-query Python loop cost 34 ms per
window at 1,000 queries, ~280 ms at 10,000). Per-query policy fields and state live in numpy
arrays, one row per query, rebuilt only when the query tuple changes (the daemon passes the
matcher's snapshot tuple, the same object until a query is added or removed). Python runs only
for the rows whose state changes in this window (onset, split, end), a handful at most.

- Background history: one ring per adapting query (``adapt_windows`` float64 slots, all rings
  in one flat buffer) with a fill count. The quantile is computed only where it can change a
  decision: ``raw >= threshold - hysteresis`` (below that, neither a hit nor stay-on is possible
  whatever ``base`` is; NaN scores compare false as before). Where computed it is the exact
  ``np.quantile`` of the same multiset of scores as before (a quantile does not depend on order),
  so every decision is identical. ``baseline()`` recomputes it on demand, from the history as it
  stood before the last window (the last push undone), which is what that window used.
- N of M: only counted hits are kept (query id -> [(window number, start_s, raw)], dropped at
  onset/end). An onset can only happen in a window that is itself a counted hit (without one the
  count cannot grow), so only those rows are checked.
- Open events: start/end/peak/window count in arrays; the ``ActiveEvent`` object given with the
  onset gets its final ``end_s``/``peak``/``windows`` when it is closed (final update or flush).

Threading: the detector is used by one thread (the daemon's inference thread). Live query
changes (MQTT thread) reach it only through the matcher's immutable snapshot tuple.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..policy import DetectionPolicy, PolicyOverlay, resolve
from ..protocol import new_event_id
from .matcher import CompiledQuery

WARMUP = 4  # background scores a query needs before its own long events stop feeding the baseline

# per-query fields derived from (query, policy): name -> dtype
_STATIC: dict[str, Any] = {
    "thr": np.float64, "thr_lo": np.float64, "margin": np.float64, "margin_lo": np.float64,
    "cooldown": np.float64, "max_event": np.float64, "quant": np.float64, "adapt": np.bool_,
    "of_windows": np.int64, "min_hits": np.int64, "W": np.int64,
}
# per-query state: name -> (dtype, initial value)
_STATE: dict[str, tuple[Any, Any]] = {
    "active": (np.bool_, False), "ev_start": (np.float64, 0.0), "ev_end": (np.float64, 0.0),
    "ev_peak": (np.float64, 0.0), "ev_windows": (np.int64, 0), "cool_until": (np.float64, -np.inf),
    "pos": (np.int64, 0), "fill": (np.int64, 0),  # ring write position, scores held
    "pushed": (np.bool_, False), "evicted": (np.bool_, False), "evicted_val": (np.float64, 0.0),
}


@dataclass
class ActiveEvent:
    event_id: str
    query_id: str
    query: str
    start_s: float
    end_s: float
    peak: float
    final: bool = False
    windows: int = 1  # windows merged into this event so far


@dataclass
class Transition:
    """An onset (``final=False``) or the closing update (``final=True``) of an event."""

    event: ActiveEvent
    final: bool


def _static(q: CompiledQuery, p: DetectionPolicy) -> tuple[Any, ...]:
    """The ``_STATIC`` row of one query, computed exactly as the per-query rules state them."""
    return (
        float(q.threshold), q.threshold - p.hysteresis, p.adapt_margin, max(0.0, p.adapt_margin - p.hysteresis),
        p.cooldown_s, p.max_event_s, p.adapt_quantile, p.adapt, p.of_windows, p.min_hits,
        p.adapt_windows if p.adapt else 0,
    )


class Detector:
    """Owns each query's score history and open event."""

    def __init__(self, default_policy: PolicyOverlay | None = None) -> None:
        self.default_policy = default_policy
        self._resolved: dict[PolicyOverlay | None, DetectionPolicy] = {}
        self._queries: tuple[CompiledQuery, ...] = ()
        self._pol: list[DetectionPolicy] = []
        self._row: dict[str, int] = {}  # query id -> row
        self._order: dict[str, None] = {}  # ids in registration order (order of flush and removal closes)
        self._events: dict[str, ActiveEvent] = {}  # query id -> its open event
        # counted hits since the last onset/end, fewer than min_hits (<= 99) per query
        self._hits: dict[str, list[tuple[int, float, float]]] = {}
        self._k = 0  # windows stepped
        self._a: dict[str, np.ndarray] = {k: np.zeros(0, d) for k, d in _STATIC.items()}
        self._a.update({k: np.zeros(0, d) for k, (d, _) in _STATE.items()})
        self._a["off"] = np.zeros(0, np.int64)
        # all background rings: adapt_windows scores (float64) per adapting query, 16 MB at 10,000 x 200
        self._flat = np.zeros(0, np.float64)

    def policy_for(self, q: CompiledQuery) -> DetectionPolicy:
        p = self._resolved.get(q.policy)
        if p is None:
            p = self._resolved[q.policy] = resolve(q.policy, self.default_policy)
        return p

    # ------------------------------------------------------------------ query set changes

    def _same(self, queries: tuple[CompiledQuery, ...]) -> bool:
        old = self._queries
        return queries is old or (len(queries) == len(old) and all(map(operator.is_, queries, old)))

    def _rebuild(self, queries: tuple[CompiledQuery, ...]) -> tuple[list[Transition], dict[int, Transition]]:
        """New rows for a changed query set: (finals of removed queries, row -> final of a replaced one)."""
        old_q, old_row, old_a, old_flat = self._queries, self._row, self._a, self._flat
        keep = {q.query_id for q in queries}
        removed = []
        for qid in [k for k in self._order if k not in keep]:
            del self._order[qid]
            if old_a["active"][old_row[qid]]:
                removed.append(self._close(old_row[qid]))
            self._hits.pop(qid, None)
        n = len(queries)
        src = np.full(n, -1, np.int64)  # old row whose whole state carries over (the same query)
        hist = np.full(n, -1, np.int64)  # old row whose background history carries over
        replaced: dict[int, Transition] = {}
        pols: list[DetectionPolicy] = []
        for j, q in enumerate(queries):
            i = old_row.get(q.query_id)
            if i is not None and old_q[i] is q:
                src[j] = hist[j] = i
                pols.append(self._pol[i])
                continue
            p = self.policy_for(q)
            pols.append(p)
            if i is None:
                self._order[q.query_id] = None
                continue
            if old_a["active"][i]:  # replaced query: close its open event
                replaced[j] = self._close(i)
            self._hits.pop(q.query_id, None)
            if old_q[i].text == q.text and self._pol[i] == p:
                hist[j] = i  # same text: keep the learnt background
        has = src >= 0
        a: dict[str, np.ndarray] = {}
        for name, dtype in _STATIC.items():
            a[name] = np.zeros(n, dtype)
            a[name][has] = old_a[name][src[has]]
        for name, (dtype, init) in _STATE.items():
            a[name] = np.full(n, init, dtype)
            a[name][has] = old_a[name][src[has]]
        fresh = np.flatnonzero(~has)
        if fresh.size:
            cols = zip(*[_static(queries[j], pols[j]) for j in fresh], strict=True)
            for name, col in zip(_STATIC, cols, strict=True):
                a[name][fresh] = np.asarray(col, _STATIC[name])
        a["off"] = np.concatenate([[0], np.cumsum(a["W"])[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
        flat = np.zeros(int(a["W"].sum()), np.float64)
        h = np.flatnonzero(hist >= 0)
        if h.size:
            a["pos"][h] = old_a["pos"][hist[h]]
            a["fill"][h] = old_a["fill"][hist[h]]
            w, w0 = a["W"][h], int(a["W"][0])
            if w0 > 0 and (a["W"] == w0).all() and (old_a["W"] == w0).all():  # one ring length: 2-D copy
                flat.reshape(-1, w0)[h] = old_flat.reshape(-1, w0)[hist[h]]
            else:  # mixed lengths: copy the segments through one index
                rel = np.arange(int(w.sum())) - np.repeat(np.cumsum(w) - w, w)
                flat[np.repeat(a["off"][h], w) + rel] = old_flat[np.repeat(old_a["off"][hist[h]], w) + rel]
        self._queries, self._pol, self._a, self._flat = queries, pols, a, flat
        self._row = {q.query_id: j for j, q in enumerate(queries)}
        return removed, replaced

    def sync(self, queries: Sequence[CompiledQuery]) -> list[Transition]:
        """Take a new query set; returns the final updates of queries that are gone or replaced."""
        qs = tuple(queries)
        if self._same(qs):
            return []
        removed, replaced = self._rebuild(qs)
        return removed + [replaced[j] for j in sorted(replaced)]

    # ------------------------------------------------------------------ one window

    def baseline(self, query_id: str) -> float:
        """The background baseline the query's last window was judged against."""
        i = self._row.get(query_id)
        a = self._a
        if i is None or not a["adapt"][i]:
            return 0.0
        off, f, w = int(a["off"][i]), int(a["fill"][i]), int(a["W"][i])
        seg = self._flat[off : off + f].copy()
        if a["pushed"][i]:  # undo the last window's push
            last = (int(a["pos"][i]) - 1) % w
            seg = np.delete(seg, last) if not a["evicted"][i] else seg
            if a["evicted"][i]:
                seg[last] = a["evicted_val"][i]
        return float(np.quantile(seg, a["quant"][i])) if seg.size else 0.0

    def step(
        self, queries: Sequence[CompiledQuery], start_s: float, end_s: float, scores: np.ndarray | None
    ) -> list[Transition]:
        """One window for every query; ``scores`` [nq] in query order, or None when gated."""
        qs = queries if isinstance(queries, tuple) else tuple(queries)
        out: list[Transition] = []
        per: dict[int, list[Transition]] = {}
        if not self._same(qs):
            out, replaced = self._rebuild(qs)
            per = {j: [t] for j, t in replaced.items()}
        self._k += 1
        a = self._a
        was = a["active"].copy()
        if scores is None:  # gated: every open event ends, nothing counts, the baseline stays
            a["pushed"][:] = False
            for i in np.flatnonzero(was).tolist():
                per.setdefault(i, []).append(self._close(i))
            return self._ordered(out, per)
        raw = np.asarray(scores)[: len(qs)].astype(np.float64)
        base = np.zeros(len(qs))
        near = raw >= a["thr_lo"]  # below threshold - hysteresis nothing depends on the baseline
        self._quantiles(np.flatnonzero(near & a["adapt"] & (a["fill"] > 0)), base)
        adapted = raw - base
        noadapt = ~a["adapt"]
        hit = (raw >= a["thr"]) & (noadapt | (adapted >= a["margin"]))
        stay = near & (noadapt | (adapted >= a["margin_lo"]))
        counted = hit & ~was & (start_s >= a["cool_until"])
        split = was & stay & ((end_s - a["ev_start"]) > a["max_event"])
        ext = np.flatnonzero(was & stay & ~split)
        if ext.size:  # merge into the open event
            a["ev_end"][ext] = end_s
            r, pk = raw[ext], a["ev_peak"][ext]
            a["ev_peak"][ext] = np.where(r > pk, r, pk)
            a["ev_windows"][ext] += 1
        for i in np.flatnonzero(counted | (was & ~stay) | split).tolist():
            tr = per.setdefault(i, [])
            if counted[i]:
                self._count(i, start_s, end_s, float(raw[i]), tr)
            elif split[i]:  # split a very long event
                tr.append(self._close(i))
                tr.append(self._open(i, start_s, end_s, float(raw[i])))
            else:
                tr.append(self._close(i))
        act = a["active"]
        # a NaN score (a window feedback suppressed) is a miss that leaves the baseline alone
        push = a["adapt"] & ~np.isnan(raw) & ((~hit & ~act) | (act & (a["fill"] < WARMUP) & (a["ev_windows"] > WARMUP)))
        self._push(np.flatnonzero(push), raw)
        return self._ordered(out, per)

    def _quantiles(self, rows: np.ndarray, base: np.ndarray) -> None:
        """``base[rows]`` = exact quantile of each row's history, grouped by (fill, quantile)."""
        if not rows.size:
            return
        a = self._a
        keys = np.stack([a["fill"][rows].astype(np.float64), a["quant"][rows]], axis=1)
        uk, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        for g in range(len(uk)):
            sel = rows[inv == g] if len(uk) > 1 else rows
            idx = a["off"][sel][:, None] + np.arange(int(uk[g, 0]))
            base[sel] = np.quantile(self._flat[idx], float(uk[g, 1]), axis=1)

    def _push(self, rows: np.ndarray, raw: np.ndarray) -> None:
        """Append ``raw`` to the background rings of ``rows``; remember what it evicted."""
        a = self._a
        a["pushed"][:] = False
        if not rows.size:
            return
        w, fill = a["W"][rows], a["fill"][rows]
        slot = a["off"][rows] + a["pos"][rows]
        a["pushed"][rows] = True
        a["evicted"][rows] = fill == w
        a["evicted_val"][rows] = self._flat[slot]
        self._flat[slot] = raw[rows]
        a["pos"][rows] = (a["pos"][rows] + 1) % w
        a["fill"][rows] = np.minimum(fill + 1, w)

    def _count(self, i: int, start_s: float, end_s: float, raw: float, out: list[Transition]) -> None:
        """A counted hit: N of M over the hits of the last ``of_windows`` windows."""
        qid = self._queries[i].query_id
        first = self._k - int(self._a["of_windows"][i])
        hits = [h for h in self._hits.get(qid, ()) if h[0] > first]
        hits.append((self._k, start_s, raw))
        if len(hits) >= self._a["min_hits"][i]:
            self._hits.pop(qid, None)
            out.append(self._open(i, hits[0][1], end_s, max(h[2] for h in hits)))
        else:
            self._hits[qid] = hits

    def _ordered(self, out: list[Transition], per: dict[int, list[Transition]]) -> list[Transition]:
        for j in sorted(per):
            out.extend(per[j])
        return out

    def _open(self, i: int, start_s: float, end_s: float, peak: float) -> Transition:
        q, a = self._queries[i], self._a
        ev = ActiveEvent(new_event_id(), q.query_id, q.text, start_s, end_s, peak)
        self._events[q.query_id] = ev
        self._hits.pop(q.query_id, None)
        a["active"][i] = True
        a["ev_start"][i], a["ev_end"][i], a["ev_peak"][i], a["ev_windows"][i] = start_s, end_s, peak, 1
        return Transition(ev, final=False)

    def _close(self, i: int) -> Transition:
        qid, a = self._queries[i].query_id, self._a
        ev = self._events.pop(qid)
        if a["ev_windows"][i] > 1:  # merged windows: bring the event object up to date
            ev.end_s, ev.peak, ev.windows = float(a["ev_end"][i]), float(a["ev_peak"][i]), int(a["ev_windows"][i])
        ev.final = True
        a["active"][i] = False
        self._hits.pop(qid, None)
        a["cool_until"][i] = ev.end_s + a["cooldown"][i]
        return Transition(ev, final=True)

    def flush(self) -> list[Transition]:
        """End of stream: close every open event."""
        act = self._a["active"]
        return [self._close(self._row[q]) for q in self._order if act[self._row[q]]]

    def active_count(self) -> int:
        return int(self._a["active"].sum())
