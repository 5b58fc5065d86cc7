"""The one streaming pipeline: samples -> windows -> gate -> experts -> matcher -> detector -> transitions.

``Pipeline(bundle, queries, policy).feed(samples)`` returns the detector's transitions (an event's
onset, then its final update) and needs no threads: a program can embed it as it would
openWakeWord's ``Model.predict``. The daemon (capture and inference threads around it), offline
scoring (``offline.scenes.stream_scores``) and archive embedding (``offline.retrieval.FileEmbedder``)
call the same parts, so a number tuned or measured offline is the number the device produces:

- ``push(block)`` / ``flush()``: source samples -> complete ticks (``windows.Windower``);
- ``embed(ticks)``: ``gate_ticks`` (the longest window's level) then ``encode`` (front end + encoder
  of every expert);
- ``score(ticks)``: ``embed`` + every query in one product per expert (a snapshot of the matcher);
- ``detect(snapshot, ticks, rows)``: the detector over the scored ticks;
- ``step(ticks)`` = ``detect(*score(ticks))``: one inference step; ``feed`` = ``push`` + ``step``.

Ticks are scored in batches of at most ``max_batch`` (the encoder's batch dimension).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from ..bundle import Bundle
from ..errors import EdgeRetrievalError, EncoderError, QueryRejected
from ..policy import PolicyOverlay
from ..protocol import FEEDBACK_WINDOWS, Example, QueryMessage
from .detector import ActiveEvent, Detector, Transition
from .expert import AudioExpert, load_experts
from .feedback import window_example
from .gate import EnergyGate
from .matcher import CompiledQuery, Matcher, Snapshot, compile_query
from .temporal import TemporalCombiner, compile_temporal
from .windows import ExpertWindowing, Tick, Windower, common_step

log = logging.getLogger(__name__)

# CPU seconds per stage; decode and window are counted by whoever reads the source (the daemon)
STAGES = ("decode", "window", "gate", "frontend", "encoder", "matcher", "detector")

Rows = list[np.ndarray | None]  # per tick: [queries] float32 scores, or None (gated, idle, failed)


def run_detector(
    detector: Detector, queries: tuple[CompiledQuery, ...], spans: Iterable[tuple[float, float]], rows: Iterable[np.ndarray | None]
) -> list[Transition]:
    """Step ``detector`` over scored windows ``(start_s, end_s)``; a None row is a miss (not encoded)."""
    out: list[Transition] = []
    for (start_s, end_s), row in zip(spans, rows, strict=True):
        out.extend(detector.step(queries, start_s, end_s, row))
    return out


class Pipeline:
    """windows -> gate -> experts -> matcher -> detector for one bundle (see module doc)."""

    def __init__(
        self,
        bundle: Bundle,
        queries: Iterable[QueryMessage | CompiledQuery] = (),
        policy: PolicyOverlay | None = None,
        *,
        sample_rate: int | None = None,
        overlap: float = 0.0,
        gate_dbfs: float | None = -70.0,
        threads: int = 1,
        providers: Sequence[str] | None = None,
        max_batch: int = 8,
        keep_vectors: int = 0,
    ) -> None:
        """``sample_rate``: rate of the samples fed (default: the longest-window expert's rate).

        ``keep_vectors``: how many recent encoded ticks keep their vectors (ticks), so an event
        can carry its windows (``event_examples``); 0 keeps none.
        """
        m = bundle.manifest
        self.bundle = bundle
        try:
            self.step_s = common_step(m.device.hop_s, overlap)
        except ValueError as exc:
            raise EdgeRetrievalError(str(exc)) from exc
        if max_batch < 1:
            raise EdgeRetrievalError(f"max_batch {max_batch!r} must be >= 1")
        self.max_batch = int(max_batch)
        self.experts: list[AudioExpert] = load_experts(bundle, threads, list(providers) if providers else None)
        longest = max(self.experts, key=lambda e: e.spec.window_s)
        self.primary = longest.name  # the gate listens to the longest window
        self.gate = EnergyGate(gate_dbfs)
        self.matcher = Matcher(m)
        self.detector = Detector(policy)
        self.temporal = TemporalCombiner()  # temporal queries: their parts' events -> theirs
        self.sample_rate = int(sample_rate or longest.sample_rate)
        self.windower = self._windower(self.sample_rate)
        # counters (windows = ticks)
        self.windows = 0  # ticks stepped
        self.encoded = 0
        self.gated = 0
        self.idle = 0  # ticks not encoded because no query was registered
        self.failed = 0  # ticks whose encoder run failed
        self.stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        # windows feedback suppressed per query id that would have passed its threshold
        self.suppressed: dict[str, int] = {}
        # recent encoded ticks: (start_s, end_s, query ids, scores [nq], {expert: [dim]}); bounded
        self._recent: deque[tuple[float, float, list[str], np.ndarray, dict[str, np.ndarray]]] = deque(
            maxlen=max(0, int(keep_vectors)) or None)
        self._keep = int(keep_vectors) > 0
        for q in queries:
            self.add_query(q)

    # ------------------------------------------------------------------ queries

    def add_query(self, q: QueryMessage | CompiledQuery) -> bool:
        """Register, update or (a tombstone message) delete a query; QueryRejected names the problem.

        Returns False when the matcher ignored it (an older or equal version of a known id).
        """
        if isinstance(q, CompiledQuery):
            return self.matcher.add(q)
        if q.deleted:
            parts = self._drop_temporal(q.query_id, q.version)
            return self.matcher.remove(q.query_id, version=q.version) or parts
        if q.expired():
            raise QueryRejected(f"query {q.query_id!r} v{q.version} expired at {q.expires}")
        if q.temporal is None:
            cq = compile_query(q, self.bundle.manifest)
            old = self.temporal.get(q.query_id)
            if old is not None and old.version >= q.version:
                return False
            self._drop_temporal(q.query_id)
            return self.matcher.add(cq)
        rule, parts = compile_temporal(q, self.bundle.manifest)
        old_plain = self.matcher.get(q.query_id)
        if (old_plain is not None and old_plain.version >= q.version) or not all(
            [self.matcher.add(p) for p in parts]  # a list: add both or report the refusal of either
        ):
            return False
        if old_plain is not None:
            self.matcher.remove(q.query_id)
        self.temporal.add(rule)
        return True

    def _drop_temporal(self, query_id: str, version: int | None = None) -> bool:
        """Remove a temporal query's rule and parts (with a tombstone's version: replays stay refused)."""
        rule = self.temporal.remove(query_id)
        if rule is None:
            return False
        for pid in rule.part_ids:
            self.matcher.remove(pid, version=version)
        return True

    def remove_query(self, query_id: str) -> bool:
        return self._drop_temporal(query_id) or self.matcher.remove(query_id)

    # ------------------------------------------------------------------ windows

    def _windower(self, rate: int) -> Windower:
        return Windower([ExpertWindowing(e.name, e.sample_rate, e.spec.window_s) for e in self.experts], rate, self.step_s)

    def new_stream(self, sample_rate: int | None = None) -> None:
        """Start windowing a new stream (offsets from 0 again); queries and detector state are kept."""
        self.sample_rate = int(sample_rate or self.sample_rate)
        self.windower = self._windower(self.sample_rate)

    def reset(self, sample_rate: int | None = None) -> None:
        """An unrelated stream: new windows, and no detector or temporal state carried over (queries kept)."""
        self.new_stream(sample_rate)
        self.detector = Detector(self.detector.default_policy)
        self.temporal.reset()

    def push(self, samples: np.ndarray) -> list[Tick]:
        """Source samples (mono float32 at ``sample_rate``) -> the ticks they complete."""
        return list(self.windower.push(np.asarray(samples, np.float32)))

    def flush(self) -> list[Tick]:
        """End of stream: the remaining ticks, the tail zero-padded into last windows."""
        return list(self.windower.flush())

    # ------------------------------------------------------------------ inference

    def gate_ticks(self, ticks: Sequence[Tick]) -> list[int]:
        """Indices of the ticks loud enough to encode (the gate listens to the longest window)."""
        t0 = time.thread_time()
        keep = [i for i, t in enumerate(ticks) if self.gate.open(t.windows[self.primary])]
        self.gated += len(ticks) - len(keep)
        self.stage_s["gate"] += time.thread_time() - t0
        return keep

    def encode(self, ticks: Sequence[Tick], keep: Sequence[int]) -> dict[str, np.ndarray]:
        """Front end + encoder of every expert on ``ticks[keep]``: {expert: [len(keep), dim] float32}.

        Raises EncoderError when an encoder run fails.
        """
        vectors: dict[str, np.ndarray] = {}
        if not keep:
            return vectors
        for ex in self.experts:
            x = np.stack([ticks[i].windows[ex.name] for i in keep])
            t1 = time.thread_time()
            feats = ex.features(x)
            t2 = time.thread_time()
            vectors[ex.name] = ex.finish(ex.encode(feats)[0])
            self.stage_s["frontend"] += t2 - t1
            self.stage_s["encoder"] += time.thread_time() - t2
        return vectors

    def embed(self, ticks: Sequence[Tick]) -> tuple[list[int], dict[str, np.ndarray]]:
        """``gate_ticks`` then ``encode``: (indices kept, {expert: [kept, dim] float32})."""
        keep = self.gate_ticks(ticks)
        return keep, self.encode(ticks, keep)

    def score(self, ticks: Sequence[Tick]) -> tuple[Snapshot, Rows]:
        """Scores of every registered query per tick, against one snapshot of the queries.

        A tick gated, not encoded (no query) or whose encoder run failed (logged at WARNING and
        counted in ``failed``: an operational state, not a reason to stop) gets None.
        """
        snap = self.matcher.snapshot  # one reference read: a consistent set while queries change
        rows: Rows = [None] * len(ticks)
        if not snap.queries:
            self.idle += len(ticks)
            return snap, rows
        keep = self.gate_ticks(ticks)
        if not keep:
            return snap, rows
        try:
            vectors = self.encode(ticks, keep)
        except EncoderError as exc:
            self.failed += len(keep)
            log.warning("encoder failed on %d window(s): %s", len(keep), exc)
            return snap, rows
        t0 = time.thread_time()
        scores = snap.score(vectors)
        mask = snap.suppressed(vectors)
        if mask is not None and mask.any():  # a suppressed window is a miss for that query (NaN)
            would = mask & (scores >= snap.thresholds)
            for col in np.flatnonzero(would.any(axis=0)).tolist():
                qid = snap.queries[col].query_id
                self.suppressed[qid] = self.suppressed.get(qid, 0) + int(would[:, col].sum())
            scores = np.where(mask, np.float32(np.nan), scores)
        self.stage_s["matcher"] += time.thread_time() - t0
        ids = snap.ids if self._keep else []
        for j, i in enumerate(keep):
            rows[i] = scores[j]
            if self._keep:
                self._recent.append((ticks[i].start_s, ticks[i].end_s, ids, scores[j],
                                     {name: v[j].copy() for name, v in vectors.items()}))  # not views: bounded
        self.encoded += len(keep)
        return snap, rows

    def event_examples(self, ev: ActiveEvent, k: int = FEEDBACK_WINDOWS) -> list[Example]:
        """Up to ``k`` windows of ``ev`` still held (``keep_vectors``), what a "false alarm" adds as
        negatives: its best-scoring window first, then ones spread evenly over the event (its first
        and last included); [] when none is held."""
        held: list[dict[str, np.ndarray]] = []
        best: tuple[float, int] | None = None
        for start_s, end_s, ids, row, vecs in self._recent:
            if end_s <= ev.start_s or start_s >= ev.end_s or ev.query_id not in ids:
                continue
            s = float(row[ids.index(ev.query_id)])
            if s == s and (best is None or s > best[0]):  # NaN (suppressed) never wins
                best = (s, len(held))
            held.append(vecs)
        if best is None or k < 1:
            return []
        peak = best[1]
        picks = list(range(len(held)))
        if len(picks) > k:
            picks = sorted({int(round(t)) for t in np.linspace(0, len(held) - 1, k)})
        if peak not in picks:
            picks = picks[: k - 1]
        return [window_example(self.bundle.manifest, held[i], ev.event_id)
                for i in [peak, *(i for i in picks if i != peak)]]

    def detect(self, snap: Snapshot, ticks: Sequence[Tick], rows: Rows) -> list[Transition]:
        """The detector over scored ticks (in stream order)."""
        t0 = time.thread_time()
        out = run_detector(self.detector, snap.queries, ((t.start_s, t.end_s) for t in ticks), rows)
        out = self.temporal.process(out)  # always: parts of a rule just removed must not leak
        self.windows += len(ticks)
        self.stage_s["detector"] += time.thread_time() - t0
        return out

    def step(self, ticks: Sequence[Tick]) -> list[Transition]:
        """One inference step over a batch of ticks: score, then detect."""
        if not ticks:
            return []
        snap, rows = self.score(ticks)
        return self.detect(snap, ticks, rows)

    def feed(self, samples: np.ndarray) -> list[Transition]:
        """Samples in, transitions out: every tick completed, in batches of at most ``max_batch``."""
        return self._steps(self.push(samples))

    def close(self) -> list[Transition]:
        """End of stream: score the padded tail, then close every open event."""
        return self._steps(self.flush()) + self.end_events()

    def end_events(self) -> list[Transition]:
        """Close every open event (final updates), e.g. when the source has ended."""
        out = list(self.detector.flush())
        return self.temporal.process(out) + self.temporal.flush()

    def _steps(self, ticks: list[Tick]) -> list[Transition]:
        out: list[Transition] = []
        for i in range(0, len(ticks), self.max_batch):
            out.extend(self.step(ticks[i : i + self.max_batch]))
        return out
