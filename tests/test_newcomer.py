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
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.device.sinks import ListSink
from edge_retrieval.device.sources import FileSource
from edge_retrieval.errors import ConfigError
from edge_retrieval.offline.query_audio import example_from_audio
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


@pytest.fixture(scope="module")
def ensemble(birdnet_bundle, tmp_path_factory) -> Path:
    """The ensemble bundle the README recommends for archive search, from the committed projections."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("moee") / "moee"
    rc = main(["train", "--from-weights", str(ROOT / "export" / "data" / "moee"), "--base", str(birdnet_bundle.root),
               "--out", str(out)])
    assert rc == 0
    return out


# --------------------------------------------------------------------------- 1: verify an ensemble


def test_bundle_verify_prints_an_ensemble_bundle(capsys, ensemble) -> None:
    capsys.readouterr()
    rc, text, err = cli(capsys, "bundle", "verify", str(ensemble))
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


def test_commands_find_the_bundle_without_the_flag(capsys, monkeypatch, tiny_bundle, tmp_path) -> None:
    """explain, run and index: --bundle, else $EDGE_RETRIEVAL_BUNDLE, else the demo's default bundle
    (named on stderr), else one line with the three ways."""
    from tests.fixtures_audio import write_scene

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("EDGE_RETRIEVAL_BUNDLE", raising=False)
    rec = tmp_path / "rec"
    rec.mkdir()
    wav = write_scene(rec / "a.wav", [("noise", 2), ("1000", 3)], 32000)
    default = home / ".cache" / "edge-retrieval" / "bundles" / "default-fp32"
    for argv in (["explain", "beep"], ["run", "--source", str(wav), "--query", "beep"], ["index", str(rec), "--quiet"]):
        rc, _, err = cli(capsys, *argv)
        one_line_error(rc, err, "no bundle", "--bundle DIR", "$EDGE_RETRIEVAL_BUNDLE", f"export default --out {default}")
    assert not (rec / ".edge-retrieval-index").exists()

    monkeypatch.setenv("EDGE_RETRIEVAL_BUNDLE", str(tiny_bundle.root))
    rc, out, err = cli(capsys, "explain", "beep", "--json")
    assert rc == 0, err
    assert json.loads(out)["space_id"] == tiny_bundle.manifest.space.id and "using the default bundle" not in err

    monkeypatch.delenv("EDGE_RETRIEVAL_BUNDLE")
    default.parent.mkdir(parents=True)
    default.symlink_to(tiny_bundle.root, target_is_directory=True)
    rc, out, err = cli(capsys, "explain", "beep", "--json")
    assert rc == 0, err
    assert json.loads(out)["space_id"] == tiny_bundle.manifest.space.id
    assert f"using the default bundle {default}" in err
    rc, _, err = cli(capsys, "run", "--source", str(wav), "--query", "beep", "--threshold", "0.5")
    assert rc == 0 and "summary:" in err and f"using the default bundle {default}" in err, err
    rc, _, err = cli(capsys, "index", str(rec), "--quiet")
    assert rc == 0, err
    assert (rec / ".edge-retrieval-index").is_dir()


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


# --------------------------------------------------------------------------- 7, 9, 11, 13: explain and warnings


def test_explain_shows_the_default_threshold_and_what_fit_means(capsys, birdnet_bundle) -> None:
    from edge_retrieval.defaults import default_threshold

    rc, out, err = cli(capsys, "explain", "thunder", "--bundle", str(birdnet_bundle.root), "--top", "2")
    assert rc == 0, err
    assert f"default threshold {default_threshold(birdnet_bundle, 'thunder'):g}" in out
    assert "fit: the best cosine similarity" in out
    rc, out, _ = cli(capsys, "explain", "Kettensäge", "--bundle", str(birdnet_bundle.root), "--json")
    data = json.loads(out)
    assert any("English" in w for w in data["warnings"]) and any("may never fire" in w for w in data["warnings"])


def _res(expert: str, fits: bool, warning: str | None = None):  # noqa: ANN202
    from edge_retrieval.protocol import encode_sparse
    from edge_retrieval.text import Resolution

    return Resolution(expert=expert, vector=encode_sparse(expert, [0], [1.0]), top=[], fit=0.5, warning=warning,
                      fits=fits)


def test_may_never_fire_only_when_no_expert_fits() -> None:
    from edge_retrieval.text import query_warnings

    some = query_warnings("glass breaking", [_res("birdnet", False, "no label"), _res("aisfx", True)])
    assert some == ["birdnet: no label"]
    none = query_warnings("glass breaking", [_res("birdnet", False, "no label"), _res("aisfx", False)])
    assert len(none) == 2 and "may never fire" in none[-1]
    assert any("English" in w for w in query_warnings("电锯", [_res("birdnet", True)]))


def test_ensemble_warns_per_expert(capsys, ensemble) -> None:
    capsys.readouterr()
    rc, text, _ = cli(capsys, "explain", "glass breaking", "--bundle", str(ensemble), "--json")
    data = json.loads(text)
    fits = {e["expert"]: e["fits"] for e in data["experts"]}
    assert any(fits.values()) and not fits["birdnet"], fits  # BirdNET has no glass label; the others fit
    assert not any("may never fire" in w for w in data["warnings"]), data["warnings"]


def test_run_prints_thresholds_and_every_windows_score(capsys, tiny_bundle, tmp_path) -> None:
    from tests.fixtures_audio import write_scene

    wav = write_scene(tmp_path / "s.wav", [("noise", 3), ("1000", 3)], 32000)
    rc, _, err = cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(wav), "--query", "beep",
                     "--threshold", "0.5", "--scores", "--json")
    assert rc == 0, err
    assert "query 'beep': 'beep', threshold 0.5" in err
    lines = [ln for ln in err.splitlines() if ln.startswith("scores ")]
    windows = int(err.split("windows ")[1].split(",")[0])
    assert len(lines) == windows > 0
    assert any("*" in ln for ln in lines) and any("*" not in ln and "beep" in ln for ln in lines)


# --------------------------------------------------------------------------- 8: dates on untimed files


def test_search_since_on_files_without_start_time(capsys, tiny_bundle, tmp_path) -> None:
    from tests.fixtures_audio import write_scene

    rec = tmp_path / "rec"
    rec.mkdir()
    write_scene(rec / "a.wav", [("1000", 2.0)], 32000)
    assert cli(capsys, "index", str(rec), "--bundle", str(tiny_bundle.root), "--quiet")[0] == 0
    rc, _, err = cli(capsys, "search", "beep", "--index", str(rec / ".edge-retrieval-index"), "--since", "2024-01-01")
    one_line_error(rc, err, "carries a start time", "20240101_063000.wav")


# --------------------------------------------------------------------------- 10: PrivateTmp


def test_install_service_names_every_path_under_tmp(tiny_bundle) -> None:
    from edge_retrieval.cli.commands.service import paths_under_tmp

    cfg = validate_config({"mqtt": False, "model": {"bundle": "/tmp/b"}, "storage": {"dir": "/var/tmp/state"},
                           "audio": {"source": "file", "path": "/tmp/x.wav"}}, check_files=False)
    found = dict(paths_under_tmp(cfg, Path("/etc/edge-retrieval/device.toml"), Path("/tmp/venv/bin/edge-retrieval")))
    assert set(found) == {"executable", "bundle (model.bundle)", "audio file (audio.path)",
                          "state directory (storage.dir)"}, found


# --------------------------------------------------------------------------- cosmetic


def test_summary_counts_the_seconds_read_and_notes_a_short_file(capsys, tiny_bundle, tmp_path) -> None:
    from tests.fixtures_audio import write_scene

    for secs in (0.2, 2.71):
        wav = write_scene(tmp_path / f"{secs}.wav", [("1000", secs)], 32000)
        rc, _, err = cli(capsys, "run", "--bundle", str(tiny_bundle.root), "--source", str(wav), "--query", "beep")
        assert rc == 0, err
        assert f"summary: {secs:.2f} s of audio" in err, err
        window_s = max(e.window_s for e in tiny_bundle.manifest.device.experts)
        assert ("shorter than the bundle's" in err) == (secs < window_s)


def test_version_and_suggestions(capsys) -> None:
    from edge_retrieval import __version__

    assert cli(capsys, "--version") == (0, f"edge-retrieval {__version__}\n", "")
    rc, _, err = cli(capsys, "serach", "rain")
    assert rc == 2 and "did you mean 'search'" in err
    with pytest.raises(SystemExit) as ei:
        main(["search", "rain", "--indx", "x"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "did you mean --index" in err and len(err.strip().splitlines()) == 1


def test_slim_refuses_a_path_inside_the_source_and_a_missing_bundle(capsys, tiny_bundle, tmp_path) -> None:
    src = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, src)
    rc, _, err = cli(capsys, "bundle", "slim", str(src), str(src / "sub"))
    one_line_error(rc, err, "inside the source bundle")
    assert not (src / "sub").exists()
    rc, _, err = cli(capsys, "bundle", "verify", str(tmp_path / "missing"))
    one_line_error(rc, err, "does not exist")


def test_config_show_writes_mqtt_false(capsys, tiny_bundle, tmp_path) -> None:
    p = tmp_path / "d.toml"
    p.write_text(f'mqtt = false\n[model]\nbundle = "{tiny_bundle.root}"\n')
    rc, out, err = cli(capsys, "config", "show", str(p))
    assert rc == 0, err
    assert "mqtt = false" in out.splitlines() and "(unset)" not in " ".join(ln for ln in out.splitlines() if "mqtt" in ln)
