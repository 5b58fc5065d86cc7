"""docs/raspberry-pi.md followed as far as a container allows.

A fresh venv gets the project from the local tree with the `mic` extra only (as install.sh does on
a device: no export extra, no torch); then, from outside the source tree: ``config check``, ``run
--config`` on a recording with a real ONNX bundle, ``install-service`` into a temporary unit
folder, and ``systemd-analyze verify`` on the result. Flashing, useradd and systemctl need a
real board.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_retrieval.bundle import slim_bundle

ROOT = Path(os.environ.get("EDGE_RETRIEVAL_WALKTHROUGH_SRC", Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m venv`` + ``pip install 'SRC[mic]'`` (wheels from the warm pip cache or PyPI)."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[mic]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        if any("Could not find a version" in t or "NewConnectionError" in t for t in tail):
            pytest.skip(f"package index not reachable from this container: {tail[-1]}")
        pytest.fail("pip install of the project into a fresh venv failed:\n" + "\n".join(tail))
    return venv


def er(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The venv's own ``edge-retrieval`` script, run away from the source tree."""
    return subprocess.run(
        [str(venv / "bin" / "edge-retrieval"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )


def test_fresh_device_install_is_not_the_source_tree(device_venv: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            str(device_venv / "bin" / "python"),
            "-c",
            "import sys, edge_retrieval, edge_retrieval.cli.commands.config, edge_retrieval.cli.commands.service; "
            "print(edge_retrieval.__file__); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    where, torch_loaded = r.stdout.split()
    assert str(device_venv) in where and torch_loaded == "False"
    r = subprocess.run(
        [str(device_venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0  # the device install carries no export stack


def test_walkthrough_check_run_and_unit(
    device_venv: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # 1. the bundle, made on the workstation and slimmed for the device (a real ONNX graph)
    try:
        bundle_src = request.getfixturevalue("tiny_bundle")
    except pytest.FixtureLookupError:
        pytest.skip("tests/fixtures_audio.py (tiny_bundle) not available")
    audio_files = request.getfixturevalue("audio_files")
    bundle = slim_bundle(bundle_src.root, tmp_path / "opt" / "bundles" / "device-slim").root

    # 2. the device file: a profile as the base, local paths for this container
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "device.toml"
    cfg.write_text(
        f"""
profile = "raspberry-pi-4"
mqtt = false

[device]
id = "walkthrough-pi"
groups = ["test"]
site = "container"
lat = 52.2
lon = 0.12

[model]
bundle = "{bundle}"

[audio]
source = "file"
path = "{audio_files["flac"]}"
realtime = false

[storage]
dir = "{tmp_path / "state"}"

[clips]
enabled = false
"""
    )

    # 3. config check, from outside the source tree
    r = er(device_venv, "config", "check", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: ") and "walkthrough-pi" in r.stdout and "slim" in r.stdout
    r = er(device_venv, "config", "show", str(cfg), "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["threads"] == 2

    # 4. run on a file: query by example (a slim bundle has no text side), events as JSON lines
    clip = tmp_path / "example.wav"
    _cut(audio_files["flac"], clip, 2.2, 3.8)
    r = er(device_venv, "run", "--config", str(cfg), "--query-audio", str(clip), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "summary:" in r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert events, r.stderr
    assert all(e["device"] == "walkthrough-pi" for e in events)
    assert any(1.0 <= e["start_s"] <= 4.0 for e in events), events  # the tone sits at 2-4 s

    # 5. the systemd unit, verified
    units = tmp_path / "units"
    exe = device_venv / "bin" / "edge-retrieval"
    r = er(device_venv, "install-service", "--config", str(cfg), "--unit-dir", str(units), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    unit = units / "edge-retrieval.service"
    text = unit.read_text()
    assert f"ExecStart={exe} run --config {cfg}" in text  # the venv's own script by default
    assert "systemctl enable --now edge-retrieval" in r.stdout
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing: apt-get install systemd")
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr


def test_walkthrough_with_the_default_birdnet_bundle(
    device_venv: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The packaged default (BirdNET 2.4, CC BY-NC-SA 4.0), slimmed, on the Pi Zero 2 W profile."""
    try:
        full = request.getfixturevalue("birdnet_bundle")
        audio_files = request.getfixturevalue("audio_files")
    except pytest.FixtureLookupError:
        pytest.skip("birdnet_bundle fixture (tests/fixtures_bundles.py) not available")
    bundle = slim_bundle(full.root, tmp_path / "birdnet-fp32-slim").root
    cfg = tmp_path / "device.toml"
    cfg.write_text(
        f"""
profile = "raspberry-pi-zero-2w"
mqtt = false
[device]
id = "zero-walk"
[model]
bundle = "{bundle}"
[audio]
source = "file"
path = "{audio_files["wav"]}"
realtime = false
[storage]
dir = "{tmp_path / "state"}"
"""
    )
    r = er(device_venv, "config", "check", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and "birdnet" in r.stdout and "slim" in r.stdout, r.stderr
    r = er(device_venv, "run", "--config", str(cfg), "--query-audio", str(audio_files["flac"]), "--json",
           cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    summary = next(line for line in r.stderr.splitlines() if line.startswith("summary:"))
    windows = int(summary.split("windows ")[1].split(",")[0])
    assert windows >= 1, summary  # 6 s of audio through the real BirdNET encoder in the device venv


def _cut(src: Path, dst: Path, t0: float, t1: float) -> None:
    import soundfile as sf

    x, rate = sf.read(str(src), dtype="float32")
    sf.write(str(dst), x[int(t0 * rate) : int(t1 * rate)], rate)
