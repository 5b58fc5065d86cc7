"""``edge-retrieval train`` code path on a small subset (the real training data is not needed).

Clips are synthetic recordings written here (tones, hums, noise bursts, chirps in 6 "packages");
the experts (aisfx ONNX, MiniLM ONNX) are the real ones. Without a base BirdNET bundle the
trainer keeps the aisfx expert; the mixture, gate and bundle code are the same.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from edge_retrieval.cli import main as cli

pytest.importorskip("torch")
pytest.importorskip("aisfx")

pytestmark = pytest.mark.slow

KINDS = {
    "high beep": lambda t, r: np.sin(2 * np.pi * 3000 * t),
    "low hum": lambda t, r: np.sin(2 * np.pi * 120 * t),
    "white noise burst": lambda t, r: r.standard_normal(t.size),
    "rising chirp": lambda t, r: np.sin(2 * np.pi * (200 + 3000 * t) * t),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import soundfile as sf

    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    rows = []
    for p in range(6):
        for cap, fn in KINDS.items():
            for r in range(2):
                rel = f"sounds/{cap.replace(' ', '_')}_{r}.wav"
                t = np.arange(int(rng.uniform(0.5, 4.0) * 22050)) / 22050
                x = 0.3 * rng.uniform(0.3, 1) * fn(t, rng) + 0.01 * rng.standard_normal(t.size)
                (root / f"pkg{p}" / "sounds").mkdir(parents=True, exist_ok=True)
                sf.write(root / f"pkg{p}" / rel, x.astype(np.float32), 22050)
                rows.append((f"pkg{p}:{rel}", cap, f"pkg{p}", "CC0-1.0"))
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "package", "licence"])
        w.writerows(rows)
    return root


def _train(dataset: Path, out: Path, seed: int, cache: Path) -> int:
    return cli(["train", "--data", str(dataset / "captions.csv"), "--out", str(out), "--audio-root", str(dataset),
                "--cache", str(cache), "--subset", "40", "--epochs", "2", "--seed", str(seed)])


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("train")
    cache = work / "cache"
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _train(dataset, work / name, seed, cache) == 0
        out[name] = work / name
    return out


def test_bundle_loads_on_device_path(trained: dict[str, Path]) -> None:
    from edge_retrieval import load_bundle
    from edge_retrieval.pipeline.expert import load_experts

    b = load_bundle(trained["a"], part="device")
    assert b.manifest.space.kind == "ensemble"
    (exp,) = load_experts(b)
    assert exp.spec.projection_file and exp.projection is not None
    rng = np.random.default_rng(1)
    v = exp.embed(0.1 * rng.standard_normal((2, exp.window_samples)).astype(np.float32))
    assert v.shape == (2, exp.dim)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    recipe = json.loads((trained["a"] / "moee" / "recipe.json").read_text())
    assert recipe["seed"] == 0 and recipe["subset"] == 40 and len(recipe["data_sha256"]) == 64
    assert sum(recipe["clips"][k] for k in ("train", "dev", "val")) == 40
    assert not set(recipe["packages"]["train"]) & set(recipe["packages"]["val"])


def test_text_side_gives_vector_per_expert_and_gates(trained: dict[str, Path]) -> None:
    from edge_retrieval import load_bundle
    from edge_retrieval.text import QueryBuilder

    b = load_bundle(trained["a"], part="all")
    qb = QueryBuilder(b)
    msg, res = qb.build("a high pitched beep", "q1", threshold=0.3)
    assert [v.expert for v in msg.vectors] == b.manifest.expert_names
    assert abs(sum(msg.weights) - 1.0) < 1e-6
    assert all("gate" in r.extra for r in res)
    v = msg.vectors[0].dense(b.manifest.expert_names and b.manifest.device.experts[0].dim)
    assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-4


def test_retrieval_prefers_matching_caption(trained: dict[str, Path], dataset: Path) -> None:
    """Scored like the device: the beep clip scores higher for 'high beep' than for 'low hum'."""
    from edge_retrieval import load_bundle
    from edge_retrieval.offline.retrieval import FileEmbedder, clip_scores, query_matrix, text_queries

    b = load_bundle(trained["a"], part="all")
    qs = text_queries(b, ["high beep", "low hum"])
    mats = {e: query_matrix(qs, e) for e in b.manifest.expert_names}
    s = clip_scores(FileEmbedder(b).embed_file(dataset / "pkg0" / "sounds" / "high_beep_0.wav"), mats)
    assert s[0] > s[1]


def test_same_seed_same_projections(trained: dict[str, Path]) -> None:
    def arrays(p: Path) -> dict[str, np.ndarray]:
        out = {}
        for f in sorted((p / "moee").glob("*.npz")):
            with np.load(f) as z:
                out.update({f"{f.name}:{k}": z[k] for k in z.files if z[k].dtype.kind == "f"})
        return out

    a, b, c = arrays(trained["a"]), arrays(trained["b"]), arrays(trained["c"])
    assert a.keys() == b.keys() and a
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if "captions" not in k)


def test_bad_csv_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\nx.wav,beep\n")
    assert cli(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing column" in err[0] and "package" in err[0]


def test_caption_class_drops_only_the_spoken_item() -> None:
    from edge_retrieval.export.train import caption_class, is_speech_class

    assert caption_class("a voice saying the syllable 'dam' in Malayalam") == "a voice saying the syllable in malayalam"
    assert caption_class("a voice saying the letter C in English") == "a voice saying the letter in english"
    assert caption_class("a voice saying a word in Russian (snowflake)") == "a voice saying a word in russian"
    assert caption_class("a woman saying the number 5") == "a woman saying the number"
    assert caption_class("Helicopter engine, heard from outside") == "helicopter engine heard from outside"
    assert is_speech_class(caption_class("a woman speaking a recorded telephone message (goodbye)"))
    assert not is_speech_class(caption_class("small explosion"))


def test_experts_on_one_file_share_one_run(trained: dict[str, Path], tmp_path: Path) -> None:
    """Two experts on one ONNX file (as BirdNET labels + embedding): one session run per batch,
    the same vectors as each expert alone."""
    from edge_retrieval import load_bundle
    from edge_retrieval.bundle import BundleWriter
    from edge_retrieval.pipeline.expert import AudioExpert, load_experts

    a = load_bundle(trained["a"], part="device")
    spec = a.manifest.device.experts[0]
    raw = spec.model_dump(mode="json")
    raw.update(name="raw", projection_file=None, dim=512)
    with BundleWriter(tmp_path / "two", overwrite=True) as w:
        for rel, entry in a.manifest.files.items():
            w.add_file(a.path(rel), rel, part=entry.part)
        b = w.commit({"name": "two", "licence": a.manifest.licence, "space": {"kind": "joint", "id": "0" * 64},
                      "device": {"experts": [spec.model_dump(mode="json"), raw], "hop_s": 1.0}})
    experts = load_experts(b)
    runs = []
    sess = experts[0].encoder.run.fn.session  # type: ignore[union-attr]
    real_run = sess.run
    sess.run = lambda names, feeds: runs.append(names) or real_run(names, feeds)  # count, then run
    rng = np.random.default_rng(3)
    x = (0.1 * rng.standard_normal((2, experts[0].window_samples))).astype(np.float32)
    got = [e.embed(x.copy()) for e in experts]
    assert len(runs) == 1
    for e, g in zip(experts, got, strict=True):
        np.testing.assert_array_equal(g, AudioExpert(b, e.spec).embed(x.copy()))
    assert got[0].shape == (2, spec.dim) and got[1].shape == (2, 512)
    experts[0].embed(x + 0.01)  # new input: runs again
    assert len(runs) == 2


COMMITTED_WEIGHTS = Path(__file__).resolve().parent.parent / "export" / "data" / "moee"


def test_committed_weights_build_on_the_base_bundle(birdnet_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """`train --from-weights` on the default bundle: the bridge expert follows the base's labels
    (whatever their count), the projections keep the recipe's dim, device and server paths agree."""
    from edge_retrieval import load_bundle
    from edge_retrieval.pipeline.expert import AudioExpert, load_experts
    from edge_retrieval.text import QueryBuilder

    if not (COMMITTED_WEIGHTS / "recipe.json").is_file():
        pytest.skip(f"{COMMITTED_WEIGHTS} has no committed weights")
    dim = json.loads((COMMITTED_WEIGHTS / "recipe.json").read_text())["config"]["dim"]
    base = birdnet_bundle
    n_labels = len(base.labels("birdnet"))
    args = ["train", "--from-weights", str(COMMITTED_WEIGHTS), "--base", str(base.root)]
    assert cli([*args, "--out", str(tmp_path / "ens")]) == 0
    b = load_bundle(tmp_path / "ens", part="all")
    assert b.manifest.space.kind == "ensemble" and b.manifest.space.id != base.manifest.space.id
    assert {e.name: e.dim for e in b.manifest.device.experts} == {"birdnet": n_labels, "birdnet_emb": dim, "aisfx": dim}
    assert b.labels("birdnet") == base.labels("birdnet")
    assert b.manifest.notes["base"]["space_id"] == base.manifest.space.id
    # the same weights on the same base: the same space id
    assert cli([*args, "--out", str(tmp_path / "ens2")]) == 0
    assert load_bundle(tmp_path / "ens2").manifest.space.id == b.manifest.space.id

    # device path: birdnet_emb is the base's 1024-d embedding through the committed projection
    experts = {e.name: e for e in load_experts(b)}
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((2, experts["birdnet"].window_samples))).astype(np.float32)
    assert experts["birdnet"].embed(x).shape == (2, n_labels)
    emb = experts["birdnet_emb"].embed(x)
    bspec = base.manifest.expert("birdnet")
    emb_out = next(k for k, d in bspec.extra_outputs.items() if d == 1024)
    _, (raw,) = AudioExpert(base, bspec, extra_outputs=[emb_out]).embed(x, with_extra=True)
    with np.load(COMMITTED_WEIGHTS / "proj_birdnet_emb.npz") as z:
        ref = raw @ z["W"] + z["b"]
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    xa = (0.1 * rng.standard_normal((2, experts["aisfx"].window_samples))).astype(np.float32)
    assert experts["aisfx"].embed(xa).shape == (2, dim)

    # server path: one vector per expert, the bridge's label indices inside the base's label range
    msg, res = QueryBuilder(b).build("a bird singing", "q1", threshold=0.3)
    assert [v.expert for v in msg.vectors] == b.manifest.expert_names
    assert all("gate" in r.extra for r in res) and abs(sum(msg.weights) - 1.0) < 1e-6
    bridge = msg.vectors[0].dense(n_labels)
    assert bridge.shape == (n_labels,) and bridge.sum() > 0
    assert base.labels("birdnet")[int(np.argmax(bridge))].split("_", 1)[-1] == res[0].top[0][0]  # "Sci_Common"
    for v in msg.vectors[1:]:
        assert abs(float(np.linalg.norm(v.dense(dim))) - 1.0) < 1e-4


def test_from_weights_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "w"
    bad.mkdir()
    (bad / "recipe.json").write_text(json.dumps({"config": {"dim": 8}}))
    np.savez(bad / "text.npz", experts=np.asarray(["aisfx"]), text_W_aisfx=np.zeros((384, 8)), text_b_aisfx=np.zeros(8),
             captions=np.zeros((1, 384)))
    np.savez(bad / "proj_aisfx.npz", W=np.zeros((1024, 8)), b=np.zeros(8))  # aisfx is 512-d
    cases = [
        (["--from-weights", str(tmp_path / "none")], "does not exist"),
        (["--from-weights", str(bad)], "expected [512, 8]"),
        (["--from-weights", str(COMMITTED_WEIGHTS)], "pass --base"),
        ([], "--from-weights"),
    ]
    for extra, want in cases:
        assert cli(["train", "--out", str(tmp_path / "o"), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.xfail(strict=False, reason="70 % target: measured 9/12 when committed (issue 7); 8/12 since the fixture "
                   "gained a chainsaw category and simutrans power tools (issue 11), which compete for the fixed "
                   "queries ('a car engine running' now finds a chainsaw); 8/12 too since search ranks by cosine")
def test_committed_ensemble_on_held_out_fixture_clips(birdnet_bundle, tmp_path: Path) -> None:  # noqa: ANN001
    """Archive top-1 of the archive test's fixed queries with the committed mixture, over the fixture
    clips that were NOT training or dev clips of the weights (recipe packages x data/captions.csv).
    Measured 9/12 (BirdNET bundle alone 7/12 on the same clips; 11/12 vs 8/12 on all 138, leaky)."""
    import csv
    import shutil

    from edge_retrieval import load_bundle
    from edge_retrieval.offline.archive import ArchiveIndex, index_folder
    from edge_retrieval.offline.retrieval import text_queries
    from tests.test_archive_fixture import FIXED_QUERIES, FIXTURE_LIST, sounds_dir

    repo = COMMITTED_WEIGHTS.parent.parent.parent
    recipe = json.loads((COMMITTED_WEIGHTS / "recipe.json").read_text())
    split = {p: s for s, ps in recipe["packages"].items() for p in ps}
    with open(repo / "data" / "captions.csv", newline="", encoding="utf-8") as f:
        seen = {r["path"] for r in csv.DictReader(f) if split.get(r["package"]) in ("train", "dev")}
    with open(FIXTURE_LIST, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if f"{r['package']}:{r['path_in_package']}" not in seen]
    root = tmp_path / "archive"
    for r in rows:
        p = sounds_dir() / r["category"] / f"{r['clip_id']}.wav"
        if p.is_file():
            (root / r["category"]).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, root / r["category"] / p.name)
    cats = [c for c in FIXED_QUERIES if (root / c).is_dir()]
    if len(cats) < len(FIXED_QUERIES):
        pytest.skip(f"fixture clips missing under {sounds_dir()} (run scripts/fetch_sounds.py --list data/fixture.csv)")
    assert cli(["train", "--from-weights", str(COMMITTED_WEIGHTS), "--base", str(birdnet_bundle.root),
                "--out", str(tmp_path / "ens")]) == 0
    b = load_bundle(tmp_path / "ens", part="all")
    with ArchiveIndex(tmp_path / "idx", create=True) as index:
        report = index_folder(root, b, index)
        assert not report.failed
        results = [(c, Path(index.search(q, top=1)[0].path).parent.name)
                   for c, q in zip(cats, text_queries(b, [FIXED_QUERIES[c] for c in cats]), strict=True)]
    right = sum(c == got for c, got in results) / len(results)
    assert right >= 0.7, results


def test_yamnet_embedding_as_an_expert(dataset: Path, yamnet_bundle, tmp_path: Path,  # noqa: ANN001
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11's fourth expert: YAMNet's 1024-d embedding (the yamnet expert's extra output of
    --yamnet) trained on a 40-clip subset; the device path applies the saved projection to that
    output, and --from-weights rebuilds the same space (and names --yamnet when it is missing)."""
    from edge_retrieval import load_bundle
    from edge_retrieval.pipeline.expert import AudioExpert, load_experts

    out, weights = tmp_path / "ens", tmp_path / "w"
    assert cli(["train", "--data", str(dataset / "captions.csv"), "--out", str(out), "--audio-root", str(dataset),
                "--cache", str(tmp_path / "cache"), "--subset", "40", "--epochs", "2", "--experts", "aisfx,yamnet_emb",
                "--yamnet", str(yamnet_bundle.root), "--weights-out", str(weights)]) == 0
    b = load_bundle(out, part="all")
    experts = {e.name: e for e in load_experts(b)}
    assert set(experts) == {"aisfx", "yamnet_emb"}
    ye = experts["yamnet_emb"]
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((2, ye.window_samples))).astype(np.float32)
    yspec = yamnet_bundle.manifest.expert("yamnet")
    _, (raw,) = AudioExpert(yamnet_bundle, yspec, extra_outputs=["EMBEDDING"]).embed(x, with_extra=True)
    with np.load(weights / "proj_yamnet_emb.npz") as z:
        assert z["W"].shape[0] == 1024
        ref = raw @ z["W"] + z["b"]
    np.testing.assert_allclose(ye.embed(x), ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)

    assert cli(["train", "--from-weights", str(weights), "--yamnet", str(yamnet_bundle.root),
                "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "ens2")]) == 0
    assert load_bundle(tmp_path / "ens2").manifest.space.id == b.manifest.space.id
    capsys.readouterr()
    assert cli(["train", "--from-weights", str(weights), "--out", str(tmp_path / "ens3")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--yamnet" in err[0], err
    assert not (tmp_path / "ens3").exists()
