"""Temporal combiner: the detector's events of a temporal query's parts -> the query's own event.

A temporal query (``QueryMessage.temporal``) is registered as its parts, ordinary queries with
hidden ids ``<query id>#1`` and ``<query id>#2`` ('#' is outside ``protocol.NAME_PATTERN``, so
they never collide with a user's id and never reach a topic), each with its own threshold and
policy; this module watches their transitions and fires the query once when they satisfy the
relation (``protocol.TemporalSpec``):

- **sequence**: part 2's event starts after part 1's event starts and at most ``within_s``
  after it ends, and is not inside it: it fires at part 2's onset when part 1's event has
  ended, else at part 1's end if part 2's event is still on (the same sound matching both
  texts, part 2's event inside part 1's, does not fire);
- **overlap**: at an onset of either part while an event of the other is on, or ended at most
  ``within_s`` before (``within_s`` 0: the events must overlap).

The firing consumes the part events that made it (a later part-2 onset needs a new part-1
event), so one occurrence of the pattern gives one event. The combined event starts with the
earliest part and closes (final update) when both part events have closed; it names each
part's times (``TemporalEvent.parts``, the event fields ``relation``, ``within_s``, ``parts``).
Part transitions never leave the pipeline.

Memory is bounded: per part at most ``MAX_HELD`` closed events, each kept ``within_s`` seconds
(stream time) after it ended.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..bundle import Manifest
from ..protocol import EventPart, QueryMessage, new_event_id
from .detector import ActiveEvent, Transition
from .matcher import CompiledQuery, compile_query

MAX_HELD = 32  # closed events held per part (count); each also expires within_s after its end (seconds)
SEP = "#"  # hidden part ids: <query id>#<n>; not allowed in a query id


def part_id(query_id: str, n: int) -> str:
    return f"{query_id}{SEP}{n}"


@dataclass
class TemporalEvent(ActiveEvent):
    """A temporal query's event: the parts' events that made it, in time order."""

    relation: str = "sequence"
    within_s: float = 0.0
    parts: list[ActiveEvent] = field(default_factory=list)


@dataclass(frozen=True)
class TemporalRule:
    query_id: str
    version: int
    text: str
    relation: str
    within_s: float
    part_ids: tuple[str, str]


def compile_temporal(msg: QueryMessage, manifest: Manifest) -> tuple[TemporalRule, list[CompiledQuery]]:
    """The rule and the parts (ordinary compiled queries, hidden ids) of a temporal message.

    Each part is checked by ``matcher.compile_query`` as a plain query of the same id, version
    and space, so a part is refused for exactly the reasons a query would be.
    """
    spec = msg.temporal
    assert spec is not None
    parts = []
    for n, p in enumerate(spec.parts, 1):
        plain = QueryMessage.model_validate(
            {
                "schema": msg.schema_, "query_id": msg.query_id, "version": msg.version, "text": p.text,
                "space_id": msg.space_id, "vectors": [v.model_dump(exclude_none=True) for v in p.vectors],
                "weights": p.weights, "threshold": p.threshold,
                "policy": p.policy.model_dump(exclude_none=True) if p.policy else None,
            }
        )
        parts.append(dataclasses.replace(compile_query(plain, manifest), query_id=part_id(msg.query_id, n)))
    rule = TemporalRule(
        msg.query_id, msg.version, msg.text, spec.relation, float(spec.within_s),
        (parts[0].query_id, parts[1].query_id),
    )
    return rule, parts


@dataclass
class _State:
    """One rule's part events: open ones by part, closed ones (bounded), the open combined event."""

    version: int
    open: list[dict[str, ActiveEvent]] = field(default_factory=lambda: [{}, {}])  # event id -> event
    closed: list[list[ActiveEvent]] = field(default_factory=lambda: [[], []])
    fired: TemporalEvent | None = None
    waiting: set[str] = field(default_factory=set)  # part event ids the open combined event waits for


class TemporalCombiner:
    """Owns the rules (swapped under a lock: queries change from the MQTT thread) and their state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: dict[str, TemporalRule] = {}  # query id -> rule (replaced, never mutated)
        self._by_part: dict[str, tuple[TemporalRule, int]] = {}  # part id -> (rule, 0|1)
        self._state: dict[str, _State] = {}  # used by the inference thread only

    def __bool__(self) -> bool:
        return bool(self._rules)

    def get(self, query_id: str) -> TemporalRule | None:
        return self._rules.get(query_id)

    def add(self, rule: TemporalRule) -> None:
        with self._lock:
            rules = {**self._rules, rule.query_id: rule}
            self._rules, self._by_part = rules, _index(rules)

    def remove(self, query_id: str) -> TemporalRule | None:
        with self._lock:
            rules = dict(self._rules)
            old = rules.pop(query_id, None)
            self._rules, self._by_part = rules, _index(rules)
            return old

    def reset(self) -> None:
        """Forget every part event and open combined event (an unrelated stream follows)."""
        self._state.clear()

    def process(self, transitions: Iterable[Transition]) -> list[Transition]:
        """Pass plain queries' transitions through; turn parts' transitions into the rules' events."""
        by_part = self._by_part  # one read: a consistent set while rules change
        out: list[Transition] = []
        for tr in transitions:
            qid = tr.event.query_id
            if SEP not in qid:
                out.append(tr)
                continue
            hit = by_part.get(qid)
            if hit is None:
                continue  # a part of a rule removed meanwhile
            rule, k = hit
            st = self._state.get(rule.query_id)
            if st is None or st.version != rule.version:  # new or replaced rule: start afresh
                st = self._state[rule.query_id] = _State(rule.version)
            out.extend(self._part(rule, st, k, tr))
        for gone in [q for q in self._state if q not in self._rules]:
            del self._state[gone]
        return out

    # ------------------------------------------------------------------ one part transition

    def _part(self, rule: TemporalRule, st: _State, k: int, tr: Transition) -> list[Transition]:
        ev = tr.event
        out: list[Transition] = []
        if not tr.final:
            st.open[k][ev.event_id] = ev
            if st.fired is None:
                partner = self._partner(rule, st, k, ev)
                if partner is not None:
                    out.append(self._fire(rule, st, ev, partner))
            return out
        st.open[k].pop(ev.event_id, None)
        if ev.event_id in st.waiting:
            st.waiting.discard(ev.event_id)
            if not st.waiting and st.fired is not None:
                fired, st.fired = st.fired, None
                fired.end_s = max(p.end_s for p in fired.parts)
                fired.peak = min(p.peak for p in fired.parts)
                fired.final = True
                out.append(Transition(fired, final=True))
            return out
        held = st.closed[k]
        held.append(ev)
        del held[:-MAX_HELD]
        if rule.relation == "sequence" and k == 0 and st.fired is None:
            # part 1 has ended: a part-2 event that started after it and is still on completes it
            later = [e for e in st.open[1].values() if e.start_s > ev.start_s]
            if later:
                out.append(self._fire(rule, st, min(later, key=lambda e: e.start_s), ev))
        return out

    def _partner(self, rule: TemporalRule, st: _State, k: int, ev: ActiveEvent) -> ActiveEvent | None:
        """The other part's event that completes the relation with onset ``ev`` of part ``k``."""
        other = 1 - k
        held = st.closed[other]
        held[:] = [e for e in held if e.end_s + rule.within_s >= ev.start_s]  # older ones can never match again
        if rule.relation == "sequence":
            # part 2 starts after a part-1 event that has ended; with part 1 still on, wait for its end
            # (a part-2 event inside part 1, the same sound matching both texts, does not count)
            cands = [e for e in held if e.start_s < ev.start_s] if k == 1 else []
        else:
            cands = [*st.open[other].values(), *(e for e in held if e.end_s + rule.within_s > ev.start_s)]
        return max(cands, key=lambda e: e.start_s, default=None)

    def _fire(self, rule: TemporalRule, st: _State, ev: ActiveEvent, partner: ActiveEvent) -> Transition:
        """Fire for ``ev`` and ``partner``; both, and anything held from before them, are consumed."""
        parts = sorted([partner, ev], key=lambda e: (e.start_s, e.query_id))
        for j in (0, 1):
            used = [p.start_s for p in parts if p.event_id in {e.event_id for e in st.closed[j]}]
            if used:
                st.closed[j] = [e for e in st.closed[j] if e.start_s > max(used)]
        st.waiting = {e.event_id for e in parts if e.event_id in st.open[0] or e.event_id in st.open[1]}
        fired = TemporalEvent(
            new_event_id(), rule.query_id, rule.text, parts[0].start_s, max(p.end_s for p in parts),
            min(p.peak for p in parts), relation=rule.relation, within_s=rule.within_s, parts=parts,
        )
        if st.waiting:
            st.fired = fired
            return Transition(fired, final=False)
        fired.final = True  # both part events already closed (cannot happen at an onset, kept for safety)
        return Transition(fired, final=True)

    def flush(self) -> list[Transition]:
        """Close the open combined events (after the detector's own flush went through ``process``)."""
        out = []
        for st in self._state.values():
            if st.fired is not None:
                st.fired.final = True
                out.append(Transition(st.fired, final=True))
                st.fired, st.waiting = None, set()
        return out


def temporal_fields(ev: ActiveEvent) -> dict[str, Any]:
    """The event fields of a temporal query's event (relation, within_s, parts); {} for a plain one."""
    if not isinstance(ev, TemporalEvent):
        return {}
    parts = [
        EventPart(text=p.query, start_s=round(p.start_s, 3), end_s=round(p.end_s, 3), score=round(float(p.peak), 4))
        for p in ev.parts
    ]
    return {"relation": ev.relation, "within_s": ev.within_s, "parts": parts}


def _index(rules: dict[str, TemporalRule]) -> dict[str, tuple[TemporalRule, int]]:
    return {pid: (r, k) for r in rules.values() for k, pid in enumerate(r.part_ids)}
