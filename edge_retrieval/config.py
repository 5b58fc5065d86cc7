"""The device config: one TOML file, optionally on top of a shipped profile (docs/architecture.md).

A field team drops one file on a card; ``load_config`` reads it, overlays it on the profile it
names (``profile = "raspberry-pi-4"`` -> firmware_config/profiles/raspberry-pi-4.toml, a deep merge
of tables), validates the result once and reports *every* problem as ``key.path: message
(expected ...)`` in one ConfigError. Secrets live in files (``mqtt.credentials_file``), never in
the config itself, and ``DeviceConfig.redacted()`` is what ``config show`` and logs print.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import re
import socket
import struct
import subprocess
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .policy import PolicyOverlay
from .protocol import NAME_FORM, NAME_RE, BrokerAddress, parse_broker_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_config" / "profiles"
GATE_DBFS_MIN = -160.0  # quietest energy gate (dBFS) a config file or `run --gate-dbfs` may set
SECRET_WORDS = ("password", "passwd", "secret", "token", "psk", "private")
BITS32_MACHINES = {"armv6l", "armv7l", "armv8l", "arm", "i386", "i486", "i586", "i686", "x86"}


def _profile_dir() -> Path:
    """Profiles ship in the wheel as ``edge_retrieval.firmware_config/profiles``."""
    try:
        from . import firmware_config  # type: ignore[attr-defined]

        return Path(firmware_config.__file__).resolve().parent / "profiles"
    except Exception:  # noqa: BLE001 - source tree without an install: fall back to the layout
        return PROFILE_DIR


# --------------------------------------------------------------------------- path helpers


def _ctx(info: ValidationInfo) -> dict[str, Any]:
    return info.context if isinstance(info.context, dict) else {}


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Expand ``~`` and make a relative path relative to the config file's folder."""
    p = Path(os.path.expanduser(str(value)))
    base = _ctx(info).get("base_dir")
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    return p


def _checking(info: ValidationInfo) -> bool:
    return bool(_ctx(info).get("check_files", True))


def _at(sub: str, msg: str) -> ValueError:
    """A model-level problem that belongs to one key below the model (``format_errors`` moves it)."""
    return ValueError(f"@{sub}: {msg}")


def _must_be_file(p: Path, what: str) -> Path:
    try:
        ok = p.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"file {str(p)!r} does not exist (expected an existing {what})")
    return p


def _resolved_path(v: Path, info: ValidationInfo) -> Path:
    return _resolve_path(v, info)


def _str_path(v: Any) -> Any:
    """TOML gives strings; refuse numbers/booleans instead of letting pydantic guess."""
    if isinstance(v, str):
        if not v or "\x00" in v:
            raise ValueError("empty path or NUL byte (expected a file system path)")
        return v
    if isinstance(v, Path):
        return v
    raise ValueError(f"got {type(v).__name__} (expected a file system path as a string)")


FilePath = Annotated[Path, BeforeValidator(_str_path), AfterValidator(_resolved_path)]


def _name(v: Any) -> Any:
    if isinstance(v, str) and not NAME_RE.match(v):
        raise ValueError(f"{v[:80]!r} is not a valid name (expected {NAME_FORM})")
    return v


Name = Annotated[str, AfterValidator(_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------- sections


class DeviceSection(_Section):
    """Who this device is and where it stands (carried in every detection)."""

    id: Name = Field(default_factory=lambda: _hostname_id())
    groups: list[Name] = Field(default_factory=list, max_length=32)
    site: str | None = Field(default=None, max_length=200)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    require_clock_sync: bool = False  # boards without an RTC: warn, and mark event times untrusted until NTP syncs

    @model_validator(mode="after")
    def _lat_lon_pair(self) -> DeviceSection:
        if (self.lat is None) != (self.lon is None):
            raise _at(
                "lon" if self.lon is None else "lat",
                "set both lat and lon or neither (expected decimal degrees, WGS84)",
            )
        return self


def _hostname_id() -> str:
    """Default device id: the hostname, trimmed to a valid topic name."""
    h = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0])[:64].strip("-._")
    return h or "device"


class ModelSection(_Section):
    """Which bundle to load and how onnxruntime runs it."""

    bundle: FilePath
    threads: int = Field(default=1, ge=1, le=64)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], min_length=1, max_length=8)

    @field_validator("bundle")
    @classmethod
    def _bundle_exists(cls, v: Path, info: ValidationInfo) -> Path:
        if not _checking(info):
            return v
        try:
            ok = (v / "manifest.json").is_file()
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                f"bundle {str(v)!r} not found (expected a bundle directory containing manifest.json, "
                "e.g. made with `edge-retrieval bundle slim`)"
            )
        return v

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(r"[A-Za-z]+ExecutionProvider", p):
                raise ValueError(
                    f"{p[:80]!r} is not an onnxruntime provider name (expected e.g. CPUExecutionProvider)"
                )
        return v


def _device_ref(v: Any) -> Any:
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return v
    if isinstance(v, str) and v.strip():
        return v
    raise ValueError(f"got {v!r:.80} (expected a PortAudio device name or a device index >= 0)")


class AudioSection(_Section):
    """Where samples come from."""

    source: Literal["mic", "file", "stdin"] = "mic"
    path: FilePath | None = None
    device: Annotated[str | int | None, BeforeValidator(_device_ref)] = None
    capture_rate: int | None = Field(default=None, ge=8000, le=384000)
    channels: int = Field(default=1, ge=1, le=32)
    block_s: float = Field(default=0.1, ge=0.005, le=2.0)
    realtime: bool = True
    stdin_rate: int = Field(default=48000, ge=8000, le=384000)
    stdin_format: Literal["s16le", "f32le"] = "s16le"

    @model_validator(mode="after")
    def _file_source(self, info: ValidationInfo) -> AudioSection:
        if self.source == "file":
            if self.path is None:
                raise _at("path", "source = 'file' needs audio.path (expected the path of a sound file)")
            if _checking(info):
                try:
                    _must_be_file(self.path, "sound file")
                except ValueError as exc:
                    raise _at("path", str(exc)) from None
        return self


class WindowsSection(_Section):
    """Windowing: overlap is a fraction of the bundle's window; the queue is bounded in seconds."""

    overlap: float = Field(default=0.0, ge=0.0, le=0.95)
    max_batch: int = Field(default=8, ge=1, le=256)
    max_queue_s: float = Field(default=30.0, gt=0, le=3600)


class GateSection(_Section):
    """Energy gate: quiet windows are counted and skipped instead of encoded."""

    enabled: bool = True
    energy_dbfs: float = Field(default=-70.0, ge=GATE_DBFS_MIN, le=0.0)


class DetectionSection(_Section):
    """Device defaults for the detection policy (below a query's own policy)."""

    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    policy: PolicyOverlay = Field(default_factory=PolicyOverlay)


class LocalQuery(_Section):
    """A query compiled on the device from text (local mode: the bundle needs its server part)."""

    id: Name | None = None
    text: str = Field(min_length=1, max_length=500)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    policy: PolicyOverlay | None = None


class TlsSection(_Section):
    """TLS files for mqtts://: CA, and the device's own certificate and key for mutual TLS."""

    ca: FilePath
    cert: FilePath | None = None
    key: FilePath | None = None

    @model_validator(mode="after")
    def _files(self, info: ValidationInfo) -> TlsSection:
        if (self.cert is None) != (self.key is None):
            raise _at(
                "key" if self.key is None else "cert",
                "set both cert and key or neither (expected PEM files for mutual TLS)",
            )
        if _checking(info):
            problems = []
            for name in ("ca", "cert", "key"):
                p = getattr(self, name)
                if p is None:
                    continue
                try:
                    _must_be_file(p, "PEM file")
                except ValueError as exc:
                    problems.append(f"@{name}: {exc}")
            if problems:
                raise ValueError("\n".join(problems))
        return self


def read_credentials(path: Path) -> tuple[str, str]:
    """``user`` and ``password`` from a file of two lines, or one ``user:password`` line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot read credentials file {str(path)!r} (expected a readable text file)"
        ) from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) == 1 and ":" in lines[0]:
        user, _, pw = lines[0].partition(":")
    elif len(lines) == 2:
        user, pw = lines
    else:
        raise ValueError(
            f"credentials file {str(path)!r} has an unexpected layout "
            "(expected two lines, user then password, or one line user:password)"
        )
    if not user or not pw:
        raise ValueError(f"credentials file {str(path)!r} has an empty user or password")
    return user, pw


class MqttSection(_Section):
    """The broker link. Credentials come from a file; the query public key pins who may command us."""

    url: str
    client_id: Name | None = None
    tls: TlsSection | None = None
    credentials_file: FilePath | None = None
    public_key_file: FilePath | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    health_interval_s: float = Field(default=60.0, ge=1.0, le=86400)
    qos: Literal[1] = 1

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            parse_broker_url(v)  # the one parser; a URL with credentials is refused without echoing it
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def address(self) -> BrokerAddress:
        return parse_broker_url(self.url)

    @field_validator("credentials_file")
    @classmethod
    def _creds(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and _checking(info):
            _must_be_file(v, "credentials file (two lines: user, password)")
            read_credentials(v)  # layout check; the values are never kept on the model
        return v

    @field_validator("public_key_file")
    @classmethod
    def _pubkey(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is not None and _checking(info):
            _must_be_file(v, "Ed25519 public key (PEM) from `edge-retrieval keys`")
            try:
                head = v.read_bytes()[:4096]
            except OSError as exc:
                raise ValueError(f"cannot read {str(v)!r} (expected a readable PEM file)") from exc
            if b"PRIVATE KEY" in head:
                raise ValueError(
                    f"{str(v)!r} holds a PRIVATE key (expected the public key; the private key stays on the server)"
                )
            if b"-----BEGIN PUBLIC KEY-----" not in head:
                raise ValueError(
                    f"{str(v)!r} is not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')"
                )
        return v

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def use_tls(self) -> bool:
        """TLS is on for mqtts:// only; ``tls`` files with mqtt:// are ignored (config check warns)."""
        return self.address.tls

    def credentials(self) -> tuple[str, str] | None:
        """Read the credentials file now (never cached on the model, never logged)."""
        if self.credentials_file is None:
            return None
        try:
            return read_credentials(self.credentials_file)
        except ValueError as exc:
            raise ConfigError(f"mqtt.credentials_file: {exc}") from exc


class StorageSection(_Section):
    """Where the outbox and state live; bounded in events, with a low-disk warning in MB."""

    dir: FilePath = Field(default=Path("~/.local/state/edge-retrieval"), validate_default=True)
    outbox_max_events: int = Field(default=100_000, ge=10, le=100_000_000)
    min_free_mb: int = Field(default=200, ge=0, le=1_000_000)


class ClipsSection(_Section):
    """Optional FLAC clips around detections, in a folder capped at ``max_mb`` megabytes."""

    enabled: bool = False
    dir: FilePath | None = None  # default: storage.dir/clips
    max_mb: float = Field(default=500.0, gt=0, le=1_000_000)
    pre_s: float = Field(default=2.0, ge=0, le=60)
    post_s: float = Field(default=2.0, ge=0, le=60)
    max_clip_s: float = Field(default=30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _lengths(self) -> ClipsSection:
        if self.max_clip_s < self.pre_s + self.post_s:
            raise _at(
                "max_clip_s",
                f"max_clip_s ({self.max_clip_s:g}) is shorter than pre_s + post_s "
                f"({self.pre_s + self.post_s:g}) (expected max_clip_s >= pre_s + post_s)",
            )
        return self


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class DeviceConfig(_Section):
    """The whole device config after profile overlay and validation."""

    profile: str | None = None
    device: DeviceSection = Field(default_factory=DeviceSection)
    model: ModelSection
    audio: AudioSection = Field(default_factory=AudioSection)
    windows: WindowsSection = Field(default_factory=WindowsSection)
    gate: GateSection = Field(default_factory=GateSection)
    detection: DetectionSection = Field(default_factory=DetectionSection)
    queries: list[LocalQuery] = Field(default_factory=list, max_length=256)
    mqtt: MqttSection | None = None
    storage: StorageSection = Field(default_factory=StorageSection)
    clips: ClipsSection = Field(default_factory=ClipsSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    @model_validator(mode="after")
    def _defaults_from_siblings(self) -> DeviceConfig:
        if self.clips.dir is None:
            self.clips.dir = self.storage.dir / "clips"
        ids = [q.id for q in self.queries if q.id is not None]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise _at("queries", f"duplicate query id(s) {dup} (expected each query id once)")
        return self

    def redacted(self) -> dict[str, Any]:
        """JSON-ready dict for ``config show`` and logs: secret-looking values masked.

        The model never holds a password or private key (they stay in files); this is the
        belt to that brace, so a future secret field cannot leak by accident.
        """
        return _redact(self.model_dump(mode="json"))


def _redact(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, key) for v in obj]
    if obj is not None and any(w in key.lower() for w in SECRET_WORDS) and not key.endswith("_file"):
        return "***"
    return obj


# --------------------------------------------------------------------------- loading


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` wins key by key; tables merge recursively, everything else (lists too) is replaced."""
    out: dict[str, Any] = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def available_profiles() -> list[str]:
    d = _profile_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {str(path)!r} does not exist (expected a TOML file)") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.__class__.__name__}") from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (expected a TOML file)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{what} {str(path)!r} is not valid TOML: {exc} (expected TOML, see firmware_config/example-device.toml)"
        ) from exc


def _profile_path(name: Any, base_dir: Path | None) -> Path:
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"profile: got {name!r:.80} (expected one of {available_profiles()} or a path to a .toml file)"
        )
    if name.endswith(".toml") or "/" in name:
        p = Path(os.path.expanduser(name))
        return p if p.is_absolute() or base_dir is None else base_dir / p
    if not NAME_RE.match(name):
        raise ConfigError(
            f"profile: {name[:80]!r} is not a profile name (expected one of {available_profiles()})"
        )
    p = _profile_dir() / f"{name}.toml"
    if not p.is_file():
        raise ConfigError(f"profile: unknown profile {name!r} (expected one of {available_profiles()})")
    return p


# mqtt keys a device file may unset with `false` (the profiles set them for an mqtts:// fleet)
UNSETTABLE_MQTT = ("tls", "credentials_file")


def merged_dict(
    data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, base_dir: Path | None = None
) -> dict[str, Any]:
    """Profile (if named) <- file <- overrides, as one plain dict, before validation."""
    top = deep_merge(data, overrides or {})  # copies: the caller's dict is never changed
    name = top.get("profile")
    if name is not None:
        ppath = _profile_path(name, base_dir)
        prof = _read_toml(ppath, "profile")
        if "profile" in prof:
            raise ConfigError(
                f"profile {str(ppath)!r}: a profile cannot name another profile (expected no 'profile' key)"
            )
        top = deep_merge(prof, top)
    if top.get("mqtt") is False:  # `mqtt = false` in a device file: local only, drop the profile's broker
        del top["mqtt"]
    mq = top.get("mqtt")
    if isinstance(mq, dict):  # `tls = false` / `credentials_file = false`: a plain mqtt:// broker on a profile
        for key in UNSETTABLE_MQTT:
            if mq.get(key) is False:
                del mq[key]
    return top


def validate_config(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    check_files: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> DeviceConfig:
    """Merge the profile and validate; every problem in one ConfigError."""
    merged = merged_dict(data, overrides, base_dir)
    try:
        cfg = DeviceConfig.model_validate(merged, context={"base_dir": base_dir, "check_files": check_files})
    except ValidationError as exc:
        problems = format_errors(exc)
        err = ConfigError(
            f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}:\n  "
            + "\n  ".join(problems)
        )
        err.problems = problems  # type: ignore[attr-defined]
        raise err from None  # the pydantic chain would repeat input values (secrets) in tracebacks
    except (TypeError, RecursionError) as exc:  # hostile nesting, non-string keys from a caller dict
        raise ConfigError(f"{source}: cannot validate ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    log.debug("config %s: %s", source, cfg.redacted())
    return cfg


def problems_of(exc: ConfigError) -> list[str]:
    """The list of ``key.path: message`` lines of a ConfigError (one line for file-level errors)."""
    return list(getattr(exc, "problems", None) or [str(exc)])


def load_config(
    path: str | os.PathLike[str], overrides: dict[str, Any] | None = None, *, check_files: bool = True
) -> DeviceConfig:
    """Read, overlay and validate a device config file (ConfigError lists ALL problems)."""
    p = Path(path)
    data = _read_toml(p, "config")
    cfg = validate_config(
        data, source=str(p), base_dir=p.resolve().parent, check_files=check_files, overrides=overrides
    )
    return cfg


# --------------------------------------------------------------------------- error messages


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional/list to the model class a loc step leads into (or None)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
        else:
            return tp


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = DeviceConfig
    for step in loc:
        if isinstance(step, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or step not in model.model_fields:
            return None
        tp = _unwrap(model.model_fields[step].annotation)
        if typing.get_origin(tp) is list:
            tp = _unwrap(typing.get_args(tp)[0])
        model = tp
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for step in loc:
        if isinstance(step, int):
            out += f"[{step}]"
        else:
            k = str(step)
            if not re.fullmatch(r"[A-Za-z0-9_-]+", k):
                k = json.dumps(k)  # a TOML quoted key: keeps odd names on one printable line
            out += ("." if out else "") + k
    return out or "(top level)"


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list (TOML array)",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "path_type": "a file system path as a string",
    "missing": "this key to be set",
}


def _show(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def format_errors(exc: ValidationError) -> list[str]:
    """One ``key.path: message (expected ...)`` line per problem; secret values never shown."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(
            s
            for s in err["loc"]
            if isinstance(s, int) or not str(s).startswith(("function-", "lax-", "strict-"))
        )
        # drop union branch tags such as 'str' / 'int' that pydantic inserts
        tags = ("str", "int", "float", "bool", "list[str]", "none")
        unknown = err["type"] == "extra_forbidden"  # the last step is the unknown key itself, even a key named "none"
        loc = tuple(s for i, s in enumerate(loc) if s not in tags or (unknown and i == len(loc) - 1))
        key = _key_path(loc)
        typ = err["type"]
        ctx = err.get("ctx") or {}
        secret = any(w in key.lower() for w in SECRET_WORDS) or key.endswith("url")
        got = "" if secret else f"got {_show(err.get('input'))}; "
        if typ == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = f"one of: {', '.join(allowed)}" if allowed else "no such key"
            if any(w in str(loc[-1]).lower() for w in SECRET_WORDS):
                hint += "; secrets go in mqtt.credentials_file, never in the config"
            msg = f"unknown key (expected {hint})"
        elif typ == "missing":
            msg = "required key is missing (expected this key to be set)"
        elif typ in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[
                typ
            ]
            bound = next(iter(ctx.values()), "?")
            msg = f"{got}out of range (expected a value {op} {bound})"
        elif typ == "literal_error":
            msg = f"{got}not allowed (expected one of {ctx.get('expected', '?')})"
        elif typ in ("too_long", "too_short", "string_too_short", "string_too_long"):
            n = ctx.get("min_length", ctx.get("max_length", "?"))
            bound = "at least" if "short" in typ else "at most"
            unit = "characters" if typ.startswith("string") else "items"
            msg = f"{got}wrong length (expected {bound} {n} {unit})"
        elif typ in ("value_error", "assertion_error"):
            text = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            for part in text.split("\n"):
                sub_key = key
                if part.startswith("@") and ": " in part:
                    sub, part = part[1:].split(": ", 1)
                    sub_key = _key_path((*loc, sub))
                lines.append(
                    f"{sub_key}: {part if 'expected' in part else part + ' (expected a valid value)'}"
                )
            continue
        elif typ in _EXPECTED:
            msg = f"{got}wrong type (expected {_EXPECTED[typ]})"
        else:
            msg = f"{got}{err['msg']}"
        lines.append(f"{key}: {msg}")
    return list(dict.fromkeys(lines))


# --------------------------------------------------------------------------- platform and clock


def check_platform(machine: str | None = None, pointer_bits: int | None = None) -> None:
    """Refuse a 32-bit OS: onnxruntime publishes no 32-bit ARM wheels.

    Checks the userland too: Raspberry Pi OS 32-bit often runs a 64-bit kernel, so
    ``uname -m`` says aarch64 while Python itself is 32-bit.
    """
    m = (machine or platform.machine() or "").lower()
    bits = pointer_bits if pointer_bits is not None else struct.calcsize("P") * 8
    if m in BITS32_MACHINES or bits < 64:
        raise ConfigError(
            f"this is a 32-bit system ({m or 'unknown'}, {bits}-bit Python); edge-retrieval needs a 64-bit OS "
            "(onnxruntime publishes no 32-bit ARM wheels): flash Raspberry Pi OS (64-bit)"
        )


TIMESYNC_MARKER = Path("/run/systemd/timesync/synchronized")


def clock_status(
    timedatectl: str = "timedatectl", marker: Path = TIMESYNC_MARKER, timeout_s: float = 2.0
) -> Literal["synced", "unsynced", "unknown"]:
    """Is the system clock NTP-synchronised? Boards without an RTC boot with a stale clock.

    Asks systemd (``timedatectl show -p NTPSynchronized --value``); falls back to the marker file
    systemd-timesyncd touches on sync; "unknown" when neither can tell (containers, no systemd).
    """
    try:
        out = subprocess.run(
            [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        val = out.stdout.strip().lower()
        if out.returncode == 0 and val in ("yes", "no"):
            return "synced" if val == "yes" else "unsynced"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        if marker.exists():
            return "synced"
    except OSError:
        pass
    return "unknown"


__all__ = [
    "AudioSection",
    "ClipsSection",
    "ConfigError",
    "DetectionSection",
    "DeviceConfig",
    "DeviceSection",
    "GateSection",
    "LocalQuery",
    "LoggingSection",
    "ModelSection",
    "MqttSection",
    "StorageSection",
    "TlsSection",
    "WindowsSection",
    "available_profiles",
    "check_platform",
    "clock_status",
    "deep_merge",
    "format_errors",
    "load_config",
    "problems_of",
    "read_credentials",
    "validate_config",
]
