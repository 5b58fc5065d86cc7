"""``edge-retrieval config check FILE`` and ``config show FILE [--json]``.

``check`` validates the merged config (profile + file), the bundle's manifest and the platform,
and prints one ``OK:`` line or every problem, one per line (exit 1). ``show`` prints the merged
result with secrets masked, as TOML (or JSON), before any file has to exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any

from ...bundle import load_bundle
from ...config import (
    DeviceConfig,
    check_platform,
    clock_status,
    load_config,
    problems_of,
)
from ...errors import BundleError, ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("check", help="validate a device config (all problems at once)")
    c.add_argument("file", help="device config (TOML)")
    c.add_argument("--no-files", action="store_true", help="skip checks of files named in the config")
    s = sub.add_parser("show", help="print the merged config (profile + file), secrets hidden")
    s.add_argument("file", help="device config (TOML)")
    s.add_argument("--json", action="store_true", help="JSON instead of TOML")


def main(args: argparse.Namespace) -> int:
    if args.action == "check":
        return check(args.file, check_files=not args.no_files)
    return show(args.file, as_json=args.json)


# --------------------------------------------------------------------------- check


def _warnings(cfg: DeviceConfig) -> list[str]:
    """Things that work but deserve a look; never fatal."""
    out: list[str] = []
    if cfg.mqtt is not None and cfg.mqtt.credentials_file is not None:
        try:
            mode = cfg.mqtt.credentials_file.stat().st_mode
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                out.append(
                    f"mqtt.credentials_file: {str(cfg.mqtt.credentials_file)!r} is readable by every user "
                    "(expected mode 0640 or 0600: chmod 640 FILE)"
                )
        except OSError:
            pass
    if cfg.mqtt is not None and not cfg.mqtt.use_tls:
        out.append("mqtt.url: plain mqtt:// sends detections unencrypted (expected mqtts:// outside a lab)")
        if cfg.mqtt.tls is not None:
            out.append("mqtt.tls: ignored with a mqtt:// url (TLS needs mqtts://)")
    if cfg.mqtt is not None and cfg.mqtt.public_key_file is None:
        out.append("mqtt.public_key_file: not set, so any client of the broker can command this device")
    if "CPUExecutionProvider" != cfg.model.providers[-1] and "CPUExecutionProvider" in cfg.model.providers:
        out.append(
            "model.providers: CPUExecutionProvider is always used last; listing it earlier has no effect"
        )
    try:
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        for p in cfg.model.providers:
            if p not in have:
                out.append(
                    f"model.providers: {p} is not in this onnxruntime build ({ort.__version__}); "
                    "it will fall back to CPU (for CUDA on Jetson install NVIDIA's onnxruntime-gpu wheel)"
                )
    except ImportError:
        out.append("onnxruntime is not installed here; the device will need it")
    return out


def check(file: str, check_files: bool = True) -> int:
    errors: list[str] = []
    try:
        cfg = load_config(file, check_files=check_files)
    except ConfigError as exc:
        for line in problems_of(exc):
            print(f"{file}: {line}", file=sys.stderr)
        return 1
    try:
        check_platform()
    except ConfigError as exc:
        errors.append(f"platform: {exc}")
    bundle_note = str(cfg.model.bundle)
    if check_files:
        try:
            b = load_bundle(cfg.model.bundle, part="device", verify=True)
            s = b.summary()
            bundle_note = (
                f"{s['name']} ({s['space_kind']}, {len(s['experts'])} expert(s), "
                f"{s['device_mb']} MB, space {s['space_id'][:12]}, {'full' if s['server_part'] else 'slim'})"
            )
            if cfg.queries and not b.has_server_part:
                errors.append(
                    "queries: local queries need the bundle's text side, but "
                    f"{str(cfg.model.bundle)!r} is slim (expected a full bundle, or send queries over MQTT)"
                )
        except BundleError as exc:
            errors.append(f"model.bundle: {exc}")
    for w in _warnings(cfg):
        print(f"{file}: warning: {w}", file=sys.stderr)
    if errors:
        for line in errors:
            print(f"{file}: {line}", file=sys.stderr)
        return 1
    mq = (
        f"mqtt {cfg.mqtt.host}:{cfg.mqtt.port}{' (TLS)' if cfg.mqtt.use_tls else ''}"
        if cfg.mqtt
        else "no broker"
    )
    audio = cfg.audio.source
    if cfg.audio.source == "mic":
        audio += f" {cfg.audio.capture_rate or 'default'} Hz"
    print(
        f"OK: {file} (profile {cfg.profile or 'none'}): device {cfg.device.id}, bundle {bundle_note}, "
        f"{cfg.model.threads} thread(s) {'/'.join(p.removesuffix('ExecutionProvider') for p in cfg.model.providers)}, "
        f"audio {audio}, overlap {cfg.windows.overlap:g}, {len(cfg.queries)} local quer"
        f"{'y' if len(cfg.queries) == 1 else 'ies'}, {mq}, storage {cfg.storage.dir}, "
        f"clips {'on' if cfg.clips.enabled else 'off'}, clock {clock_status()}"
    )
    return 0


# --------------------------------------------------------------------------- show


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return (
            "{ "
            + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None)
            + " }"
        )
    raise TypeError(type(v).__name__)


def to_toml(data: dict[str, Any], prefix: str = "", header: str | None = None) -> str:
    """A small TOML writer for the config dict (None = unset, shown as a comment)."""
    scalars: list[str] = []
    tables: list[str] = []
    for k, v in data.items():
        name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
        if isinstance(v, dict):
            tables.append(to_toml(v, name))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.extend(to_toml(item, name, header=f"[[{name}]]") for item in v)
        elif v is None:
            scalars.append(f"# {_toml_key(k)} = (unset)")
        else:
            scalars.append(f"{_toml_key(k)} = {_toml_value(v)}")
    if header is None:
        header = f"[{prefix}]" if prefix and (scalars or not tables) else ""
    out = (header + "\n" if header else "") + "".join(line + "\n" for line in scalars)
    for t in tables:
        out += ("\n" if out else "") + t
    return out


def show(file: str, as_json: bool = False) -> int:
    try:
        cfg = load_config(file, check_files=False)
    except ConfigError as exc:
        for line in problems_of(exc):
            print(f"{file}: {line}", file=sys.stderr)
        return 1
    data = cfg.redacted()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        print(f"# merged config of {os.fspath(Path(file))} (profile {cfg.profile or 'none'}); secrets hidden")
        if data.get("mqtt") is None:  # no broker is written `mqtt = false`, as in the device file
            data = {**data, "mqtt": False}
        print(to_toml(data), end="")
    return 0
