"""Console accounts and sessions, in the server's database.

Passwords are hashed with argon2id (argon2-cffi); a session is a random token whose sha256 is
stored (a stolen database holds no usable cookie), with its own CSRF token and an expiry, and
logging out deletes it. Roles: ``viewer`` reads; ``ranger`` also changes alerts and gives feedback.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..protocol import NAME_FORM, NAME_RE, utcnow
from .side_db import open_side_db

ROLES = ("viewer", "ranger")
MIN_PASSWORD = 10  # characters
SESSION_S = 12 * 3600  # a session lives this long (seconds), then the user logs in again

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, csrf TEXT NOT NULL, expires REAL NOT NULL
);
"""
_PG_SCHEMA = _SCHEMA.replace("REAL", "DOUBLE PRECISION")


def _hasher() -> Any:
    try:
        from argon2 import PasswordHasher
    except ImportError as exc:
        raise ImportError("console accounts need argon2-cffi: pip install 'edge-retrieval[console]'") from exc
    return PasswordHasher()


@dataclass(frozen=True)
class Session:
    name: str
    role: str
    csrf: str

    @property
    def can_change(self) -> bool:
        return self.role == "ranger"


class Users:
    """Accounts and sessions, in the server's ``--db`` (a SQLite file or PostgreSQL; own connection)."""

    def __init__(self, db: str | Path) -> None:
        self._ph = _hasher()
        self._sql = open_side_db(db, _SCHEMA, _PG_SCHEMA)

    @property
    def where(self) -> str:
        """The database, for messages (a PostgreSQL URL without its password)."""
        return str(self._sql)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._sql.exec(sql, args)

    # ------------------------------------------------------------------ accounts

    def add(self, name: str, role: str, password: str, replace: bool = False) -> None:
        if not NAME_RE.match(name):
            raise ConfigError(f"user name {name!r} is not valid (expected {NAME_FORM})")
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not valid (expected one of {', '.join(ROLES)})")
        if len(password) < MIN_PASSWORD:
            raise ConfigError(f"password is {len(password)} characters (expected at least {MIN_PASSWORD})")
        if not replace and self.role(name) is not None:
            raise ConfigError(f"user {name!r} exists (remove it first, or pass --replace)")
        self._exec("INSERT INTO users VALUES (?,?,?,?) ON CONFLICT(name) DO UPDATE SET role=excluded.role, "
                   "hash=excluded.hash", (name, role, self._ph.hash(password), utcnow()))
        self._exec("DELETE FROM sessions WHERE name=?", (name,))  # a new password ends old sessions

    def remove(self, name: str) -> None:
        if self.role(name) is None:
            raise ConfigError(f"no user {name!r}")
        self._exec("DELETE FROM users WHERE name=?", (name,))
        self._exec("DELETE FROM sessions WHERE name=?", (name,))

    def list(self) -> list[dict[str, str]]:
        rows = self._exec("SELECT name, role, created FROM users ORDER BY name").fetchall()
        return [{"name": n, "role": r, "created": c} for n, r, c in rows]

    def role(self, name: str) -> str | None:
        r = self._exec("SELECT role FROM users WHERE name=?", (name,)).fetchone()
        return r[0] if r else None

    def verify(self, name: str, password: str) -> bool:
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

        r = self._exec("SELECT hash FROM users WHERE name=?", (name,)).fetchone()
        if r is None:
            self._ph.hash(password)  # same work for an unknown name: no timing oracle for names
            return False
        try:
            return bool(self._ph.verify(r[0], password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # ------------------------------------------------------------------ sessions

    def open_session(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        self._exec("DELETE FROM sessions WHERE expires < ?", (time.time(),))
        self._exec("INSERT INTO sessions VALUES (?,?,?,?)",
                   (_sha(token), name, secrets.token_urlsafe(32), time.time() + SESSION_S))
        return token

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        r = self._exec("SELECT s.name, u.role, s.csrf, s.expires FROM sessions s JOIN users u ON u.name = s.name "
                       "WHERE s.token_sha256=?", (_sha(token),)).fetchone()
        if r is None or r[3] < time.time():
            return None
        return Session(r[0], r[1], r[2])

    def close_session(self, token: str | None) -> None:
        if token:
            self._exec("DELETE FROM sessions WHERE token_sha256=?", (_sha(token),))

    def close(self) -> None:
        self._sql.close()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LoginLimiter:
    """At most ``attempts`` failed logins per ``window_s`` (seconds) per client address and per name."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and q[0] < now - self.window_s:
            q.popleft()
        return q

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self.attempts for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._fails) > 10_000:  # bounded: forget everyone rather than grow without end
                self._fails.clear()
            for k in keys:
                self._recent(k, now).append(now)
