"""Wire contracts between server and devices (docs/architecture.md): query message, event, topics.

Schema 1. Vectors travel as base64 little-endian f16/f32, or sparse (indices + weights) for a
labels space. Query messages and tombstones are signed with Ed25519 over the canonical JSON of
the message without its ``signature`` field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, QueryRejected
from .policy import PolicyOverlay

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEMA = 1
TOPIC_ROOT = "edge-retrieval/v1"
MAX_QUERY_BYTES = 256 * 1024  # a 512-d f32 vector is ~2.8 kB of base64; be generous but bounded
MAX_SPARSE = 64
MAX_CLIP_BYTES = 2_000_000  # largest clip published (bytes); MQTT brokers often cap messages near here
MAX_DENSE_DIM = 8192
MAX_FIELD_CHARS = 256  # free-text fields of device messages (source, clip, site, reasons)
MAX_DEVICE_MESSAGE_BYTES = 64 * 1024  # largest event or status payload a server reads
MAX_CLOCK_SKEW_S = 300.0  # a query "created" further ahead of the device's clock waits (clock behind)
MAX_EXAMPLES = 32  # feedback windows (negatives or positives) per query
# windows of one event sent for feedback (its peak and others spread over it; chosen on the dev half
# by scripts/feedback_cv.py: one window removed 3 of 11 false events, 4 removed 5, none lost) and
# the most a server reads
FEEDBACK_WINDOWS = 4
MAX_EVENT_WINDOWS = 8


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- topics


def group_query_topic(group: str, query_id: str = "+") -> str:
    return f"{TOPIC_ROOT}/groups/{group}/queries/{query_id}"


def device_query_topic(device: str, query_id: str = "+") -> str:
    return f"{TOPIC_ROOT}/devices/{device}/queries/{query_id}"


def detections_topic(device: str = "+") -> str:
    return f"{TOPIC_ROOT}/devices/{device}/detections"


def status_topic(device: str = "+") -> str:
    return f"{TOPIC_ROOT}/devices/{device}/status"


def clip_topic(device: str, event_id: str = "+") -> str:
    return f"{TOPIC_ROOT}/devices/{device}/clips/{event_id}"


# device ids, group names, query ids, event ids: each is one MQTT topic level, so it must be safe there
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RE = re.compile(NAME_PATTERN)
NAME_FORM = "1-64 characters A-Z a-z 0-9 _ . -, starting with a letter or digit"


@dataclass(frozen=True)
class Topic:
    """A topic of this protocol, taken apart: what it carries and for whom."""

    kind: Literal["query", "detections", "status", "clip"]
    scope: Literal["groups", "devices"]
    target: str  # the group name or device id
    item: str | None = None  # the query id (query) or event id (clip)


def parse_topic(topic: str) -> Topic | None:
    """The inverse of the ``*_topic`` builders above; None for any other topic (or an empty level)."""
    root = TOPIC_ROOT.split("/")
    parts = topic.split("/")
    if parts[: len(root)] != root:
        return None
    rest = parts[len(root) :]
    if len(rest) < 3 or rest[0] not in ("groups", "devices") or not all(rest):
        return None
    scope, target = rest[0], rest[1]
    if len(rest) == 4 and rest[2] == "queries":
        return Topic("query", scope, target, rest[3])  # type: ignore[arg-type]
    if scope != "devices":
        return None
    if len(rest) == 3 and rest[2] in ("detections", "status"):
        return Topic(rest[2], "devices", target)  # type: ignore[arg-type]
    if len(rest) == 4 and rest[2] == "clips":
        return Topic("clip", "devices", target, rest[3])
    return None


# --------------------------------------------------------------------------- broker address

URL_FORM = "mqtt://host[:port] or mqtts://host[:port]"


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed broker URL."""

    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883); credentials never in the URL."""
    try:
        u = urlsplit(str(url))
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {str(url)[:120]!r} is not valid (expected {URL_FORM})") from exc
    if u.username is not None or u.password is not None:
        raise ConfigError(f"credentials in the broker URL are not allowed (expected {URL_FORM}; use a credentials file)")
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname or u.path not in ("", "/") or u.query:
        raise ConfigError(f"broker URL {str(url)[:120]!r} is not valid (expected {URL_FORM})")
    if port == 0:
        raise ConfigError(f"broker URL {str(url)[:120]!r} has port 0 (expected a port 1-65535)")
    tls = u.scheme == "mqtts"
    return BrokerAddress(u.hostname, port or (8883 if tls else 1883), tls)



# --------------------------------------------------------------------------- vectors


class VectorPayload(BaseModel):
    """One expert's query vector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert: str = Field(min_length=1, max_length=64)
    encoding: Literal["f16", "f32", "sparse"]
    data: str | None = None  # base64 little-endian, dense encodings
    dim: int | None = Field(default=None, gt=0, le=MAX_DENSE_DIM)
    indices: list[int] | None = None  # sparse
    weights: list[float] | None = None  # sparse

    @model_validator(mode="after")
    def _shape(self) -> VectorPayload:
        if self.encoding == "sparse":
            if self.indices is None or self.weights is None or self.data is not None:
                raise ValueError("sparse vector needs indices and weights and no data")
            if len(self.indices) != len(self.weights):
                raise ValueError("sparse indices and weights differ in length")
            if not 1 <= len(self.indices) <= MAX_SPARSE:
                raise ValueError(f"sparse vector must have 1..{MAX_SPARSE} entries, got {len(self.indices)}")
            if len(set(self.indices)) != len(self.indices) or min(self.indices) < 0:
                raise ValueError("sparse indices must be distinct and >= 0")
            if not all(math.isfinite(w) and w >= 0 for w in self.weights):
                raise ValueError("sparse weights must be finite and >= 0")
            if abs(sum(self.weights) - 1.0) > 1e-3:
                raise ValueError(f"sparse weights must sum to 1, got {sum(self.weights):.4f}")
        else:
            if self.data is None or self.indices is not None or self.weights is not None:
                raise ValueError(f"{self.encoding} vector needs data and no indices/weights")
        return self

    def dense(self, dim: int) -> np.ndarray:
        """Decode to a float32 array of length ``dim`` (sparse is scattered into zeros)."""
        if self.encoding == "sparse":
            assert self.indices is not None and self.weights is not None
            if max(self.indices) >= dim:
                raise QueryRejected(f"sparse index {max(self.indices)} out of range for dimension {dim}")
            v = np.zeros(dim, np.float32)
            v[np.asarray(self.indices)] = np.asarray(self.weights, np.float32)
            return v
        try:
            raw = base64.b64decode(self.data or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise QueryRejected(f"vector for expert {self.expert!r}: data is not base64") from exc
        dt = np.dtype("<f2") if self.encoding == "f16" else np.dtype("<f4")
        if len(raw) != dim * dt.itemsize:
            raise QueryRejected(
                f"vector for expert {self.expert!r}: {len(raw)} bytes, expected {dim * dt.itemsize} "
                f"({dim} x {self.encoding})"
            )
        v = np.frombuffer(raw, dtype=dt).astype(np.float32)
        if not np.all(np.isfinite(v)):
            raise QueryRejected(f"vector for expert {self.expert!r} holds NaN or inf")
        return v


def encode_dense(expert: str, vec: np.ndarray, encoding: Literal["f16", "f32"] = "f16") -> VectorPayload:
    v = np.asarray(vec, dtype="<f2" if encoding == "f16" else "<f4").ravel()
    return VectorPayload(
        expert=expert, encoding=encoding, data=base64.b64encode(v.tobytes()).decode(), dim=int(v.size)
    )


def encode_sparse(expert: str, indices: np.ndarray, weights: np.ndarray) -> VectorPayload:
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return VectorPayload(
        expert=expert,
        encoding="sparse",
        indices=[int(i) for i in indices],
        weights=[float(x) for x in w],
    )


# --------------------------------------------------------------------------- feedback examples


class Example(BaseModel):
    """One window a ranger judged (feedback): its vector per expert, as the event carried it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vectors: list[VectorPayload] = Field(min_length=1, max_length=16)
    event_id: str | None = Field(default=None, pattern=NAME_PATTERN)  # where it came from


# --------------------------------------------------------------------------- query message

MAX_WITHIN_S = 3600.0  # longest time limit of a temporal query (seconds)


def _check_vectors(vectors: list[VectorPayload], weights: list[float], threshold: float | None) -> None:
    """What a scoring query needs: vectors, one weight each, a threshold, one vector per expert."""
    if not vectors:
        raise ValueError("vectors is empty")
    if threshold is None:
        raise ValueError("threshold is missing")
    if len(weights) != len(vectors):
        raise ValueError(f"{len(weights)} weights for {len(vectors)} vectors")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be finite, >= 0, and not all zero")
    experts = [v.expert for v in vectors]
    if len(set(experts)) != len(experts):
        raise ValueError(f"duplicate expert in vectors: {experts}")


class TemporalPart(BaseModel):
    """One part of a temporal query: an ordinary query (vectors, threshold, policy) without an id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=500)
    vectors: list[VectorPayload] = Field(max_length=16)
    weights: list[float] = Field(max_length=16)
    threshold: float = Field(ge=-1, le=1)
    policy: PolicyOverlay | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TemporalPart:
        _check_vectors(self.vectors, self.weights, self.threshold)
        return self


class TemporalSpec(BaseModel):
    """A temporal query (docs/architecture.md): two parts and how their events must lie in time.

    ``sequence``: part 2's event starts after part 1's starts and at most ``within_s`` after
    part 1's ends; ``overlap``: the two events overlap in time, with ``within_s`` of slack.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    relation: Literal["sequence", "overlap"]
    within_s: float = Field(ge=0, le=MAX_WITHIN_S)
    parts: list[TemporalPart] = Field(min_length=2, max_length=2)


class QueryMessage(BaseModel):
    """A registered text query as it travels to devices (retained, QoS 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: int = Field(alias="schema")
    query_id: str = Field(pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    deleted: bool = False
    text: str = Field(default="", max_length=500)
    space_id: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    vectors: list[VectorPayload] = Field(default_factory=list, max_length=16)
    weights: list[float] = Field(default_factory=list, max_length=16)
    threshold: float | None = Field(default=None, ge=-1, le=1)
    policy: PolicyOverlay | None = None
    created: str = ""
    expires: str | None = None
    # feedback (optional): windows marked "false alarm" (suppressed when closer than the query's
    # positives) and "correct" (positives beside the query vector); docs/architecture.md
    negatives: list[Example] = Field(default_factory=list, max_length=MAX_EXAMPLES)
    positives: list[Example] = Field(default_factory=list, max_length=MAX_EXAMPLES)
    temporal: TemporalSpec | None = None  # a temporal query: its parts replace vectors/weights/threshold
    signature: str | None = None
    # the query topic this message was signed for (binds the signature to its target and id);
    # devices with a public key refuse a message that arrives on any other topic
    topic: str | None = Field(default=None, max_length=300)

    @field_validator("created", "expires")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v:
            parse_time(v)  # raises ValueError naming the expected form
        return v

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v != SCHEMA:
            raise ValueError(f"schema {v!r} is not supported (expected {SCHEMA})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> QueryMessage:
        if self.deleted:
            return self
        if not self.text.strip():
            raise ValueError("text is empty")
        if not self.space_id:
            raise ValueError("space_id is missing")
        if self.temporal is not None:
            if self.vectors or self.weights or self.threshold is not None:
                raise ValueError("a temporal query carries its vectors, weights and thresholds in temporal.parts only")
            return self
        _check_vectors(self.vectors, self.weights, self.threshold)
        return self

    def _wire(self, exclude_none: bool) -> dict[str, Any]:
        d = self.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
        for key in _OPTIONAL_LISTS:  # absent when empty: messages without feedback keep their bytes
            if not d.get(key):
                d.pop(key, None)
        return d

    # canonical bytes for signing: everything but the signature, sorted keys, compact
    def signing_bytes(self) -> bytes:
        d = self._wire(exclude_none=False)
        d.pop("signature", None)
        if d.get("temporal") is None:
            d.pop("temporal", None)  # a plain query signs the same bytes as before the field existed
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def to_json(self) -> bytes:
        return json.dumps(self._wire(exclude_none=True)).encode()

    def expired(self, now: datetime | None = None) -> bool:
        return bool(self.expires) and (now or datetime.now(timezone.utc)) >= parse_time(self.expires or "")

    def created_ahead_s(self, now: datetime | None = None) -> float:
        """Seconds ``created`` lies ahead of ``now`` (> MAX_CLOCK_SKEW_S: this clock is behind)."""
        if not self.created:
            return 0.0
        return (parse_time(self.created) - (now or datetime.now(timezone.utc))).total_seconds()


def parse_time(text: str) -> datetime:
    """A UTC ISO 8601 time from the wire (``Z`` or an offset; naive means UTC); ValueError otherwise."""
    try:
        t = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"time {str(text)[:40]!r} is not ISO 8601 (expected e.g. 2026-01-31T12:00:00Z)") from exc
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


_OPTIONAL_LISTS = ("negatives", "positives")


def parse_query_message(payload: bytes | str) -> QueryMessage:
    """Parse a payload from the wire; any problem becomes one QueryRejected line."""
    if isinstance(payload, bytes | bytearray):
        if len(payload) > MAX_QUERY_BYTES:
            raise QueryRejected(f"query message is {len(payload)} bytes, limit {MAX_QUERY_BYTES}")
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QueryRejected("query message is not UTF-8") from exc
    elif len(payload) > MAX_QUERY_BYTES:
        raise QueryRejected(f"query message is {len(payload)} chars, limit {MAX_QUERY_BYTES}")
    try:
        obj = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise QueryRejected(f"query message is not JSON ({str(exc)[:80]})") from exc
    if not isinstance(obj, dict):
        raise QueryRejected(f"query message must be a JSON object, got {type(obj).__name__}")
    try:
        return QueryMessage.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _one_line(".".join(str(p) for p in err["loc"])) or "(message)"
        raise QueryRejected(f"query message field {loc}: {err['msg']}") from exc


def printable(text: object, limit: int = 200) -> str:
    """A device-supplied string made safe for a log line or a terminal: control and format characters
    (newlines, escape sequences, bidi overrides) are written as escapes, and it is cut at ``limit``."""
    t = str(text)
    cut = len(t) > limit
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in t[:limit])
    return out + ("..." if cut else "")


def _one_line(text: str, limit: int = 120) -> str:
    """A wire-supplied name made safe for a one-line message (control characters escaped)."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# --------------------------------------------------------------------------- signing


def sign_message(msg: QueryMessage, private_key: Ed25519PrivateKey) -> QueryMessage:
    """Return ``msg`` with an Ed25519 signature (base64) from ``private_key``."""
    sig = private_key.sign(msg.signing_bytes())
    return msg.model_copy(update={"signature": base64.b64encode(sig).decode()})


def verify_signature(msg: QueryMessage, public_key: Ed25519PublicKey) -> None:
    """Raise QueryRejected unless ``msg`` carries a valid signature by ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    if not msg.signature:
        raise QueryRejected(f"query {msg.query_id!r} v{msg.version} is unsigned")
    try:
        sig = base64.b64decode(msg.signature, validate=True)
        public_key.verify(sig, msg.signing_bytes())
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise QueryRejected(f"query {msg.query_id!r} v{msg.version} has a bad signature") from exc


# --------------------------------------------------------------------------- events


class _WireMessage(BaseModel):
    """A device-to-server message: unknown fields refused, NaN/Infinity refused, JSON without the
    unset ones. Every string is bounded: a device must not grow the server's database at will."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


class EventPart(BaseModel):
    """When one part of a temporal query was heard (stream offsets, seconds) and its peak score."""

    model_config = ConfigDict(extra="forbid")

    text: str
    start_s: float
    end_s: float
    score: float


class Event(_WireMessage):
    """A detection. The onset message and later updates share ``event_id``; the server upserts."""

    schema_: int = Field(default=SCHEMA, alias="schema")
    event_id: str = Field(pattern=NAME_PATTERN)
    device: str = Field(pattern=NAME_PATTERN)
    query_id: str = Field(pattern=NAME_PATTERN)
    query: str = Field(max_length=500)  # the query text (QueryMessage.text has the same bound)
    score: float
    start_s: float
    end_s: float
    time: str = Field(max_length=40)  # UTC ISO 8601 of the onset
    clock: Literal["synced", "unsynced", "unknown"] = "unknown"
    source: str = Field(max_length=MAX_FIELD_CHARS)
    final: StrictBool = False  # True on the update that closes the event
    clip: str | None = Field(default=None, max_length=MAX_FIELD_CHARS)
    site: str | None = Field(default=None, max_length=MAX_FIELD_CHARS)
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    # the peak window's vector per expert (f16 embeddings, top-k sparse labels) on the final
    # update, as devices sent it before ``windows``: a server still reads it from them
    vectors: list[VectorPayload] | None = Field(default=None, max_length=16)
    # on the final update: up to FEEDBACK_WINDOWS windows of the event in that form, the peak
    # first, the others spread over its length (a long false alarm does not sound the same
    # throughout); what a "false alarm" or "correct" feedback adds to the alert
    windows: list[Example] | None = Field(default=None, max_length=MAX_EVENT_WINDOWS)
    relation: Literal["sequence", "overlap"] | None = None  # temporal queries only
    within_s: float | None = None  # temporal queries only
    parts: list[EventPart] | None = None  # temporal queries only: each part's event, in time order


def new_event_id() -> str:
    return uuid.uuid4().hex


def _check_size(payload: bytes | str, what: str) -> None:
    if len(payload) > MAX_DEVICE_MESSAGE_BYTES:
        raise QueryRejected(f"{what} is {len(payload)} bytes, limit {MAX_DEVICE_MESSAGE_BYTES}")


def parse_event(payload: bytes | str) -> Event:
    _check_size(payload, "event")
    try:
        return Event.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _one_line(".".join(str(p) for p in err["loc"])) or "(event)"
        raise QueryRejected(f"event field {loc}: {err['msg']}") from exc


# --------------------------------------------------------------------------- device status


class Status(_WireMessage):
    """What a device says on its status topic (schema 1).

    ``type`` "state" (retained: "online" on connect, "offline" as the last will), "health"
    (retained, periodic: real-time factor, dropped/gated windows, outbox depth, disk, clock)
    or "rejection" (not retained: a query message this device refused, and why).
    """

    schema_: int = Field(default=SCHEMA, alias="schema")
    type: Literal["state", "health", "rejection"]
    device: str = Field(pattern=NAME_PATTERN)
    time: str = Field(default_factory=utcnow, max_length=40)
    state: Literal["online", "offline"] | None = None
    health: dict[str, Any] | None = None
    topic: str | None = Field(default=None, max_length=300)  # rejection: where the message came from
    query_id: str | None = Field(default=None, max_length=200)
    version: int | None = None
    reason: str | None = Field(default=None, max_length=500)


def parse_status(payload: bytes | str) -> Status:
    _check_size(payload, "status")
    try:
        return Status.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _one_line(".".join(str(p) for p in err["loc"])) or "(status)"
        raise QueryRejected(f"status field {loc}: {err['msg']}") from exc
