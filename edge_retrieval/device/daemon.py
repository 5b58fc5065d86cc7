"""The streaming daemon: a source and sinks around the one ``Pipeline``, on two threads.

The capture thread reads the source, keeps the recent-audio history for clips, cuts windows
(``Pipeline.push``) and puts complete ticks into a bounded queue of at most ``max_queue_s``
seconds of hops. The inference thread (the caller of ``run``) takes up to ``max_batch`` ticks at
once (batching when behind) and runs ``Pipeline.step`` on them (gate, encode, score every query,
detect); the daemon turns the detector's transitions into events with wall-clock times.

When inference is slower than real time, a live source (microphone, real-time replay) cannot
wait: the oldest queued tick is dropped and counted. A non-live source (a file read as fast as
possible, a stdin pipe) is simply read more slowly, so nothing is lost. Either way memory stays
bounded. The real-time factor ``rtf`` = inference busy time / audio time processed (< 1 keeps up);
``cpu_rtf`` and ``stage_cpu_s`` count CPU time of the thread doing each stage (decode and window
on the capture thread, the rest on the inference thread), so they hold on a busy machine too.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..bundle import Bundle, load_bundle
from ..config import DeviceConfig
from ..defaults import default_policy, merge_overlays
from ..errors import ConfigError, SourceError
from ..pipeline.core import Pipeline
from ..pipeline.detector import Detector, Transition
from ..pipeline.expert import AudioExpert
from ..pipeline.matcher import Matcher
from ..pipeline.temporal import temporal_fields
from ..pipeline.windows import Tick
from ..policy import PolicyOverlay
from ..protocol import MAX_DEVICE_MESSAGE_BYTES, MAX_FIELD_CHARS, Event, QueryMessage
from .clips import ClipWriter
from .ringbuffer import AudioHistory
from .sinks import Sink
from .sources import FileSource, MicSource, Source, StdinSource

log = logging.getLogger(__name__)

# encoded ticks whose vectors the pipeline keeps for events' peak windows (~2 min at a 3 s hop)
EVENT_VECTOR_TICKS = 40


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Daemon:
    """Listens to one source and raises events for the registered queries (see module doc)."""

    def __init__(
        self,
        bundle: Bundle,
        source: Source,
        *,
        device_id: str,
        threads: int = 1,
        providers: list[str] | None = None,
        overlap: float = 0.0,
        gate_dbfs: float | None = -70,
        policy: PolicyOverlay | None = None,
        sinks: Iterable[Sink] = (),
        max_batch: int = 8,
        max_queue_s: float = 30,
        clock: Callable[[], str] | None = None,
        site: str | None = None,
        lat: float | None = None,
        lon: float | None = None,
        clips: ClipWriter | None = None,
        on_scores: Callable[[float, float, list[str], np.ndarray | None], None] | None = None,
    ) -> None:
        # per window: (start_s, end_s, query ids, scores or None when gated/idle/failed), for `run --scores`
        self.on_scores = on_scores
        self.bundle, self.source, self.device_id = bundle, source, device_id
        self.site, self.lat, self.lon = site, lat, lon
        self.clock = clock  # returns the clock status: "synced" | "unsynced" | "unknown"
        self.pipeline = Pipeline(bundle, (), policy, sample_rate=source.sample_rate, overlap=overlap,
                                 gate_dbfs=gate_dbfs, threads=threads, providers=providers, max_batch=max_batch,
                                 keep_vectors=EVENT_VECTOR_TICKS)
        self.step_s = self.pipeline.step_s
        self._sinks: list[Sink] = list(sinks)
        self.max_batch = int(max_batch)
        # bounded queue of ticks: units = hops (max_queue_s of audio), at least one batch
        self.max_queue = max(self.max_batch, int(math.ceil(max_queue_s / self.step_s - 1e-9)))
        self._queue: deque[Tick] = deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._source_done = False
        self.clips = clips
        self.history: AudioHistory | None = None
        if clips is not None:
            self.history = AudioHistory(int((clips.history_s + max_queue_s + 5) * source.sample_rate))
        self._pending_clips: list[Event] = []
        self._thread: threading.Thread | None = None
        self._capture: threading.Thread | None = None
        self.source_error: str | None = None
        self.error: BaseException | None = None
        # counters (windows = ticks; the pipeline counts encoded, gated, idle and failed ticks)
        self.dropped = 0  # ticks dropped because inference was behind a live source
        self.events = 0  # events closed (final updates)
        self.sink_errors = 0
        self.busy_s = 0.0  # wall seconds the inference thread spent on windows
        self.cpu_s = 0.0  # CPU seconds of the inference thread (onnxruntime runs in it with 1 thread)
        self.audio_s = 0.0  # seconds of stream the windows advanced over (hops; the RTF basis)
        self.source_s = 0.0  # seconds of audio read from the source
        self.stage_s = self.pipeline.stage_s  # CPU seconds per stage (decode and window counted here)
        self.started: float | None = None
        self.t0_wall: float | None = None  # wall clock at stream offset 0
        self.t0_mono: float | None = None  # monotonic clock at stream offset 0 (live sources)

    # ------------------------------------------------------------------ the pipeline's parts

    @property
    def matcher(self) -> Matcher:
        return self.pipeline.matcher

    @property
    def detector(self) -> Detector:
        return self.pipeline.detector

    @property
    def experts(self) -> list[AudioExpert]:
        return self.pipeline.experts

    @property
    def windows(self) -> int:
        """Ticks taken by the inference thread."""
        return self.pipeline.windows

    @property
    def encoded(self) -> int:
        return self.pipeline.encoded

    @property
    def gated(self) -> int:
        return self.pipeline.gated

    @property
    def idle(self) -> int:
        """Ticks not encoded because no query was registered."""
        return self.pipeline.idle

    @property
    def failed(self) -> int:
        """Ticks whose encoder run failed."""
        return self.pipeline.failed

    # ------------------------------------------------------------------ queries and sinks

    def apply_query(self, msg: QueryMessage) -> None:
        """Register (or update, or delete) a query; raises QueryRejected naming the problem."""
        self.pipeline.add_query(msg)

    def remove_query(self, query_id: str) -> None:
        self.pipeline.remove_query(query_id)

    def add_sink(self, sink: Sink) -> None:
        with self._cv:
            self._sinks = [*self._sinks, sink]

    # ------------------------------------------------------------------ threads

    def _put(self, tick: Tick) -> None:
        with self._cv:
            if self.source.live:
                while len(self._queue) >= self.max_queue:
                    self._queue.popleft()
                    self.dropped += 1
            else:
                while len(self._queue) >= self.max_queue and not self._stop.is_set():
                    self._cv.wait(0.5)
            self._queue.append(tick)
            self._cv.notify_all()

    def _capture_loop(self) -> None:
        it = iter(self.source.blocks())
        live = self.source.live
        try:
            while not self._stop.is_set():
                t0 = time.thread_time()
                block = next(it, None)
                t1 = time.thread_time()
                if not live:
                    self.stage_s["decode"] += t1 - t0
                if block is None:
                    break
                if self.t0_wall is None:
                    lag = block.size / self.source.sample_rate if live else 0.0
                    self.t0_wall = time.time() - lag
                    self.t0_mono = time.monotonic() - lag
                self.source_s += block.shape[0] / self.source.sample_rate
                if self.history is not None:
                    self.history.append(block)
                for tick in self.pipeline.push(block):
                    self._put(tick)
                self.stage_s["window"] += time.thread_time() - t1
            if not self._stop.is_set():
                for tick in self.pipeline.flush():
                    self._put(tick)
        except SourceError as exc:
            self.source_error = str(exc)
            log.warning("source %s: %s", self.source.name, exc)
        except Exception as exc:  # a bug or an unexpected library failure: report, do not hang
            self.source_error = f"{type(exc).__name__}: {exc}"
            log.exception("capture thread failed")
        finally:
            with self._cv:
                self._source_done = True
                self._cv.notify_all()

    def _take(self) -> list[Tick]:
        with self._cv:
            while not self._queue and not self._source_done and not self._stop.is_set():
                self._cv.wait(0.5)
            n = min(len(self._queue), self.max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            self._cv.notify_all()
            return batch

    def run(self) -> None:
        """Block until the source ends or ``stop()`` is called; then close open events."""
        self.started = time.monotonic()
        self._capture = threading.Thread(target=self._capture_loop, name="er-capture", daemon=True)
        self._capture.start()
        try:
            while not self._stop.is_set():
                batch = self._take()
                if not batch:
                    if self._source_done:
                        break
                    continue
                self._process(batch)
        finally:
            self._stop.set()
            self.source.stop()
            with self._cv:
                self._cv.notify_all()
            self._capture.join(timeout=5)
            for tr in self.pipeline.end_events():
                self._transition(tr)
            self._flush_clips(force=True)

    def start(self) -> None:
        """``run()`` in a background thread (errors are kept in ``self.error``)."""

        def target() -> None:
            try:
                self.run()
            except BaseException as exc:  # keep it for the caller; the thread must not die silently
                self.error = exc
                log.exception("daemon stopped by an error")

        self._thread = threading.Thread(target=target, name="er-daemon", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.source.stop()
        with self._cv:
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ inference

    def _process(self, batch: list[Tick]) -> None:
        t_start, c_start = time.perf_counter(), time.thread_time()
        snap, rows = self.pipeline.score(batch)
        if self.on_scores is not None:
            ids = [q.query_id for q in snap.queries]
            for tick, row in zip(batch, rows, strict=True):
                self.on_scores(tick.start_s, tick.end_s, ids, row)
        transitions = self.pipeline.detect(snap, batch, rows)
        t0 = time.thread_time()
        for tr in transitions:
            self._transition(tr)
        self._flush_clips(force=False, now_s=batch[-1].end_s)
        self.stage_s["detector"] += time.thread_time() - t0  # events out: part of the detector stage
        self.audio_s += self.step_s * len(batch)
        self.busy_s += time.perf_counter() - t_start
        self.cpu_s += time.thread_time() - c_start

    def _event(self, tr: Transition) -> Event:
        ev = tr.event
        if self.source.live and self.t0_mono is not None:
            # live audio: offset -> wall time through the monotonic clock and the wall clock *now*,
            # so an NTP step after start (a board without an RTC) does not skew later events
            t0 = time.time() - (time.monotonic() - self.t0_mono)
        else:
            t0 = self.t0_wall if self.t0_wall is not None else time.time()
        clock = "unknown"
        if self.clock is not None:
            try:
                clock = self.clock()
            except Exception as exc:  # a status probe must not stop detection
                log.debug("clock status failed: %s", exc)
        if clock not in ("synced", "unsynced", "unknown"):
            clock = "unknown"
        return Event(
            event_id=ev.event_id,
            device=self.device_id,
            query_id=ev.query_id,
            query=ev.query,
            score=round(float(ev.peak), 4),
            start_s=round(ev.start_s, 3),
            end_s=round(ev.end_s, 3),
            time=_iso(t0 + ev.start_s),
            clock=clock,  # type: ignore[arg-type]
            source=self.source.name[:MAX_FIELD_CHARS],
            final=tr.final,
            site=self.site,
            lat=self.lat,
            lon=self.lon,
            **self._feedback_windows(tr),
            **temporal_fields(ev),
        )

    def _feedback_windows(self, tr: Transition) -> dict[str, Any]:
        """The final update carries a few windows of the event, the peak first (feedback adds them
        to the alert); fewer when the update would not fit in a device message with its other fields."""
        if not tr.final:
            return {}
        exs = [e.model_copy(update={"event_id": None}) for e in self.pipeline.event_examples(tr.event)]
        while len(exs) > 1 and sum(len(e.model_dump_json()) for e in exs) + 4096 > MAX_DEVICE_MESSAGE_BYTES:
            exs = exs[:-1]
        return {"windows": exs} if exs else {}

    def _transition(self, tr: Transition) -> None:
        ev = self._event(tr)
        if tr.final:
            self.events += 1
            if self.clips is not None and self.history is not None:
                self._pending_clips.append(ev)
                return
        self._emit(ev)

    def _flush_clips(self, force: bool, now_s: float | None = None) -> None:
        if not self._pending_clips or self.clips is None or self.history is None:
            return
        rate = self.source.sample_rate
        now = self.history.total / rate if now_s is None else max(now_s, 0.0)
        keep: list[Event] = []
        for ev in self._pending_clips:
            a, b = self.clips.span(ev.start_s, ev.end_s)
            if not force and min(now, self.history.total / rate) < b:
                keep.append(ev)
                continue
            name = self.clips.write(ev.event_id, self.history.slice(int(a * rate), int(b * rate)), rate)
            self._emit(ev.model_copy(update={"clip": name}) if name else ev)
        self._pending_clips = keep

    def _emit(self, ev: Event) -> None:
        for sink in self._sinks:
            try:
                sink.emit(ev)
            except Exception as exc:  # a broken sink must not stop detection
                self.sink_errors += 1
                log.warning("sink %s failed: %s", type(sink).__name__, exc)

    # ------------------------------------------------------------------ status

    @property
    def rtf(self) -> float | None:
        return self.busy_s / self.audio_s if self.audio_s > 0 else None

    @property
    def cpu_rtf(self) -> float | None:
        """CPU seconds per audio second (insensitive to other load on the machine)."""
        return self.cpu_s / self.audio_s if self.audio_s > 0 else None

    def health(self) -> dict[str, Any]:
        src_stats: dict[str, Any] = {}
        try:
            src_stats = dict(self.source.stats())
        except Exception as exc:  # stats are informative only
            log.debug("source stats failed: %s", exc)
        rtf = self.rtf
        return {
            "rtf": round(rtf, 4) if rtf is not None else None,
            "cpu_rtf": round(self.cpu_rtf, 4) if self.cpu_rtf is not None else None,
            "windows": self.windows,
            "encoded": self.encoded,
            "gated": self.gated,
            "idle": self.idle,
            "dropped": self.dropped,
            "failed": self.failed,
            "events": self.events,
            "suppressed": dict(self.pipeline.suppressed),  # query id -> windows feedback silenced
            "active_events": self.detector.active_count(),
            "queue": len(self._queue),
            "queue_max": self.max_queue,
            "queries": len(self.matcher),
            "query_ids": sorted(q.query_id for q in self.matcher.snapshot.queries),
            "step_s": self.step_s,
            "audio_s": round(self.audio_s, 3),
            "source_s": round(self.source_s, 3),
            "uptime_s": round(time.monotonic() - self.started, 3) if self.started else 0.0,
            "stage_cpu_s": {k: round(v, 4) for k, v in self.stage_s.items()},
            "source": {"name": self.source.name, "rate": self.source.sample_rate, **src_stats,
                       "error": self.source_error},
            "bundle": {"name": self.bundle.manifest.name, "space_id": self.bundle.manifest.space.id},
            "sink_errors": self.sink_errors,
            "clips": None if self.clips is None else {"written": self.clips.written, "deleted": self.clips.deleted},
        }

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        cfg: DeviceConfig,
        sinks: Iterable[Sink] = (),
        bundle: Bundle | None = None,
        clock: Callable[[], str] | None = None,
        source: Source | None = None,
        on_scores: Callable[[float, float, list[str], np.ndarray | None], None] | None = None,
    ) -> Daemon:
        """The daemon a ``DeviceConfig`` describes: the one constructor of ``run``, the service and tests.

        ``run`` turns its flags into overrides of the config before it gets here. The detection
        policy is the config's ``[detection]`` over the bundle's tuned defaults (docs/architecture.md,
        policy precedence). Local queries are applied by the caller.
        """
        if bundle is None:
            bundle = load_bundle(cfg.model.bundle, part="device")
        try:
            policy = merge_overlays(cfg.detection.policy, default_policy(bundle))
        except ValidationError as exc:
            raise ConfigError(f"detection.policy over the bundle's tuned policy: {exc.errors()[0]['msg']}") from exc
        clips = None
        if cfg.clips.enabled:
            cdir = cfg.clips.dir or (cfg.storage.dir / "clips")
            clips = ClipWriter(cdir, cfg.clips.max_mb, cfg.clips.pre_s, cfg.clips.post_s, cfg.clips.max_clip_s)
        return cls(
            bundle,
            source if source is not None else source_from_config(cfg),
            device_id=cfg.device.id,
            threads=cfg.model.threads,
            providers=list(cfg.model.providers),
            overlap=cfg.windows.overlap,
            gate_dbfs=cfg.gate.energy_dbfs if cfg.gate.enabled else None,
            policy=policy,
            sinks=sinks,
            max_batch=cfg.windows.max_batch,
            max_queue_s=cfg.windows.max_queue_s,
            clock=clock,
            site=cfg.device.site,
            lat=cfg.device.lat,
            lon=cfg.device.lon,
            clips=clips,
            on_scores=on_scores,
        )


def source_from_config(cfg: DeviceConfig) -> Source:
    """The source ``[audio]`` describes."""
    a = cfg.audio
    if a.source == "file":
        if a.path is None:
            raise SourceError("audio.path is required when audio.source is 'file'")
        return FileSource(a.path, block_s=max(a.block_s, 0.5), realtime=a.realtime)
    if a.source == "stdin":
        return StdinSource(rate=a.stdin_rate, fmt=a.stdin_format, channels=a.channels, block_s=a.block_s)
    return MicSource(device=a.device, rate=a.capture_rate, channels=a.channels, block_s=a.block_s)
