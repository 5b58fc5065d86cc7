"""aisfx expert: numpy log-mel vs librosa 0.9.2 (golden file), (time, mel) orientation, ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.errors import BundleError
from edge_retrieval.frontends import make_frontend
from edge_retrieval.frontends.aisfx import AisfxLogMel, AisfxParams, mel_filters

GOLDEN = Path(__file__).parent / "data" / "aisfx_librosa_golden.npz"
SR, N = 44100, 99 * 1024


def _signals() -> np.ndarray:
    """The signals the golden file was computed from (same seed and formulas)."""
    rng = np.random.default_rng(1234)
    t = np.arange(N) / SR
    return np.stack([
        0.05 * rng.standard_normal(N),
        0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t) + 0.001 * rng.standard_normal(N),
        0.3 * np.sin(2 * np.pi * (100 + 4000 * t) * t) * np.exp(-t),
    ]).astype(np.float32)


def test_matches_librosa_reference() -> None:
    golden = np.load(GOLDEN)["features"]
    feats = make_frontend("aisfx_logmel", {})(_signals())
    assert feats.shape == golden.shape == (3, 100, 96)
    assert feats.dtype == np.float32
    assert np.max(np.abs(feats - golden)) < 1e-5


def test_orientation_is_time_then_mel() -> None:
    """A tone that starts half-way lights up the later frames (axis 1) of one mel band region."""
    t = np.arange(N) / SR
    x = np.where(t > t[-1] / 2, np.sin(2 * np.pi * 1000 * t), 0.0).astype(np.float32)
    f = AisfxLogMel(AisfxParams())(x[None])[0]
    energy_per_frame = f.sum(axis=1)
    assert energy_per_frame[:40].max() < 1e-6
    assert energy_per_frame[60:].min() > 1.0
    band = int(np.argmax(f[80]))
    assert f[80, band] > 5 * np.median(f[80])


def test_mel_filters_unit_sum_and_peak_normalisation() -> None:
    w = mel_filters(AisfxParams())
    assert w.shape == (96, 1025)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    fe = AisfxLogMel(AisfxParams())
    x = _signals()[:1]
    np.testing.assert_allclose(fe(x), fe(0.01 * x), atol=1e-6)  # level-free, as aisfx's reference
    assert np.all(fe(np.zeros((2, N), np.float32)) == 0)


@pytest.mark.parametrize("params", [{"n_mels": 0}, {"f_max": 30000.0}, {"bogus": 1}])
def test_bad_params_raise_bundle_error(params: dict) -> None:
    with pytest.raises(BundleError, match="aisfx_logmel"):
        make_frontend("aisfx_logmel", params)


def test_onnx_export_parity(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("aisfx")
    import onnxruntime as ort
    from edge_retrieval.export.aisfx import EMBEDDING_DIM, INPUT_NAME, OUTPUT_NAME, PARITY_TOL, export_onnx

    report = export_onnx(tmp_path / "a.onnx")
    assert report["max_abs_diff"] < PARITY_TOL
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: make_frontend("aisfx_logmel", {})(_signals())})[0]
    assert out.shape == (3, EMBEDDING_DIM)
    assert np.all(np.isfinite(out)) and np.linalg.norm(out[0] - out[1]) > 0
