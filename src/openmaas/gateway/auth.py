"""API keys: generation, keyed hashing, verification, and the bootstrap platform-admin key."""

from __future__ import annotations

import asyncio
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
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.entities.models import Model
from openmaas.errors import Forbidden, NotFound, Unauthenticated
from openmaas.store.tables import ApiKeyRow, OrgRow, utcnow
from openmaas.tenancy.models import KeyLimits
from openmaas.tenancy.roles import ALL_SCOPES, Action, Role, why_not

log = logging.getLogger(__name__)

KEY_PREFIX = "om_"
BOOTSTRAP_ADMIN_NAME = "bootstrap-admin"
# Verified keys are remembered this long, so revocation takes effect within it on every process.
_CACHE_TTL_S = 1.0


_NO_LIMITS = KeyLimits()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the platform admin, or a key (org key or a member's session) acting in one org."""

    kind: Literal["platform_admin", "api_key", "session"]
    key_id: str
    scopes: frozenset[str]
    org_id: str | None = None
    # The organisation's name: its models' namespace (``org/name``), where bare model names resolve first.
    org_name: str | None = None
    user_id: str | None = None
    # The most this principal may do in its org (the role of whoever created the key).
    role: Role = "owner"
    # Allow-list of model names (None = every model the org can see).
    models: frozenset[str] | None = None
    limits: KeyLimits = _NO_LIMITS

    @property
    def is_platform_admin(self) -> bool:
        return self.kind == "platform_admin"

    def require(self, action: Action, org_id: str | None = None) -> None:
        """Allow ``action`` (in ``org_id`` when given) or raise: 404 for another org, 403 for too little right."""
        if self.is_platform_admin:
            return
        if org_id is not None and org_id != self.org_id:
            raise NotFound("this organisation does not exist or you do not have access to it", param="org")
        reason = why_not(self.role, self.scopes, action)
        if reason is not None:
            raise Forbidden(reason)

    def may_use_model(self, model: Model) -> bool:
        """Whether the key's allow-list admits ``model``: by full name, or by its own name for a model of the
        key's organisation or of the platform."""
        if self.models is None or model.name in self.models:
            return True
        namespace = model.namespace
        return (namespace is None or namespace == self.org_name) and model.short_name in self.models


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
        self._pending: dict[str, asyncio.Future[Principal]] = {}

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

    async def authenticate_async(self, token: str | None) -> Principal:
        """``authenticate`` off the event loop, one database lookup per key at a time.

        When a busy key's cache entry expires, every request in flight with it would otherwise look it up at
        once (a thundering herd each second); they share the first lookup instead."""
        if not token:
            return self.authenticate(token)
        digest = self.digest(token)
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self.authenticate, token))
            self._pending[digest] = pending

            def done(fut: asyncio.Future[Principal]) -> None:
                self._pending.pop(digest, None)
                if not fut.cancelled():
                    fut.exception()  # retrieved here too, in case every waiter has gone away

            pending.add_done_callback(done)
        return await asyncio.shield(pending)

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Unauthenticated("Missing API key: send it as 'Authorization: Bearer <key>'.", param="authorization")
        digest = self.digest(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        row, org_name = self._key_row(ApiKeyRow.key_hash == digest)
        # The lookup is by digest; compare again in constant time so equality is never decided by a branch
        # that depends on how many characters matched.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise Unauthenticated("Incorrect API key provided.", param="authorization")
        principal = self._principal(row, org_name)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal

    def by_key_id(self, key_id: str) -> Principal:
        """The principal of a stored key by its id (an offline batch runs as the key that created it); 401 once
        that key is revoked or expired."""
        row, org_name = self._key_row(ApiKeyRow.id == key_id)
        if row is None:
            raise Unauthenticated("The API key that created this batch no longer exists.", param="authorization")
        return self._principal(row, org_name)

    def _key_row(self, where: Any) -> tuple[ApiKeyRow | None, str | None]:
        """The key matching ``where`` and its organisation's name (None, None when there is none)."""
        with self._sessions() as s:
            found = s.execute(
                select(ApiKeyRow, OrgRow.name).outerjoin(OrgRow, OrgRow.id == ApiKeyRow.org_id).where(where)
            ).first()
        return (found[0], found[1]) if found is not None else (None, None)

    @staticmethod
    def _principal(row: ApiKeyRow, org_name: str | None) -> Principal:
        if row.revoked_at is not None:
            raise Unauthenticated("This API key has been revoked.", param="authorization")
        if row.expires_at is not None and row.expires_at <= datetime.now(UTC):
            raise Unauthenticated("This API key has expired.", param="authorization")
        return Principal(
            kind="platform_admin"
            if row.kind == "platform_admin"
            else "session"
            if row.kind == "session"
            else "api_key",
            key_id=row.id,
            scopes=frozenset(row.scopes),
            org_id=row.org_id,
            org_name=org_name,
            user_id=row.user_id,
            role=row.role,  # type: ignore[arg-type]
            models=frozenset(row.models) if row.models is not None else None,
            limits=KeyLimits.model_validate(row.limits) if row.limits else _NO_LIMITS,
        )

    def forget(self, key_id: str) -> None:
        """Drop a key from this process's cache at once (other processes notice within the cache TTL)."""
        with self._lock:
            for digest in [d for d, (_, p) in self._cache.items() if p.key_id == key_id]:
                del self._cache[digest]

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
                        suffix=key[-4:],
                        key_hash=digest,
                        kind="platform_admin",
                        org_id=None,
                        role="owner",
                        scopes=list(ALL_SCOPES),
                        created_at=utcnow(),
                    )
                )
            elif row.key_hash != digest:
                row.key_hash = digest
                row.prefix = key[:8]
                row.suffix = key[-4:]
            s.commit()
        if generated is not None:
            _write_private(key_file, generated.encode() + b"\n")
        with self._lock:
            self._cache.clear()
        return generated
