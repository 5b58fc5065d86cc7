"""CLAP log-mel in numpy: ``windows [B, samples] -> [B, 1, frames, n_mels]`` float32 (key "clap_logmel").

Bit-identical to ``transformers.ClapFeatureExtractor`` with ``truncation="rand_trunc"`` (unfused
checkpoints) for windows of exactly ``max_length_s`` (the daemon's windows): reflect pad by
n_fft/2, periodic Hann, float64 rFFT rounded to complex64 like HF, power 2, Slaney mel filters,
``10*log10(max(x, 1e-10))``. One deliberate difference: HF crops a longer input at a *random*
offset; here the crop is the centre (``(len - max) // 2``), so the same audio always gives the
same vector. Shorter input is repeated then zero padded (HF's ``repeatpad``), as in HF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import Frontend, register_frontend


@dataclass(frozen=True)
class ClapLogMelParams:
    """Front-end parameters as the bundle manifest stores them (HF names in comments)."""

    sample_rate: int = 48_000  # sampling_rate
    n_fft: int = 1024  # fft_window_size (periodic Hann of the same length)
    hop_length: int = 480
    n_mels: int = 64  # feature_size
    f_min: float = 0.0  # frequency_min
    f_max: float = 14_000.0  # frequency_max
    mel_scale: str = "slaney"  # "slaney" for rand_trunc, "htk" for fusion
    mel_norm: str | None = "slaney"  # "slaney" for rand_trunc, None for fusion
    max_length_s: float = 10.0
    truncation: str = "rand_trunc"  # long input: centre crop here (HF: random crop)
    padding: str = "repeatpad"  # short input: "repeatpad" | "repeat" | "pad"
    crop: str = "centre"

    def __post_init__(self) -> None:
        if self.truncation != "rand_trunc":
            raise ValueError(
                f"truncation {self.truncation!r} is not supported (only 'rand_trunc': unfused CLAP checkpoints)"
            )
        if self.mel_scale not in ("slaney", "htk"):
            raise ValueError(f"mel_scale {self.mel_scale!r} must be 'slaney' or 'htk'")
        if self.mel_norm not in (None, "slaney"):
            raise ValueError(f"mel_norm {self.mel_norm!r} must be null or 'slaney'")
        if self.padding not in ("repeatpad", "repeat", "pad"):
            raise ValueError(f"padding {self.padding!r} must be 'repeatpad', 'repeat' or 'pad'")
        if self.crop != "centre":
            raise ValueError(f"crop {self.crop!r} must be 'centre'")
        if self.n_fft <= 0 or self.hop_length <= 0 or self.n_mels <= 0 or self.sample_rate <= 0:
            raise ValueError("sample_rate, n_fft, hop_length and n_mels must be > 0")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {self.f_max}")

    @property
    def max_samples(self) -> int:
        return int(round(self.max_length_s * self.sample_rate))

    @property
    def frames(self) -> int:
        return self.max_samples // self.hop_length + 1


def _hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    mels = 3.0 * f / 200.0
    log_region = f >= 1000.0
    mels = np.where(log_region, 15.0 + np.log(np.where(log_region, f, 1000.0) / 1000.0) * (27.0 / np.log(6.4)), mels)
    return mels


def _mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
    m = np.asarray(m, np.float64)
    if scale == "htk":
        return 700.0 * (np.power(10, m / 2595.0) - 1.0)
    freq = 200.0 * m / 3.0
    log_region = m >= 15.0
    return np.where(log_region, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), freq)


def mel_filters(p: ClapLogMelParams) -> np.ndarray:
    """Triangular mel filter bank ``[n_fft//2 + 1, n_mels]`` float64 (same formulas as HF/librosa)."""
    n_bins = p.n_fft // 2 + 1
    mel_freqs = np.linspace(_hz_to_mel(np.float64(p.f_min), p.mel_scale), _hz_to_mel(np.float64(p.f_max), p.mel_scale), p.n_mels + 2)
    filter_freqs = _mel_to_hz(mel_freqs, p.mel_scale)
    fft_freqs = np.linspace(0, p.sample_rate // 2, n_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    fb = np.maximum(np.zeros(1), np.minimum(down, up))
    if p.mel_norm == "slaney":
        fb *= (2.0 / (filter_freqs[2 : p.n_mels + 2] - filter_freqs[: p.n_mels]))[None, :]
    return fb


def periodic_hann(n: int) -> np.ndarray:
    return np.hanning(n + 1)[:-1]


class ClapLogMel:
    """The front end: a pure function of the samples; parameters fixed at construction."""

    def __init__(self, params: ClapLogMelParams) -> None:
        self.params = params
        self.window = periodic_hann(params.n_fft).astype(np.float64)
        self.filters = mel_filters(params)

    def fit_length(self, x: np.ndarray) -> np.ndarray:
        """One 1-D signal -> exactly ``max_samples``: centre crop or repeat/pad (as HF's padding modes)."""
        n, m = x.shape[0], self.params.max_samples
        if n > m:
            start = (n - m) // 2
            return x[start : start + m]
        if n < m:
            if n == 0:
                return np.zeros(m, x.dtype)
            if self.params.padding == "repeat":
                x = np.tile(x, m // n + 1)[:m]
            elif self.params.padding == "repeatpad":
                x = np.tile(x, m // n)
            x = np.pad(x, (0, m - x.shape[0]), mode="constant", constant_values=0)
        return x

    def logmel(self, windows: np.ndarray) -> np.ndarray:
        """``[B, max_samples]`` -> ``[B, frames, n_mels]`` float32 (HF's arithmetic, vectorised over frames)."""
        p = self.params
        half = p.n_fft // 2
        padded = np.pad(windows, ((0, 0), (half, half)), mode="reflect").astype(np.float64)
        frames = sliding_window_view(padded, p.n_fft, axis=-1)[:, :: p.hop_length]  # [B, F, n_fft] view
        spec = np.fft.rfft(frames * self.window, axis=-1).astype(np.complex64)
        power = np.abs(spec, dtype=np.float64) ** 2  # [B, F, bins]
        out = np.empty((windows.shape[0], power.shape[1], p.n_mels), np.float32)
        fb_t = self.filters.T
        for b in range(windows.shape[0]):  # same dot shapes as HF, so the same BLAS rounding
            mel = np.maximum(1e-10, np.dot(fb_t, power[b].T))
            db = 10.0 * (np.log10(np.clip(mel, 1e-10, None)) - np.log10(1.0))
            out[b] = np.asarray(db, np.float32).T
        return out

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """``[B, samples]`` float -> ``[B, 1, frames, n_mels]`` float32 model input."""
        w = np.asarray(windows)
        if w.ndim == 1:
            w = w[None, :]
        if w.ndim != 2:
            raise ValueError(f"clap_logmel expects windows [B, samples], got shape {w.shape}")
        if not np.issubdtype(w.dtype, np.floating):
            w = w.astype(np.float32)
        if w.shape[1] != self.params.max_samples:
            w = np.stack([self.fit_length(row) for row in w])
        return self.logmel(w)[:, None, :, :]


def params_from_dict(params: dict[str, Any]) -> ClapLogMelParams:
    return ClapLogMelParams(**params)


@register_frontend("clap_logmel")
def _make(params: dict[str, Any]) -> Frontend:
    return ClapLogMel(params_from_dict(params))
