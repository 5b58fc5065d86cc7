"""aisfx log-mel front end in numpy (registered as ``aisfx_logmel``).

Reproduces aisfx 0.1.2's librosa path (``aisfx/spectrogram/spectrogram_librosa.py``, librosa
0.9.2 defaults) without librosa: peak-normalised audio, centred STFT (zero padding, periodic Hann
2048, hop 1024), power mel with HTK scale and unit-sum filters (96 bands, 0-22050 Hz),
``log10(1e4 * x + 1)``, then aisfx's "original" min-max scaling (0 .. 9.4578).
The output is **(time, mel)** = ``[B, 100, 96]``, the orientation the CNN was trained on (the
packaged librosa path hands it the transposed (mel, time) array by mistake).

Tolerance against librosa 0.9.2 on the same window: max abs difference below 1e-5 on features
in [0, ~1] (measured 1.9e-6, float32 rounding in librosa; golden file tests/data/
aisfx_librosa_golden.npz, made in a separate venv with librosa 0.9.2; see tests/test_aisfx.py).
One difference by design: the reference normalises the peak over a whole file, the device over
each window (``peak_normalize``); the two agree when a file is one window long.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import Frontend, register_frontend


@dataclass(frozen=True)
class AisfxParams:
    """Front-end parameters as the bundle manifest stores them (units: samples, Hz, frames)."""

    sample_rate: int = 44100
    n_fft: int = 2048
    hop: int = 1024
    n_mels: int = 96
    f_min: float = 0.0
    f_max: float = 22050.0
    frames: int = 100  # one CNN block, ~2.3 s
    log_scale: float = 1e4  # log10(log_scale * power + 1)
    norm_min: float = 0.0  # aisfx spectrogram_normalize(spec_norm="original")
    norm_max: float = 9.457798957824707
    peak_normalize: bool = True

    def __post_init__(self) -> None:
        if self.n_fft <= 0 or self.hop <= 0 or self.n_mels <= 0 or self.frames <= 0:
            raise ValueError("n_fft, hop, n_mels and frames must be positive")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= {self.sample_rate / 2}, got {self.f_min}, {self.f_max}")
        if self.norm_max <= self.norm_min:
            raise ValueError("norm_max must exceed norm_min")

    @property
    def window_samples(self) -> int:
        """Samples that give exactly ``frames`` centred STFT frames."""
        return (self.frames - 1) * self.hop

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> AisfxParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown aisfx_logmel parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _hz_to_mel_htk(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(p: AisfxParams) -> np.ndarray:
    """[n_mels, n_fft//2+1] triangular HTK filters, each row summing to 1 (librosa norm=1.0)."""
    fft_freqs = np.linspace(0.0, p.sample_rate / 2.0, p.n_fft // 2 + 1)
    mel_pts = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(np.float64(p.f_min)), _hz_to_mel_htk(np.float64(p.f_max)), p.n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0.0, np.minimum(lower, upper))
    s = w.sum(axis=1, keepdims=True)
    return (w / np.where(s > np.finfo(np.float32).tiny, s, 1.0)).astype(np.float32)


class AisfxLogMel:
    """windows [B, (frames-1)*hop] float32 at 44.1 kHz -> [B, frames, n_mels] float32."""

    def __init__(self, params: AisfxParams) -> None:
        self.p = params
        n = np.arange(params.n_fft)
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / params.n_fft)).astype(np.float64)  # periodic Hann
        self.mel = mel_filters(params).astype(np.float64).T  # [bins, mels]

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        p = self.p
        x = np.asarray(windows, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2:
            raise ValueError(f"aisfx_logmel expects windows [B, samples], got shape {x.shape}")
        if p.peak_normalize:
            peak = np.max(np.abs(x), axis=1, keepdims=True)
            x = x / np.where(peak > 0, peak, 1.0)
        pad = p.n_fft // 2
        x = np.pad(x, ((0, 0), (pad, pad)))
        n_frames = 1 + (x.shape[1] - p.n_fft) // p.hop
        idx = np.arange(p.n_fft)[None, :] + p.hop * np.arange(n_frames)[:, None]
        frames = x[:, idx] * self.window  # [B, T, n_fft]
        power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
        spec = np.log10(p.log_scale * (power @ self.mel) + 1.0)
        spec = (spec - p.norm_min) / (p.norm_max - p.norm_min)
        if n_frames < p.frames:  # aisfx's blocking pads a short block with zeros
            spec = np.pad(spec, ((0, 0), (0, p.frames - n_frames), (0, 0)))
        return np.ascontiguousarray(spec[:, : p.frames], dtype=np.float32)


@register_frontend("aisfx_logmel")
def _aisfx_logmel(params: dict[str, Any]) -> Frontend:
    return AisfxLogMel(AisfxParams.from_dict(params))
