"""``edge-retrieval run`` / ``explain`` from the command line: results, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_retrieval.cli import main
from edge_retrieval.protocol import parse_event
from tests.fixtures_audio import write_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    return write_scene(
        tmp_path_factory.mktemp("cli") / "scene.wav",
        [("noise", 6), ("1000", 3), ("noise", 5), ("3000", 2), ("noise", 4)],
        32000,
        channels=2,
    )


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_json_lines(capsys, tiny_bundle, scene) -> None:
    rc, out, err = run_cli(
        capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene),
        "--query", "beep", "--query", "whistle sound", "--threshold", "0.5", "--json", "--cooldown", "0",
    )
    assert rc == 0, err
    events = [parse_event(line) for line in out.splitlines()]
    assert sorted((e.query, e.start_s, e.end_s) for e in events) == [("beep", 6.0, 9.0), ("whistle sound", 14.0, 16.0)]
    assert "summary:" in err and "windows 20" in err and "events 2" in err and "RTF" in err


def test_run_table_and_queries_files(capsys, tiny_bundle, scene, tmp_path) -> None:
    toml = tmp_path / "q.toml"
    toml.write_text('[[queries]]\ntext = "beep"\nthreshold = 0.6\nid = "b"\npolicy = { cooldown_s = 0 }\n')
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene),
                           "--queries-file", str(toml))
    assert rc == 0, err
    assert "start" in out.splitlines()[0] and "0:00:06.0" in out and "beep" in out
    jl = tmp_path / "q.jsonl"
    jl.write_text(json.dumps({"text": "chirp"}) + "\n" + json.dumps({"text": "whistle", "threshold": 0.4}) + "\n")
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene),
                           "--queries-file", str(jl), "--json")
    assert rc == 0, err
    assert [json.loads(line)["query"] for line in out.splitlines()] == ["whistle"]


def test_run_warns_on_a_badly_resolved_query(capsys, tiny_bundle, scene) -> None:
    rc, _, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene),
                         "--query", "thunderstorm", "--json")
    assert rc == 0
    assert "warning: query 'thunderstorm'" in err and "matches no label" in err


def test_run_query_audio(capsys, tiny_bundle, scene, tmp_path) -> None:
    ex = write_scene(tmp_path / "ex.flac", [("3000", 1.5)], 24000)
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene),
                           "--query-audio", str(ex), "--threshold", "0.4", "--json")
    assert rc == 0, err
    ev = [parse_event(line) for line in out.splitlines()]
    assert [(e.query_id, e.start_s, e.end_s) for e in ev] == [("like-ex", 14.0, 16.0)]


def _one_line_error(rc: int, out: str, err: str, *needles: str) -> None:
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("edge-retrieval run: error:") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("kind, needle", [
    ("missing", "does not exist"), ("corrupt", "cannot decode"), ("empty", "is empty"), ("zero", "cannot decode"),
])
def test_bad_audio_is_one_line(capsys, tiny_bundle, bad_files, tmp_path, kind: str, needle: str) -> None:
    path = tmp_path / "missing.wav" if kind == "missing" else bad_files[kind]
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(path), "--query", "beep")
    _one_line_error(rc, out, err, needle, path.name)


@pytest.mark.parametrize("args, needle", [
    (["--query", ""], "query text is empty"),
    (["--query", "   "], "query text is empty"),
    (["--query", "beep", "--threshold", "1.5"], "threshold 1.5"),
    (["--query", "beep", "--threshold", "-0.2"], "threshold -0.2"),
    (["--query", "a", "--query", "b", "--query", "c", "--threshold", "0.1", "--threshold", "0.2"], "--threshold"),
    ([], "no queries"),
    (["--query", "beep", "--gate-dbfs", "loud"], "--gate-dbfs"),
    (["--query", "beep", "--overlap", "0.99"], "--overlap"),
    (["--query", "beep", "--min-hits", "3", "--of-windows", "2"], "min_hits"),
])
def test_bad_arguments_are_one_line(capsys, tiny_bundle, scene, args: list[str], needle: str) -> None:
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(scene), *args)
    _one_line_error(rc, out, err, needle)


def test_checksum_failure_is_one_line(capsys, tiny_bundle, scene, tmp_path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.root, bad)
    onnx_file = bad / "tones.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    rc, out, err = run_cli(capsys, "run", "--bundle", str(bad), "--source", str(scene), "--query", "beep")
    _one_line_error(rc, out, err, "checksum", "tones.onnx")


def test_missing_bundle_is_one_line(capsys, scene, tmp_path) -> None:
    rc, out, err = run_cli(capsys, "run", "--bundle", str(tmp_path / "nope"), "--source", str(scene), "--query", "x")
    _one_line_error(rc, out, err, "nope")


def test_explain(capsys, tiny_bundle) -> None:
    rc = main(["explain", "a high whistle", "--bundle", str(tiny_bundle.root), "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    data = json.loads(out)
    assert data["experts"][0]["top"][0][0] == "whistle" and data["experts"][0]["warning"] is None
    rc = main(["explain", "rain", "--bundle", str(tiny_bundle.root)])
    out, _ = capsys.readouterr()
    assert rc == 0 and "warning:" in out and "fit 0.000" in out
    rc = main(["explain", "", "--bundle", str(tiny_bundle.root)])
    _, err = capsys.readouterr()
    assert rc == 1 and "empty" in err
