"""The optimised-model cache of OnnxEncoder: reused on the second load, same outputs, a broken
cache file never stops a load, and EDGE_RETRIEVAL_ORT_CACHE=off turns it off."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.bundle import Bundle
from edge_retrieval.pipeline.expert import ORT_CACHE_ENV, OnnxEncoder, ort_cache_dir, ort_cache_key


def _encoder(bundle: Bundle) -> tuple[str, str, str, int]:
    spec = bundle.manifest.device.experts[0]
    return str(bundle.path(spec.file)), spec.input_name, spec.output_name, int(round(spec.window_s * spec.sample_rate))


def _windows(n: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(7).standard_normal((3, n))).astype(np.float32)


def test_second_load_uses_cached_model_with_same_outputs(
    tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, inp, out, n = _encoder(tiny_bundle)
    monkeypatch.setenv(ORT_CACHE_ENV, "off")
    plain = OnnxEncoder(path, inp, [out])
    assert not plain.cached
    monkeypatch.setenv(ORT_CACHE_ENV, str(tmp_path / "ort"))
    assert ort_cache_dir() == tmp_path / "ort"
    first = OnnxEncoder(path, inp, [out])
    cached_file = tmp_path / "ort" / f"{ort_cache_key(path, ['CPUExecutionProvider'])}.onnx"
    assert first.cached and cached_file.is_file()
    assert [p.name for p in (tmp_path / "ort").iterdir()] == [cached_file.name]  # no temp file left
    stamp = cached_file.stat().st_mtime_ns
    second = OnnxEncoder(path, inp, [out])
    assert second.cached
    assert cached_file.stat().st_mtime_ns == stamp  # reused, not rewritten
    x = _windows(n)
    ref = plain(x)[0]
    np.testing.assert_allclose(first(x)[0], ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(second(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_corrupt_cache_file_falls_back_with_warning(
    tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, inp, out, n = _encoder(tiny_bundle)
    monkeypatch.setenv(ORT_CACHE_ENV, "off")
    ref = OnnxEncoder(path, inp, [out])(_windows(n))[0]
    monkeypatch.setenv(ORT_CACHE_ENV, str(tmp_path))
    cached_file = tmp_path / f"{ort_cache_key(path, ['CPUExecutionProvider'])}.onnx"
    cached_file.write_bytes(b"\x08\x07 this is not an ONNX model \xff" * 10)
    with caplog.at_level(logging.WARNING, logger="edge_retrieval.pipeline.expert"):
        enc = OnnxEncoder(path, inp, [out])
    assert any(r.levelno == logging.WARNING and str(cached_file) in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(enc(_windows(n))[0], ref, atol=1e-5, rtol=1e-5)
    assert cached_file.is_file() and b"not an ONNX" not in cached_file.read_bytes()  # rebuilt


def test_unwritable_cache_dir_falls_back_with_warning(
    tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, inp, out, n = _encoder(tiny_bundle)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(ORT_CACHE_ENV, str(blocker / "ort"))
    with caplog.at_level(logging.WARNING, logger="edge_retrieval.pipeline.expert"):
        enc = OnnxEncoder(path, inp, [out])
    assert not enc.cached
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert enc(_windows(n))[0].shape[0] == 3


def test_env_off_disables_cache(tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, inp, out, _ = _encoder(tiny_bundle)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(ORT_CACHE_ENV, "off")
    assert ort_cache_dir() is None
    assert not OnnxEncoder(path, inp, [out]).cached
    assert not any(tmp_path.rglob("*.onnx"))
    monkeypatch.delenv(ORT_CACHE_ENV)
    assert ort_cache_dir() == tmp_path / "edge-retrieval" / "ort"
    assert OnnxEncoder(path, inp, [out]).cached
    assert len(list((tmp_path / "edge-retrieval" / "ort").glob("*.onnx"))) == 1
