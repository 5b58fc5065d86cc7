"""BirdNET 2.4 spectrogram in numpy: the part of the tflite graph that no converter handles.

The graph rescales each window to [-1, 1] (min-max), takes two STFTs (frame 2048 / hop 278 and
frame 1024 / hop 280, Hann), keeps only the **real** part of each spectrum, applies a 96-bin mel
matrix, squares, raises to a learned power, flips the mel axis and stacks the branches as
channels: ``[B, 96, 511, 2]``. Every number comes from the bundle: the manifest's params and
the constants npz they name (windows, mel matrices), both read from the tflite at export.

Default method "rfft" follows the graph (float32 rfft, real part, mel weights) and reproduces the
tflite's spectrogram to about 2e-5. The mel matrices are >98% zeros (each band is a short run of
bins), so the mel step gathers only the nonzero bins and sums each band's run (``np.add.reduceat``)
in the flipped band order: no BLAS call (whose thread pool spins and steals the core from the next
step on a small board) and no flip or copy afterwards. Method "folded" uses that the real part of a DFT is linear
in the samples: window, cosine transform and mel matrix fold into one ``[frame, 96]`` matrix,
one matmul per branch (about 3x faster, but float32 accumulation over 2048 terms errs up to
~1e-3 on quiet bins; logits still agree, see benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import Frontend, load_constants, register_frontend

_SUPPORTED = {
    "rescale": "minmax_-1_1",
    "spectrum": "real",
    "square": True,
    "flip_mels": True,
    "layout": "B,mels,frames,branch",
}


@dataclass(frozen=True)
class Branch:
    """One STFT branch: frame length and hop in samples, mel bins, power after squaring."""

    frame: int
    hop: int
    n_mels: int
    power: float


@dataclass(frozen=True)
class BirdnetParams:
    """Front-end parameters as the manifest states them (``constants`` is a bundle file)."""

    sample_rate: int
    window_samples: int
    eps: float
    branches: tuple[Branch, ...]
    constants: str
    rescale: str = "minmax_-1_1"
    spectrum: str = "real"
    square: bool = True
    flip_mels: bool = True
    layout: str = "B,mels,frames,branch"

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> BirdnetParams:
        p = dict(params)
        branches = tuple(Branch(**b) for b in p.pop("branches"))
        out = cls(branches=branches, **p)
        for key, want in _SUPPORTED.items():
            if getattr(out, key) != want:
                raise ValueError(f"{key}={getattr(out, key)!r} is not supported (expected {want!r})")
        if not branches:
            raise ValueError("no STFT branches")
        frames = {out.n_frames(b) for b in branches}
        if len(frames) != 1:
            raise ValueError(f"branches give different frame counts {sorted(frames)}")
        return out

    def n_frames(self, b: Branch) -> int:
        return (self.window_samples - b.frame) // b.hop + 1


def fold_branch(window: np.ndarray, mel: np.ndarray) -> np.ndarray:
    """``[frame, n_mels]`` matrix = diag(window) @ Re(DFT) @ mel.T, computed in float64."""
    frame = window.shape[0]
    n_bins = frame // 2 + 1
    if mel.shape[1] != n_bins:
        raise ValueError(f"mel matrix has {mel.shape[1]} bins, frame {frame} needs {n_bins}")
    n = np.arange(frame, dtype=np.int64)
    k = np.arange(n_bins, dtype=np.int64)
    cos = np.cos(2.0 * np.pi * ((np.outer(n, k) % frame) / frame))  # exact phase, no drift
    return ((window.astype(np.float64)[:, None] * cos) @ mel.astype(np.float64).T).astype(np.float32)


@dataclass(frozen=True)
class SparseMel:
    """Nonzero weights of a mel matrix with its bands flipped: ``bins``/``weights`` grouped by band."""

    bins: np.ndarray  # [nnz] int64, FFT bin of each weight
    weights: np.ndarray  # [nnz] float32
    starts: np.ndarray  # [n_mels] int64, first entry of each (flipped) band


def sparse_mel(mel: np.ndarray) -> SparseMel | None:
    """``mel [n_mels, bins]`` -> its nonzeros by flipped band; None if a band is empty (reduceat needs >= 1)."""
    flipped = np.asarray(mel, np.float32)[::-1]
    bands, bins = np.nonzero(flipped)  # row-major: sorted by band, then bin
    counts = np.bincount(bands, minlength=flipped.shape[0])
    if np.any(counts == 0):
        return None
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return SparseMel(bins.astype(np.int64), flipped[bands, bins].astype(np.float32), starts)


class BirdnetFrontend:
    """``windows [B, 144000] float32 -> [B, 96, 511, 2] float32`` (the backbone's input)."""

    def __init__(
        self,
        params: BirdnetParams,
        arrays: dict[str, np.ndarray],
        method: str = "rfft",
        rfft: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if method not in ("rfft", "folded"):
            raise ValueError(f"method {method!r} must be 'rfft' or 'folded'")
        self.params = params
        self.method = method
        # the real FFT over the last axis. numpy's (double precision inside) matches the tflite to
        # ~1e-5; scipy.fft in float32 is ~1.6x faster but 2e-4 off (beyond the 1e-4 parity budget),
        # so it is only timed by the benchmarks, not used
        self.rfft = rfft or partial(np.fft.rfft, axis=-1)
        self.windows: list[np.ndarray] = []
        self.mels_t: list[np.ndarray] = []  # [bins, n_mels], C-contiguous for the matmul
        self.matrices: list[np.ndarray] = []
        self.sparse: list[SparseMel | None] = []  # nonzero mel weights, bands flipped (None: dense path)
        for i, b in enumerate(params.branches, start=1):
            try:
                window, mel = arrays[f"window{i}"], arrays[f"mel{i}"]
            except KeyError as exc:
                raise ValueError(f"constants lack {exc.args[0]!r}") from exc
            if window.shape != (b.frame,) or mel.shape[0] != b.n_mels:
                raise ValueError(f"branch {i}: window {window.shape} / mel {mel.shape} do not match {b}")
            self.windows.append(window.astype(np.float32))
            self.mels_t.append(np.ascontiguousarray(mel.T, dtype=np.float32))
            self.sparse.append(sparse_mel(mel))
            if method == "folded":
                self.matrices.append(fold_branch(window, mel))
        self.n_frames = params.n_frames(params.branches[0])

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        p = self.params
        x = np.asarray(windows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != p.window_samples:
            raise ValueError(f"expected windows [B, {p.window_samples}], got {list(x.shape)}")
        out = np.empty((x.shape[0], p.branches[0].n_mels, self.n_frames, len(p.branches)), np.float32)
        # one window at a time: the STFT intermediates (~8 MB a window) stay bounded and in cache;
        # a batch of 8 at once was slower per window and doubled the daemon's peak memory
        for i in range(x.shape[0]):
            self._one(x[i : i + 1], out[i : i + 1])
        return out

    def _one(self, x: np.ndarray, out: np.ndarray) -> None:
        """``x [1, window]`` -> ``out [1, mels, frames, branches]`` (written in place)."""
        p = self.params
        x = x - x.min(axis=1, keepdims=True)
        x = x / (x.max(axis=1, keepdims=True) + np.float32(p.eps))
        x = (x - np.float32(0.5)) * np.float32(2.0)
        for c, b in enumerate(p.branches):
            frames = np.lib.stride_tricks.sliding_window_view(x, b.frame, axis=1)[:, :: b.hop][:, : self.n_frames]
            sp = self.sparse[c]
            if self.method == "folded":
                spec = np.ascontiguousarray(frames) @ self.matrices[c]  # [1, frames, mels]
                flipped = False
            elif sp is not None:
                real = self.rfft(frames * self.windows[c]).real
                gathered = real[..., sp.bins]  # [1, frames, nnz] float32, a fresh array
                gathered *= sp.weights
                spec = np.add.reduceat(gathered, sp.starts, axis=-1)  # [1, frames, mels], bands flipped
                flipped = True
            else:
                real = self.rfft(frames * self.windows[c]).real
                spec = (np.ascontiguousarray(real[0]) @ self.mels_t[c])[None]
                flipped = False
            spec = np.square(spec, out=spec)
            spec = np.power(spec, np.float32(b.power), out=spec)
            out[..., c] = (spec if flipped else spec[:, :, ::-1]).transpose(0, 2, 1)


@register_frontend("birdnet", needs_root=True)
def make_birdnet(params: dict[str, Any], root: Path | None = None) -> Frontend:
    """Factory: params from the manifest, constants from ``root / params['constants']``."""
    p = BirdnetParams.from_dict(params)
    return BirdnetFrontend(p, load_constants(p.constants, root, "BirdNET"))
