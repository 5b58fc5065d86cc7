"""Bounded sample buffers: the capture ring (callback -> reader) and the recent-audio history.

Both hold float32 mono samples; capacities are in samples. Writers never block: when full,
the ring drops the oldest samples and counts them, so memory stays fixed whatever the reader does.
"""

from __future__ import annotations

import threading

import numpy as np


class RingBuffer:
    """Single-producer / single-consumer ring of float32 samples, ``capacity`` samples long.

    ``write`` is safe to call from an audio callback: it copies and returns at once (the lock is
    held only for the copy). When the reader falls behind, the oldest samples are overwritten and
    counted in ``overflow_samples``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"ring capacity must be > 0 samples, got {capacity!r}")
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, np.float32)
        self._start = 0  # index of the oldest unread sample
        self._size = 0  # unread samples
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.overflow_samples = 0  # samples lost because the reader was too slow
        self.written_samples = 0

    def write(self, x: np.ndarray) -> int:
        """Append samples; return how many old samples were dropped to make room."""
        x = np.asarray(x, np.float32).ravel()
        n = x.size
        if n == 0:
            return 0
        with self._lock:
            dropped = 0
            if n >= self.capacity:  # keep only the newest capacity samples
                dropped = self._size + n - self.capacity
                self._buf[:] = x[-self.capacity :]
                self._start, self._size = 0, self.capacity
            else:
                over = self._size + n - self.capacity
                if over > 0:
                    self._start = (self._start + over) % self.capacity
                    self._size -= over
                    dropped = over
                end = (self._start + self._size) % self.capacity
                first = min(n, self.capacity - end)
                self._buf[end : end + first] = x[:first]
                if first < n:
                    self._buf[: n - first] = x[first:]
                self._size += n
            self.overflow_samples += dropped
            self.written_samples += n
            self._ready.notify()
            return dropped

    def __len__(self) -> int:
        with self._lock:
            return self._size

    def read(self, max_samples: int | None = None, timeout: float | None = None) -> np.ndarray:
        """Take up to ``max_samples`` unread samples (waits up to ``timeout`` s for at least one)."""
        with self._lock:
            if self._size == 0 and timeout:
                self._ready.wait(timeout)
            n = self._size if max_samples is None else min(self._size, int(max_samples))
            out = np.empty(n, np.float32)
            first = min(n, self.capacity - self._start)
            out[:first] = self._buf[self._start : self._start + first]
            if first < n:
                out[first:] = self._buf[: n - first]
            self._start = (self._start + n) % self.capacity
            self._size -= n
            return out

    def clear(self) -> None:
        with self._lock:
            self._start = self._size = 0


class AudioHistory:
    """The last ``capacity`` samples of a stream, addressed by absolute sample offset.

    Kept for detection clips: ``slice(a, b)`` returns what is still held of samples [a, b).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._buf = np.zeros(self.capacity, np.float32)
        self.total = 0  # samples ever appended (absolute offset of the next sample)
        self._lock = threading.Lock()

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).ravel()
        if x.size > self.capacity:
            self.total += x.size - self.capacity
            x = x[-self.capacity :]
        with self._lock:
            pos = self.total % self.capacity
            first = min(x.size, self.capacity - pos)
            self._buf[pos : pos + first] = x[:first]
            if first < x.size:
                self._buf[: x.size - first] = x[first:]
            self.total += x.size

    def slice(self, start: int, end: int) -> np.ndarray:
        with self._lock:
            start = max(int(start), self.total - self.capacity, 0)
            end = min(int(end), self.total)
            if end <= start:
                return np.zeros(0, np.float32)
            idx = np.arange(start, end) % self.capacity
            return self._buf[idx].copy()
