"""Console sessions on SQLite and PostgreSQL: only a keyed hash of the cookie is stored; idle and absolute expiry,
operators, members of one or several organisations, and sign-out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, text, update

from openmaas.errors import InvalidCredentials, Unauthenticated
from openmaas.gateway.auth import KeyAuthenticator, new_key
from openmaas.store.db import session_factory, upgrade
from openmaas.store.tables import ApiKeyRow, ConsoleSessionRow
from openmaas.tenancy.service import TenancyService
from openmaas.tenancy.sessions import ConsoleSessions

PASSWORD = "a long enough password"


def _setup(engine: Engine) -> tuple[ConsoleSessions, TenancyService, KeyAuthenticator]:
    upgrade(engine)
    sessions = session_factory(engine)
    auth = KeyAuthenticator(sessions, b"secret")
    tenancy = TenancyService(sessions, auth.digest, new_key)
    consoles = ConsoleSessions(sessions, tenancy, auth.digest, idle=timedelta(minutes=30), absolute=timedelta(hours=12))
    return consoles, tenancy, auth


def _age(engine: Engine, *, seen: timedelta = timedelta(0), expires: timedelta | None = None) -> None:
    """Move every session's clock: last seen ``seen`` ago; ending in ``expires`` from now."""
    now = datetime.now(UTC)
    values: dict[str, datetime] = {"seen_at": now - seen}
    if expires is not None:
        values["expires_at"] = now + expires
    with session_factory(engine)() as s:
        s.execute(update(ConsoleSessionRow).values(**values))
        s.commit()


def test_a_session_stores_only_a_hash_and_acts_through_a_key_of_the_members_role(engine: Engine) -> None:
    consoles, tenancy, auth = _setup(engine)
    org = tenancy.create_org("acme")
    tenancy.add_member(org.id, "ann@example.com", "viewer", password=PASSWORD)
    token = consoles.sign_in("Ann@Example.com", PASSWORD, None)  # her only organisation
    found = consoles.lookup(token)
    assert found is not None and found.org_id == org.id and found.role == "viewer" and not found.operator
    who = auth.by_key_id(found.key_id)
    assert who.kind == "session" and who.org_id == org.id and who.role == "viewer"
    with engine.connect() as conn:
        dump = " ".join(str(v) for table in ("console_sessions", "api_keys") for row in
                        conn.execute(text(f"select * from {table}")) for v in row)  # fmt: skip
    assert token not in dump
    for wrong in (("ann@example.com", "wrong password", None), ("ann@example.com", PASSWORD, "other-org"),
                  ("bob@example.com", PASSWORD, None)):  # fmt: skip
        with pytest.raises(InvalidCredentials, match="wrong email, password or organisation"):
            consoles.sign_in(*wrong)
    assert consoles.lookup("not-a-session") is None
    assert consoles.lookup("x" * 1000) is None


def test_idle_and_absolute_expiry_end_the_session_and_its_key(engine: Engine) -> None:
    consoles, tenancy, auth = _setup(engine)
    org = tenancy.create_org("acme")
    tenancy.add_member(org.id, "ann@example.com", "member", password=PASSWORD)
    token = consoles.sign_in("ann@example.com", PASSWORD, "acme")
    _age(engine, seen=timedelta(minutes=29))
    found = consoles.lookup(token)
    assert found is not None  # 29 minutes idle: still alive, and now seen again
    _age(engine, seen=timedelta(minutes=31))
    assert consoles.lookup(token) is None
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.by_key_id(found.key_id)
    with session_factory(engine)() as s:
        assert s.scalar(select(ConsoleSessionRow)) is None

    busy = consoles.sign_in("ann@example.com", PASSWORD, "acme")
    _age(engine, seen=timedelta(0), expires=timedelta(seconds=-1))  # busy, but past the absolute limit
    assert consoles.lookup(busy) is None


def test_operators_sign_in_without_an_organisation_and_lose_it_when_demoted(engine: Engine) -> None:
    consoles, tenancy, auth = _setup(engine)
    a, b = tenancy.create_org("acme"), tenancy.create_org("beta")
    user = tenancy.create_user("op@example.com", PASSWORD)
    with pytest.raises(InvalidCredentials):
        consoles.sign_in("op@example.com", PASSWORD, None)  # not an operator, in no organisation
    tenancy.set_platform_admin(user.id, True)
    token = consoles.sign_in("op@example.com", PASSWORD, None)
    found = consoles.lookup(token)
    assert found is not None and found.operator and found.org_id is None
    assert auth.by_key_id(found.key_id).is_platform_admin
    tenancy.set_platform_admin("op@example.com", False)
    assert consoles.lookup(token) is None  # demoted: the operator session ends at once
    # A member of two organisations names the one to sign in to.
    tenancy.add_member(a.id, "two@example.com", "member", password=PASSWORD)
    tenancy.add_member(b.id, "two@example.com", "admin")
    with pytest.raises(InvalidCredentials, match="name the organisation"):
        consoles.sign_in("two@example.com", PASSWORD, None)
    found = consoles.lookup(consoles.sign_in("two@example.com", PASSWORD, "beta"))
    assert found is not None and found.org_name == "beta" and found.role == "admin"
    assert [m.org_name for m in consoles.memberships(found.user_id)] == ["acme", "beta"]


def test_sign_out_and_a_new_sign_in_end_the_old_session(engine: Engine) -> None:
    consoles, tenancy, _ = _setup(engine)
    org = tenancy.create_org("acme")
    tenancy.add_member(org.id, "ann@example.com", "member", password=PASSWORD)
    first = consoles.sign_in("ann@example.com", PASSWORD, None)
    second = consoles.sign_in("ann@example.com", PASSWORD, None, replacing=first)
    assert consoles.lookup(first) is None and consoles.lookup(second) is not None
    key_id = consoles.lookup(second).key_id  # type: ignore[union-attr]
    consoles.sign_out(second)
    assert consoles.lookup(second) is None
    with session_factory(engine)() as s:
        assert s.get(ApiKeyRow, key_id).revoked_at is not None  # type: ignore[union-attr]
    consoles.sign_out(second)  # twice is fine
    # Removing the member ends the sessions too (their key is revoked with the membership).
    third = consoles.sign_in("ann@example.com", PASSWORD, None)
    tenancy.remove_member(org.id, consoles.lookup(third).user_id)  # type: ignore[union-attr]
    assert consoles.lookup(third) is None
    assert consoles.end_all("nobody") == 0
