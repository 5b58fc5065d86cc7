"""One wiring: ``run`` flags are overrides of a DeviceConfig, built by the service's constructor."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from edge_retrieval.bundle import load_bundle
from edge_retrieval.cli.commands.run import add_arguments, device_config
from edge_retrieval.config import load_config
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.errors import ConfigError
from tests.fixtures_audio import write_scene


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def _settings(d: Daemon) -> dict:
    """Everything the daemon was built with that a flag or a config key can set."""
    c = d.clips
    return {
        "device": d.device_id, "step_s": d.step_s, "max_batch": d.max_batch, "max_queue": d.max_queue,
        "gate": d.pipeline.gate.threshold_dbfs, "policy": d.detector.default_policy,
        "source": (type(d.source).__name__, d.source.name, d.source.sample_rate, d.source.live),
        "experts": [(e.name, e.sample_rate) for e in d.experts],
        "clips": None if c is None else (c.dir, c.max_bytes, c.pre_s, c.post_s, c.max_clip_s),
        "site": (d.site, d.lat, d.lon),
    }


def test_flags_and_config_file_build_the_same_daemon(tiny_bundle, tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scene.wav", [("noise", 2), ("1000", 2)], 32000)
    clips = tmp_path / "clips"
    flags = _args("--bundle", str(tiny_bundle.root), "--source", str(scene), "--threads", "2", "--overlap", "0.5",
                  "--max-batch", "4", "--gate-dbfs", "-60", "--device-id", "dev7", "--min-hits", "2",
                  "--of-windows", "3", "--cooldown", "1.5", "--no-adapt", "--clips-dir", str(clips))
    toml = tmp_path / "device.toml"
    toml.write_text(f"""
[device]
id = "dev7"
[model]
bundle = "{tiny_bundle.root}"
threads = 2
[audio]
source = "file"
path = "{scene}"
realtime = false
[windows]
overlap = 0.5
max_batch = 4
[gate]
energy_dbfs = -60
[detection.policy]
min_hits = 2
of_windows = 3
cooldown_s = 1.5
adapt = false
[clips]
enabled = true
dir = "{clips}"
""")
    from_flags = device_config(flags)
    from_file = device_config(_args("--config", str(toml)))
    assert from_flags == from_file == load_config(toml)
    bundle = load_bundle(tiny_bundle.root, part="device")
    a, b = Daemon.from_config(from_flags, bundle=bundle), Daemon.from_config(from_file, bundle=bundle)
    assert _settings(a) == _settings(b)
    assert _settings(a)["gate"] == -60 and _settings(a)["step_s"] == pytest.approx(0.5 * bundle.manifest.device.hop_s)
    assert a.detector.default_policy.min_hits == 2 and a.detector.default_policy.adapt is False


def test_flags_override_the_config_file(tiny_bundle, tmp_path: Path) -> None:
    toml = tmp_path / "device.toml"
    toml.write_text(f'[model]\nbundle = "{tiny_bundle.root}"\nthreads = 2\n[gate]\nenergy_dbfs = -50\n')
    cfg = device_config(_args("--config", str(toml), "--gate-dbfs", "off", "--threads", "1"))
    assert cfg.gate.enabled is False and cfg.model.threads == 1


@pytest.mark.parametrize("value", ["-170", "3"])
def test_a_flag_has_the_config_limits(tiny_bundle, value: str) -> None:
    # one set of limits: --gate-dbfs is checked by the config's own rule, and named on one line
    with pytest.raises(ConfigError) as exc:
        device_config(_args("--bundle", str(tiny_bundle.root), f"--gate-dbfs={value}"))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("--gate-dbfs: gate.energy_dbfs:") and value in msg


@pytest.mark.parametrize("level", ["INFO", "ERROR"])
def test_config_log_level_reaches_the_root_logger(tiny_bundle, tmp_path: Path, capsys, level: str) -> None:
    import logging

    from edge_retrieval.cli import main

    scene = write_scene(tmp_path / "scene.wav", [("noise", 2), ("1000", 2)], 32000)
    toml = tmp_path / "device.toml"
    toml.write_text(f'[model]\nbundle = "{tiny_bundle.root}"\n[audio]\nsource = "file"\npath = "{scene}"\n'
                    f'realtime = false\n[logging]\nlevel = "{level}"\n[[queries]]\ntext = "beep"\n')
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.WARNING)  # what the CLI sets without -v
    try:
        assert main(["run", "--config", str(toml), "--json"]) == 0
        assert root.level == getattr(logging, level)
    finally:
        root.setLevel(before)
