"""Interleaved timing: every iteration runs every variant once, so outside load hits all alike.

Shared machines are noisy; a comparison is only fair when its variants see the same noise. Each
round runs all variants in a rotated order (no variant always goes first), after a warm-up. Per
variant we keep wall time (``time.perf_counter``) and process CPU time (``time.process_time``,
all threads of this process) of every call, and report median and p95 over the measured rounds.
Ratios between variants come from the same run: ratio of medians and the median of per-round
ratios (the paired one is steadier when the load changes during the run).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Samples:
    """Per-call wall and CPU times of one variant, in seconds (one entry per measured round)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        w = np.asarray(self.wall) * 1e3
        c = np.asarray(self.cpu) * 1e3
        if w.size == 0:
            return {"n": 0}
        return {
            "n": int(w.size),
            "median_ms": round(float(np.median(w)), 4),
            "p95_ms": round(float(np.percentile(w, 95)), 4),
            "min_ms": round(float(w.min()), 4),
            "cpu_median_ms": round(float(np.median(c)), 4),
        }


def interleaved(
    variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, Samples]:
    """Run ``warmup`` then ``repeats`` rounds; each round calls every variant once, order rotated."""
    if repeats < 1:
        raise ValueError(f"repeats {repeats!r} must be >= 1")
    names = list(variants)
    for _ in range(max(0, warmup)):
        for n in names:
            variants[n]()
    out = {n: Samples() for n in names}
    for r in range(repeats):
        k = r % len(names) if names else 0
        for n in names[k:] + names[:k]:
            fn = variants[n]
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            out[n].wall.append(t1 - t0)
            out[n].cpu.append(c1 - c0)
    return out


def ratio(samples: Mapping[str, Samples], num: str, den: str) -> dict[str, float | None]:
    """``num / den`` from one interleaved run: ratio of medians, and median of per-round ratios."""
    a, b = samples[num].wall, samples[den].wall
    if not a or not b:
        return {"of_medians": None, "paired_median": None}
    med = float(np.median(a)) / float(np.median(b)) if np.median(b) > 0 else math.nan
    paired = float(np.median(np.asarray(a) / np.maximum(np.asarray(b), 1e-12)))
    return {"of_medians": round(med, 4), "paired_median": round(paired, 4)}


def summaries(samples: Mapping[str, Samples]) -> dict[str, dict[str, float]]:
    return {k: v.summary() for k, v in samples.items()}
