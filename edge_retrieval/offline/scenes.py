"""Evaluation streams: real clips in a row with noise gaps, and where each one lies (ground truth).

Used by ``edge-retrieval demo``, ``scripts/tune_defaults.py`` and the fixture acceptance test.
Clips are read whole (they are short sound effects), mixed down, resampled to ``rate`` and
peak-normalised to ``level``; gaps are low-level noise so the energy gate and the background
adaptation see a realistic floor. Event scoring matches detections to clips by time overlap.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle
from ..device.sources import FileSource
from ..pipeline.core import Pipeline, run_detector
from ..pipeline.detector import Detector
from ..pipeline.matcher import CompiledQuery
from ..pipeline.windows import Tick
from ..policy import PolicyOverlay
from ..protocol import QueryMessage

SOUNDS_ENV = "EDGE_RETRIEVAL_SOUNDS"

# The FIXED detection queries of the fixture test and the tuned defaults (chosen before any score
# was seen): query text -> the fixture categories it should find. "dog barking" has no category
# in data/fixture.csv: it must stay silent. With the AudioSet vocabulary (issue 11) "chainsaw
# sound" means chainsaws only (the fixture's chainsaw category) and "a power tool" finds drills,
# hammers and saws, chainsaws included: the two queries the issue names. The engine category is
# aircraft and vehicle engines (jets, helicopters, planes, a tank's tread): the query says so
# ("car engine" named a car, which the AudioSet vocabulary now tells apart from a jet; dev event
# F1 0.53 -> 0.75 with the wording that describes the category, chosen on the dev half).
DETECTION_QUERIES: dict[str, tuple[str, ...]] = {
    "chainsaw sound": ("chainsaw",),
    "a power tool": ("power_tool", "chainsaw"),
    "gunshot": ("gunshot",),
    "siren": ("siren",),
    "bird singing": ("bird",),
    "an aircraft or vehicle engine": ("engine",),
    "dog barking": (),
}


def sounds_dir() -> Path:
    return Path(os.environ.get(SOUNDS_ENV) or Path.home() / ".cache" / "edge-retrieval" / "sounds").expanduser()


@dataclass(frozen=True)
class Clip:
    clip_id: str
    category: str
    split: str
    path: Path


def read_fixture(csv_path: Path, root: Path | None = None) -> list[Clip]:
    """Rows of data/fixture.csv whose WAV exists under ``root``/<category>/<clip_id>.wav."""
    root = root or sounds_dir()
    out = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            p = root / row["category"] / f"{row['clip_id']}.wav"
            if p.is_file():
                out.append(Clip(row["clip_id"], row["category"], row.get("split", "test"), p))
    return out


@dataclass(frozen=True)
class Segment:
    clip: Clip
    start_s: float
    end_s: float


def load_clip(path: Path, rate: int, max_s: float | None = None, level: float = 0.5) -> np.ndarray:
    src = FileSource(path, target_rate=rate, block_s=1.0)
    x = np.concatenate(list(src.blocks()))
    if max_s is not None:
        x = x[: int(max_s * rate)]
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return (x * (level / peak)).astype(np.float32) if peak > 0 else x


def build_stream(
    clips: Sequence[Clip],
    rate: int,
    gap_s: float = 6.0,
    lead_s: float = 15.0,
    noise_dbfs: float = -50.0,
    max_clip_s: float = 20.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[Segment]]:
    """Concatenate ``clips`` with noise gaps; returns samples and the segment of each clip."""
    rng = np.random.default_rng(seed)
    amp = 10 ** (noise_dbfs / 20)

    def floor(seconds: float, n: int | None = None) -> np.ndarray:
        # brownish noise: a field-recording floor rather than white hiss
        w = rng.standard_normal(n if n is not None else int(seconds * rate)).astype(np.float32)
        b = np.cumsum(w) * 0.02
        b -= np.convolve(b, np.ones(256) / 256, mode="same")
        b = 0.5 * b / (np.std(b) + 1e-9) + 0.5 * w
        return (amp * b / (np.std(b) + 1e-9)).astype(np.float32)

    parts = [floor(lead_s)]
    t = lead_s
    segs = []
    for c in clips:
        x = load_clip(c.path, rate, max_clip_s)
        x = x + floor(0.0, x.size)
        segs.append(Segment(c, t, t + x.size / rate))
        parts.append(x)
        t += x.size / rate
        parts.append(floor(gap_s))
        t += gap_s
    return np.concatenate(parts), segs


def match_events(
    events: Iterable[tuple[float, float]],
    truth: Sequence[tuple[float, float]],
    tol_s: float = 1.5,
    slack_s: float = 3.0,
) -> tuple[int, int, int]:
    """(true positives, false positives, found truths) by overlap, with ``tol_s`` slack.

    An event is a true positive when it overlaps truth segments (within ``tol_s``) AND its length
    is explained by them: at most the sum of their lengths, each widened by ``tol_s + slack_s``
    on both sides (``slack_s`` = one window: windows that only partly cover a sound still score
    it). Otherwise it is a false positive and finds nothing: an event that stays on through the
    noise floor between sounds must not count as detecting every sound it happens to span.
    """
    found = [False] * len(truth)
    tp = fp = 0
    for a, b in events:
        hits = [i for i, (ta, tb) in enumerate(truth) if a < tb + tol_s and b > ta - tol_s]
        explained = sum(truth[i][1] - truth[i][0] + 2 * (tol_s + slack_s) for i in hits)
        if hits and (b - a) <= explained:
            tp += 1
            for i in hits:
                found[i] = True
        else:
            fp += 1
    return tp, fp, sum(found)


# --------------------------------------------------------------------------- scoring a stream


def stream_scores(
    bundle: Bundle,
    x: np.ndarray,
    rate: int,
    msgs: Sequence[QueryMessage],
    gate_dbfs: float | None = -70.0,
    overlap: float = 0.0,
    threads: int = 1,
    block_s: float = 5.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw per-window scores of ``msgs`` over samples ``x``: (starts [T], ends [T], scores [T, nq]).

    ``Pipeline.score`` over blocks of ``block_s`` seconds (the daemon's own step, without the
    detector, so its policy can be replayed by ``detect_offline``); gated windows are NaN rows.
    """
    pipe = Pipeline(bundle, msgs, sample_rate=rate, overlap=overlap, gate_dbfs=gate_dbfs, threads=threads)
    starts: list[float] = []
    ends: list[float] = []
    rows: list[np.ndarray] = []

    def score(ticks: list[Tick]) -> None:
        _, scored = pipe.score(ticks)
        out = np.full((len(ticks), len(msgs)), np.nan, np.float32)
        for j, row in enumerate(scored):
            if row is not None:
                out[j] = row
        starts.extend(t.start_s for t in ticks)
        ends.extend(t.end_s for t in ticks)
        rows.append(out)

    step = int(block_s * rate)
    for i in range(0, x.size, step):
        ticks = pipe.push(x[i : i + step])
        if ticks:
            score(ticks)
    tail = pipe.flush()
    if tail:
        score(tail)
    return np.asarray(starts), np.asarray(ends), np.concatenate(rows) if rows else np.zeros((0, len(msgs)))


def detect_offline(
    queries: Sequence[CompiledQuery], starts: np.ndarray, ends: np.ndarray, scores: np.ndarray,
    policy: PolicyOverlay | None,
) -> dict[str, list[tuple[float, float]]]:
    """Replay the detector over stored scores: query id -> [(start_s, end_s)] of its events."""
    det = Detector(policy)
    out: dict[str, list[tuple[float, float]]] = {q.query_id: [] for q in queries}
    spans = ((float(a), float(b)) for a, b in zip(starts, ends, strict=True))
    rows = (None if np.isnan(row).all() else row for row in scores)
    for tr in [*run_detector(det, tuple(queries), spans, rows), *det.flush()]:
        if tr.final:
            out[tr.event.query_id].append((tr.event.start_s, tr.event.end_s))
    return out


def event_scores(
    events: dict[str, list[tuple[float, float]]],
    segments: Sequence[Segment],
    query_categories: dict[str, tuple[str, ...]],
    tol_s: float = 1.5,
) -> dict[str, dict[str, int]]:
    """Per query: tp/fp events and found/total ground-truth segments of its categories."""
    out = {}
    for qid, evs in events.items():
        cats = query_categories.get(qid, ())
        truth = [(s.start_s, s.end_s) for s in segments if s.clip.category in cats]
        tp, fp, found = match_events(evs, truth, tol_s)
        out[qid] = {"tp": tp, "fp": fp, "found": found, "truth": len(truth)}
    return out


def totals(per_query: dict[str, dict[str, int]]) -> tuple[float, float]:
    """(event recall, event precision) summed over queries."""
    tp = sum(v["tp"] for v in per_query.values())
    fp = sum(v["fp"] for v in per_query.values())
    found = sum(v["found"] for v in per_query.values())
    truth = sum(v["truth"] for v in per_query.values())
    return (found / truth if truth else 1.0), (tp / (tp + fp) if tp + fp else 1.0)
