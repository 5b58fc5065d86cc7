"""Energy gate: skip the encoder on near-silent windows (the power saving on a battery device).

Level is RMS in dBFS, full scale = 1.0 for float samples (a full-scale sine is -3 dBFS).
"""

from __future__ import annotations

import numpy as np

from ..config import GATE_DBFS_MIN

SILENCE_DBFS = -200.0  # what digital zero reads as


def rms_dbfs(windows: np.ndarray) -> np.ndarray:
    """[B, n] or [n] float samples -> RMS level(s) in dBFS."""
    x = np.asarray(windows, np.float32)
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1)
    return np.maximum(10.0 * np.log10(np.maximum(ms, 1e-20)), SILENCE_DBFS)


class EnergyGate:
    """Open (encode) when the window's RMS is at or above ``threshold_dbfs``; None = always open."""

    def __init__(self, threshold_dbfs: float | None = -70.0) -> None:
        if threshold_dbfs is not None and not GATE_DBFS_MIN <= threshold_dbfs <= 0.0:
            raise ValueError(f"gate threshold {threshold_dbfs!r} dBFS must be in [{GATE_DBFS_MIN:g}, 0] (config gate.energy_dbfs)")
        self.threshold_dbfs = threshold_dbfs
        self.passed = 0
        self.gated = 0  # windows whose encoder run was skipped

    def open(self, window: np.ndarray) -> bool:
        if self.threshold_dbfs is None:
            self.passed += 1
            return True
        ok = bool(rms_dbfs(window) >= self.threshold_dbfs)
        if ok:
            self.passed += 1
        else:
            self.gated += 1
        return ok
