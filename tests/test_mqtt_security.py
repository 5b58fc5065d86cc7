"""TLS with client certificates + username/password + the example ACL, and signed queries:
a forged query, a replayed old version and an unsigned removal are refused over the wire."""

from __future__ import annotations

import numpy as np
import pytest

from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.device.agent import DeviceAgent
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.errors import TransportError
from edge_retrieval.protocol import (
    QueryMessage,
    detections_topic,
    encode_sparse,
    group_query_topic,
    sign_message,
    status_topic,
)
from edge_retrieval.server import AlertManager, load_private_key, query_topic
from edge_retrieval.transport import MqttTransport, TlsFiles, read_credentials_file
from tests.mqtt_helpers import beep_scene, device_config, start_server, wait_for

TOPIC = group_query_topic("site-a", "beep")


def _query(space: str, version: int, **kw: object) -> QueryMessage:
    d: dict[str, object] = {
        "schema": 1, "query_id": "beep", "version": version, "text": "beep", "space_id": space,
        "vectors": [encode_sparse("tones", np.array([1]), np.array([1.0])).model_dump(exclude_none=True)],
        "weights": [1.0], "threshold": 0.5,
    }
    d.update(kw)
    return QueryMessage.model_validate(d)


def _tls(mat, user: str) -> TlsFiles:
    return TlsFiles(mat.ca, mat.client_cert[user], mat.client_key[user])


def test_tls_auth_acl_and_signed_queries(tmp_path, tls_broker, tls_material, tiny_bundle) -> None:
    mat = tls_material
    priv, pub = generate(tmp_path / "keys")
    key = load_private_key(priv)
    space = tiny_bundle.manifest.space.id
    srv, store = start_server(tls_broker.url, tmp_path / "server.sqlite", tls=_tls(mat, "server"),
                              credentials=("server", mat.passwords["server"]))
    alerts = AlertManager(store, srv.transport, key)

    audio = beep_scene(tmp_path / "long.wav", beeps=20)
    _, cfg = device_config(tmp_path, tls_broker.url, tiny_bundle.root, audio, device_id="dev-1",
                           public_key=pub, tls=_tls(mat, "dev-1"), credentials=mat.credentials_file("dev-1"))
    daemon = Daemon.from_config(cfg)
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.start()
    wait_for(lambda: agent.transport.connected, 15, f"the device's TLS link ({agent.transport.last_error})")

    # 1. a signed alert applies
    alerts.publish(_query(space, 10), "group", "site-a")
    wait_for(lambda: (q := daemon.matcher.get("beep")) and q.version == 10, 10, "the signed query")
    rejected = lambda: agent.queries.counts["rejected"]  # noqa: E731

    # an attacker with broker write access (here: the server's account) but not the signing key
    def inject(payload: bytes) -> None:
        srv.transport.publish_wait(TOPIC, payload, qos=1, retain=True)

    # 2. forged: signed with another key, higher version, lower threshold
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    n = rejected()
    inject(sign_message(_query(space, 11, threshold=0.01), Ed25519PrivateKey.generate()).to_json())
    wait_for(lambda: rejected() == n + 1, 10, "the forged query's rejection")
    assert "bad signature" in agent.queries.last_rejection and daemon.matcher.get("beep").version == 10
    # 3. replay of an old, genuinely signed version after an update
    old = sign_message(_query(space, 10, topic=TOPIC), key).to_json()
    alerts.publish(_query(space, 12, threshold=0.6), "group", "site-a")
    wait_for(lambda: daemon.matcher.get("beep").version == 12, 10, "the update")
    inject(old)
    wait_for(lambda: rejected() == n + 2, 10, "the replay's rejection")
    assert "older" in agent.queries.last_rejection and daemon.matcher.get("beep").version == 12
    # 4. an unsigned removal and an empty retained payload remove nothing
    inject(QueryMessage.model_validate({"schema": 1, "query_id": "beep", "version": 99, "deleted": True}).to_json())
    wait_for(lambda: rejected() == n + 3, 10, "the unsigned tombstone's rejection")
    assert "unsigned" in agent.queries.last_rejection
    inject(b"")
    wait_for(lambda: rejected() == n + 4, 10, "the empty payload's rejection")
    assert len(daemon.matcher) == 1
    # the server heard about every refusal on the device's status topic
    wait_for(lambda: len(store.notices("dev-1", "rejection")) >= 4, 10, "rejection notices at the server")
    # 5. the genuine removal (signed tombstone, then the topic is cleared) works
    alerts.publish(_query(space, 13), "group", "site-a")
    wait_for(lambda: daemon.matcher.get("beep").version == 13, 10, "re-added query")
    alerts.remove("beep")
    wait_for(lambda: len(daemon.matcher) == 0, 10, "the signed removal")

    # 6. ACL: a device (here dev-2, whose certificate is its account) cannot write queries, nor read
    # another device's detections; it can read its own status topic
    creds2 = read_credentials_file(mat.credentials_file("dev-2"))
    rogue = MqttTransport(tls_broker.url, "dev-2-rogue", tls=_tls(mat, "dev-2"), credentials=creds2,
                          clean_session=True)
    seen: list[str] = []
    rogue.subscribe(detections_topic("dev-1"), lambda t, p, r: seen.append(t))
    rogue.subscribe(status_topic("dev-2"), lambda t, p, r: seen.append(t) if p == b"marker" else None)
    rogue.start()
    wait_for(lambda: rogue.connected, 10, "the rogue link")
    before = dict(agent.queries.counts)
    rogue.publish_wait(query_topic("group", "site-a", "evil"), _query(space, 50, query_id="evil").to_json(),
                       qos=1, retain=True)
    # a genuine message published afterwards arrives; the rogue one never did
    alerts.publish(_query(space, 60, query_id="marker"), "group", "site-a")
    wait_for(lambda: daemon.matcher.get("marker") is not None, 10, "the marker query")
    assert agent.queries.counts["rejected"] == before["rejected"]  # the rogue message never arrived
    srv.transport.publish_wait(detections_topic("dev-1"), b"{}", qos=1)
    srv.transport.publish_wait(status_topic("dev-2"), b"marker", qos=1)  # readable by dev-2
    wait_for(lambda: status_topic("dev-2") in seen, 10, "the marker on dev-2's own status topic")
    assert detections_topic("dev-1") not in seen
    rogue.stop()

    # 7. the certificate is the account (use_identity_as_username): a password, even a wrong one or
    # another account's name, changes nothing; without a client certificate nobody gets in
    other = MqttTransport(tls_broker.url, "dev-1-other", tls=_tls(mat, "dev-1"), credentials=("server", "wrong"))
    other.start()
    wait_for(lambda: other.connected, 10, "dev-1's certificate connecting")
    other.stop()
    with pytest.raises(TransportError, match="not reachable"):
        bad2 = MqttTransport(tls_broker.url, "x", tls=TlsFiles(mat.ca), credentials=("dev-1", "wrong"))
        bad2.start()
        try:
            bad2.publish_wait("a/b", b"x", timeout_s=2)
        finally:
            bad2.stop()

    daemon.stop()
    agent.stop(drain_s=0)
    srv.stop()
