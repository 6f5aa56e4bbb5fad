"""Console sign-in sessions: an opaque random id in the browser's cookie, a server-side row with idle and
absolute expiry, and a session key (whose secret is never kept) that the session acts through, so every call a
signed-in member makes is authorised, metered, billed and audited as that key."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.errors import InvalidCredentials, NotFound
from openmaas.store.tables import ApiKeyRow, ConsoleSessionRow, MembershipRow, OrgRow, UserRow, utcnow
from openmaas.tenancy.passwords import verify_password
from openmaas.tenancy.roles import ALL_SCOPES, Role
from openmaas.tenancy.service import TenancyService

# seen_at is written at most this often per session (not on every page or fragment).
_TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class Membership:
    org_id: str
    org_name: str
    role: Role


@dataclass(frozen=True)
class SignedIn:
    """A live console session, as pages need it (never the cookie's value)."""

    key_id: str
    user_id: str
    email: str
    org_id: str | None
    org_name: str | None
    role: Role
    operator: bool
    expires_at: datetime


class ConsoleSessions:
    """Sign-in, lookup and sign-out of console sessions. ``digest`` is the server's keyed hash (as for keys)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        tenancy: TenancyService,
        digest: Callable[[str], str],
        *,
        idle: timedelta,
        absolute: timedelta,
        on_key_changed: Callable[[str], None] = lambda key_id: None,
    ) -> None:
        self._sessions = sessions
        self._tenancy = tenancy
        self._digest = digest
        self.idle = idle
        self.absolute = absolute
        self._on_key_changed = on_key_changed

    def sign_in(self, email: str, password: str, org_ref: str | None, *, replacing: str | None = None) -> str:
        """A new session's cookie value. With no organisation, an operator signs in as the platform admin and a
        member of exactly one organisation into that one. One message for every wrong detail; an old session
        (``replacing``) ends, so an id planted before sign-in is never the signed-in one."""
        failure = InvalidCredentials("wrong email, password or organisation", param="email")
        email = email.strip().lower()
        org_ref = (org_ref or "").strip() or None
        if replacing:
            self.sign_out(replacing)
        with self._sessions() as s:
            user = s.scalar(select(UserRow).where(UserRow.email == email))
            if not verify_password(user.password_hash if user else None, password) or user is None:
                raise failure
            org: OrgRow | None = None
            role: Role = "owner"
            if org_ref is not None:
                org = s.get(OrgRow, org_ref) or s.scalar(select(OrgRow).where(OrgRow.name == org_ref))
                membership = s.get(MembershipRow, (org.id, user.id)) if org is not None else None
                if org is None or membership is None:
                    raise failure
                role = membership.role  # type: ignore[assignment]
            elif not user.platform_admin:
                rows = s.execute(
                    select(OrgRow, MembershipRow.role)
                    .join(MembershipRow, MembershipRow.org_id == OrgRow.id)
                    .where(MembershipRow.user_id == user.id)
                ).all()
                if len(rows) != 1:
                    raise InvalidCredentials(
                        "name the organisation to sign in to" if rows else "wrong email, password or organisation",
                        param="org",
                    )
                org, role = rows[0][0], rows[0][1]  # type: ignore[assignment]
            user_id, org_id = user.id, org.id if org is not None else None
        return self._start(user_id, email, org_id, role)

    def _start(self, user_id: str, email: str, org_id: str | None, role: Role) -> str:
        """A new session (and the key it acts through) for ``user_id`` in ``org_id`` (None: as an operator)."""
        now = datetime.now(UTC)
        expires = now + self.absolute
        # The session acts through a key of its own; its secret is dropped here and exists nowhere.
        _, key = self._tenancy.create_key(
            org_id,
            f"console {email}",
            list(ALL_SCOPES),
            role=role,
            user_id=user_id,
            expires_at=expires,
            kind="session" if org_id is not None else "platform_admin",
        )
        token = secrets.token_urlsafe(32)
        with self._sessions() as s:
            s.add(
                ConsoleSessionRow(
                    id_hash=self._digest(token),
                    user_id=user_id,
                    org_id=org_id,
                    key_id=key.id,
                    created_at=now,
                    seen_at=now,
                    expires_at=expires,
                )
            )
            s.commit()
        return token

    def switch(self, token: str, org_ref: str) -> str:
        """A new session for the same user in another organisation they belong to (this one ends); no password
        again, since the session proves who they are."""
        found = self.lookup(token)
        if found is None:
            raise InvalidCredentials("your session has ended; sign in again", param="session")
        with self._sessions() as s:
            org = s.get(OrgRow, org_ref) or s.scalar(select(OrgRow).where(OrgRow.name == org_ref))
            membership = s.get(MembershipRow, (org.id, found.user_id)) if org is not None else None
            if org is None or membership is None:
                raise NotFound("you are not a member of that organisation", param="org")
            org_id, role = org.id, membership.role
        self.sign_out(token)
        return self._start(found.user_id, found.email, org_id, role)  # type: ignore[arg-type]

    def lookup(self, token: str | None) -> SignedIn | None:
        """The live session for a cookie value, else None (an expired or idle one is ended here)."""
        if not token or len(token) > 128:
            return None
        digest = self._digest(token)
        now = datetime.now(UTC)
        with self._sessions() as s:
            found = s.execute(
                select(ConsoleSessionRow, UserRow, ApiKeyRow, OrgRow.name)
                .join(UserRow, UserRow.id == ConsoleSessionRow.user_id)
                .join(ApiKeyRow, ApiKeyRow.id == ConsoleSessionRow.key_id)
                .outerjoin(OrgRow, OrgRow.id == ConsoleSessionRow.org_id)
                .where(ConsoleSessionRow.id_hash == digest)
            ).first()
            if found is None:
                return None
            row, user, key, org_name = found
            alive = (
                row.expires_at > now
                and row.seen_at + self.idle > now
                and key.revoked_at is None
                and (key.kind != "platform_admin" or user.platform_admin)
            )
            if not alive:
                key_id = row.key_id
                s.delete(row)
                if key.revoked_at is None:
                    key.revoked_at = utcnow()
                s.commit()
                self._on_key_changed(key_id)
                return None
            if now - row.seen_at >= _TOUCH_EVERY:
                row.seen_at = now
                s.commit()
            return SignedIn(
                key_id=row.key_id,
                user_id=user.id,
                email=user.email,
                org_id=row.org_id,
                org_name=org_name,
                role=key.role,  # type: ignore[arg-type]
                operator=key.kind == "platform_admin",
                expires_at=row.expires_at,
            )

    def sign_out(self, token: str | None) -> None:
        """End the session (its row deleted, its key revoked). Unknown values are ignored."""
        if not token or len(token) > 128:
            return
        with self._sessions() as s:
            row = s.get(ConsoleSessionRow, self._digest(token))
            if row is None:
                return
            key_id = row.key_id
            key = s.get(ApiKeyRow, key_id)
            if key is not None and key.revoked_at is None:
                key.revoked_at = utcnow()
            s.delete(row)
            s.commit()
        self._on_key_changed(key_id)

    def memberships(self, user_id: str) -> list[Membership]:
        """The organisations a user may switch to."""
        with self._sessions() as s:
            rows = s.execute(
                select(OrgRow.id, OrgRow.name, MembershipRow.role)
                .join(MembershipRow, MembershipRow.org_id == OrgRow.id)
                .where(MembershipRow.user_id == user_id)
                .order_by(OrgRow.name)
            ).all()
        return [Membership(r[0], r[1], r[2]) for r in rows]  # type: ignore[arg-type]

    def end_all(self, user_id: str) -> int:
        """End every session of a user (e.g. after a password change); how many ended."""
        with self._sessions() as s:
            rows = list(s.scalars(select(ConsoleSessionRow).where(ConsoleSessionRow.user_id == user_id)))
            for row in rows:
                key = s.get(ApiKeyRow, row.key_id)
                if key is not None and key.revoked_at is None:
                    key.revoked_at = utcnow()
            s.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.user_id == user_id))
            s.commit()
        for row in rows:
            self._on_key_changed(row.key_id)
        return len(rows)
