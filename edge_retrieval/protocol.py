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
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import QueryRejected
from .policy import PolicyOverlay

SCHEMA = 1
TOPIC_ROOT = "edge-retrieval/v1"
MAX_QUERY_BYTES = 256 * 1024  # a 512-d f32 vector is ~2.8 kB of base64; be generous but bounded
MAX_SPARSE = 64
MAX_CLIP_BYTES = 2_000_000  # largest clip published (bytes); MQTT brokers often cap messages near here
MAX_DENSE_DIM = 8192


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
    temporal: TemporalSpec | None = None  # a temporal query: its parts replace vectors/weights/threshold
    signature: str | None = None

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

    # canonical bytes for signing: everything but the signature, sorted keys, compact
    def signing_bytes(self) -> bytes:
        d = self.model_dump(mode="json", by_alias=True, exclude_none=False)
        d.pop("signature", None)
        if d.get("temporal") is None:
            d.pop("temporal", None)  # a plain query signs the same bytes as before the field existed
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()

    def expired(self, now: datetime | None = None) -> bool:
        if not self.expires:
            return False
        now = now or datetime.now(timezone.utc)
        try:
            exp = datetime.fromisoformat(self.expires.replace("Z", "+00:00"))
        except ValueError:
            return False
        if exp.tzinfo is None:
            exp = exp.replace(tzinfo=timezone.utc)
        return now >= exp


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


def _one_line(text: str, limit: int = 120) -> str:
    """A wire-supplied name made safe for a one-line message (control characters escaped)."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# --------------------------------------------------------------------------- signing


def sign_message(msg: QueryMessage, private_key: Any) -> QueryMessage:
    """Return ``msg`` with an Ed25519 signature (base64) from ``private_key``."""
    sig = private_key.sign(msg.signing_bytes())
    return msg.model_copy(update={"signature": base64.b64encode(sig).decode()})


def verify_signature(msg: QueryMessage, public_key: Any) -> None:
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
    """A device-to-server message: unknown fields refused, JSON without the unset ones."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

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
    event_id: str
    device: str
    query_id: str
    query: str
    score: float
    start_s: float
    end_s: float
    time: str  # UTC ISO 8601 of the onset
    clock: Literal["synced", "unsynced", "unknown"] = "unknown"
    source: str
    final: bool = False  # True on the update that closes the event
    clip: str | None = None
    site: str | None = None
    lat: float | None = None
    lon: float | None = None
    relation: Literal["sequence", "overlap"] | None = None  # temporal queries only
    within_s: float | None = None  # temporal queries only
    parts: list[EventPart] | None = None  # temporal queries only: each part's event, in time order


def new_event_id() -> str:
    return uuid.uuid4().hex


def parse_event(payload: bytes | str) -> Event:
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
    device: str
    time: str = Field(default_factory=utcnow)
    state: Literal["online", "offline"] | None = None
    health: dict[str, Any] | None = None
    topic: str | None = None  # rejection: where the message came from
    query_id: str | None = None
    version: int | None = None
    reason: str | None = None


def parse_status(payload: bytes | str) -> Status:
    try:
        return Status.model_validate_json(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = _one_line(".".join(str(p) for p in err["loc"])) or "(status)"
        raise QueryRejected(f"status field {loc}: {err['msg']}") from exc
