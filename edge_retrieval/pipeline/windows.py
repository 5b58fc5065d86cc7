"""Windowing on a common hop: source blocks -> per-expert windows, one "tick" at a time.

Definitions (seconds are stream offsets from the first sample of the source):

- ``step_s`` (the common hop) = bundle ``device.hop_s`` x (1 - overlap), overlap in [0, 0.95).
- Tick ``k`` starts at ``k * step_s``. For every expert ``e`` its window ``k`` covers
  ``[k * step_s, k * step_s + window_s(e))`` at the expert's own rate (the source is resampled
  per expert with a streaming soxr resampler). Windows of all experts start together; a tick is
  complete when the longest expert window is, and its scores land at ``start_s = k * step_s``.
- At the end of a stream, the uncovered tail gets one last zero-padded window per expert (so a
  clip shorter than a window is still scored).

Memory is bounded: each expert keeps at most one window plus one block of samples.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


class Resampler:
    """Streaming resampler (soxr) with ``flush`` at the end; identity when rates agree."""

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self._rs = None
        if self.in_rate != self.out_rate:
            import soxr

            self._rs = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality=quality)

    def __call__(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        if self._rs is None:
            return x
        return self._rs.resample_chunk(np.ascontiguousarray(x, np.float32), last=last)

    def flush(self) -> np.ndarray:
        return self(np.zeros(0, np.float32), last=True)



@dataclass
class Tick:
    """One scoring instant: the window of every expert that starts at ``start_s``."""

    index: int
    start_s: float
    end_s: float  # start + the longest expert window
    windows: dict[str, np.ndarray] = field(default_factory=dict)  # expert -> [window_samples] float32
    padded: bool = False  # the last window of a stream, zero-padded


@dataclass(frozen=True)
class ExpertWindowing:
    name: str
    sample_rate: int
    window_s: float

    @property
    def window_samples(self) -> int:
        return int(round(self.window_s * self.sample_rate))


def common_step(hop_s: float, overlap: float) -> float:
    """The common hop in seconds: bundle hop x (1 - overlap)."""
    if not 0.0 <= overlap < 0.951:
        raise ValueError(f"overlap {overlap!r} must be in [0, 0.95] (fraction of the window)")
    return float(hop_s) * (1.0 - float(overlap))


class _ExpertWindower:
    """Resample one stream to one expert's rate and cut windows at ``k * step`` samples."""

    def __init__(self, spec: ExpertWindowing, source_rate: int, step_s: float) -> None:
        self.spec = spec
        self.rate = spec.sample_rate
        self.win = spec.window_samples
        self.step_s = step_s
        self.rs = Resampler(source_rate, spec.sample_rate)
        self.buf = np.zeros(0, np.float32)
        self.buf_start = 0  # absolute sample index (at the expert rate) of buf[0]
        self.total = 0  # samples received at the expert rate
        self.next_k = 0
        self.ready: deque[np.ndarray] = deque()

    def start(self, k: int) -> int:
        return int(round(k * self.step_s * self.rate))

    def push(self, x: np.ndarray, last: bool = False) -> None:
        y = self.rs(x, last=last)
        if y.size:
            self.buf = np.concatenate([self.buf, y]) if self.buf.size else y.astype(np.float32, copy=True)
            self.total += y.size
        self._cut()

    def _cut(self) -> None:
        while True:
            s = self.start(self.next_k)
            if self.buf_start + self.buf.size < s + self.win:
                break
            off = s - self.buf_start
            self.ready.append(self.buf[off : off + self.win].copy())
            self.next_k += 1
            self._trim()

    def _trim(self) -> None:
        drop = min(self.start(self.next_k) - self.buf_start, self.buf.size)
        if drop > 0:
            self.buf = self.buf[drop:]
            self.buf_start += drop

    def needed_final(self) -> int:
        """Tick count this expert needs to cover everything it received (padding the tail)."""
        k = self.next_k
        covered = self.start(k - 1) + self.win if k > 0 else 0
        while covered < self.total and self.start(k) < self.total:
            covered = self.start(k) + self.win
            k += 1
        return k

    def pad_to(self, k_final: int) -> None:
        while self.next_k < k_final:
            s = self.start(self.next_k)
            off = s - self.buf_start
            w = np.zeros(self.win, np.float32)
            if 0 <= off < self.buf.size:
                part = self.buf[off : off + self.win]
                w[: part.size] = part
            self.ready.append(w)
            self.next_k += 1
            self._trim()


class Windower:
    """All experts of a bundle fed from one source; yields complete ``Tick``s in order."""

    def __init__(self, experts: list[ExpertWindowing], source_rate: int, step_s: float) -> None:
        if step_s <= 0:
            raise ValueError(f"step {step_s!r} s must be > 0")
        self.experts = [_ExpertWindower(e, source_rate, step_s) for e in experts]
        self.step_s = step_s
        self.source_rate = int(source_rate)
        self.longest_s = max(e.window_s for e in experts)
        self._k = 0
        self.samples_in = 0  # source samples received

    def _ticks(self, padded: bool = False) -> Iterator[Tick]:
        while all(e.ready for e in self.experts):
            start = self._k * self.step_s
            tick = Tick(self._k, start, start + self.longest_s, padded=padded)
            for e in self.experts:
                tick.windows[e.spec.name] = e.ready.popleft()
            self._k += 1
            yield tick

    def push(self, block: np.ndarray) -> Iterator[Tick]:
        """Feed a block of source samples; yield every tick it completes."""
        self.samples_in += block.size
        for e in self.experts:
            e.push(block)
        yield from self._ticks()

    def flush(self) -> Iterator[Tick]:
        """End of stream: drain resamplers and pad the tail into last windows."""
        for e in self.experts:
            e.push(np.zeros(0, np.float32), last=True)
        yield from self._ticks()
        k_final = max(e.needed_final() for e in self.experts)
        for e in self.experts:
            e.pad_to(k_final)
        yield from self._ticks(padded=True)
