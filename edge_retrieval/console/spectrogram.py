"""A clip -> spectrogram PNG with numpy and zlib only (no plotting library on the server).

Log-magnitude STFT (Hann window), rows low to high frequency drawn bottom-up, levels mapped
through a small perceptual colour ramp; the PNG is written by hand (one IDAT, filter 0).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

N_FFT = 512  # samples per frame
HOP = 256  # samples between frames
MAX_S = 30.0  # seconds of a clip drawn (a clip is at most a few tens of seconds)
DYN_DB = 80.0  # dB below the loudest bin that still get a colour
# a viridis-like ramp: (position, r, g, b)
_RAMP = np.array([(0.0, 68, 1, 84), (0.25, 59, 82, 139), (0.5, 33, 145, 140), (0.75, 94, 201, 98),
                  (1.0, 253, 231, 37)], np.float64)


def spectrogram(samples: np.ndarray) -> np.ndarray:
    """Mono float samples -> levels in [0, 1], shape [freq bins, frames]."""
    x = np.asarray(samples, np.float64)
    if x.size < N_FFT:
        x = np.pad(x, (0, N_FFT - x.size))
    frames = 1 + (x.size - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(N_FFT), axis=1)).T
    db = 20 * np.log10(spec + 1e-10)
    return np.clip((db - (db.max() - DYN_DB)) / DYN_DB, 0.0, 1.0)


def colour(levels: np.ndarray) -> np.ndarray:
    """Levels [H, W] in [0, 1] -> RGB uint8 [H, W, 3] through the ramp."""
    rgb = [np.interp(levels, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def png(rgb: np.ndarray) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def clip_png(path: str | Path) -> bytes:
    """A clip file (FLAC, WAV) -> its spectrogram as PNG bytes (first ``MAX_S`` seconds)."""
    import soundfile as sf

    x, rate = sf.read(str(path), dtype="float32", always_2d=True, frames=-1)
    x = x[: int(MAX_S * rate)].mean(axis=1)
    return png(colour(spectrogram(x)[::-1]))
