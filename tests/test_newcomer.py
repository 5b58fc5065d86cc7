"""What a first-time user trips over (issue 17): each mistake is one line, examples find themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_retrieval.cli import main
from edge_retrieval.config import validate_config
from edge_retrieval.daemon import Daemon
from edge_retrieval.errors import ConfigError
from edge_retrieval.query_audio import example_from_audio
from edge_retrieval.sinks import ListSink
from edge_retrieval.sources import FileSource
from tests.fixtures_bundles import sounds_dir

ROOT = Path(__file__).resolve().parent.parent
# one real clip per category (the siren is the one of issue 17: BirdNET hears it weakly)
EXAMPLES = [
    "siren/siren_btanks_klaxon", "speech/speech_asterisk_vm_repeat", "gunshot/gunshot_warzone2100_mgtower",
    "engine/engine_searchandrescue_engine_start_from0s", "explosion/explosion_bzflag_explosion",
    "frog_insect/frog_insect_btanks_swamp_from0s", "car_horn/car_horn_scorched3d_carhorn1",
    "distractor_wind/distractor_wind_7kaa_wind",
]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def clips() -> list[Path]:
    d = sounds_dir()
    paths = [d / f"{c}.wav" for c in EXAMPLES] if d else []
    if not paths or not all(p.is_file() for p in paths):
        pytest.skip("the real fixture clips are not on disk (run scripts/fetch_sounds.py --list data/fixture.csv)")
    return paths


# --------------------------------------------------------------------------- 1: verify an ensemble


def test_bundle_verify_prints_an_ensemble_bundle(capsys, birdnet_bundle, tmp_path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "moee"
    rc, _, err = cli(capsys, "train", "--from-weights", str(ROOT / "export" / "data" / "moee"),
                     "--base", str(birdnet_bundle.root), "--out", str(out))
    if rc != 0 and "pip install" in err:
        pytest.skip(err.strip())
    assert rc == 0, err
    rc, text, err = cli(capsys, "bundle", "verify", str(out))
    assert rc == 0 and not err, err
    experts = [ln for ln in text.splitlines() if ln.lstrip().startswith("expert ")]
    assert len(experts) == 3 and all("parity" in ln for ln in experts), text
    assert any("max |diff|" in ln for ln in experts) and any("top-1" in ln for ln in experts), text


# --------------------------------------------------------------------------- 3, 4: index and stores


def test_index_refuses_a_file_and_a_missing_folder(capsys, tiny_bundle, tmp_path) -> None:
    f = tmp_path / "one.wav"
    f.write_bytes(b"not read")
    rc, _, err = cli(capsys, "index", str(f), "--bundle", str(tiny_bundle.root))
    one_line_error(rc, err, "is a file", "one.wav")
    missing = tmp_path / "nope"
    rc, _, err = cli(capsys, "index", str(missing), "--bundle", str(tiny_bundle.root))
    one_line_error(rc, err, "does not exist", "nope")
    assert not missing.exists()


@pytest.mark.parametrize("argv", [["alerts", "list"], ["detections", "--since", "1h"]])
def test_reading_commands_do_not_create_a_database(capsys, tmp_path, monkeypatch, argv) -> None:
    typo = tmp_path / "typo.sqlite"
    rc, out, err = cli(capsys, *argv, "--db", str(typo))
    one_line_error(rc, err, "no server database", "typo.sqlite")
    assert not typo.exists() and not out


def test_search_on_the_recordings_folder_points_to_its_index(capsys, tiny_bundle, tmp_path) -> None:
    from tests.fixtures_audio import write_scene

    rec = tmp_path / "rec"
    rec.mkdir()
    write_scene(rec / "a.wav", [("1000", 2.0)], 32000)
    rc, _, err = cli(capsys, "index", str(rec), "--bundle", str(tiny_bundle.root), "--quiet")
    assert rc == 0, err
    rc, _, err = cli(capsys, "search", "beep", "--index", str(rec))
    one_line_error(rc, err, f"--index {rec / '.edge-retrieval-index'}")


# --------------------------------------------------------------------------- 5: no --source


def test_run_without_source_says_the_microphone_was_chosen(tiny_bundle, tmp_path) -> None:
    env = {**os.environ, "PULSE_SERVER": "unix:/nonexistent"}
    env.pop("PULSE_SOURCE", None)
    try:
        r = subprocess.run([sys.executable, "-m", "edge_retrieval.cli", "run", "--bundle", str(tiny_bundle.root),
                            "--query", "beep"], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("a microphone is available here: run listened instead of failing")
    line = one_line_error(r.returncode, r.stderr, "microphone was chosen", "--source FILE")
    assert "None" not in line  # the old message named "input device None"


# --------------------------------------------------------------------------- 6: query by example


def test_an_example_fires_on_itself(birdnet_bundle, clips) -> None:
    for clip in clips:
        msg, own = example_from_audio(birdnet_bundle, clip, "ex")
        assert 0 < msg.threshold < own, (clip.name, own, msg.threshold)
        sink = ListSink()
        d = Daemon(birdnet_bundle, FileSource(clip), device_id="t", sinks=[sink])
        d.apply_query(msg)
        d.run()
        assert sink.finals(), f"{clip.name}: self-score {own:.3f}, threshold {msg.threshold:.3f}, no event"


def test_search_by_example_ranks_the_example_first(capsys, birdnet_bundle, clips, tmp_path) -> None:
    rec = tmp_path / "rec"
    rec.mkdir()
    for c in clips:
        shutil.copy(c, rec / c.name)
    rc, _, err = cli(capsys, "index", str(rec), "--bundle", str(birdnet_bundle.root), "--quiet")
    assert rc == 0, err
    firsts = []
    for c in clips:
        rc, out, err = cli(capsys, "search", "--audio", str(c), "--index", str(rec / ".edge-retrieval-index"),
                           "--top", "20")
        assert rc == 0, err
        files = list(dict.fromkeys(line.split()[2] for line in out.splitlines()))  # files, best first
        assert Path(files[0]).name == c.name or Path(files[1]).name == c.name, (c.name, files[:3])
        firsts.append(Path(files[0]).name == c.name)
    assert firsts[0], "the siren of issue 17 does not rank itself first"
    assert sum(firsts) >= len(clips) - 1, firsts


def test_run_query_audio_on_itself_prints_its_threshold(capsys, birdnet_bundle, clips) -> None:
    siren = clips[0]
    rc, out, err = cli(capsys, "run", "--bundle", str(birdnet_bundle.root), "--source", str(siren),
                       "--query-audio", str(siren), "--json")
    assert rc == 0, err
    assert out.count('"query_id": "like-siren_btanks_klaxon"') >= 1, out
    assert "self-score" in err and "threshold" in err


# --------------------------------------------------------------------------- 12: plain broker on a profile


def _pub(tmp_path: Path) -> Path:
    p = tmp_path / "query.pub.pem"
    p.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


def test_device_file_unsets_the_profiles_tls_and_credentials(tiny_bundle, tmp_path) -> None:
    base = {"profile": "raspberry-pi-4", "model": {"bundle": str(tiny_bundle.root)},
            "mqtt": {"url": "mqtt://broker.lan:1883", "public_key_file": str(_pub(tmp_path))}}
    with pytest.raises(ConfigError) as ei:  # the profile's /etc files do not exist here
        validate_config(base, base_dir=tmp_path)
    assert "mqtt.tls.ca" in str(ei.value) and "mqtt.credentials_file" in str(ei.value)
    plain = {**base, "mqtt": {**base["mqtt"], "tls": False, "credentials_file": False}}
    cfg = validate_config(plain, base_dir=tmp_path)
    assert cfg.mqtt is not None and cfg.mqtt.tls is None and cfg.mqtt.credentials() is None
    assert cfg.mqtt.public_key_file is not None  # only the keys set to false are dropped


def test_example_device_file_documents_unsetting() -> None:
    text = (ROOT / "firmware_config" / "example-device.toml").read_text()
    assert "tls = false" in text and "credentials_file = false" in text


# --------------------------------------------------------------------------- 2: alerts add default threshold


def test_alerts_add_uses_runs_default_threshold(capsys, broker, birdnet_bundle, tmp_path) -> None:
    from edge_retrieval.defaults import default_threshold

    rc, out, err = cli(capsys, "alerts", "add", "chainsaw", "--group", "farm-a", "--json",
                       "--bundle", str(birdnet_bundle.root), "--broker", broker.url, "--db", str(tmp_path / "s.db"))
    assert rc == 0, err
    alert = json.loads(out)
    assert alert["threshold"] == pytest.approx(default_threshold(birdnet_bundle, "chainsaw"))
