"""CLAP export on a tiny random checkpoint: ONNX parity, device and text paths vs torch, int8 budget, errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.bundle import load_bundle
from edge_retrieval.errors import BundleError, EdgeRetrievalError, EncoderError, ExportError
from edge_retrieval.pipeline.expert import AudioExpert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

SR = 48_000
TEXTS = ["a dog barks twice", "chainsaw cutting wood in the forest", "thunder"]


def _windows(n: int = 4, seed: int = 7) -> np.ndarray:
    """Distinct 10 s windows at 48 kHz (not the calibration clips the export used)."""
    rng = np.random.default_rng(seed)
    t = np.arange(10 * SR) / SR
    out = []
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * (300 + 700 * i) * t) + (0.02 + 0.05 * i) * rng.standard_normal(t.size)
        x[: SR * i] *= 0.1
        out.append(x.astype(np.float32))
    return np.stack(out)


def _torch_model(checkpoint: Path):  # noqa: ANN202
    from transformers import ClapFeatureExtractor, ClapModel

    model = transformers.ClapModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
    assert isinstance(model, ClapModel)
    fe = ClapFeatureExtractor.from_pretrained(str(checkpoint))
    tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    return model, fe, tok


def _torch_audio(checkpoint: Path, windows: np.ndarray) -> np.ndarray:
    model, fe, _ = _torch_model(checkpoint)
    feats = fe(list(windows), sampling_rate=SR, truncation="rand_trunc", return_tensors="pt")["input_features"]
    with torch.no_grad():
        v = model.get_audio_features(input_features=feats).pooler_output.numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _expert(bundle_dir: Path) -> AudioExpert:
    b = load_bundle(bundle_dir, part="device")
    return AudioExpert(b, b.manifest.expert("clap"))


# --------------------------------------------------------------------------- fp32


def test_fp32_bundle_manifest_and_parity(tiny_clap_bundle: Path) -> None:
    b = load_bundle(tiny_clap_bundle, part="all")
    m = b.manifest
    assert m.space.kind == "joint"
    e = m.expert("clap")
    assert (e.precision, e.output_kind, e.dim, e.sample_rate, e.window_s) == ("fp32", "embedding", 32, SR, 10.0)
    assert e.frontend.kind == "clap_logmel" and e.frontend.params["truncation"] == "rand_trunc"
    assert e.parity["audio_onnx_fp32_vs_torch"]["min_cosine"] >= 0.9999
    assert e.parity["text_onnx_vs_torch"]["min_cosine"] >= 0.9999
    assert m.files["text/clap_text.onnx"].part == "server" and m.files["clap/audio.onnx"].part == "device"
    assert "centre" in m.notes["crop"]
    assert m.licence == "apache-2.0"


def test_device_path_equals_torch(tiny_clap_bundle: Path, tiny_clap_checkpoint: Path) -> None:
    """Raw 48 kHz windows -> numpy log-mel -> onnxruntime == torch on ClapFeatureExtractor features."""
    w = _windows()
    got = _expert(tiny_clap_bundle).embed(w)
    ref = _torch_audio(tiny_clap_checkpoint, w)
    assert got.shape == ref.shape == (len(w), 32)
    assert _cos(got, ref).min() >= 0.9999
    assert np.abs(got - ref).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_path_equals_torch(tiny_clap_bundle: Path, tiny_clap_checkpoint: Path) -> None:
    """QueryBuilder (tokenizers + onnxruntime, no torch) == torch get_text_features, normalised."""
    from edge_retrieval.text import QueryBuilder

    qb = QueryBuilder(load_bundle(tiny_clap_bundle, part="all"))
    model, _, tok = _torch_model(tiny_clap_checkpoint)
    for text in TEXTS:
        (res,) = qb.resolve(text)
        v = res.vector.dense(32)
        assert res.vector.encoding == "f16" and res.top == [] and res.fit == 1.0
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            ref = model.get_text_features(**enc).pooler_output.numpy()[0]
        ref = ref / np.linalg.norm(ref)
        assert np.abs(v - ref).max() < 2e-3  # f16 on the wire
        assert float(v @ ref) / float(np.linalg.norm(v)) >= 0.9999
    msg, _ = qb.build("a dog barks", "dog", threshold=0.2)
    assert msg.space_id == load_bundle(tiny_clap_bundle).manifest.space.id
    with pytest.raises(EdgeRetrievalError, match="empty"):
        qb.resolve("   ")


# --------------------------------------------------------------------------- int8


def test_int8_bundle_meets_budget_and_shares_space(tiny_clap_bundle_int8: Path, tiny_clap_bundle: Path, tiny_clap_checkpoint: Path) -> None:
    m8 = load_bundle(tiny_clap_bundle_int8, part="all").manifest
    m32 = load_bundle(tiny_clap_bundle).manifest
    assert m8.space.id == m32.space.id  # precision must not change the space id
    e = m8.expert("clap")
    q = e.quantization
    assert q is not None and q["budget_met"] is True
    assert e.precision in ("int8", "mixed")
    assert q["achieved"]["min_cosine"] >= 0.99 and q["achieved"]["nn_identity"] == 1.0
    assert q["size_int8_bytes"] < q["size_fp32_bytes"]
    assert q["latency_ms_fp32"] > 0 and q["latency_ms_int8"] > 0 and q["latency_ratio"] > 0
    assert isinstance(q["blocks_fp32"], list)
    assert q["calibration"]["kind"] in ("synthetic", "fixture recordings")
    par = e.parity["int8_vs_torch"]
    assert par["min_cosine"] >= 0.99 and par["nn_identity"] == 1.0
    assert m8.files["clap/audio.onnx"].bytes < m32.files["clap/audio.onnx"].bytes
    # the device path on unseen audio stays within the budget too
    w = _windows(seed=11)
    got = _expert(tiny_clap_bundle_int8).embed(w)
    ref = _torch_audio(tiny_clap_checkpoint, w)
    assert _cos(got, ref).min() >= 0.99


def test_space_id_follows_weights(tiny_clap_checkpoint: Path) -> None:
    from edge_retrieval.export.clap import state_dict_digest

    from tests.fixtures_clap import tiny_clap_config

    model, _, _ = _torch_model(tiny_clap_checkpoint)
    torch.manual_seed(1)
    other = transformers.ClapModel(tiny_clap_config()).eval()
    assert state_dict_digest(model) == state_dict_digest(model)
    assert state_dict_digest(model) != state_dict_digest(other)


def test_legacy_opset_export_loads(tiny_clap_checkpoint: Path, tiny_clap_bundle: Path, tmp_path: Path, clap_sensitivity_cache: Path) -> None:
    import onnx
    from edge_retrieval.export.clap import export_clap

    out = export_clap(str(tiny_clap_checkpoint), tmp_path / "legacy", "int8", legacy_opset=True, cache_dir=clap_sensitivity_cache, quiet=True)
    b = load_bundle(out, part="all")
    e = b.manifest.expert("clap")
    assert b.manifest.space.id == load_bundle(tiny_clap_bundle).manifest.space.id
    for rel in ("clap/audio.onnx", "text/clap_text.onnx"):
        m = onnx.load(str(out / rel))
        assert m.ir_version <= 8, rel  # onnxruntime < 1.17 rejects IR 10
        opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
        assert opsets.get("ai.onnx") == 17, opsets
        used = {n.domain or "ai.onnx" for n in m.graph.node}
        assert set(opsets) <= used | {"ai.onnx"}, (opsets, used)  # no unused opset imports
    ops = {n.op_type for n in onnx.load(str(out / "clap/audio.onnx")).graph.node}
    if e.quantization and e.quantization["budget_met"]:
        assert "MatMulInteger" in ops and "ConvInteger" not in ops  # ORT 1.16 has no int8 ConvInteger
    w = _windows(2)
    assert _cos(_expert(out).embed(w), _torch_audio(tiny_clap_checkpoint, w)).min() >= 0.99


# --------------------------------------------------------------------------- budget logic


def _fp32_inputs(bundle_dir: Path) -> tuple[Path, np.ndarray]:
    from edge_retrieval.export.clap import synthetic_clips

    ex = _expert(bundle_dir)
    clips = np.stack(synthetic_clips(SR, 10.0, n=8, seed=3))
    return bundle_dir / "clap/audio.onnx", ex.features(clips)


def test_impossible_budget_ships_nothing_and_caches_sensitivity(tiny_clap_bundle: Path, tmp_path: Path) -> None:
    from edge_retrieval.export.quantize import Budget, quantize_under_budget

    src, feats = _fp32_inputs(tiny_clap_bundle)
    cache = tmp_path / "cache"
    out = tmp_path / "q.onnx"
    rep = quantize_under_budget(src, out, feats, "audio_embeds", Budget(min_cosine=1.5), cache_dir=cache, progress=False, latency_rounds=2)
    assert rep["budget_met"] is False and rep["shipped"] == "fp32" and "no int8 variant" in rep["reason"]
    assert not out.exists()
    cache_file = Path(rep["sensitivity_cache"])
    assert cache_file.is_file() and cache_file.parent == cache
    blocks = json.loads(cache_file.read_text())["blocks"]
    assert len(blocks) == rep["blocks"] >= 2
    # the cached ranking is used as is: rewrite it in reverse order and see the report follow
    data = json.loads(cache_file.read_text())
    names = list(data["blocks"])[::-1]
    data["blocks"] = {n: {**data["blocks"][n], "damage": float(len(names) - i)} for i, n in enumerate(names)}
    cache_file.write_text(json.dumps(data))
    rep2 = quantize_under_budget(src, out, feats, "audio_embeds", Budget(min_cosine=1.5), cache_dir=cache, progress=False)
    assert list(rep2["sensitivity"]) == names


def test_tight_budget_keeps_blocks_fp32_and_holds(tiny_clap_bundle: Path, tmp_path: Path) -> None:
    from edge_retrieval.export.quantize import Budget, embedding_metrics, quantize_under_budget, run_model

    src, feats = _fp32_inputs(tiny_clap_bundle)
    loose = quantize_under_budget(src, tmp_path / "a.onnx", feats, "audio_embeds", cache_dir=tmp_path, progress=False, latency_rounds=2)
    assert loose["budget_met"] and loose["blocks_fp32"] == [] and loose["shipped"] == "int8"
    tight_cos = (loose["achieved"]["min_cosine"] + 1.0) / 2  # stricter than the whole graph in int8 reaches
    rep = quantize_under_budget(src, tmp_path / "b.onnx", feats, "audio_embeds", Budget(min_cosine=tight_cos), cache_dir=tmp_path, progress=False, latency_rounds=2)
    assert "sensitivity" in rep  # the whole graph missed the tighter budget, so blocks were ranked
    if rep["budget_met"]:
        assert rep["sensitivity_searched"] and rep["blocks_fp32"] and rep["shipped"] == "mixed"
        again = embedding_metrics(run_model(src, feats, "audio_embeds"), run_model(tmp_path / "b.onnx", feats, "audio_embeds"))
        assert again["min_cosine"] >= tight_cos and again["nn_identity"] == 1.0
        assert rep["size_int8_bytes"] > loose["size_int8_bytes"]
    else:
        assert not (tmp_path / "b.onnx").exists()


def test_labels_budget(tiny_clap_bundle: Path, tmp_path: Path) -> None:
    """The labels metric (top-5 overlap) on the same graph, as the BirdNET export would use it."""
    from edge_retrieval.export.quantize import Budget, quantize_under_budget, topk_metrics

    src, feats = _fp32_inputs(tiny_clap_bundle)
    rep = quantize_under_budget(src, tmp_path / "l.onnx", feats, "audio_embeds", Budget(metric="labels"), cache_dir=tmp_path, progress=False, latency_rounds=2)
    assert "mean_topk_overlap" in rep["achieved"]
    assert rep["budget_met"] == (rep["achieved"]["mean_topk_overlap"] >= 4.75)
    ref = np.array([[5, 4, 3, 2, 1, 0, -1.0]])
    assert topk_metrics(ref, ref)["mean_topk_overlap"] == 5
    assert topk_metrics(ref, ref[:, ::-1].copy())["mean_topk_overlap"] == 3  # 7 labels: top-5 sets share 3


def test_nn_identity_catches_swapped_vectors() -> None:
    from edge_retrieval.export.quantize import Budget, embedding_metrics, evaluate

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 16)) + 10.0  # all alike, as random-weight models make them
    got = ref[[1, 0, 2, 3]]
    assert embedding_metrics(ref, got)["min_cosine"] > 0.95
    assert embedding_metrics(ref, got)["nn_identity"] == 0.5
    assert not evaluate(ref, got, Budget(min_cosine=0.9)).met
    assert evaluate(ref, ref, Budget(min_cosine=0.9)).met


# --------------------------------------------------------------------------- errors


def test_corrupt_onnx_is_one_line(tiny_clap_bundle: Path, tmp_path: Path) -> None:
    from edge_retrieval.export.quantize import quantize_under_budget

    from edge_retrieval.bundle import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_clap_bundle, bad)
    onnx_path = bad / "clap/audio.onnx"
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="checksum of 'clap/audio.onnx'") as ei:
        load_bundle(bad)
    assert "\n" not in str(ei.value)
    # checksum made to agree: onnxruntime itself must refuse, in one line naming the file
    man = json.loads((bad / "manifest.json").read_text())
    man["files"]["clap/audio.onnx"]["sha256"] = sha256_file(onnx_path)
    man["files"]["clap/audio.onnx"]["bytes"] = onnx_path.stat().st_size
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EncoderError, match="audio.onnx") as ei:
        _expert(bad)
    assert "\n" not in str(ei.value)
    with pytest.raises(ExportError, match="audio.onnx") as ei:
        quantize_under_budget(onnx_path, tmp_path / "q.onnx", np.zeros((2, 1, 1001, 64), np.float32), "audio_embeds", progress=False)
    assert "\n" not in str(ei.value)


def test_existing_output_dir_is_refused(tiny_clap_checkpoint: Path, tmp_path: Path) -> None:
    from edge_retrieval.export.clap import export_clap

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeRetrievalError, match="already exists"):
        export_clap(str(tiny_clap_checkpoint), out, "fp32", quiet=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_unknown_checkpoint_is_one_line(tmp_path: Path) -> None:
    from edge_retrieval.export.clap import export_clap

    with pytest.raises(ExportError, match="no-such-org/no-such-clap") as ei:
        export_clap("no-such-org/no-such-clap", tmp_path / "out", "fp32", quiet=True)
    assert "\n" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_not_a_clap_checkpoint(tmp_path: Path) -> None:
    from edge_retrieval.export.clap import export_clap

    ck = tmp_path / "bert"
    transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(ck)
    with pytest.raises(ExportError, match="'bert' model, expected 'clap'"):
        export_clap(str(ck), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("edge_retrieval.export.cli") is None, reason="export CLI not present yet")
def test_cli_errors_are_one_line(tiny_clap_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_retrieval.cli import main

    rc = main(["export", "clap", "--quiet", "--checkpoint", "no-such-org/no-such-clap", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "no-such-org/no-such-clap" in err[0], err
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    rc = main(["export", "clap", "--checkpoint", str(tiny_clap_checkpoint), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line]
    assert rc != 0 and len(errors) == 1 and "already exists" in errors[0], err
    assert not any("Traceback" in line for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.skipif(importlib.util.find_spec("edge_retrieval.export.cli") is None, reason="export CLI not present yet")
def test_cli_int8_impossible_budget_ships_fp32(tiny_clap_checkpoint: Path, tmp_path: Path) -> None:
    from edge_retrieval.cli import main

    out = tmp_path / "b"
    rc = main(["export", "clap", "--checkpoint", str(tiny_clap_checkpoint), "--out", str(out), "--precision", "int8",
               "--min-cosine", "1.5", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    m = load_bundle(out, part="all").manifest
    e = m.expert("clap")
    assert e.precision == "fp32" and e.quantization["budget_met"] is False
    assert "no saving met the budget" in m.notes["int8"]
