"""``edge-retrieval install-service --config FILE``: write a hardened systemd unit for the daemon.

The unit runs ``edge-retrieval run --config FILE`` as a dedicated user (install.sh creates it)
with ``ProtectSystem=strict``: only the config's storage (and clips) folder is writable.
``Type=notify`` + ``WatchdogSec=``: the daemon reports READY and pings the watchdog through
``edge_retrieval.device.sdnotify``; ``--watchdog-s 0`` writes a plain ``Type=simple`` unit instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ...config import DeviceConfig, load_config, problems_of
from ...errors import ConfigError

UNIT_NAME = "edge-retrieval"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
DEFAULT_USER = "edge-retrieval"
TEMPLATE = "edge-retrieval.service.in"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="device config (TOML) the service runs with")
    p.add_argument(
        "--unit-dir", default=DEFAULT_UNIT_DIR, help=f"where to write the unit (default {DEFAULT_UNIT_DIR})"
    )
    p.add_argument("--user", default=DEFAULT_USER, help=f"service user (default {DEFAULT_USER})")
    p.add_argument(
        "--exec", dest="exec_path", default=None, help="edge-retrieval executable (default: this one)"
    )
    p.add_argument("--name", default=UNIT_NAME, help=f"unit name without .service (default {UNIT_NAME})")
    p.add_argument(
        "--watchdog-s",
        type=int,
        default=60,
        help="systemd watchdog period in seconds; 0 = no watchdog (Type=simple)",
    )
    p.add_argument(
        "--no-files", action="store_true", help="do not require the files the config names to exist yet"
    )


def _template() -> str:
    from ... import config as _cfg

    path = _cfg._profile_dir().parent / TEMPLATE
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"unit template {str(path)!r} is missing from the installation ({exc.strerror})"
        ) from exc


def _escape_arg(value: str) -> str:
    """One ExecStart argument: ``%`` is a systemd specifier, ``$`` an environment expansion."""
    v = value.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() for c in v) or '"' in v or "\\" in v or "'" in v:
        v = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return v


def _plain_path(p: Path, what: str) -> str:
    s = str(p)
    if not p.is_absolute() or any(c.isspace() for c in s) or any(c in s for c in "%$\"'\\;"):
        raise ConfigError(
            f"{what}: {s!r} cannot go in a systemd unit (expected an absolute path without spaces or quotes)"
        )
    return s


def _state_lines(cfg: DeviceConfig) -> str:
    """StateDirectory= when storage sits under /var/lib (systemd creates and chowns it), else ReadWritePaths=."""
    storage = Path(os.path.normpath(cfg.storage.dir))
    lines: list[str] = []
    rw: list[str] = []
    if storage.parent == Path("/var/lib"):
        lines += [f"StateDirectory={storage.name}", "StateDirectoryMode=0750"]
    else:
        rw.append(_plain_path(storage, "storage.dir"))
    clips = Path(os.path.normpath(cfg.clips.dir)) if cfg.clips.dir else None
    if cfg.clips.enabled and clips is not None and not clips.is_relative_to(storage):
        rw.append(_plain_path(clips, "clips.dir"))
    if rw:  # '-': do not fail the start if the folder is missing; the daemon reports it clearly
        lines.append("ReadWritePaths=" + " ".join(f"-{p}" for p in rw))
    return "\n".join(lines)


GPU_DEVICES = ("char-nvidia*", "char-nvhost*", "char-nvgpu*", "char-nvmap", "/dev/nvmap", "/dev/nvhost-ctrl",
               "/dev/nvhost-ctrl-gpu", "/dev/nvhost-prof-gpu", "/dev/nvhost-gpu", "/dev/nvhost-as-gpu")


def _device_lines(cfg: DeviceConfig) -> str:
    if any(p != "CPUExecutionProvider" for p in cfg.model.providers):
        # the char-* names are /proc/devices groups (systemd matches them as globs); the nvmap and
        # nvhost nodes of a Jetson are misc devices, named one by one
        return (
            "# GPU providers need the vendor's device nodes (/dev/nvhost-*, /dev/nvmap on Jetson, /dev/nvidia*):\n"
            "# closed policy, with those allowed; no ProtectClock, which would close them again.\n"
            "DevicePolicy=closed\nDeviceAllow=char-alsa rw\n"
            + "\n".join(f"DeviceAllow={d} rw" for d in GPU_DEVICES)
        )
    return "ProtectClock=true\nDevicePolicy=closed\nDeviceAllow=char-alsa rw"


HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))


def _protect_home(*paths: Path) -> str:
    """``true`` hides /home; a venv or config there (a test install) needs ``read-only``."""
    if any(p.is_relative_to(h) for p in paths for h in HOME_ROOTS):
        return "read-only"
    return "true"


def render_unit(
    cfg: DeviceConfig, config_path: Path, exec_path: Path, user: str, watchdog_s: int = 60
) -> str:
    """The unit text for this config; pure, so tests can verify it without writing."""
    if not user or not all(c.isalnum() or c in "-_" for c in user):
        raise ConfigError(f"--user {user!r} is not a valid user name (expected letters, digits, - and _)")
    if watchdog_s < 0 or watchdog_s > 3600:
        raise ConfigError(f"--watchdog-s {watchdog_s} is out of range (expected 0..3600 seconds)")
    watchdog = (
        f"# The daemon pings every {watchdog_s / 4:g} s; a hung inference loop is restarted.\n"
        f"WatchdogSec={watchdog_s}"
        if watchdog_s
        else "# No watchdog (--watchdog-s 0)."
    )
    subs = {
        "@TYPE@": "notify" if watchdog_s else "simple",
        "@EXEC@": _escape_arg(str(exec_path)),
        "@CONFIG_ARG@": _escape_arg(str(config_path)),
        "@CONFIG@": str(config_path).replace("%", "%%"),
        "@USER@": user,
        "@WATCHDOG@": watchdog,
        "@STATE@": _state_lines(cfg),
        "@DEVICES@": _device_lines(cfg),
        "@PROTECT_HOME@": _protect_home(config_path, exec_path),
        # onnxruntime's optimised-model cache (edge_retrieval.pipeline.expert) in the writable state dir:
        # the service user's ~/.cache is read-only under ProtectSystem/ProtectHome
        "@ORT_CACHE@": "Environment=EDGE_RETRIEVAL_ORT_CACHE="
        + _plain_path(Path(os.path.normpath(cfg.storage.dir)) / "ort-cache", "storage.dir"),
    }
    text = _template()
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


TMP_ROOTS = (Path("/tmp"), Path("/var/tmp"))


def paths_under_tmp(cfg: DeviceConfig, config_path: Path, exec_path: Path) -> list[tuple[str, Path]]:
    """Every path the service reads or writes that PrivateTmp would hide: (what, path)."""
    named: list[tuple[str, Path | None]] = [
        ("config", config_path), ("executable", exec_path), ("bundle (model.bundle)", cfg.model.bundle),
        ("audio file (audio.path)", cfg.audio.path if cfg.audio.source == "file" else None),
        ("state directory (storage.dir)", cfg.storage.dir), ("clips directory (clips.dir)", cfg.clips.dir),
    ]
    if cfg.mqtt is not None:
        named += [("credentials file (mqtt.credentials_file)", cfg.mqtt.credentials_file),
                  ("public key (mqtt.public_key_file)", cfg.mqtt.public_key_file)]
        if cfg.mqtt.tls is not None:
            named += [(f"TLS file (mqtt.tls.{k})", getattr(cfg.mqtt.tls, k)) for k in ("ca", "cert", "key")]
    out = []
    for what, p in named:
        if p is None:
            continue
        ap = Path(os.path.abspath(Path(p).expanduser()))
        if any(ap.is_relative_to(t) for t in TMP_ROOTS) and not any(ap.is_relative_to(q) for _, q in out):
            out.append((what, ap))
    return out


def default_exec() -> Path:
    """The edge-retrieval script next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "edge-retrieval"
    if here.is_file():
        return here
    found = shutil.which("edge-retrieval")
    if found:
        return Path(found)
    raise ConfigError(
        "cannot find the edge-retrieval executable (expected --exec /opt/edge-retrieval/venv/bin/edge-retrieval)"
    )


def main(args: argparse.Namespace) -> int:
    config_path = Path(args.config).resolve()
    try:
        cfg = load_config(config_path, check_files=not args.no_files)
    except ConfigError as exc:
        for line in problems_of(exc):
            print(f"{args.config}: {line}", file=sys.stderr)
        return 1
    exec_path = Path(args.exec_path).resolve() if args.exec_path else default_exec()
    if not exec_path.is_file():
        raise ConfigError(
            f"--exec {str(exec_path)!r} does not exist (expected the edge-retrieval executable)"
        )
    if not all(c.isalnum() or c in "-_.@" for c in args.name):
        raise ConfigError(f"--name {args.name!r} is not a unit name (expected letters, digits, - _ . @)")
    text = render_unit(cfg, config_path, exec_path, args.user, args.watchdog_s)
    unit_dir = Path(args.unit_dir)
    unit = unit_dir / f"{args.name}.service"
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        tmp = unit.with_name(f".{unit.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, unit)
    except OSError as exc:
        hint = " (run as root: sudo)" if isinstance(exc, PermissionError) else ""
        raise ConfigError(f"cannot write {str(unit)!r}: {exc.strerror}{hint}") from exc
    for what, path in paths_under_tmp(cfg, config_path, exec_path):
        print(f"warning: the {what} {path} is under /tmp, which the unit hides (PrivateTmp): "
              "move it (e.g. to /etc/edge-retrieval/, /opt/edge-retrieval/ or /var/lib/edge-retrieval/)")
    print(f"wrote {unit}")
    print("enable and start it with:")
    print(f"  sudo systemctl daemon-reload && sudo systemctl enable --now {args.name}")
    print("then watch it with:")
    print(f"  systemctl status {args.name}; journalctl -u {args.name} -f")
    return 0
