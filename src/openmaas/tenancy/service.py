"""Organisations, users, memberships, API keys and quotas (rules here; the SQL is small enough to live beside)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from openmaas.errors import AlreadyExists, InvalidCredentials, InvalidRequest, NotFound
from openmaas.store.tables import ApiKeyRow, MembershipRow, OrgRow, QuotaRow, UserRow, utcnow
from openmaas.tenancy.models import ApiKey, KeyLimits, Member, Org, User
from openmaas.tenancy.passwords import MIN_LENGTH, hash_password, verify_password
from openmaas.tenancy.roles import ALL_SCOPES, ROLES, Role, Scope

ORG_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,62}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")
UNITS = ("requests", "input_tokens", "output_tokens", "items", "audio_seconds")
SESSION_TTL = timedelta(hours=12)


def _org(row: OrgRow) -> Org:
    return Org(id=row.id, name=row.name, created_at=row.created_at)


def _user(row: UserRow) -> User:
    return User(id=row.id, email=row.email, created_at=row.created_at, platform_admin=row.platform_admin)


def api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        suffix=row.suffix,
        kind=row.kind,
        org_id=row.org_id,
        user_id=row.user_id,
        role=row.role,  # type: ignore[arg-type]
        scopes=list(row.scopes),  # type: ignore[arg-type]
        models=row.models,
        limits=KeyLimits.model_validate(row.limits or {}),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        rotated_from=row.rotated_from,
    )


class TenancyService:
    """Everything about who is who. ``new_secret`` makes key secrets; ``digest`` is the keyed hash stored."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        digest: Callable[[str], str],
        new_secret: Callable[[], str],
        *,
        on_key_changed: Callable[[str], None] = lambda key_id: None,
    ) -> None:
        self._sessions = sessions
        self._digest = digest
        self._new_secret = new_secret
        # Caches elsewhere (authenticated keys, quota totals) that a change here must reach at once.
        self._on_key_changed = on_key_changed
        self._quota_listeners: list[Callable[[], None]] = []

    # -- organisations ------------------------------------------------------------------------------------------

    def create_org(self, name: str) -> Org:
        if not ORG_NAME_RE.match(name):
            raise InvalidRequest(
                f"invalid organisation name '{name}': use 2-63 lower-case letters, digits, '-' or '_', starting "
                "with a letter or digit",
                param="name",
            )
        with self._sessions() as s:
            row = OrgRow(id=uuid.uuid4().hex, name=name, created_at=utcnow())
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise AlreadyExists(f"an organisation named '{name}' already exists", param="name") from None
            return _org(row)

    def get_org(self, ref: str) -> Org:
        """An organisation by id or name; NotFound otherwise."""
        with self._sessions() as s:
            row = s.get(OrgRow, ref) or s.scalar(select(OrgRow).where(OrgRow.name == ref))
            if row is None:
                raise NotFound(f"organisation '{ref}' does not exist or you do not have access to it", param="org")
            return _org(row)

    def list_orgs(self, only: str | None = None) -> list[Org]:
        q = select(OrgRow).order_by(OrgRow.name)
        if only is not None:
            q = q.where(OrgRow.id == only)
        with self._sessions() as s:
            return [_org(r) for r in s.scalars(q)]

    # -- users and members --------------------------------------------------------------------------------------

    def create_user(self, email: str, password: str) -> User:
        email = email.strip().lower()
        if not EMAIL_RE.match(email):
            raise InvalidRequest(f"'{email}' is not an email address", param="email")
        if len(password) < MIN_LENGTH:
            raise InvalidRequest(f"the password must have at least {MIN_LENGTH} characters", param="password")
        with self._sessions() as s:
            row = UserRow(id=uuid.uuid4().hex, email=email, password_hash=hash_password(password), created_at=utcnow())
            s.add(row)
            try:
                s.commit()
            except IntegrityError:
                raise AlreadyExists(f"a user with email '{email}' already exists", param="email") from None
            return _user(row)

    def list_users(self) -> list[User]:
        with self._sessions() as s:
            return [_user(r) for r in s.scalars(select(UserRow).order_by(UserRow.email))]

    def set_platform_admin(self, user_id: str, platform_admin: bool) -> User:
        """Make a user an operator (who signs in to the console as the platform admin), or no longer one."""
        with self._sessions() as s:
            row = s.get(UserRow, user_id) or s.scalar(select(UserRow).where(UserRow.email == user_id.lower()))
            if row is None:
                raise NotFound(f"no user '{user_id}'", param="user")
            row.platform_admin = platform_admin
            s.commit()
            return _user(row)

    def add_member(self, org_id: str, email: str, role: Role, password: str | None = None) -> Member:
        """Give a user a role in an org (creating the user when a password is given); re-adding changes the role."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role '{role}'; use one of {', '.join(ROLES)}", param="role")
        email = email.strip().lower()
        with self._sessions() as s:
            user = s.scalar(select(UserRow).where(UserRow.email == email))
        if user is None:
            if password is None:
                raise InvalidRequest(
                    f"no user has the email '{email}'; send a 'password' to create the user", param="email"
                )
            created = self.create_user(email, password)
            with self._sessions() as s:
                user = s.get(UserRow, created.id)
        assert user is not None
        with self._sessions() as s:
            row = s.get(MembershipRow, (org_id, user.id))
            if row is None:
                row = MembershipRow(org_id=org_id, user_id=user.id, role=role, created_at=utcnow())
                s.add(row)
            else:
                row.role = role
            s.commit()
            return Member(user_id=user.id, email=user.email, role=role, created_at=row.created_at)

    def list_members(self, org_id: str) -> list[Member]:
        q = (
            select(MembershipRow, UserRow)
            .join(UserRow, UserRow.id == MembershipRow.user_id)
            .where(MembershipRow.org_id == org_id)
            .order_by(UserRow.email)
        )
        with self._sessions() as s:
            return [
                Member(user_id=u.id, email=u.email, role=m.role, created_at=m.created_at)  # type: ignore[arg-type]
                for m, u in s.execute(q)
            ]

    def remove_member(self, org_id: str, user_id: str) -> None:
        with self._sessions() as s:
            s.execute(delete(MembershipRow).where(MembershipRow.org_id == org_id, MembershipRow.user_id == user_id))
            # The user's sessions in this org end with the membership.
            for row in s.scalars(select(ApiKeyRow).where(ApiKeyRow.org_id == org_id, ApiKeyRow.user_id == user_id)):
                row.revoked_at = row.revoked_at or utcnow()
            s.commit()

    def login(self, email: str, password: str, org_ref: str) -> tuple[str, ApiKey]:
        """A session key (12 h) for a member, with the member's role; one message for every wrong detail."""
        failure = InvalidCredentials("wrong email, password or organisation", param="email")
        email = email.strip().lower()
        with self._sessions() as s:
            user = s.scalar(select(UserRow).where(UserRow.email == email))
            if not verify_password(user.password_hash if user else None, password) or user is None:
                raise failure
            org = s.get(OrgRow, org_ref) or s.scalar(select(OrgRow).where(OrgRow.name == org_ref))
            membership = s.get(MembershipRow, (org.id, user.id)) if org is not None else None
            if org is None or membership is None:
                raise failure
        return self.create_key(
            org.id,
            f"session {email}",
            list(ALL_SCOPES),
            role=membership.role,  # type: ignore[arg-type]
            user_id=user.id,
            expires_at=datetime.now(UTC) + SESSION_TTL,
            kind="session",
        )

    # -- API keys -----------------------------------------------------------------------------------------------

    def create_key(
        self,
        org_id: str | None,
        name: str,
        scopes: list[Scope],
        *,
        role: Role,
        user_id: str | None = None,
        models: list[str] | None = None,
        expires_at: datetime | None = None,
        limits: KeyLimits | None = None,
        kind: str = "org",
        rotated_from: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key; the secret is returned here only and stored as its keyed hash."""
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InvalidRequest("'expires_at' is in the past", param="expires_at")
        secret = self._new_secret()
        row = ApiKeyRow(
            id=uuid.uuid4().hex,
            name=name,
            prefix=secret[:8],
            suffix=secret[-4:],
            key_hash=self._digest(secret),
            kind=kind,
            org_id=org_id,
            user_id=user_id,
            role=role,
            scopes=sorted(set(scopes)),
            models=sorted(set(models)) if models is not None else None,
            limits=limits.model_dump(exclude_none=True) if limits is not None and not limits.empty else None,
            created_at=utcnow(),
            expires_at=expires_at,
            rotated_from=rotated_from,
        )
        with self._sessions() as s:
            s.add(row)
            s.commit()
            return secret, api_key(row)

    def list_keys(self, org_id: str, *, include_sessions: bool = False) -> list[ApiKey]:
        q = select(ApiKeyRow).where(ApiKeyRow.org_id == org_id).order_by(ApiKeyRow.created_at)
        if not include_sessions:
            q = q.where(ApiKeyRow.kind != "session")
        with self._sessions() as s:
            return [api_key(r) for r in s.scalars(q)]

    def get_key(self, org_id: str, key_id: str) -> ApiKey:
        with self._sessions() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.org_id != org_id:
                raise NotFound(f"API key '{key_id}' does not exist in this organisation", param="key")
            return api_key(row)

    def revoke_key(self, org_id: str, key_id: str) -> ApiKey:
        with self._sessions() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.org_id != org_id:
                raise NotFound(f"API key '{key_id}' does not exist in this organisation", param="key")
            row.revoked_at = row.revoked_at or utcnow()
            s.commit()
            revoked = api_key(row)
        self._on_key_changed(key_id)
        return revoked

    def rotate_key(self, org_id: str, key_id: str, grace: timedelta) -> tuple[str, ApiKey, ApiKey]:
        """A new key with the same settings; the old one keeps working for ``grace``, then expires."""
        old = self.get_key(org_id, key_id)
        if old.revoked_at is not None:
            raise InvalidRequest("a revoked key cannot be rotated; create a new key instead", param="key")
        secret, new = self.create_key(
            org_id,
            old.name,
            old.scopes,
            role=old.role,
            user_id=old.user_id,
            models=old.models,
            expires_at=old.expires_at,
            limits=old.limits,
            kind=old.kind,
            rotated_from=old.id,
        )
        with self._sessions() as s:
            row = s.get(ApiKeyRow, key_id)
            assert row is not None
            ends = datetime.now(UTC) + grace
            row.expires_at = min(row.expires_at, ends) if row.expires_at is not None else ends
            s.commit()
            old_after = api_key(row)
        self._on_key_changed(key_id)
        return secret, new, old_after

    # -- quotas -------------------------------------------------------------------------------------------------

    def on_quotas_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every quota change (a cache of quotas must drop what it holds)."""
        self._quota_listeners.append(listener)

    def set_quota(self, org_id: str, unit: str, monthly_limit: int | None) -> dict[str, int]:
        """Set (or with None remove) an org's monthly quota of ``unit``; returns all its quotas."""
        if unit not in UNITS:
            raise InvalidRequest(f"unknown unit '{unit}'; use one of {', '.join(UNITS)}", param="unit")
        with self._sessions() as s:
            row = s.get(QuotaRow, (org_id, unit))
            if monthly_limit is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(QuotaRow(org_id=org_id, unit=unit, monthly_limit=monthly_limit))
            else:
                row.monthly_limit = monthly_limit
            s.commit()
        for listener in self._quota_listeners:
            listener()
        return self.quotas(org_id)

    def quotas(self, org_id: str) -> dict[str, int]:
        with self._sessions() as s:
            return {r.unit: r.monthly_limit for r in s.scalars(select(QuotaRow).where(QuotaRow.org_id == org_id))}

    def all_quotas(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._sessions() as s:
            for r in s.scalars(select(QuotaRow)):
                out.setdefault(r.org_id, {})[r.unit] = r.monthly_limit
        return out


def key_json(key: ApiKey) -> dict[str, Any]:
    return key.model_dump(mode="json")
