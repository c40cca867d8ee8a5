"""The server's token store: who may use its GPUs, and how much of them (SQLite, tokens hashed).

A token is ``bfnet_<id>_<secret>``: ``id`` names it in listings and revocations (it is not
secret), ``secret`` is 32 random bytes (URL-safe base64). The store keeps the id, the user, the
SHA-256 of the secret (never the secret: a stolen database gives no working token, and a token
of 256 random bits needs no slow hash), its limits, when it was made, when it expires and when it
was revoked. The token text is shown once, when it is created.

One SQLite file in the server's state directory (``tokens.sqlite3``), opened per operation, so
that ``bitfusion-server token ...`` and a running server share it safely (SQLite's own locking);
the server reads it at each connect, so a revocation holds at the next connect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_FILE = "tokens.sqlite3"
STATE_DIR_ENV = "BITFUSION_NET_STATE_DIR"
_TOKEN = re.compile(r"^bfnet_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    user TEXT NOT NULL,
    secret_sha256 BLOB NOT NULL,
    max_gpus INTEGER,          -- NULL: no limit
    max_memory INTEGER,        -- bytes across the user's leases; NULL: no limit
    max_fraction REAL,         -- sum of the user's fractions of GPUs; NULL: no limit
    created REAL NOT NULL,     -- unix seconds
    expires REAL,              -- unix seconds; NULL: never
    revoked REAL,              -- unix seconds; NULL: live
    operator INTEGER NOT NULL DEFAULT 0  -- 1: may read the management endpoint's API
);
"""
# A record's columns, in ``TokenRecord``'s order.
_COLUMNS = "id, user, max_gpus, max_memory, max_fraction, created, expires, revoked, operator"


class TokenError(Exception):
    """A token that is malformed, unknown, expired or revoked; the message says which (and
    never echoes the secret)."""


def default_state_dir() -> Path:
    """``$BITFUSION_NET_STATE_DIR``, else ``~/.local/state/bitfusion-net``."""
    configured = os.environ.get(STATE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".local" / "state" / "bitfusion-net"


@dataclass(frozen=True)
class TokenRecord:
    """A token as the store knows it (without its secret)."""

    id: str
    user: str
    max_gpus: int | None
    max_memory: int | None
    max_fraction: float | None
    created: float
    expires: float | None
    revoked: float | None
    operator: bool = False  # may read the management endpoint

    def state(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and now >= self.expires:
            return "expired"
        return "live"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class TokenStore:
    """The tokens of one server, in ``state_dir/tokens.sqlite3`` (created on first use)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / TOKEN_FILE

    @classmethod
    def existing(cls, state_dir: str | os.PathLike[str]) -> TokenStore | None:
        """The store in ``state_dir`` if it has been created, else None."""
        store = cls(state_dir)
        return store if store.path.exists() else None

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not self.path.exists()
        db = sqlite3.connect(self.path, timeout=5.0)
        try:
            if fresh:
                os.chmod(self.path, 0o600)  # hashes only, but who holds tokens is nobody's business
            db.execute(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(tokens)")}
            if "operator" not in columns:  # a store made before operators existed
                db.execute("ALTER TABLE tokens ADD COLUMN operator INTEGER NOT NULL DEFAULT 0")
            with db:  # one transaction
                yield db
        finally:
            db.close()

    def create(
        self,
        user: str,
        *,
        max_gpus: int | None = None,
        max_memory: int | None = None,
        max_fraction: float | None = None,
        expires_in: float | None = None,
        operator: bool = False,
        now: float | None = None,
    ) -> tuple[str, TokenRecord]:
        """Make a token for ``user``; returns its text (shown once) and its record.
        ``operator``: it may also read the management endpoint (docs/OBSERVABILITY.md)."""
        if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", user):
            raise ValueError(f"a user name is 1-64 of letters, digits and ._@- (got {user!r})")
        for name, value in (("max_gpus", max_gpus), ("max_memory", max_memory)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_fraction is not None and not max_fraction >= 0:
            raise ValueError(f"max_fraction must be >= 0, got {max_fraction}")
        if expires_in is not None and not expires_in > 0:
            raise ValueError(f"a token must expire after a positive time, got {expires_in}")
        created = time.time() if now is None else now
        token_id = secrets.token_hex(8)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        record = TokenRecord(
            token_id,
            user,
            max_gpus,
            max_memory,
            max_fraction,
            created,
            None if expires_in is None else created + expires_in,
            None,
            operator,
        )
        with self._db() as db:
            db.execute(
                f"INSERT INTO tokens (secret_sha256, {_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (
                    _digest(secret),
                    record.id,
                    record.user,
                    record.max_gpus,
                    record.max_memory,
                    record.max_fraction,
                    record.created,
                    record.expires,
                    int(operator),
                ),
            )
        return f"bfnet_{token_id}_{secret}", record

    def records(self) -> list[TokenRecord]:
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM tokens ORDER BY created").fetchall()
        return [_record(row) for row in rows]

    def revoke(self, token_id: str, now: float | None = None) -> TokenRecord:
        """Revoke a token by its id (or the whole token text); ``TokenError`` if unknown."""
        match = _TOKEN.match(token_id)
        token_id = match.group(1) if match else token_id
        with self._db() as db:
            updated = db.execute(
                "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (time.time() if now is None else now, token_id),
            ).rowcount
            row = db.execute(f"SELECT {_COLUMNS} FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if row is None:
            raise TokenError(f"no token {token_id!r} in {self.path}")
        record = _record(row)
        if not updated:
            raise TokenError(f"token {token_id} of {record.user} was already revoked")
        return record

    def check(self, token: str, now: float | None = None) -> TokenRecord:
        """The live token ``token`` is, or ``TokenError`` saying why not (malformed, unknown,
        wrong secret: the same text; expired or revoked, with when). The secret's hash is
        compared in constant time."""
        match = _TOKEN.match(token)
        if match is None:
            raise TokenError("not a bitfusion-net token (expected bfnet_<id>_<secret>)")
        token_id, secret = match.groups()
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS}, secret_sha256 FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        if row is None or not hmac.compare_digest(bytes(row[-1]), _digest(secret)):
            raise TokenError("unknown token")
        record = _record(row[:-1])
        now = time.time() if now is None else now
        if record.revoked is not None:
            raise TokenError(f"the token of {record.user} was revoked at {_when(record.revoked)}")
        if record.expires is not None and now >= record.expires:
            raise TokenError(f"the token of {record.user} expired at {_when(record.expires)}")
        return record


def _record(row: tuple[Any, ...]) -> TokenRecord:
    """A record from a row of ``_COLUMNS``."""
    token_id, user, max_gpus, max_memory, max_fraction, created, expires, revoked, operator = row
    return TokenRecord(
        token_id,
        user,
        max_gpus,
        max_memory,
        max_fraction,
        created,
        expires,
        revoked,
        bool(operator),
    )


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
