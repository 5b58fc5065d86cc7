"""Sinks: where events go. ``emit`` must return quickly (it runs on the inference thread).

The daemon emits an onset (``final=False``) and a closing update with the same ``event_id``
(``final=True``). Local sinks: a readable table, or JSON lines (one object per event by
default: the final one; ``updates=True`` also writes onsets, for consumers that upsert).
"""

from __future__ import annotations

import sys
import threading
from typing import Protocol, TextIO, runtime_checkable

from ..protocol import Event


@runtime_checkable
class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class _StreamSink:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except BrokenPipeError:  # the reader went away (| head): stop writing, keep running
                pass

    def close(self) -> None:
        try:
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            pass


class JsonLinesSink(_StreamSink):
    """One JSON object per line with the fields of the event contract."""

    def __init__(self, stream: TextIO | None = None, updates: bool = False) -> None:
        super().__init__(stream)
        self.updates = updates

    def emit(self, event: Event) -> None:
        if event.final or self.updates:
            self._write(event.to_json())


def _clock(s: float) -> str:
    h, rem = divmod(max(s, 0.0), 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h):d}:{int(m):02d}:{sec:04.1f}"


class TableSink(_StreamSink):
    """A readable table; ``onsets=True`` (live sources) also prints a row when an event starts."""

    HEADER = f"{'start':>10}  {'end':>10}  {'score':>5}  {'query':<28} {'time (UTC)':<24} clip"

    def __init__(self, stream: TextIO | None = None, onsets: bool = False) -> None:
        super().__init__(stream)
        self.onsets = onsets
        self._header = False
        self.rows = 0

    def emit(self, event: Event) -> None:
        if not event.final and not self.onsets:
            return
        if not self._header:
            self._write(self.HEADER)
            self._header = True
        end = _clock(event.end_s) if event.final else "..."
        self.rows += 1
        self._write(
            f"{_clock(event.start_s):>10}  {end:>10}  {event.score:5.2f}  {event.query[:28]:<28} "
            f"{event.time[:23]:<24} {event.clip or ''}".rstrip()
        )
        for part in event.parts or ():  # a temporal query: when each part was heard
            self._write(f"{_clock(part.start_s):>10}  {_clock(part.end_s):>10}  {part.score:5.2f}    part: {part.text[:60]}")


class ListSink:
    """Keeps events in memory (tests, the demo summary, archive runs). Bounded: ``maxlen`` events."""

    def __init__(self, maxlen: int = 100000) -> None:
        self.events: list[Event] = []
        self.maxlen = maxlen
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            if len(self.events) < self.maxlen:
                self.events.append(event)

    def close(self) -> None:
        pass

    def finals(self) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.final]
