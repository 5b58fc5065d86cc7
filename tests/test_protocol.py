"""Wire contracts: query message, event and status round trips, Ed25519 signatures, parser fuzzing."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_retrieval.errors import QueryRejected
from edge_retrieval.protocol import (
    MAX_QUERY_BYTES,
    Event,
    QueryMessage,
    Status,
    encode_dense,
    encode_sparse,
    new_event_id,
    parse_event,
    parse_query_message,
    parse_status,
    sign_message,
    verify_signature,
)

SPACE = "ab" * 32


def make_query(version: int = 1, qid: str = "chainsaw-1", **kw: object) -> QueryMessage:
    d: dict[str, object] = {
        "schema": 1,
        "query_id": qid,
        "version": version,
        "text": "chainsaw sound",
        "space_id": SPACE,
        "vectors": [
            encode_sparse("birdnet", np.array([3, 17, 40]), np.array([0.5, 0.3, 0.2])).model_dump(exclude_none=True),
            encode_dense("clap", np.linspace(-1, 1, 8), "f16").model_dump(exclude_none=True),
        ],
        "weights": [0.5, 0.5],
        "threshold": 0.35,
        "policy": {"min_hits": 2, "of_windows": 3},
        "created": "2026-01-01T00:00:00.000Z",
    }
    d.update(kw)
    return QueryMessage.model_validate(d)


def test_query_round_trip_keeps_every_field() -> None:
    msg = make_query()
    back = parse_query_message(msg.to_json())
    assert back == msg
    assert back.signing_bytes() == msg.signing_bytes()
    v = back.vectors[1].dense(8)
    assert np.allclose(v, np.linspace(-1, 1, 8), atol=1e-3)
    s = back.vectors[0].dense(64)
    assert s[3] == pytest.approx(0.5) and s.sum() == pytest.approx(1.0)


def test_signature_verifies_and_detects_tampering() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_message(make_query(), key)
    verify_signature(parse_query_message(signed.to_json()), key.public_key())
    # any changed field breaks it: threshold, version, vector data
    for change in ({"threshold": 0.01}, {"version": 2}, {"text": "gunshot"}):
        forged = signed.model_copy(update=change)
        with pytest.raises(QueryRejected, match="bad signature"):
            verify_signature(forged, key.public_key())
    with pytest.raises(QueryRejected, match="bad signature"):
        verify_signature(sign_message(make_query(), Ed25519PrivateKey.generate()), key.public_key())
    with pytest.raises(QueryRejected, match="unsigned"):
        verify_signature(make_query(), key.public_key())
    bad_b64 = signed.model_copy(update={"signature": "!!not base64!!"})
    with pytest.raises(QueryRejected):
        verify_signature(bad_b64, key.public_key())


def test_tombstone_is_signed_like_a_query() -> None:
    key = Ed25519PrivateKey.generate()
    tomb = QueryMessage.model_validate({"schema": 1, "query_id": "chainsaw-1", "version": 5, "deleted": True})
    signed = sign_message(tomb, key)
    back = parse_query_message(signed.to_json())
    assert back.deleted and back.version == 5
    verify_signature(back, key.public_key())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"schema": 2}, "schema"),
        ({"space_id": "xyz"}, "space_id"),
        ({"threshold": float("nan")}, "NaN|not JSON|threshold"),
        ({"weights": [1.0]}, "weights"),
        ({"query_id": "../../etc"}, "query_id"),
        ({"text": ""}, "text"),
        ({"version": 0}, "version"),
        ({"extra_field": 1}, "extra"),
    ],
)
def test_parser_names_the_bad_field(change: dict, match: str) -> None:
    d = json.loads(make_query().to_json())
    d.update(change)
    raw = json.dumps(d, allow_nan=True).encode()
    with pytest.raises(QueryRejected, match=match):
        parse_query_message(raw)


def test_dense_vector_checks_size_and_finiteness() -> None:
    v = encode_dense("clap", np.ones(8), "f32")
    with pytest.raises(QueryRejected, match="expected 64"):
        v.dense(16)
    nan = v.model_copy(update={"data": base64.b64encode(np.array([np.nan] * 8, "<f4").tobytes()).decode()})
    with pytest.raises(QueryRejected, match="NaN or inf"):
        nan.dense(8)
    with pytest.raises(QueryRejected, match="limit"):
        parse_query_message(b"{" + b" " * (MAX_QUERY_BYTES + 1) + b"}")


def test_event_and_status_round_trip() -> None:
    ev = Event(event_id=new_event_id(), device="dev-1", query_id="q", query="chainsaw sound", score=0.8,
               start_s=1.5, end_s=4.0, time="2026-01-01T00:00:01.500Z", clock="synced", source="mic", final=True,
               site="north", lat=51.5, lon=-0.1)
    assert parse_event(ev.to_json()) == ev
    assert json.loads(ev.to_json())["schema"] == 1
    with pytest.raises(QueryRejected, match="event field"):
        parse_event(b'{"event_id": 3}')
    for st_ in (
        Status(type="state", state="offline", device="dev-1"),
        Status(type="health", state="online", device="dev-1", health={"rtf": 0.1, "outbox_depth": 0}),
        Status(type="rejection", device="dev-1", topic="t", query_id="q", reason="bad signature"),
    ):
        assert parse_status(st_.to_json()) == st_
    with pytest.raises(QueryRejected):
        parse_status(b'{"type": "party"}')


# --------------------------------------------------------------------------- fuzzing

_valid = json.loads(make_query().to_json())
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=10), c, max_size=5),
                           max_leaves=20)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with one field replaced, removed or added."""
    d = json.loads(json.dumps(_valid))
    key = draw(st.sampled_from(sorted(d) + ["vectors.0", "vectors.1", "new"]))
    op = draw(st.sampled_from(["replace", "delete"]))
    if key.startswith("vectors."):
        i = int(key.split(".")[1])
        sub = draw(st.sampled_from(sorted(d["vectors"][i])))
        if op == "delete":
            d["vectors"][i].pop(sub)
        else:
            d["vectors"][i][sub] = draw(json_values)
    elif op == "delete" and key in d:
        d.pop(key)
    else:
        d[key] = draw(json_values)
    return json.dumps(d).encode()


payloads = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=256).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated(),
    st.sampled_from([b"NaN", b'{"schema": 1, "version": Infinity}', b"[" * 5000, b'{"a":' * 3000]),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads)
def test_parse_never_raises_anything_but_query_rejected(payload: bytes) -> None:
    try:
        msg = parse_query_message(payload)
    except QueryRejected as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # whatever parses is a coherent message whose vectors decode or are rejected cleanly
    assert isinstance(msg, QueryMessage)
    for v in msg.vectors:
        try:
            v.dense(128)
        except QueryRejected:
            pass
