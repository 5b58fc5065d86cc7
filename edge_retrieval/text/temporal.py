"""Temporal query grammar: "A followed by B within 30 s" -> two plain parts and a relation.

A small hand-written parser (no language model): one relation word splits the text into two
parts, each an ordinary text query (resolved by ``QueryBuilder`` as any other), and an optional
trailing ``within N <unit>`` sets the time limit. Forms (case-insensitive)::

    A followed by B | A then B | A and then B | A before B   -> sequence, first A then B
    B after A                                                -> sequence, first A then B
    A while B | A with B                                     -> overlap
    ... within N seconds|second|secs|sec|s|minutes|minute|mins|min

Defaults (``DEFAULT_WITHIN_S``): a sequence fires when B starts at most 60 s after A ends; an
overlap fires when the two parts' events overlap in time (0 s of slack). A text with no relation
word is a plain query (``parse_temporal`` returns None). Every mistake raises ``QueryRejected``
with one line naming the problem.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import QueryRejected
from ..policy import PolicyOverlay
from ..protocol import MAX_WITHIN_S, SCHEMA, QueryMessage, utcnow

if TYPE_CHECKING:
    from . import QueryBuilder, Resolution

Relation = Literal["sequence", "overlap"]

DEFAULT_WITHIN_S: dict[str, float] = {"sequence": 60.0, "overlap": 0.0}

_UNITS: dict[str, float] = {
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
}
# relation word -> (relation, whether the text's first part happens first)
_WORDS: dict[str, tuple[Relation, bool]] = {
    "followed by": ("sequence", True),
    "and then": ("sequence", True),
    "then": ("sequence", True),
    "before": ("sequence", True),
    "after": ("sequence", False),
    "while": ("overlap", True),
    "with": ("overlap", True),
}
_RELATION_RE = re.compile(r"\b(followed\s+by|and\s+then|then|before|after|while|with|followed)\b", re.IGNORECASE)
_WITHIN_RE = re.compile(r"\bwithin\b(.*)$", re.IGNORECASE | re.DOTALL)
_DURATION_RE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_EDGE = " \t\r\n,;:.!?"


@dataclass(frozen=True)
class TemporalQuery:
    """Parts in time order (``first`` happens before ``second`` for a sequence) and the limit."""

    text: str
    first: str
    second: str
    relation: Relation
    within_s: float
    word: str  # the relation word as written, for explain

    @property
    def parts(self) -> tuple[str, str]:
        return (self.first, self.second)

    def describe(self) -> str:
        if self.relation == "sequence":
            return f"{self.first!r} then {self.second!r}, second starting at most {self.within_s:g} s after the first ends"
        slack = f" (or within {self.within_s:g} s)" if self.within_s else ""
        return f"{self.first!r} and {self.second!r} at the same time{slack}"


def _duration(clause: str, text: str) -> float:
    m = _DURATION_RE.match(clause.rstrip(_EDGE))
    if m is None:
        raise QueryRejected(
            f"could not read 'within{clause}' in {text!r} (expected 'within N seconds' or 'within N minutes')"
        )
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit:
        raise QueryRejected(f"'within {m.group(1)}' in {text!r} has no unit (expected seconds, s, sec, minutes or min)")
    if unit not in _UNITS:
        raise QueryRejected(f"unknown unit {unit!r} in {text!r} (expected seconds, s, sec, minutes or min)")
    if value < 0:
        raise QueryRejected(f"duration {m.group(1)} {unit} in {text!r} is negative (expected a time >= 0)")
    seconds = value * _UNITS[unit]
    if seconds > MAX_WITHIN_S:
        raise QueryRejected(f"duration {m.group(1)} {unit} in {text!r} is over the limit of {MAX_WITHIN_S:g} s")
    return seconds


def parse_temporal(text: str) -> TemporalQuery | None:
    """The temporal reading of ``text``, or None when it names no relation (a plain query)."""
    text = " ".join((text or "").split())
    body, within = text, None
    w = _WITHIN_RE.search(text)
    if w is not None:
        body = text[: w.start()]
        within = _duration(w.group(1), text)
    found = list(_RELATION_RE.finditer(body))
    if not found:
        if within is not None:
            raise QueryRejected(
                f"'within' in {text!r} needs a relation (expected e.g. 'A followed by B within 30 s')"
            )
        return None
    if len(found) > 1:
        words = ", ".join(repr(" ".join(m.group(1).lower().split())) for m in found)
        raise QueryRejected(f"more than one relation ({words}) in {text!r}: a temporal query has exactly two parts")
    m = found[0]
    word = " ".join(m.group(1).lower().split())
    if word == "followed":
        raise QueryRejected(f"could not read 'followed' in {text!r} (expected 'A followed by B')")
    relation, in_order = _WORDS[word]
    left, right = body[: m.start()].strip(_EDGE), body[m.end() :].strip(_EDGE)
    if not left:
        raise QueryRejected(f"relation {word!r} in {text!r} has no first part (expected 'A {word} B')")
    if not right:
        raise QueryRejected(f"relation {word!r} in {text!r} has no second part (expected 'A {word} B')")
    if within is None:
        within = DEFAULT_WITHIN_S[relation]
    first, second = (left, right) if in_order else (right, left)
    return TemporalQuery(text=text, first=first, second=second, relation=relation, within_s=within, word=word)


def build_temporal(
    qb: QueryBuilder,
    tq: TemporalQuery,
    query_id: str,
    thresholds: Sequence[float],
    version: int = 1,
    policy: PolicyOverlay | None = None,
    expires: str | None = None,
) -> tuple[QueryMessage, list[list[Resolution]]]:
    """One message for the whole temporal query: each part built as a plain query (its own threshold)."""
    if len(thresholds) != 2:
        raise QueryRejected(f"{len(thresholds)} thresholds for the 2 parts of {tq.text!r}")
    parts, resolutions = [], []
    for text, thr in zip(tq.parts, thresholds, strict=True):
        msg, res = qb.build(text, query_id, float(thr), version=version, policy=policy, expires=expires)
        parts.append(
            {
                "text": msg.text, "vectors": [v.model_dump(exclude_none=True) for v in msg.vectors],
                "weights": msg.weights, "threshold": msg.threshold,
                "policy": msg.policy.model_dump(exclude_none=True) if msg.policy else None,
            }
        )
        resolutions.append(res)
    msg = QueryMessage.model_validate(
        {
            "schema": SCHEMA, "query_id": query_id, "version": version, "text": tq.text,
            "space_id": qb.bundle.manifest.space.id, "created": utcnow(), "expires": expires,
            "temporal": {"relation": tq.relation, "within_s": tq.within_s, "parts": parts},
        }
    )
    return msg, resolutions
