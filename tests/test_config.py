"""Device config: profiles validate, overlays merge, every problem is reported, secrets stay hidden."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_retrieval.bundle import BundleWriter
from edge_retrieval.config import (
    DeviceConfig,
    available_profiles,
    check_platform,
    clock_status,
    deep_merge,
    load_config,
    problems_of,
    validate_config,
)
from edge_retrieval.device.sdnotify import Notifier
from edge_retrieval.errors import ConfigError

PROFILES = ["jetson-orin-nano", "raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2w"]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "firmware_config" / "example-device.toml"
PASSWORD = "s3cr3t-Pa55word-xyzzy"


def make_dummy_bundle(out: Path, slim: bool = True) -> Path:
    """A valid bundle manifest whose 'model' is a few bytes: config checks never run it."""
    with BundleWriter(out) as w:
        w.add_bytes(b"not really onnx", "audio.onnx", "device")
        if not slim:
            w.add_text("{}", "text.json", "server")
        w.commit(
            {
                "name": "dummy",
                "licence": "test",
                "space": {"kind": "joint", "id": "0" * 64},
                "device": {
                    "experts": [
                        {
                            "name": "a",
                            "family": "clap",
                            "sample_rate": 48000,
                            "window_s": 1.0,
                            "frontend": {"kind": "in-graph"},
                            "file": "audio.onnx",
                            "precision": "fp32",
                            "input_name": "x",
                            "output_name": "y",
                            "output_kind": "embedding",
                            "dim": 8,
                        }
                    ],
                    "hop_s": 1.0,
                },
                "server": None if slim else {"text": [{"expert": "a", "kind": "joint"}]},
            }
        )
    return out


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Bundle, TLS CA, credentials and a real Ed25519 public key, as a device would have them."""
    d = tmp_path / "etc"
    (d / "tls").mkdir(parents=True)
    creds = d / "mqtt-credentials"
    creds.write_text(f"hedge-north-03\n{PASSWORD}\n")
    os.chmod(creds, 0o640)
    ca = d / "tls" / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    key = Ed25519PrivateKey.generate()
    pub = d / "query-signing.pub.pem"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    priv = d / "query-signing.key.pem"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return {
        "bundle": make_dummy_bundle(tmp_path / "bundle"),
        "creds": creds,
        "ca": ca,
        "pub": pub,
        "priv": priv,
        "dir": tmp_path,
    }


def file_overrides(files: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"bundle": str(files["bundle"])},
        "mqtt": {
            "credentials_file": str(files["creds"]),
            "public_key_file": str(files["pub"]),
            "tls": {"ca": str(files["ca"])},
        },
        "storage": {"dir": str(files["dir"] / "state")},
    }


def write(tmp_path: Path, text: str, name: str = "device.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(exc_info: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return problems_of(exc_info.value)


# --------------------------------------------------------------------------- profiles


def test_shipped_profiles_are_the_four_boards() -> None:
    assert available_profiles() == PROFILES


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_validates(name: str, files: dict[str, Path]) -> None:
    cfg = validate_config({"profile": name}, overrides=file_overrides(files))
    assert cfg.profile == name
    assert cfg.model.bundle == files["bundle"]
    assert cfg.model.providers[-1] == "CPUExecutionProvider"
    assert cfg.mqtt is not None and cfg.mqtt.use_tls
    assert cfg.gate.enabled
    # the profile's own values survive the overlay of file paths
    raw = __import__("tomllib").loads((ROOT / "firmware_config" / "profiles" / f"{name}.toml").read_text())
    assert cfg.model.threads == raw["model"]["threads"]
    assert cfg.windows.overlap == raw["windows"]["overlap"]
    assert str(cfg.model.bundle) != raw["model"]["bundle"]


def test_profile_specifics(files: dict[str, Path]) -> None:
    ov = file_overrides(files)
    zero = validate_config({"profile": "raspberry-pi-zero-2w"}, overrides=ov)
    pi5 = validate_config({"profile": "raspberry-pi-5"}, overrides=ov)
    jetson = validate_config({"profile": "jetson-orin-nano"}, overrides=ov)
    assert zero.model.threads <= 2 < jetson.model.threads
    assert zero.windows.max_batch < pi5.windows.max_batch
    assert zero.storage.outbox_max_events < pi5.storage.outbox_max_events
    assert jetson.model.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert zero.device.require_clock_sync and pi5.device.require_clock_sync


def test_example_device_file_validates(files: dict[str, Path]) -> None:
    cfg = load_config(EXAMPLE, overrides=file_overrides(files))
    assert cfg.profile == "raspberry-pi-4"
    assert cfg.device.id == "hedge-north-03" and cfg.device.lat == pytest.approx(52.2053)
    assert cfg.detection.policy.cooldown_s == 20  # the file's own policy key
    assert cfg.detection.policy.min_hits is None  # the rest falls through to the bundle's tuned policy
    assert cfg.clips.max_mb == 500 and cfg.clips.enabled  # file value + profile value
    assert cfg.mqtt is not None and cfg.mqtt.host == "broker.example.org" and cfg.mqtt.port == 8883


# --------------------------------------------------------------------------- overlays


def test_deep_merge_tables_merge_lists_replace() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    over = {"a": {"y": [3]}, "c": 2}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs untouched


def test_overlay_precedence_profile_file_overrides(files: dict[str, Path]) -> None:
    p = write(
        files["dir"],
        f"""
profile = "raspberry-pi-4"
[model]
bundle = "{files["bundle"]}"
threads = 3
[device]
groups = ["a", "b"]
[mqtt]
url = "mqtts://broker.test:18883"
credentials_file = "{files["creds"]}"
public_key_file = "{files["pub"]}"
[mqtt.tls]
ca = "{files["ca"]}"
""",
    )
    cfg = load_config(p)
    assert cfg.model.threads == 3  # file beats profile (2)
    assert cfg.windows.max_batch == 2  # profile value kept
    assert cfg.mqtt is not None and cfg.mqtt.port == 18883 and cfg.mqtt.keepalive_s == 30
    cfg2 = load_config(p, overrides={"model": {"threads": 4}, "device": {"groups": ["c"]}})
    assert cfg2.model.threads == 4  # overrides beat the file
    assert cfg2.device.groups == ["c"]  # lists are replaced, not appended
    assert cfg2.windows.max_batch == 2


def test_mqtt_false_drops_the_profiles_broker(files: dict[str, Path]) -> None:
    p = write(
        files["dir"], f'profile = "raspberry-pi-5"\nmqtt = false\n[model]\nbundle = "{files["bundle"]}"\n'
    )
    cfg = load_config(p)
    assert cfg.mqtt is None and cfg.model.threads == 2


def test_relative_paths_are_relative_to_the_config_file(files: dict[str, Path], tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    make_dummy_bundle(sub / "b2")
    p = write(sub, '[model]\nbundle = "b2"\n[storage]\ndir = "state"\n')
    cfg = load_config(p)
    assert cfg.model.bundle == sub / "b2"
    assert cfg.storage.dir == sub / "state"
    assert cfg.clips.dir == sub / "state" / "clips"  # default follows storage.dir


def test_defaults_without_profile(files: dict[str, Path]) -> None:
    cfg = validate_config({"model": {"bundle": str(files["bundle"])}})
    assert cfg.profile is None and cfg.mqtt is None
    assert cfg.device.id  # the hostname, made topic-safe
    assert cfg.model.threads == 1 and cfg.model.providers == ["CPUExecutionProvider"]
    assert cfg.audio.source == "mic" and cfg.windows.overlap == 0.0 and cfg.gate.energy_dbfs == -70
    assert cfg.logging.level == "INFO" and not cfg.clips.enabled


# --------------------------------------------------------------------------- errors


def test_all_problems_at_once_with_key_paths(files: dict[str, Path]) -> None:
    p = write(
        files["dir"],
        """
[device]
lat = 123.0
lon = 0
colour = "red"
[model]
bundle = "missing-bundle"
threads = 0
[audio]
source = "radio"
[windows]
overlap = "half"
[[queries]]
text = "dog"
threshold = 7
[mqtt]
url = "http://broker"
credentials_file = "nope"
[mqtt.tls]
ca = "no-ca.pem"
[logging]
level = "LOUD"
""",
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = problems(ei)
    want = [
        "device.lat",
        "device.colour",
        "model.bundle",
        "model.threads",
        "audio.source",
        "windows.overlap",
        "queries[0].threshold",
        "mqtt.url",
        "mqtt.credentials_file",
        "mqtt.tls.ca",
        "logging.level",
    ]
    for key in want:
        assert any(line.startswith(f"{key}: ") for line in lines), (key, lines)
    assert all("expected" in line for line in lines), lines
    assert str(p) in str(ei.value) and f"{len(lines)} problems" in str(ei.value)
    unknown = next(line for line in lines if line.startswith("device.colour"))
    assert "unknown key" in unknown and "require_clock_sync" in unknown  # lists the allowed keys
    assert "'radio'" in next(line for line in lines if line.startswith("audio.source"))


@pytest.mark.parametrize(
    ("section", "key", "what"),
    [
        ("model", "bundle", "manifest.json"),
        ("mqtt", "credentials_file", "credentials"),
        ("mqtt", "public_key_file", "public key"),
        ("mqtt.tls", "ca", "PEM"),
    ],
)
def test_missing_files_name_the_key(files: dict[str, Path], section: str, key: str, what: str) -> None:
    ov = file_overrides(files)
    ov["mqtt"]["url"] = "mqtts://b:8883"
    node = ov
    for part in section.split("."):
        node = node[part]
    node[key] = str(files["dir"] / "does-not-exist")
    with pytest.raises(ConfigError) as ei:
        validate_config({}, overrides=ov)
    lines = problems(ei)
    assert len(lines) == 1 and lines[0].startswith(f"{section}.{key}: ") and what in lines[0], lines
    # ...and the same config passes when file checks are off (config show before copying files)
    validate_config({}, overrides=ov, check_files=False)


def test_file_source_needs_an_existing_path(files: dict[str, Path]) -> None:
    base = {"model": {"bundle": str(files["bundle"])}}
    with pytest.raises(ConfigError) as ei:
        validate_config({**base, "audio": {"source": "file"}})
    assert problems(ei)[0].startswith("audio.path: ")
    with pytest.raises(ConfigError) as ei:
        validate_config({**base, "audio": {"source": "file", "path": str(files["dir"] / "x.wav")}})
    assert problems(ei)[0].startswith("audio.path: ") and "does not exist" in problems(ei)[0]


def test_cross_field_rules(files: dict[str, Path]) -> None:
    b = {"model": {"bundle": str(files["bundle"])}}
    cases = {
        "device.lon": {"device": {"lat": 10.0}},
        "clips.max_clip_s": {"clips": {"pre_s": 20, "post_s": 20, "max_clip_s": 30}},
        "detection.policy": {"detection": {"policy": {"min_hits": 3, "of_windows": 2}}},
        "queries": {"queries": [{"id": "q", "text": "a"}, {"id": "q", "text": "b"}]},
        "mqtt.tls.key": {
            "mqtt": {"url": "mqtts://h", "tls": {"ca": str(files["ca"]), "cert": str(files["ca"])}}
        },
        "device.id": {"device": {"id": "bad/id+#"}},
        "model.providers": {"model": {"providers": ["Cuda"]}},
    }
    for key, data in cases.items():
        with pytest.raises(ConfigError) as ei:
            validate_config(deep_merge(b, data))
        assert problems(ei)[0].startswith(f"{key}: "), (key, problems(ei))


def test_toml_syntax_and_unknown_profile_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2"):
        load_config(write(tmp_path, "[model]\nbundle = \n"))
    with pytest.raises(ConfigError, match=r"unknown profile 'raspberry-pi-3'.*raspberry-pi-4"):
        load_config(write(tmp_path, 'profile = "raspberry-pi-3"\n'))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[model]")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(tmp_path / "bin.toml")


def test_private_key_is_refused_as_public_key(files: dict[str, Path]) -> None:
    ov = file_overrides(files)
    ov["mqtt"]["url"] = "mqtts://b"
    ov["mqtt"]["public_key_file"] = str(files["priv"])
    with pytest.raises(ConfigError) as ei:
        validate_config({}, overrides=ov)
    assert problems(ei)[0].startswith("mqtt.public_key_file: ") and "PRIVATE" in problems(ei)[0]


def test_credentials_file_layouts(files: dict[str, Path]) -> None:
    ov = file_overrides(files)
    ov["mqtt"]["url"] = "mqtts://b"
    cfg = validate_config({}, overrides=ov)
    assert cfg.mqtt is not None and cfg.mqtt.credentials() == ("hedge-north-03", PASSWORD)
    files["creds"].write_text(f"dev:{PASSWORD}\n")
    assert cfg.mqtt.credentials() == ("dev", PASSWORD)
    files["creds"].write_text("one\ntwo\nthree\n")
    with pytest.raises(ConfigError) as ei:
        validate_config({}, overrides=ov)
    assert problems(ei)[0].startswith("mqtt.credentials_file: ") and "two lines" in problems(ei)[0]


# --------------------------------------------------------------------------- secrets


def test_secrets_never_in_messages_show_or_logs(
    files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ov = file_overrides(files)
    ov["mqtt"]["url"] = "mqtts://broker.test"
    cfg = validate_config({}, overrides=ov)
    assert cfg.mqtt is not None and cfg.mqtt.credentials() is not None
    shown = json.dumps(cfg.redacted())
    assert PASSWORD not in shown and str(files["creds"]) in shown
    assert "config <config>" in caplog.text and PASSWORD not in caplog.text
    # a secret typed into the config: refused, and its value never echoed
    for bad in (
        {"mqtt": {"url": f"mqtts://user:{PASSWORD}@broker"}},
        {"mqtt": {"url": "mqtts://b", "password": PASSWORD}},
        {"device": {"token": PASSWORD}},
    ):
        with pytest.raises(ConfigError) as ei:
            validate_config(deep_merge(ov, bad))
        assert PASSWORD not in str(ei.value)
        assert ei.value.__cause__ is None and ei.value.__suppress_context__
    assert PASSWORD not in caplog.text


def test_redacted_masks_secret_looking_fields() -> None:
    from edge_retrieval.config import _redact

    out = _redact({"a": {"password": "x", "api_token": "y", "credentials_file": "/p", "site": "s"}})
    assert out == {"a": {"password": "***", "api_token": "***", "credentials_file": "/p", "site": "s"}}


# --------------------------------------------------------------------------- broken configs (hypothesis)

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.datetimes(),
    st.dates(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)

KNOWN_KEYS: dict[str, list[str]] = {
    name: list(field.annotation.model_fields) if hasattr(field.annotation, "model_fields") else []
    for name, field in DeviceConfig.model_fields.items()
}
KNOWN_KEYS["mqtt"] = [
    "url",
    "client_id",
    "tls",
    "credentials_file",
    "public_key_file",
    "keepalive_s",
    "health_interval_s",
    "qos",
]
KNOWN_KEYS["queries"] = []


@st.composite
def broken_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible config with a few known keys set to random TOML values."""
    data: dict[str, Any] = {}
    for _ in range(draw(st.integers(1, 6))):
        section = draw(st.sampled_from(sorted(KNOWN_KEYS)))
        keys = KNOWN_KEYS[section]
        if not keys or draw(st.integers(0, 9)) == 0:
            data[section] = draw(toml_values)
        else:
            table = data.setdefault(section, {}) if isinstance(data.get(section), dict) else {}
            data[section] = table
            table[draw(st.sampled_from(keys))] = draw(toml_values)
    return data


def _toml_text(obj: Any) -> str:
    """Serialise via show's TOML writer, so random documents are syntactically valid TOML."""
    from edge_retrieval.cli.commands.config import to_toml

    return to_toml(obj)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=broken_configs())
def test_random_values_for_known_keys_give_config_errors(data: dict[str, Any], tmp_path_factory) -> None:
    bundle = tmp_path_factory.getbasetemp() / "hyp-bundle"
    if not bundle.exists():
        make_dummy_bundle(bundle)
    base = {"model": {"bundle": str(bundle)}}
    try:
        cfg = validate_config(deep_merge(base, data))
    except ConfigError as exc:
        lines = problems_of(exc)
        assert lines and all(isinstance(x, str) and x and "\n" not in x for x in lines)
        assert "Traceback" not in str(exc)
    else:
        assert isinstance(cfg, DeviceConfig)
        assert cfg.model.threads >= 1 and 0 <= cfg.windows.overlap <= 0.95
        for v in (cfg.gate.energy_dbfs, cfg.windows.max_queue_s, cfg.clips.max_mb):
            assert math.isfinite(v)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_documents_give_config_errors(text: str, tmp_path_factory) -> None:
    d = tmp_path_factory.mktemp("doc")
    p = d / "c.toml"
    p.write_bytes(text.encode("utf-8", errors="replace"))
    with pytest.raises(ConfigError):  # no text without a model.bundle can be a valid config
        load_config(p)


@settings(max_examples=150, deadline=None)
@given(data=st.dictionaries(st.text(min_size=1, max_size=10), toml_values, max_size=5))
def test_random_toml_tables_give_config_errors(data: dict[str, Any], tmp_path_factory) -> None:
    d = tmp_path_factory.mktemp("tbl")
    p = d / "c.toml"
    try:
        p.write_text(_toml_text(data), encoding="utf-8")
    except (TypeError, UnicodeEncodeError):
        return  # datetimes etc. that the small writer does not emit
    with pytest.raises(ConfigError):
        load_config(p)


# --------------------------------------------------------------------------- platform, clock, sd_notify


@pytest.mark.parametrize(
    ("machine", "bits", "ok"),
    [
        ("aarch64", 64, True),
        ("x86_64", 64, True),
        ("armv7l", 32, False),
        ("armv6l", 32, False),
        ("aarch64", 32, False),
        ("i686", 32, False),
    ],
)
def test_check_platform_refuses_32_bit(machine: str, bits: int, ok: bool) -> None:
    if ok:
        check_platform(machine, bits)
    else:
        with pytest.raises(ConfigError, match="64-bit OS") as ei:
            check_platform(machine, bits)
        assert "\n" not in str(ei.value)


def test_check_platform_here() -> None:
    check_platform()  # the test host is 64-bit


def _fake_timedatectl(tmp_path: Path, answer: str, rc: int = 0) -> str:
    p = tmp_path / f"timedatectl-{answer or 'empty'}-{rc}"
    p.write_text(
        f'#!/bin/sh\n[ "$1 $2 $3 $4" = "show -p NTPSynchronized --value" ] || exit 9\necho {answer}\nexit {rc}\n'
    )
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_clock_status(tmp_path: Path) -> None:
    marker = tmp_path / "synchronized"
    assert clock_status(_fake_timedatectl(tmp_path, "yes"), marker) == "synced"
    assert clock_status(_fake_timedatectl(tmp_path, "no"), marker) == "unsynced"
    assert clock_status(str(tmp_path / "missing"), marker) == "unknown"
    assert clock_status(_fake_timedatectl(tmp_path, "", 1), marker) == "unknown"
    marker.touch()
    assert clock_status(str(tmp_path / "missing"), marker) == "synced"
    assert clock_status() in ("synced", "unsynced", "unknown")


def test_sdnotify_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    addr = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(addr)
    srv.settimeout(5)
    try:
        monkeypatch.setenv("WATCHDOG_USEC", "60000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        n = Notifier(addr)
        assert n.enabled and n.watchdog_s == 60 and n.ping_interval_s == 15
        assert n.ready("listening")
        assert srv.recv(1024) == b"READY=1\nSTATUS=listening"
        assert n.watchdog()
        assert srv.recv(1024) == b"WATCHDOG=1"
        assert not n.watchdog()  # rate-limited: at most one ping per 15 s
        assert n.stopping() and srv.recv(1024) == b"STOPPING=1"
    finally:
        srv.close()
    assert not Notifier("").enabled and not Notifier("").ready()
    assert not Notifier(str(tmp_path / "gone.sock")).ready()  # a lost ping never raises


# --------------------------------------------------------------------------- CLI


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_retrieval.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cli_config_check_ok_and_errors(files: dict[str, Path]) -> None:
    good = write(
        files["dir"],
        f"""
profile = "raspberry-pi-zero-2w"
[device]
id = "pi-zero-7"
[model]
bundle = "{files["bundle"]}"
[mqtt]
url = "mqtts://broker.test"
credentials_file = "{files["creds"]}"
public_key_file = "{files["pub"]}"
[mqtt.tls]
ca = "{files["ca"]}"
""",
        "good.toml",
    )
    r = cli("config", "check", str(good))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: ") and "pi-zero-7" in r.stdout and "dummy" in r.stdout
    assert "raspberry-pi-zero-2w" in r.stdout and "Traceback" not in r.stderr

    bad = write(
        files["dir"], '[model]\nbundle = "nope"\nthreads = "many"\n[gate]\nenergy_dbfs = 3\n', "bad.toml"
    )
    r = cli("config", "check", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"model.bundle", "model.threads", "gate.energy_dbfs"}

    # a corrupt bundle is caught by check (checksums), not only a missing one
    (files["bundle"] / "audio.onnx").write_bytes(b"tampered")
    r = cli("config", "check", str(good))
    assert r.returncode == 1 and "model.bundle:" in r.stderr and "checksum" in r.stderr

    r = cli("config", "check", str(files["dir"] / "absent.toml"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_cli_check_refuses_local_queries_on_a_slim_bundle(files: dict[str, Path]) -> None:
    p = write(files["dir"], f'[model]\nbundle = "{files["bundle"]}"\n[[queries]]\ntext = "dog barking"\n')
    r = cli("config", "check", str(p))
    assert r.returncode == 1 and "queries: " in r.stderr and "slim" in r.stderr
    full = make_dummy_bundle(files["dir"] / "full", slim=False)
    p.write_text(f'[model]\nbundle = "{full}"\n[[queries]]\ntext = "dog barking"\n')
    r = cli("config", "check", str(p))
    assert r.returncode == 0 and "1 local query" in r.stdout, r.stderr


def test_cli_config_show_merged_and_redacted(files: dict[str, Path]) -> None:
    import tomllib

    p = write(
        files["dir"],
        f"""
profile = "raspberry-pi-4"
[model]
bundle = "{files["bundle"]}"
[mqtt]
url = "mqtts://broker.test"
credentials_file = "{files["creds"]}"
[[queries]]
text = "chainsaw \\"close\\""
policy = {{ min_hits = 2, of_windows = 3 }}
""",
    )
    r = cli("config", "show", str(p), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"]["threads"] == 2 and data["windows"]["max_batch"] == 2  # from the profile
    assert data["mqtt"]["credentials_file"] == str(files["creds"])
    assert PASSWORD not in r.stdout and PASSWORD not in r.stderr
    r = cli("-vv", "config", "show", str(p))
    assert r.returncode == 0, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    back = tomllib.loads(r.stdout)  # show's TOML reads back to the same merged config
    assert back["queries"][0]["text"] == 'chainsaw "close"'
    assert back["queries"][0]["policy"] == {"min_hits": 2, "of_windows": 3}
    assert (
        validate_config(back, check_files=False).model_dump()
        == load_config(p, check_files=False).model_dump()
    )


# --------------------------------------------------------------------------- profiles as measured


def test_each_profile_runs_a_measured_setting_no_worse_than_the_bundles_own() -> None:
    """scripts/profile_policies.py measured every profile's overlap + policy on the fixture's dev
    half with the default bundle's tuned thresholds; a profile edited without re-measuring, or a
    re-tuned bundle policy, fails here."""
    import tomllib

    from edge_retrieval.policy import PolicyOverlay, resolve

    res = json.loads((ROOT / "benchmarks" / "results" / "profile_policies_dev.json").read_text())
    spaces = json.loads((ROOT / "edge_retrieval" / "data" / "default_policy.json").read_text())["spaces"]
    default = [sid for sid, e in spaces.items() if e["bundle"].startswith("default-")]
    assert res["space_id"] in default, "measured on another bundle than the shipped default: re-run the script"
    tuned = PolicyOverlay.model_validate(spaces[res["space_id"]]["policy"])
    rows = {r["name"]: r for r in res["rows"]}
    ref = rows["bundle's tuned policy, no overlap"]
    assert ref["effective_policy"] == resolve(None, tuned).model_dump()
    assert sorted(res["profiles"]) == PROFILES
    for name in PROFILES:
        with open(ROOT / "firmware_config" / "profiles" / f"{name}.toml", "rb") as f:
            prof = tomllib.load(f)
        own = prof.get("detection", {}).get("policy")
        row = rows[res["profiles"][name]]
        assert row["overlap"] == prof["windows"]["overlap"], name
        assert row["effective_policy"] == resolve(PolicyOverlay.model_validate(own) if own else None, tuned).model_dump(), name
        assert row["f1"] >= ref["f1"] - 0.01 and row["false_events_per_stream"] <= ref["false_events_per_stream"] + 1, (name, row)
