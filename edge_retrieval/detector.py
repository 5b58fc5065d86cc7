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
- A gated (near-silent, not encoded) window counts as a miss and leaves the baseline alone.

Policy per query: ``policy.resolve(query policy, device default)`` (query > config > built-in).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .matcher import CompiledQuery
from .policy import DetectionPolicy, PolicyOverlay, resolve
from .protocol import new_event_id

WARMUP = 4  # background scores a query needs before its own long events stop feeding the baseline


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


@dataclass
class _State:
    query: CompiledQuery
    policy: DetectionPolicy
    recent: deque[tuple[bool, float, float, float]]  # (hit, start_s, end_s, raw), last of_windows
    history: deque[float]  # non-detection scores, last adapt_windows
    scored: int = 0
    active: ActiveEvent | None = None
    cooldown_until: float = float("-inf")
    baseline: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class Detector:
    """Owns each query's score history and open event."""

    def __init__(self, default_policy: PolicyOverlay | None = None) -> None:
        self.default_policy = default_policy
        self._states: dict[str, _State] = {}

    def policy_for(self, q: CompiledQuery) -> DetectionPolicy:
        return resolve(q.policy, self.default_policy)

    def _state(self, q: CompiledQuery, out: list[Transition]) -> _State:
        st = self._states.get(q.query_id)
        if st is not None and st.query is q:
            return st
        if st is not None and st.active is not None:  # replaced query: close its open event
            out.append(self._close(st))
        p = self.policy_for(q)
        st = _State(q, p, deque(maxlen=p.of_windows), deque(maxlen=p.adapt_windows))
        if st is not None and q.query_id in self._states:
            old = self._states[q.query_id]
            if old.query.text == q.text and old.policy == p:
                st.history.extend(old.history)  # same text: keep the learnt background
                st.scored = old.scored
        self._states[q.query_id] = st
        return st

    def sync(self, queries: Sequence[CompiledQuery]) -> list[Transition]:
        """Close events of queries that are gone; returns their final updates."""
        keep = {q.query_id for q in queries}
        out: list[Transition] = []
        for qid in [k for k in self._states if k not in keep]:
            st = self._states.pop(qid)
            if st.active is not None:
                out.append(self._close(st))
        return out

    def baseline(self, query_id: str) -> float:
        st = self._states.get(query_id)
        return st.baseline if st else 0.0

    def step(
        self, queries: Sequence[CompiledQuery], start_s: float, end_s: float, scores: np.ndarray | None
    ) -> list[Transition]:
        """One window for every query; ``scores`` [nq] in query order, or None when gated."""
        out = self.sync(queries)
        for i, q in enumerate(queries):
            st = self._state(q, out)
            raw = None if scores is None else float(scores[i])
            self._one(st, start_s, end_s, raw, out)
        return out

    def _one(self, st: _State, start_s: float, end_s: float, raw: float | None, out: list[Transition]) -> None:
        p, thr = st.policy, st.query.threshold
        base = float(np.quantile(st.history, p.adapt_quantile)) if p.adapt and st.history else 0.0
        st.baseline = base
        hit = stay = False
        if raw is not None:
            adapted = raw - base
            hit = raw >= thr and (not p.adapt or adapted >= p.adapt_margin)
            stay = raw >= thr - p.hysteresis and (not p.adapt or adapted >= max(0.0, p.adapt_margin - p.hysteresis))
        ev = st.active
        if ev is not None:
            if stay and raw is not None:
                if end_s - ev.start_s > p.max_event_s:  # split a very long event
                    out.append(self._close(st))
                    self._open(st, start_s, end_s, raw, out)
                else:
                    ev.end_s, ev.peak = end_s, max(ev.peak, raw)
                    ev.windows += 1
            else:
                out.append(self._close(st))
        else:
            counted = hit and start_s >= st.cooldown_until
            st.recent.append((counted, start_s, end_s, raw if raw is not None else 0.0))
            hits = [r for r in st.recent if r[0]]
            if len(hits) >= p.min_hits:
                self._open(st, hits[0][1], end_s, max(r[3] for r in hits), out)
        if raw is not None:
            st.scored += 1
            ev = st.active
            if (not hit and ev is None) or (ev is not None and len(st.history) < WARMUP and ev.windows > WARMUP):
                st.history.append(raw)

    def _open(self, st: _State, start_s: float, end_s: float, peak: float, out: list[Transition]) -> None:
        st.active = ActiveEvent(new_event_id(), st.query.query_id, st.query.text, start_s, end_s, peak)
        st.recent.clear()
        out.append(Transition(st.active, final=False))

    def _close(self, st: _State) -> Transition:
        ev = st.active
        assert ev is not None
        ev.final = True
        st.active = None
        st.recent.clear()
        st.cooldown_until = ev.end_s + st.policy.cooldown_s
        return Transition(ev, final=True)

    def flush(self) -> list[Transition]:
        """End of stream: close every open event."""
        return [self._close(st) for st in self._states.values() if st.active is not None]

    def active_count(self) -> int:
        return sum(1 for st in self._states.values() if st.active is not None)
