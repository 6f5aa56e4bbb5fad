"""API keys: generation, keyed hashing, verification, and the bootstrap platform-admin key."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.errors import Unauthenticated
from openmaas.store.tables import ApiKeyRow, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "om_"
ALL_SCOPES = ("inference", "manage", "billing")
BOOTSTRAP_ADMIN_NAME = "bootstrap-admin"
# Verified keys are remembered this long, so revocation takes effect within it on every process.
_CACHE_TTL_S = 1.0


@dataclass(frozen=True)
class Principal:
    """Who is calling. Organisations and per-user keys fill ``org_id``/``user_id`` in later releases."""

    kind: Literal["platform_admin", "api_key"]
    key_id: str
    scopes: frozenset[str]
    org_id: str | None = None
    user_id: str | None = None

    @property
    def is_platform_admin(self) -> bool:
        return self.kind == "platform_admin"

    def has_scope(self, scope: str) -> bool:
        return self.is_platform_admin or scope in self.scopes


def new_key() -> str:
    """A fresh secret key: ``om_`` plus 256 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_or_create_secret(configured: str | None, path: Path) -> bytes:
    """The server secret used to hash keys: from settings, or generated once into ``path`` (mode 0600)."""
    if configured:
        return configured.encode()
    if path.exists():
        return path.read_bytes().strip()
    value = secrets.token_hex(32).encode()
    _write_private(path, value)
    return value


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


class KeyAuthenticator:
    """Turns a bearer token into a Principal. Only HMAC-SHA256 digests of keys are stored or compared."""

    def __init__(self, sessions: sessionmaker[Session], secret: bytes) -> None:
        self._sessions = sessions
        self._secret = secret
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def digest(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def cached(self, token: str | None) -> Principal | None:
        """The principal for a recently verified key, without touching the database (else None)."""
        if not token:
            return None
        hit = self._cache.get(self.digest(token))
        if hit is not None and time.monotonic() - hit[0] < _CACHE_TTL_S:
            return hit[1]
        return None

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated("Missing API key: send it as 'Authorization: Bearer <key>'.", param="authorization")
        digest = self.digest(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        with self._sessions() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == digest))
        # The lookup is by digest; compare again in constant time so equality is never decided by a branch
        # that depends on how many characters matched.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise Unauthenticated("Incorrect API key provided.", param="authorization")
        if row.revoked_at is not None:
            raise Unauthenticated("This API key has been revoked.", param="authorization")
        if row.expires_at is not None and row.expires_at <= datetime.now(UTC):
            raise Unauthenticated("This API key has expired.", param="authorization")
        principal = Principal(
            kind="platform_admin" if row.kind == "platform_admin" else "api_key",
            key_id=row.id,
            scopes=frozenset(row.scopes),
            org_id=row.org_id,
        )
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal

    def ensure_admin_key(self, configured: str | None, key_file: Path) -> str | None:
        """Make sure the platform-admin key exists; return a newly generated key (to print once), else None.

        A configured key (OPENMAAS_ADMIN_KEY) replaces the stored one. Otherwise a key is generated on the
        first start and written to ``key_file``.
        """
        with self._sessions() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.name == BOOTSTRAP_ADMIN_NAME))
            generated: str | None = None
            if configured:
                key = configured
            elif row is None:
                key = generated = new_key()
            else:
                return None
            digest = self.digest(key)
            if row is None:
                s.add(
                    ApiKeyRow(
                        id=uuid.uuid4().hex,
                        name=BOOTSTRAP_ADMIN_NAME,
                        prefix=key[:8],
                        key_hash=digest,
                        kind="platform_admin",
                        org_id=None,
                        scopes=list(ALL_SCOPES),
                        created_at=utcnow(),
                    )
                )
            elif row.key_hash != digest:
                row.key_hash = digest
                row.prefix = key[:8]
            s.commit()
        if generated is not None:
            _write_private(key_file, generated.encode() + b"\n")
        with self._lock:
            self._cache.clear()
        return generated
