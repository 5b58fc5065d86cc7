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

from .sources import FileSource

SOUNDS_ENV = "EDGE_RETRIEVAL_SOUNDS"


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

    def floor(seconds: float) -> np.ndarray:
        # brownish noise: a field-recording floor rather than white hiss
        w = rng.standard_normal(int(seconds * rate)).astype(np.float32)
        b = np.cumsum(w) * 0.02
        b -= np.convolve(b, np.ones(256) / 256, mode="same")
        b = 0.5 * b / (np.std(b) + 1e-9) + 0.5 * w
        return (amp * b / (np.std(b) + 1e-9)).astype(np.float32)

    parts = [floor(lead_s)]
    t = lead_s
    segs = []
    for c in clips:
        x = load_clip(c.path, rate, max_clip_s)
        x = x + floor(x.size / rate)[: x.size]
        segs.append(Segment(c, t, t + x.size / rate))
        parts.append(x)
        t += x.size / rate
        parts.append(floor(gap_s))
        t += gap_s
    return np.concatenate(parts), segs


def match_events(
    events: Iterable[tuple[float, float]], truth: Sequence[tuple[float, float]], tol_s: float = 1.5
) -> tuple[int, int, int]:
    """(true positives, false positives, found truths) by overlap, with ``tol_s`` slack."""
    events = list(events)
    found = [False] * len(truth)
    tp = fp = 0
    for a, b in events:
        hit = False
        for i, (ta, tb) in enumerate(truth):
            if a < tb + tol_s and b > ta - tol_s:
                found[i] = True
                hit = True
        tp += hit
        fp += not hit
    return tp, fp, sum(found)
