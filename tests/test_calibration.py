"""Per-label calibration: offsets fitted on real background windows, folded into the ONNX graph."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from edge_retrieval.export.calibration import (
    Calibration,
    background_clips,
    fit_calibration,
    fold_into_onnx,
    window_logits,
)

from edge_retrieval.bundle import Bundle
from edge_retrieval.errors import ExportError
from tests.fixtures_bundles import sounds_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@pytest.fixture(scope="module")
def dev_clips() -> list[Path]:
    root = sounds_dir()
    if root is None:
        pytest.skip("no fixture recordings (scripts/fetch_sounds.py)")
    with open(REPO / "data" / "fixture.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "dev"]
    paths = [root / r["category"] / f"{r['clip_id']}.wav" for r in rows]
    paths = [p for p in paths if p.is_file()][::6]  # one clip in six: every category, a short run
    if len(paths) < 5:
        pytest.skip("too few fixture dev clips on disk")
    return paths


@pytest.fixture(scope="module")
def birdnet_logits(birdnet_bundle: Bundle, dev_clips: list[Path]) -> tuple[np.ndarray, list[list[int]]]:
    logits, overlaps, silent = window_logits(birdnet_bundle, dev_clips, threads=2, progress=False)
    assert silent.shape == (len(overlaps),) and silent.mean() < 0.5
    return logits["birdnet"], overlaps


def test_background_is_one_stream_of_the_clips(birdnet_bundle: Bundle, dev_clips: list[Path],
                                               birdnet_logits: tuple[np.ndarray, list[list[int]]]) -> None:
    import soundfile as sf
    from edge_retrieval.export.calibration import kind_exclusions

    z, overlaps = birdnet_logits
    total = sum(sf.info(str(p)).duration for p in dev_clips)
    hop = birdnet_bundle.manifest.device.hop_s
    assert abs(len(overlaps) - total / hop) <= 2 and len(overlaps) == z.shape[0]  # no padded window per clip
    assert all(ov for ov in overlaps) and [i for ov in overlaps for i in ov][0] == 0
    assert sorted({i for ov in overlaps for i in ov}) == list(range(len(dev_clips)))
    assert any(len(ov) > 1 for ov in overlaps)  # windows span clip boundaries, as a stream does
    ex = kind_exclusions(["a", "b"] + ["c"] * (len(dev_clips) - 2), overlaps, {"e": np.array([0, 1, 2])},
                         lambda t: {0} if t == "a" else {1} if t == "b" else set())["e"]
    assert ex.shape == (len(overlaps), 3) and not ex[:, 2].any()
    assert np.array_equal(ex[:, 0], np.array([0 in ov for ov in overlaps]))


def test_offsets_map_every_label_background_quantile_to_the_target(
        birdnet_logits: tuple[np.ndarray, list[list[int]]]) -> None:
    z, overlaps = birdnet_logits
    first = np.array([0 in ov for ov in overlaps])
    assert z.shape[0] >= 40 and np.ptp(np.quantile(z, 0.9, axis=0)) > 5  # labels really differ before
    cal = fit_calibration(z, quantile=0.9, target=0.1, k0=0)
    after = np.quantile(cal.apply(z), 0.9, axis=0)
    assert np.abs(after - _logit(0.1)).max() < 1e-3
    # with exclusions: the quantile over each label's own background windows
    exclude = np.zeros_like(z, bool)
    exclude[first, ::2] = True  # the first clip is "about" every other label
    cal = fit_calibration(z, exclude, quantile=0.9, target=0.1, k0=0)
    after = np.nanquantile(np.where(exclude, np.nan, cal.apply(z)), 0.9, axis=0)
    assert np.abs(after - _logit(0.1)).max() < 1e-3
    assert (cal.n_background[::2] == z.shape[0] - first.sum()).all()


def test_few_background_windows_shrink_toward_the_expert_median(
        birdnet_logits: tuple[np.ndarray, list[list[int]]]) -> None:
    z, _ = birdnet_logits
    exclude = np.zeros_like(z, bool)
    exclude[10:, 0] = True  # label 0 keeps 10 windows
    raw = fit_calibration(z, exclude, quantile=0.9, k0=0)
    cal = fit_calibration(z, exclude, quantile=0.9, k0=5)
    m = float(np.median(raw.offset))
    t = 10 * (1 - 0.9)
    assert abs((cal.offset[0] - m) - t / (t + 5) * (raw.offset[0] - m)) < 1e-4
    many = z.shape[0] * (1 - 0.9)  # labels with every window shrink less
    assert abs((cal.offset[1] - m) - many / (many + 5) * (raw.offset[1] - m)) < 1e-4


def test_folded_onnx_equals_numpy_calibration(birdnet_bundle: Bundle, dev_clips: list[Path], tmp_path: Path) -> None:
    import onnxruntime as ort

    from edge_retrieval.pipeline.expert import load_experts

    spec = birdnet_bundle.manifest.expert("birdnet")
    (expert,) = load_experts(birdnet_bundle)
    logits, _, _ = window_logits(birdnet_bundle, dev_clips[:2], progress=False)
    cal = fit_calibration(logits["birdnet"], quantile=0.9)
    dst = tmp_path / "calibrated.onnx"
    fold_into_onnx(birdnet_bundle.path(spec.file), dst, spec.output_name, cal)
    import soundfile as sf
    import soxr

    a, sr = sf.read(str(dev_clips[0]), dtype="float32", always_2d=True)
    a = soxr.resample(a.mean(axis=1), sr, spec.sample_rate).astype(np.float32)
    n = expert.window_samples
    wins = np.stack([np.pad(a[s : s + n], (0, max(0, n - len(a[s : s + n])))) for s in range(0, max(1, len(a) - n + 1), n)][:4])
    feats = expert.features(wins)
    raw = ort.InferenceSession(str(birdnet_bundle.path(spec.file)), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    outs = [o.name for o in raw.get_outputs()]
    assert [o.name for o in new.get_outputs()] == outs  # the interface is unchanged
    r = dict(zip(outs, raw.run(outs, {spec.input_name: feats}), strict=True))
    g = dict(zip(outs, new.run(outs, {spec.input_name: feats}), strict=True))
    assert np.abs(g[spec.output_name] - cal.apply(r[spec.output_name])).max() < 1e-4
    assert np.abs(g[spec.output_name] - r[spec.output_name]).max() > 1  # it did change the logits
    for o in outs:
        if o != spec.output_name:
            assert np.array_equal(g[o], r[o])
    with pytest.raises(ExportError, match="already calibrated"):
        fold_into_onnx(dst, tmp_path / "twice.onnx", spec.output_name, cal)
    with pytest.raises(ExportError, match="no output"):
        fold_into_onnx(birdnet_bundle.path(spec.file), tmp_path / "x.onnx", "NOPE", cal)
    short = Calibration(cal.offset[:10], cal.scale[:10], cal.background_quantile[:10], cal.n_background[:10], 0.9, 0.1, 5)
    with pytest.raises(ExportError, match="labels"):
        fold_into_onnx(birdnet_bundle.path(spec.file), tmp_path / "y.onnx", spec.output_name, short)


def test_bad_matrices_are_refused() -> None:
    with pytest.raises(ExportError, match="windows"):
        fit_calibration(np.zeros((1, 5)))
    with pytest.raises(ExportError, match="exclude"):
        fit_calibration(np.zeros((10, 5)), np.zeros((10, 4), bool))
    with pytest.raises(ExportError, match="quantile"):
        fit_calibration(np.zeros((10, 5)), quantile=1.0)


def test_background_never_uses_test_or_validation_audio(tmp_path: Path) -> None:
    from edge_retrieval.export.train import read_captions, split_packages

    root = sounds_dir()
    with open(REPO / "data" / "fixture.csv", newline="", encoding="utf-8") as f:
        split = {r["clip_id"]: r["split"] for r in csv.DictReader(f)}
    clips = background_clips(REPO, root, None)
    assert all(split[c.path.stem] == "dev" for c in clips) and all(c.source == "fixture-dev" for c in clips)
    if root is not None:
        assert len(clips) > 10
    # captions: only TRAIN packages; fake a root holding one file per package to see which are taken
    caps = read_captions(REPO / "data" / "captions.csv")
    parts = split_packages(caps, 0)
    for c in caps:
        pkg, rel = c.path.split(":", 1)
        p = (tmp_path / pkg / rel.lstrip("/").replace("!", "/")).with_suffix(".wav")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    taken = background_clips(REPO, None, tmp_path)
    assert all(parts[c.path.relative_to(tmp_path).parts[0]] == "train" for c in taken)
    assert len(taken) == sum(parts[c.package] == "train" for c in caps) > 0
    assert {parts[c.package] for c in caps} >= {"train", "dev", "val"}
