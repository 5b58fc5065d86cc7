"""Bundle manifest contract on the real default bundle: checksums, parts, verify and slim."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_retrieval.bundle import MANIFEST_NAME, Bundle, load_bundle, sha256_file
from edge_retrieval.cli import main as cli_main
from edge_retrieval.errors import BundleError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def slim(birdnet_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slim") / "device"
    assert cli_main(["bundle", "slim", str(birdnet_bundle.root), str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(capsys: pytest.CaptureFixture[str], cmd: str = "bundle") -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(f"edge-retrieval {cmd}: error:"), err
    return err[0]


def test_verify_prints_summary_and_json(birdnet_bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bundle", "verify", str(birdnet_bundle.root)]) == 0
    text = capsys.readouterr().out
    n = birdnet_bundle.manifest.expert("birdnet").dim  # 6,522 labels + the group outputs
    assert "OK" in text and "CC-BY-NC-SA-4.0" in text and f"logits[{n}]" in text and "'Dog'" in text
    assert cli_main(["bundle", "verify", str(birdnet_bundle.root), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["space_kind"] == "labels" and s["space_id"] == birdnet_bundle.manifest.space.id
    assert s["server_part"] is True and s["text"] == ["label_bridge"]
    assert s["checks"]["experts"][0]["output"] == [1, n] and n > 6522
    assert s["checks"]["text"][0]["top"] == "Dog"
    assert s["experts"][0]["parity"]["top1_agreement"] >= 0.99


def test_slim_keeps_device_part_only(birdnet_bundle: Bundle, slim: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = load_bundle(slim, part="all")
    assert b.manifest.server is None and not b.has_server_part
    full = birdnet_bundle.manifest.files
    assert set(b.manifest.files) == {k for k, v in full.items() if v.part == "device"}
    on_disk = {str(p.relative_to(slim)) for p in slim.rglob("*") if p.is_file()}
    assert on_disk == set(b.manifest.files) | {MANIFEST_NAME}
    assert not (slim / "text").exists() and not any("label_index" in p for p in on_disk)
    assert b.manifest.space.id == birdnet_bundle.manifest.space.id
    with pytest.raises(BundleError, match="slim device bundle"):
        b.require_server()
    assert cli_main(["bundle", "verify", str(slim), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["server_part"] is False and s["checks"]["text"] == []


def test_checksum_failure_is_one_line(slim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _copy(slim, tmp_path / "b")
    with open(b / "birdnet" / "labels.txt", "ab") as f:
        f.write(b"\nExtra_Extra")
    assert cli_main(["bundle", "verify", str(b)]) == 1
    line = _one_line(capsys)
    assert "checksum of 'birdnet/labels.txt'" in line and "corrupt or modified" in line


def test_missing_file_is_one_line(slim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _copy(slim, tmp_path / "b")
    (b / "birdnet" / "frontend.npz").unlink()
    assert cli_main(["bundle", "verify", str(b)]) == 1
    assert "file 'birdnet/frontend.npz' is missing" in _one_line(capsys)


def test_corrupt_onnx_is_one_line(slim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _copy(slim, tmp_path / "b")
    onnx = b / "birdnet" / "backbone_fp32.onnx"
    onnx.write_bytes(b"\x08\x07garbage, not a protobuf" * 100)
    assert cli_main(["bundle", "verify", str(b)]) == 1
    assert "checksum of 'birdnet/backbone_fp32.onnx'" in _one_line(capsys)
    # the same garbage with a matching checksum (a broken export, not a broken copy)
    m = json.loads((b / MANIFEST_NAME).read_text())
    m["files"]["birdnet/backbone_fp32.onnx"].update(sha256=sha256_file(onnx), bytes=onnx.stat().st_size)
    (b / MANIFEST_NAME).write_text(json.dumps(m))
    assert cli_main(["bundle", "verify", str(b)]) == 1
    assert "cannot load ONNX model" in _one_line(capsys)


def test_bad_manifest_field_is_one_line(slim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = _copy(slim, tmp_path / "b")
    m = json.loads((b / MANIFEST_NAME).read_text())
    m["device"]["experts"][0]["frontend"]["params"]["rescale"] = "peak"
    (b / MANIFEST_NAME).write_text(json.dumps(m))
    assert cli_main(["bundle", "verify", str(b)]) == 1
    line = _one_line(capsys)
    assert "front end 'birdnet'" in line and "rescale" in line


def test_slim_into_existing_directory_and_errors_via_subprocess(
    slim: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    assert cli_main(["bundle", "slim", str(slim), str(out)]) == 1
    assert "already exists" in _one_line(capsys)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "bundle", "verify", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in r.stderr
