"""numpy CLAP log-mel vs transformers' ClapFeatureExtractor (rand_trunc): bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from edge_retrieval.errors import BundleError
from edge_retrieval.frontends import make_frontend
from edge_retrieval.frontends.clap import ClapLogMelParams, mel_filters

transformers = pytest.importorskip("transformers")

SR = 48_000


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    """Tone + chirp + noise + a silent stretch: exercises the -100 dB floor and loud bins."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (200 + 900 * t) * t)
    x = x + 0.05 * rng.standard_normal(t.size)
    x[len(x) // 5 : len(x) // 3] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def hf() -> object:
    return transformers.ClapFeatureExtractor(truncation="rand_trunc")


def test_filters_match_hf(hf: object) -> None:
    assert np.array_equal(mel_filters(ClapLogMelParams()), hf.mel_filters_slaney)


def test_ten_second_windows_bit_exact(hf: object) -> None:
    fe = make_frontend("clap_logmel", {})
    batch = np.stack([_clip(10.0, 0), _clip(10.0, 1)[::-1].copy(), np.zeros(10 * SR, np.float32)])
    ref = hf(list(batch), sampling_rate=SR, return_tensors="np")["input_features"]
    got = fe(batch)
    assert got.shape == (3, 1, 1001, 64) == ref.shape
    assert got.dtype == np.float32
    assert np.array_equal(got, ref)


def test_short_clip_repeatpad_bit_exact(hf: object) -> None:
    x = _clip(7.3, 2)
    ref = hf(x, sampling_rate=SR, return_tensors="np")["input_features"]
    assert np.array_equal(make_frontend("clap_logmel", {})(x[None]), ref)


def test_long_clip_is_centre_cropped(hf: object) -> None:
    """HF crops at random; here the crop is the centre, so the result is the HF mel of that crop."""
    x = _clip(12.5, 3)
    start = (len(x) - 10 * SR) // 2
    ref = hf(x[start : start + 10 * SR], sampling_rate=SR, return_tensors="np")["input_features"]
    fe = make_frontend("clap_logmel", {})
    assert np.array_equal(fe(x[None]), ref)
    assert np.array_equal(fe(x[None]), fe(x[None]))  # deterministic


def test_other_frequency_range_matches(hf: object) -> None:
    hf50 = transformers.ClapFeatureExtractor(truncation="rand_trunc", frequency_min=50, frequency_max=18_000)
    x = _clip(10.0, 4)
    ref = hf50(x, sampling_rate=SR, return_tensors="np")["input_features"]
    got = make_frontend("clap_logmel", {"f_min": 50.0, "f_max": 18_000.0})(x[None])
    assert np.array_equal(got, ref)


@pytest.mark.parametrize(
    "params",
    [{"truncation": "fusion"}, {"mel_scale": "bark"}, {"f_max": 30_000.0}, {"no_such": 1}],
)
def test_bad_params_are_one_bundle_error(params: dict) -> None:
    with pytest.raises(BundleError, match="clap_logmel"):
        make_frontend("clap_logmel", params)
