"""A real Mosquitto broker for tests: free loopback port, generated config, stop/restart helpers.

``broker`` is a plain listener (anonymous, persistence on, so a restart keeps retained
messages and persistent sessions like a production broker). ``tls_broker`` adds TLS with a
throwaway CA, a server certificate and a client certificate made with ``cryptography``, a
password file made with ``mosquitto_passwd -b`` and the example ACL file from
firmware_config/examples.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
EXAMPLES = Path(__file__).resolve().parent.parent / "firmware_config" / "examples"


IDENTITY_KEYS = ("require_certificate", "use_identity_as_username", "use_username_as_clientid")


def example_identity_lines() -> list[str]:
    """Who a client is, as the shipped example config says it (certificate identity, client id)."""
    lines = [ln.strip() for ln in (EXAMPLES / "mosquitto.conf").read_text().splitlines()]
    return [ln for ln in lines if ln.split(" ", 1)[0] in IDENTITY_KEYS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TlsMaterial:
    """Throwaway PKI and credentials for one test session."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: dict[str, Path] = field(default_factory=dict)
    client_key: dict[str, Path] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)
    password_file: Path | None = None

    def credentials_file(self, user: str) -> Path:
        p = self.dir / f"{user}.cred"
        p.write_text(f"{user}\n{self.passwords[user]}\n")
        p.chmod(0o600)
        return p


class Broker:
    """One mosquitto process; ``stop``/``start`` keep the port and the persistence file."""

    def __init__(self, workdir: Path, tls: TlsMaterial | None = None, acl: Path | None = None) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        lines = [
            "per_listener_settings false",
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # keep access to the 0700 pytest tmp dir
        if tls is None:
            lines.append("allow_anonymous true")
        else:
            lines += [
                f"cafile {tls.ca}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
                *example_identity_lines(),
                "allow_anonymous false",
                f"password_file {tls.password_file}",
            ]
            if acl is not None:
                lines.append(f"acl_file {acl}")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}\n{self.log_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}\n{self.log_text()}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM): mosquitto saves retained messages and sessions first."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def make_tls_material(d: Path, users: dict[str, str]) -> TlsMaterial:
    """A CA, a server cert for 127.0.0.1/localhost, one client cert per user, a password file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def write_key(key: ec.EllipticCurvePrivateKey, p: Path) -> Path:
        p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        p.chmod(0o600)
        return p

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer_key: ec.EllipticCurvePrivateKey,
             issuer: x509.Name | None, ca: bool, san: list[x509.GeneralName] | None = None) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False,
                                              encipher_only=False, decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                critical=False)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("edge-retrieval test CA", ca_key, ca_key, None, True)
    ca_path = d / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = cert("localhost", srv_key, ca_key, ca_cert.subject, False,
               [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    srv_path = d / "server.pem"
    srv_path.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    mat = TlsMaterial(dir=d, ca=ca_path, server_cert=srv_path, server_key=write_key(srv_key, d / "server.key"))
    for user in users:
        k = ec.generate_private_key(ec.SECP256R1())
        c = cert(user, k, ca_key, ca_cert.subject, False)
        cp = d / f"client-{user}.pem"
        cp.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        mat.client_cert[user] = cp
        mat.client_key[user] = write_key(k, d / f"client-{user}.key")
    pw = d / "passwords"
    pw.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pw.chmod(0o600)
    mat.password_file = pw
    mat.passwords = dict(users)
    return mat


@pytest.fixture
def broker(tmp_path: Path):
    """A fresh plain broker per test (mosquitto starts in milliseconds)."""
    b = Broker(tmp_path / "broker")
    try:
        yield b
    finally:
        b.stop()


TLS_USERS = {"server": "server-pw-1", "alerts": "alerts-pw", "dev-1": "dev-1-pw", "dev-2": "dev-2-pw",
             "homeassistant": "ha-pw"}


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    return make_tls_material(tmp_path_factory.mktemp("pki"), TLS_USERS)


@pytest.fixture
def tls_broker(tmp_path: Path, tls_material: TlsMaterial):
    """TLS + client certificates + the example config's identity rules and ACL (users: server, alerts,
    dev-1, dev-2, homeassistant)."""
    b = Broker(tmp_path / "tls-broker", tls=tls_material, acl=EXAMPLES / "mosquitto.acl")
    try:
        yield b
    finally:
        b.stop()
