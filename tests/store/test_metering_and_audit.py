"""Group-commit metering, quotas' counters, the audit chain and tenancy rows, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, event, select, update

from openmaas.audit import Actor, AuditLog
from openmaas.errors import AlreadyExists, InvalidRequest, NotFound, Unauthenticated
from openmaas.gateway.auth import KeyAuthenticator, new_key
from openmaas.metering.records import UsageRecord
from openmaas.metering.usage import UsageQueries
from openmaas.metering.writer import GroupCommitWriter
from openmaas.store.db import session_factory, upgrade
from openmaas.store.tables import AuditEventRow, Base, UsageRecordRow
from openmaas.tenancy.service import TenancyService


def test_migrations_match_the_tables(engine: Engine) -> None:
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # Type spellings differ per backend (JSON vs TEXT on SQLite); structure must not.
    structural = [d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")]
    assert structural == []


def _record(i: int, *, org: str = "o1", key: str | None = None, tokens: int = 3) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{i}",
        org_id=org,
        key_id="k1",
        model="m",
        version=1,
        protocol="openai",
        latency_ms=1.0,
        input_tokens=tokens,
        items=1,
        idempotency_key=key,
        fingerprint="f" if key else None,
    )


def test_group_commit_stores_each_record_once_and_counts_months(engine: Engine) -> None:
    upgrade(engine)
    writer = GroupCommitWriter(engine)
    usage = UsageQueries(session_factory(engine))
    try:

        async def main() -> list[bool]:
            # 200 concurrent calls, 20 of them duplicates by idempotency key and 10 by request id.
            records = [_record(i, key=f"idem-{i}") for i in range(100)]
            records += [_record(1000 + i, key=f"idem-{i}") for i in range(20)]
            records += [_record(i, key=None) for i in range(100, 180)]
            records += [_record(i, key=None) for i in range(100, 110)]
            return await asyncio.gather(*(writer.record(r) for r in records))

        stored = asyncio.run(main())
    finally:
        writer.close()
    assert stored.count(True) == 180 and stored.count(False) == 30
    month = datetime.now(UTC).strftime("%Y-%m")
    assert usage.month_totals("o1", month) == {"requests": 180, "input_tokens": 540, "items": 180}
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    rows = usage.summary("o1", today, today, ["unit"])
    assert {r["unit"]: r["quantity"] for r in rows} == {"requests": 180, "input_tokens": 540, "items": 180}
    prior = usage.prior_call("o1", "idem-5", datetime.now(UTC))
    assert prior is not None and prior.request_id == "r5" and prior.fingerprint == "f"
    assert usage.prior_call("o1", "idem-5", datetime.now(UTC) + timedelta(hours=25)) is None  # forgotten after 24 h
    assert usage.summary("o2", today, today, []) == []


def test_records_of_one_turn_reach_the_writer_in_one_hand_off_and_groups_stay_bounded(engine: Engine) -> None:
    """The records an event loop takes in one turn wake the writer thread once (one queue hand-off), and a turn
    larger than a group is committed in groups of at most ``max_group``, every record stored once."""
    upgrade(engine)
    groups: list[int] = []

    hand_offs: list[int] = []

    class Spy(GroupCommitWriter):
        def write(self, records: Sequence[UsageRecord]) -> list[bool]:
            groups.append(len(records))
            return super().write(records)

        def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
            hand_offs.append(len(self._turns.get(loop, [])))
            super()._hand_off(loop)

    writer = Spy(engine, max_group=64)
    try:

        async def main() -> list[bool]:
            return await asyncio.gather(*(writer.record(_record(5000 + i, org="o4")) for i in range(150)))

        stored = asyncio.run(main())
    finally:
        writer.close()
    assert stored == [True] * 150
    assert hand_offs == [150]  # one hand-off for the whole turn
    assert groups == [64, 64, 22]
    month = datetime.now(UTC).strftime("%Y-%m")
    assert UsageQueries(session_factory(engine)).month_totals("o4", month)["requests"] == 150


def test_a_group_of_new_records_is_three_statements_and_a_stored_one_among_them_is_not_counted_again(
    engine: Engine,
) -> None:
    """The common group (no record stored before) is written with one executemany a table and no RETURNING; a
    group that repeats a stored request id falls back to the statement that says which records are new, and
    nothing is counted twice. Stored values (a UTC timestamp) read back as the ORM wrote them."""
    upgrade(engine)
    statements: list[tuple[str, bool]] = []
    returning: list[bool] = []

    def spy(conn: object, cursor: object, sql: str, params: object, context: object, many: bool) -> None:
        if sql.lstrip().upper().startswith("INSERT"):
            statements.append((sql.split("(")[0].split()[-1], many))
            if "INTO usage_records" in sql:
                returning.append("RETURNING" in sql.upper())

    writer = GroupCommitWriter(engine)
    try:
        first = [_record(7000 + i, org="o5") for i in range(20)]
        event.listen(engine, "before_cursor_execute", spy)
        assert writer.write(first) == [True] * 20
        written = list(statements)
        statements.clear()
        again = [_record(7100, org="o5"), first[3], _record(7101, org="o5")]
        assert writer.write(again) == [True, False, True]
        event.remove(engine, "before_cursor_execute", spy)
    finally:
        writer.close()
    # One statement a table (the counters' three units and the day's one row included), no RETURNING.
    assert [table for table, _ in written] == ["usage_records", "usage_counters", "usage_daily"]
    assert written[0][1] and written[1][1]
    # The first group: one insert without RETURNING; the second: that insert, then the fallback saying which are new.
    assert returning == [False, False, True]
    month = datetime.now(UTC).strftime("%Y-%m")
    assert UsageQueries(session_factory(engine)).month_totals("o5", month) == {
        "requests": 22,
        "input_tokens": 66,
        "items": 22,
    }
    with session_factory(engine)() as db:
        row = db.get(UsageRecordRow, "r7003")
        assert row is not None and row.created_at == first[3].created_at and row.day == first[3].row()["day"]


def test_group_commit_under_threads_from_several_loops(engine: Engine) -> None:
    upgrade(engine)
    writer = GroupCommitWriter(engine)

    def one_loop(base: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(writer.record(_record(base + i, org="o3")) for i in range(50)))

        asyncio.run(main())

    threads = [threading.Thread(target=one_loop, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    month = datetime.now(UTC).strftime("%Y-%m")
    assert UsageQueries(session_factory(engine)).month_totals("o3", month)["requests"] == 200


def test_audit_chain_detects_changes_gaps_and_forgery(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    log = AuditLog(sessions, b"secret")
    who = Actor(kind="platform_admin", key_id="k", client_ip="127.0.0.1")
    threads = [
        threading.Thread(target=lambda i=i: log.append(who, "thing.do", f"t{i}", org_id="o", after={"i": i}))
        for i in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.verify().ok and log.verify().events == 20
    assert [e.seq for e in log.list()] == list(range(1, 21))
    # Someone with the database but not the server secret re-hashes a changed event: still detected.
    assert not AuditLog(sessions, b"another secret").verify().ok
    with sessions() as s:
        s.execute(update(AuditEventRow).where(AuditEventRow.seq == 7).values(target="forged"))
        s.commit()
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 7 and "changed" in (result.reason or "")
    with sessions() as s:
        s.execute(update(AuditEventRow).where(AuditEventRow.seq == 7).values(target="t?"))
        row = s.scalar(select(AuditEventRow).where(AuditEventRow.seq == 7))
        assert row is not None
        s.delete(row)
        s.commit()
    result = log.verify()
    assert not result.ok and result.first_bad_seq == 8 and "gap" in (result.reason or "")


def test_tenancy_orgs_members_keys_and_sessions(engine: Engine) -> None:
    upgrade(engine)
    sessions = session_factory(engine)
    auth = KeyAuthenticator(sessions, b"secret")
    tenancy = TenancyService(sessions, auth.digest, new_key)
    org = tenancy.create_org("acme")
    with pytest.raises(AlreadyExists):
        tenancy.create_org("acme")
    with pytest.raises(InvalidRequest):
        tenancy.create_org("Not A Slug!")
    assert tenancy.get_org("acme") == tenancy.get_org(org.id)
    with pytest.raises(NotFound):
        tenancy.get_org("nope")
    with pytest.raises(InvalidRequest):
        tenancy.add_member(org.id, "new@example.com", "member")  # unknown user and no password
    with pytest.raises(InvalidRequest):
        tenancy.add_member(org.id, "new@example.com", "member", password="short")
    member = tenancy.add_member(org.id, "New@Example.com", "member", password="long enough password")
    assert member.email == "new@example.com"
    assert tenancy.add_member(org.id, "new@example.com", "admin").role == "admin"
    assert [m.role for m in tenancy.list_members(org.id)] == ["admin"]

    secret, session = tenancy.login("new@example.com", "long enough password", "acme")
    principal = auth.authenticate(secret)
    assert principal.kind == "session" and principal.role == "admin" and principal.org_id == org.id
    with pytest.raises(Unauthenticated):
        tenancy.login("new@example.com", "wrong password!!", "acme")
    tenancy.remove_member(org.id, member.user_id)  # ends the member's sessions too
    auth.forget(session.id)
    with pytest.raises(Unauthenticated):
        auth.authenticate(secret)

    key_secret, key = tenancy.create_key(org.id, "ci", ["inference"], role="member")
    assert key_secret not in repr(key) and key.prefix == key_secret[:8]
    new_secret, new, old = tenancy.rotate_key(org.id, key.id, timedelta(seconds=60))
    assert new.rotated_from == key.id and old.expires_at is not None
    assert auth.authenticate(new_secret).key_id == new.id
    assert auth.authenticate(key_secret).key_id == key.id  # still inside its grace period
    with pytest.raises(InvalidRequest):
        tenancy.set_quota(org.id, "bananas", 3)
    assert tenancy.set_quota(org.id, "requests", 3) == {"requests": 3}
    assert tenancy.all_quotas() == {org.id: {"requests": 3}}


def test_the_daily_rollup_equals_the_records_for_every_grouping(engine: Engine) -> None:
    """Summaries read usage_daily; whatever the grouping, they equal sums over the raw records (duplicates,
    records without an organisation and several days, models, keys and protocols included)."""
    import random

    from sqlalchemy import func

    from openmaas.store.tables import UsageRecordRow

    upgrade(engine)
    writer = GroupCommitWriter(engine)
    usage = UsageQueries(session_factory(engine))
    rng = random.Random(7)
    now = datetime.now(UTC)
    records = []
    for i in range(400):
        records.append(
            UsageRecord(
                request_id=f"d{i % 370}",  # 30 duplicates by request id: stored once, summed once
                org_id=rng.choice(["o1", "o2", None]),
                key_id=rng.choice(["k1", "k2"]),
                model=rng.choice(["m1", "m2", "acme/m3"]),
                version=1,
                protocol=rng.choice(["openai", "v2", "grpc"]),
                latency_ms=1.0,
                input_tokens=rng.randrange(0, 50),
                output_tokens=rng.randrange(0, 9),
                items=rng.randrange(1, 4),
                audio_ms=rng.choice([0, 1500]),
                created_at=now - timedelta(days=rng.randrange(0, 3)),
            )
        )
    try:

        async def main() -> None:
            for start in range(0, len(records), 50):
                await asyncio.gather(*(writer.record(r) for r in records[start : start + 50]))

        asyncio.run(main())
    finally:
        writer.close()
    first = (now - timedelta(days=2)).strftime("%Y-%m-%d")
    last = now.strftime("%Y-%m-%d")
    columns = {"model": UsageRecordRow.model, "key": UsageRecordRow.key_id, "day": UsageRecordRow.day,
               "org": UsageRecordRow.org_id, "protocol": UsageRecordRow.protocol}  # fmt: skip
    with session_factory(engine)() as s:
        for groups in (["model"], ["day", "model"], ["key", "protocol"], ["org"], []):
            for org, all_orgs in (("o1", False), (None, False), (None, True)):
                got = usage.summary(org, first, last, groups, all_orgs=all_orgs)
                q = select(*[columns[g] for g in groups], func.sum(UsageRecordRow.requests),
                           func.sum(UsageRecordRow.input_tokens), func.sum(UsageRecordRow.audio_ms))  # fmt: skip
                if not all_orgs:
                    q = q.where(UsageRecordRow.org_id == org if org else UsageRecordRow.org_id.is_(None))
                if groups:
                    q = q.group_by(*[columns[g] for g in groups])
                want = {tuple(row[: len(groups)]): (row[-3], row[-2], row[-1] / 1000) for row in s.execute(q)}
                assert {tuple(r[g] for g in groups): (r["requests"], r["input_tokens"], r["audio_seconds"])
                        for r in got} == want, (groups, org, all_orgs)  # fmt: skip
    assert sum(r["requests"] for r in usage.summary(None, first, last, [], all_orgs=True)) == 370
