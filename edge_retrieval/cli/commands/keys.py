"""``edge-retrieval keys generate --out DIR``: the Ed25519 pair that signs queries.

The private key (``query-signing.key``, mode 0600) stays on the server; devices get only the
public key (``query-signing.pub``) as ``mqtt.public_key_file``, so a stolen device cannot forge
queries for the fleet.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ...errors import ConfigError

PRIVATE_NAME = "query-signing.key"
PUBLIC_NAME = "query-signing.pub"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    g = sub.add_parser("generate", help="write a new private/public key pair (PEM)")
    g.add_argument("--out", type=Path, required=True, help="folder for the two PEM files")
    g.add_argument("--force", action="store_true", help="overwrite an existing pair")


def generate(out: Path, force: bool = False) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out).expanduser()
    priv, pub = out / PRIVATE_NAME, out / PUBLIC_NAME
    if not force and (priv.exists() or pub.exists()):
        raise ConfigError(f"{str(priv)!r} or {str(pub)!r} already exists (expected an empty folder, or --force)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        if priv.exists():
            priv.unlink()
        fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(priv, 0o600)
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        raise ConfigError(f"cannot write keys to {str(out)!r}: {exc}") from exc
    return priv, pub


def main(args: argparse.Namespace) -> int:
    priv, pub = generate(args.out, args.force)
    print(f"private key: {priv} (mode 0600; keep it on the server, pass it as --key)")
    print(f"public key:  {pub} (copy to each device: mqtt.public_key_file)")
    return 0
