"""YAMNet log-mel patches in numpy: the waveform part of the SavedModel that tf2onnx cannot convert.

The SavedModel frames 16 kHz audio (400-sample periodic Hann frames, hop 160), takes
``|rfft(frame, 512)|`` (each frame zero-padded at its end), applies a [257, 64] mel matrix, adds
a log offset, takes the log, and cuts the [frames, 64] log-mel into patches of 96 frames
(0.96 s) every 48 frames (0.48 s). Every number comes from the bundle: the manifest's params and
the constants npz they name (the Hann window and the mel matrix), both read from the SavedModel's
graph at export.

Windowing on the common hop: an expert window is ``n_patches`` patches at the patch hop, with no
sample left over (the default bundle: 5 patches, 0.96 + 4 x 0.48 + 0.015 = 2.895 s = 46,320 samples,
so the SavedModel pads nothing on the same window). The output is ``[B, n_patches, 96, 64]``; the
ONNX graph scores every patch and reduces over the patch axis (logits: max, embedding: mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import Frontend, load_constants, register_frontend

_LAYOUT = "B,patches,frames,mels"


@dataclass(frozen=True)
class YamnetParams:
    """Front-end parameters as the manifest states them (lengths in samples or STFT frames)."""

    sample_rate: int
    window_samples: int  # one expert window
    frame: int  # STFT frame length (samples)
    hop: int  # STFT hop (samples)
    fft: int  # FFT length (>= frame; the frame is zero-padded at its end)
    n_mels: int
    log_offset: float
    patch_frames: int  # STFT frames per patch
    patch_hop: int  # STFT frames between patch starts
    constants: str  # npz in the bundle: "window" [frame], "mel" [fft // 2 + 1, n_mels]
    layout: str = _LAYOUT

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> YamnetParams:
        p = cls(**params)
        if p.layout != _LAYOUT:
            raise ValueError(f"layout={p.layout!r} is not supported (expected {_LAYOUT!r})")
        if p.fft < p.frame or p.hop <= 0 or p.patch_hop <= 0 or p.patch_frames <= 0:
            raise ValueError(f"inconsistent STFT/patch lengths: {p}")
        if p.n_patches < 1:
            raise ValueError(f"window_samples={p.window_samples} is shorter than one patch")
        if p.used_samples != p.window_samples:
            raise ValueError(
                f"window_samples={p.window_samples} is not a whole number of patch hops; "
                f"{p.n_patches} patch(es) use {p.used_samples} samples"
            )
        return p

    @property
    def n_frames(self) -> int:
        return (self.window_samples - self.frame) // self.hop + 1

    @property
    def n_patches(self) -> int:
        return (self.n_frames - self.patch_frames) // self.patch_hop + 1

    @property
    def used_samples(self) -> int:
        """Samples the patches cover: the last patch's last frame ends here."""
        last_frame = (self.n_patches - 1) * self.patch_hop + self.patch_frames - 1
        return last_frame * self.hop + self.frame


def window_samples_for(n_patches: int, frame: int, hop: int, patch_frames: int, patch_hop: int) -> int:
    """Samples of a window that holds exactly ``n_patches`` patches (the exporter's choice)."""
    return ((n_patches - 1) * patch_hop + patch_frames - 1) * hop + frame


class YamnetFrontend:
    """``windows [B, window_samples] float32 -> [B, n_patches, patch_frames, n_mels] float32``."""

    def __init__(self, params: YamnetParams, arrays: dict[str, np.ndarray]) -> None:
        p = params
        try:
            window, mel = arrays["window"], arrays["mel"]
        except KeyError as exc:
            raise ValueError(f"constants lack {exc.args[0]!r}") from exc
        if window.shape != (p.frame,) or mel.shape != (p.fft // 2 + 1, p.n_mels):
            raise ValueError(f"window {window.shape} / mel {mel.shape} do not match {p}")
        self.params = p
        self.window = np.asarray(window, np.float32)
        self.mel = np.ascontiguousarray(mel, dtype=np.float32)
        # the mel matrix is ~97% zeros (each band a short run of bins): sum each band's run with
        # np.add.reduceat instead of a BLAS matmul, whose thread pool spins and steals the core on
        # a small or busy board (measured: 0.03 ms idle, ~10 ms on a loaded 2-core host)
        bands, bins = np.nonzero(self.mel.T)  # row-major: sorted by band, then bin
        counts = np.bincount(bands, minlength=p.n_mels)
        self.sparse = None if np.any(counts == 0) else (
            bins.astype(np.int64), self.mel.T[bands, bins].astype(np.float32),
            np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
        # patch k covers frames [k * patch_hop, k * patch_hop + patch_frames)
        self.patch_index = (np.arange(p.n_patches)[:, None] * p.patch_hop + np.arange(p.patch_frames)[None, :])

    def log_mel(self, windows: np.ndarray) -> np.ndarray:
        """``[B, window_samples]`` -> ``[B, n_frames, n_mels]`` (the SavedModel's own log-mel output)."""
        p = self.params
        x = np.asarray(windows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != p.window_samples:
            raise ValueError(f"expected windows [B, {p.window_samples}], got {list(x.shape)}")
        frames = np.lib.stride_tricks.sliding_window_view(x, p.frame, axis=1)[:, :: p.hop][:, : p.n_frames]
        mag = np.abs(np.fft.rfft(frames * self.window, n=p.fft, axis=-1)).astype(np.float32)
        if self.sparse is not None:
            bins, weights, starts = self.sparse
            gathered = mag[..., bins]
            gathered *= weights
            mel = np.add.reduceat(gathered, starts, axis=-1)
        else:  # a band without bins: reduceat cannot express it
            mel = mag @ self.mel
        return np.log(mel + np.float32(p.log_offset))

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.log_mel(windows)[:, self.patch_index])


@register_frontend("yamnet_logmel", needs_root=True)
def make_yamnet(params: dict[str, Any], root: Path | None = None) -> Frontend:
    """Factory: params from the manifest, constants from ``root / params['constants']``."""
    p = YamnetParams.from_dict(params)
    return YamnetFrontend(p, load_constants(p.constants, root, "YAMNet"))
