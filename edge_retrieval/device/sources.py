"""Audio sources: each yields float32 mono blocks at the rate it states (``sample_rate``).

- ``FileSource``: WAV/FLAC/OGG (anything libsndfile reads) decoded in blocks, mixed down, and
  optionally resampled (soxr streaming) to a target rate; replayed as fast as possible or paced
  in real time. An hours-long recording is never loaded whole.
- ``StdinSource``: raw little-endian PCM (s16le or f32le) on a byte stream.
- ``MicSource``: a PortAudio input stream (sounddevice); the callback only copies into a bounded
  ring buffer; a device that disappears is reopened with backoff.

A live source (mic, real-time file) cannot wait for the reader: the daemon drops windows when
behind. A non-live source (fast file, stdin pipe) is read only as fast as inference goes.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import numpy as np

from ..errors import SourceError
from ..pipeline.windows import Resampler
from .ringbuffer import RingBuffer

log = logging.getLogger(__name__)


@runtime_checkable
class Source(Protocol):
    """Yields float32 mono blocks at ``sample_rate``; ``live`` says whether it can wait."""

    name: str
    sample_rate: int
    live: bool

    def blocks(self) -> Iterator[np.ndarray]: ...

    def stop(self) -> None: ...

    def stats(self) -> dict[str, object]: ...


def mixdown(x: np.ndarray) -> np.ndarray:
    """[frames, channels] or [frames] -> [frames] float32 (mean of channels)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[:, 0] if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(x, np.float32)


class _Pacer:
    """Sleeps so that samples are released no faster than real time."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.t0: float | None = None
        self.sent = 0

    def wait(self, n: int, stop: threading.Event) -> None:
        if self.t0 is None:
            self.t0 = time.monotonic()
        self.sent += n
        due = self.t0 + self.sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            stop.wait(delay)


class FileSource:
    """An audio file decoded ``block_s`` seconds at a time, mixed down, resampled if asked."""

    def __init__(
        self,
        path: str | Path,
        target_rate: int | None = None,
        block_s: float = 0.5,
        realtime: bool = False,
    ) -> None:
        import soundfile as sf

        self.path = Path(path)
        self.name = f"file:{self.path.name}"
        self.realtime = bool(realtime)
        self.live = self.realtime
        if not self.path.exists():
            raise SourceError(f"audio file {str(self.path)!r} does not exist")
        if self.path.is_dir():
            raise SourceError(f"audio file {str(self.path)!r} is a directory, expected a WAV/FLAC/OGG file")
        try:
            info = sf.info(str(self.path))
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError
            raise SourceError(
                f"cannot decode {str(self.path)!r}: not a readable WAV/FLAC/OGG file ({_short(exc)})"
            ) from exc
        if info.frames == 0:
            raise SourceError(f"audio file {str(self.path)!r} is empty (0 frames)")
        self.in_rate = int(info.samplerate)
        self.channels = int(info.channels)
        self.frames = int(info.frames)
        self.duration_s = self.frames / self.in_rate
        self.sample_rate = int(target_rate or self.in_rate)
        self.block_frames = max(256, int(block_s * self.in_rate))
        self._stop = threading.Event()
        self.frames_read = 0
        self.error: str | None = None

    def blocks(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        rs = Resampler(self.in_rate, self.sample_rate)
        pacer = _Pacer(self.sample_rate) if self.realtime else None
        try:
            f = sf.SoundFile(str(self.path))
        except Exception as exc:
            raise SourceError(f"cannot open {str(self.path)!r}: {_short(exc)}") from exc
        with f:
            while not self._stop.is_set():
                try:
                    raw = f.read(self.block_frames, dtype="float32", always_2d=True)
                except Exception as exc:
                    raise SourceError(
                        f"decoding {str(self.path)!r} failed at {self.frames_read / self.in_rate:.1f} s: {_short(exc)}"
                    ) from exc
                if raw.shape[0] == 0:
                    break
                self.frames_read += raw.shape[0]
                out = rs(mixdown(raw))
                if out.size:
                    if pacer is not None:
                        pacer.wait(out.size, self._stop)
                    yield out
        tail = rs.flush()
        if tail.size and not self._stop.is_set():
            yield tail

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, object]:
        return {"frames_read": self.frames_read, "duration_s": round(self.duration_s, 3)}


class StdinSource:
    """Raw PCM (``s16le`` or ``f32le``) with ``channels`` interleaved channels on a byte stream."""

    FORMATS = {"s16le": (np.dtype("<i2"), 1 / 32768.0), "f32le": (np.dtype("<f4"), 1.0)}

    def __init__(
        self,
        rate: int = 48000,
        fmt: str = "s16le",
        channels: int = 1,
        stream: BinaryIO | None = None,
        block_s: float = 0.1,
        target_rate: int | None = None,
    ) -> None:
        if fmt not in self.FORMATS:
            raise SourceError(f"stdin format {fmt!r} is not supported; expected one of {sorted(self.FORMATS)}")
        if rate <= 0:
            raise SourceError(f"stdin rate {rate!r} must be a positive number of samples per second")
        if channels <= 0:
            raise SourceError(f"stdin channels {channels!r} must be >= 1")
        self.dtype, self.scale = self.FORMATS[fmt]
        self.in_rate = int(rate)
        self.channels = int(channels)
        self.sample_rate = int(target_rate or rate)
        self.stream = stream if stream is not None else sys.stdin.buffer
        self.frame_bytes = self.dtype.itemsize * self.channels
        self.block_bytes = max(1, int(block_s * rate)) * self.frame_bytes
        self.name = f"stdin:{fmt}@{rate}"
        self.live = False
        self._stop = threading.Event()
        self.frames_read = 0

    def blocks(self) -> Iterator[np.ndarray]:
        rs = Resampler(self.in_rate, self.sample_rate)
        pending = b""
        while not self._stop.is_set():
            chunk = self.stream.read(self.block_bytes)
            if not chunk:
                break
            data = pending + chunk
            usable = len(data) - len(data) % self.frame_bytes
            pending = data[usable:]
            if not usable:
                continue
            x = np.frombuffer(data[:usable], dtype=self.dtype).astype(np.float32) * self.scale
            x = mixdown(x.reshape(-1, self.channels))
            self.frames_read += x.size
            out = rs(x)
            if out.size:
                yield out
        if pending:
            log.warning("stdin ended with %d bytes of a partial frame; ignored", len(pending))
        tail = rs.flush()
        if tail.size:
            yield tail

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, object]:
        return {"frames_read": self.frames_read}


class MicSource:
    """A PortAudio capture stream through sounddevice.

    The callback copies (mixed down) into a ``RingBuffer`` of ``ring_s`` seconds and counts
    PortAudio overflows; ``blocks`` reads from the ring. When the stream dies (device unplugged,
    server gone) it is reopened with exponential backoff (``backoff_s`` doubling up to
    ``max_backoff_s``); the daemon keeps running meanwhile.
    """

    def __init__(
        self,
        device: str | int | None = None,
        rate: int | None = None,
        channels: int = 1,
        block_s: float = 0.1,
        ring_s: float = 10.0,
        target_rate: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ) -> None:
        try:
            import sounddevice as sd
        except ImportError as exc:
            raise ImportError(
                "'sounddevice' is not installed; install it with: pip install 'edge-retrieval[mic]'"
            ) from exc
        except OSError as exc:  # PortAudio library missing
            raise SourceError(f"microphone unavailable: {exc} (install libportaudio2)") from exc
        self._sd = sd
        self.device = device
        self.channels = int(channels)
        try:
            info = sd.query_devices(device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            if device is None:
                raise SourceError(f"no default input device (microphone) is available: {_short(exc)}") from exc
            raise SourceError(f"input device {device!r} not found: {_short(exc)}") from exc
        self.in_rate = int(rate or info["default_samplerate"])
        self.sample_rate = int(target_rate or self.in_rate)
        self.block_frames = max(64, int(block_s * self.in_rate))
        self.ring = RingBuffer(max(self.block_frames * 4, int(ring_s * self.in_rate)))
        self.name = f"mic:{info['name']}"
        self.live = True
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._stop = threading.Event()
        self._failed = threading.Event()
        self._stream = None
        self.input_overflows = 0  # PortAudio reported input overflow (driver side)
        self.reopens = 0
        self.callbacks = 0
        self.state = "closed"
        self.last_error: str | None = None
        self._last_cb = 0.0
        self.stall_s = max(2.0, 10 * block_s)  # no callback for this long = the device is gone

    # the audio callback: copy, count, never block or allocate much
    def _callback(self, indata: np.ndarray, frames: int, time_info: object, status: object) -> None:
        if status and getattr(status, "input_overflow", False):
            self.input_overflows += 1
        self.callbacks += 1
        self._last_cb = time.monotonic()
        self.ring.write(indata[:, 0] if indata.shape[1] == 1 else indata.mean(axis=1))

    def _finished(self) -> None:
        if not self._stop.is_set():
            self._failed.set()

    def _open(self) -> None:
        sd = self._sd
        try:
            stream = sd.InputStream(
                device=self.device,
                samplerate=self.in_rate,
                channels=self.channels,
                dtype="float32",
                blocksize=self.block_frames,
                callback=self._callback,
                finished_callback=self._finished,
            )
            stream.start()
        except (sd.PortAudioError, ValueError, OSError) as exc:
            raise SourceError(f"cannot open input device {self.device!r}: {_short(exc)}") from exc
        self._stream = stream
        self._last_cb = time.monotonic()
        self._failed.clear()
        self.state = "open"

    def _close(self) -> None:
        s, self._stream = self._stream, None
        if s is not None:
            try:
                s.abort(ignore_errors=True)
                s.close(ignore_errors=True)
            except Exception as exc:  # PortAudio may fail on a vanished device; nothing to save
                log.debug("closing input stream: %s", exc)
        self.state = "closed"

    def _alive(self) -> bool:
        s = self._stream
        if s is None or self._failed.is_set() or not s.active:
            return False
        return time.monotonic() - self._last_cb < self.stall_s

    def blocks(self) -> Iterator[np.ndarray]:
        rs = Resampler(self.in_rate, self.sample_rate)
        backoff = self.backoff_s
        self._open()
        try:
            while not self._stop.is_set():
                x = self.ring.read(timeout=0.2)
                if x.size:
                    out = rs(x)
                    if out.size:
                        yield out
                    continue
                if self._alive():
                    continue
                # the device went away: reopen with backoff, keep the daemon alive
                self._close()
                self.state = "reopening"
                log.warning("input device %r stopped; reopening in %.1f s", self.device, backoff)
                if self._stop.wait(backoff):
                    break
                try:
                    self._open()
                    self.reopens += 1
                    backoff = self.backoff_s
                    log.warning("input device %r reopened", self.device)
                except SourceError as exc:
                    self.last_error = str(exc)
                    log.warning("%s", exc)
                    backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            self._close()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, object]:
        return {
            "state": self.state,
            "ring_overflow_samples": self.ring.overflow_samples,
            "input_overflows": self.input_overflows,
            "reopens": self.reopens,
            "last_error": self.last_error,
        }


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def open_source(
    spec: str,
    *,
    realtime: bool = False,
    device: str | int | None = None,
    stdin_rate: int = 48000,
    stdin_format: str = "s16le",
    capture_rate: int | None = None,
    channels: int = 1,
    block_s: float = 0.1,
) -> FileSource | StdinSource | MicSource:
    """``"mic"``, ``"-"`` (stdin) or a file path -> a Source."""
    if spec == "mic":
        return MicSource(device=device, rate=capture_rate, channels=channels, block_s=block_s)
    if spec == "-":
        return StdinSource(rate=stdin_rate, fmt=stdin_format, channels=channels, block_s=block_s)
    return FileSource(spec, realtime=realtime, block_s=max(block_s, 0.5))
