"""Group commit: concurrent calls hand their usage records to one writer thread, which stores everything that
has arrived in one transaction and wakes each caller once it is durable.

Under load, records pile up while a commit is in progress and the next transaction takes them all, so the cost
of a commit (and its fsync) is shared by many requests; at low load each record commits alone, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect, Engine
from sqlalchemy.dialects import postgresql, sqlite

from openmaas.metering.records import UsageRecord, idempotency_scope, month_of
from openmaas.store.tables import IdempotencyKeyRow, UsageCounterRow, UsageDailyRow, UsageRecordRow
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)
_STOP = object()
# Most records in one transaction (bounds the statement size).
MAX_GROUP = 512


@dataclass
class _Pending:
    record: UsageRecord
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[bool]


def _insert(engine: Engine, table: Any) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (both SQLite and PostgreSQL spell it the same)."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table)
    if engine.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"metering supports SQLite and PostgreSQL, not {engine.dialect.name}")


class _Compiled:
    """A statement compiled once for the engine's dialect and run through ``exec_driver_sql``.

    Each row's values go through the columns' own bind processors (so a UTC datetime is stored exactly as the ORM
    stores it), but the statement is not compiled again, its parameters are not re-processed through SQLAlchemy's
    execution context, and there is no result to build: the writer's transaction for one usage record took 290 us
    of CPU with the Core constructs and 200 us this way (SQLite, its commit included), for a group of 32 1030 us
    and 580 us; on PostgreSQL a group of 32 went from 4240 to 1240 us."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        self.names: list[str] = list(compiled.positiontup or ()) if self.positional else list(compiled.binds)
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name in self.names:
            processor = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor

    def parameters(self, row: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        processors = self.processors
        values = [processors[n](row[n]) if n in processors else row[n] for n in self.names]
        return tuple(values) if self.positional else dict(zip(self.names, values, strict=True))

    def run(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> int:
        """Executes the statement for each row (one ``executemany``); returns the rows it changed."""
        result = conn.exec_driver_sql(self.sql, [self.parameters(r) for r in rows])
        return int(result.rowcount)


class _SomeAlreadyStored(Exception):
    """The fast insert changed fewer rows than it was given: the group is written again by the path that says
    which records are new."""


class GroupCommitWriter:
    """Makes usage records durable, exactly once per request id and per idempotency key."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics | None = None,
        settle: Callable[[Connection, dict[str, Any], Any], None] | None = None,
        release: Callable[[Connection, Any], None] | None = None,
        max_group: int = MAX_GROUP,
        name: str = "openmaas-metering",
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        # Billing's settlement of a record's hold, run inside the same transaction as the record (exactly once).
        self._settle = settle
        self._release = release
        #: Lists of records (one event loop's turn each), or _STOP.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: The records each event loop has taken in its current turn, not yet handed to the thread.
        self._turns: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        # The writer thread's own connection, kept open between groups: checking one out of the pool (and, on
        # PostgreSQL, pinging it) for every commit cost a third of a single record's write. Dropped after a
        # failure, so the next group starts on a fresh one.
        self._conn: Connection | None = None
        # Built once: constructing them per commit was a measurable part of a single record's write.
        self._claim_keys = (
            _insert(engine, IdempotencyKeyRow)
            .on_conflict_do_nothing()
            .returning(IdempotencyKeyRow.scope, IdempotencyKeyRow.key)
        )
        self._insert_records = (
            _insert(engine, UsageRecordRow).on_conflict_do_nothing().returning(UsageRecordRow.request_id)
        )
        # The common case, no record stored before: one executemany and its row count (a request id is minted
        # per call, so a duplicate is a retried batch line or a replay, and takes the statement above instead).
        self._insert_new_records = _Compiled(_insert(engine, UsageRecordRow).on_conflict_do_nothing(), engine.dialect)
        upsert = _insert(engine, UsageCounterRow)
        add_to_counters = upsert.on_conflict_do_update(
            index_elements=["org_id", "month", "unit"],
            set_={"quantity": UsageCounterRow.quantity + upsert.excluded.quantity},
        )
        daily = _insert(engine, UsageDailyRow)
        add_to_daily = daily.on_conflict_do_update(
            index_elements=["org_id", "day", "model", "key_id", "protocol"],
            set_={c: getattr(UsageDailyRow, c) + daily.excluded[c] for c in ("records", *DAILY_SUMS)},
        )
        self._counters = _Compiled(add_to_counters, engine.dialect)
        self._daily = _Compiled(add_to_daily, engine.dialect)
        self._max_group = max_group
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def record(self, record: UsageRecord) -> bool:
        """Store ``record`` and return once it is committed: True if new, False if its idempotency key or
        request id was already recorded (nothing is counted twice). Raises if the database refused.

        The records of one turn of the event loop reach the writer thread together, at the end of the turn: a
        hand-off wakes the thread (a system call and a switch of the interpreter lock), once per turn rather than
        once per record."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = []
            loop.call_soon(self._hand_off, loop)
        turn.append(_Pending(record, loop, future))
        return await future

    def _hand_off(self, loop: asyncio.AbstractEventLoop) -> None:
        turn = self._turns.pop(loop, None)
        if turn:
            self._queue.put(turn)

    def close(self) -> None:
        for loop in list(self._turns):  # records of a turn not handed off yet go first
            self._hand_off(loop)
        self._queue.put(_STOP)
        self._thread.join(timeout=30)
        self._drop_connection()

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # -- writer thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group: list[_Pending] = list(first)
            stop = False
            while len(group) < self._max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                group.extend(item)
            # A turn may bring more than a group holds: it is committed in groups of at most max_group.
            for start in range(0, len(group), self._max_group):
                self._commit(group[start : start + self._max_group])
            if stop:
                return

    def _commit(self, group: list[_Pending]) -> None:
        try:
            stored = self.write([p.record for p in group])
        except Exception as e:
            self._drop_connection()
            log.error("usage records could not be stored", extra={"records": len(group), "error": str(e)})
            for p in group:
                p.loop.call_soon_threadsafe(_set_exception, p.future, e)
            return
        if self._metrics is not None:
            self._metrics.metering_group_size.observe(len(group))
        # One wake-up of each event loop for the whole group, not one per record.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], bool]]] = {}
        for p, was_stored in zip(group, stored, strict=True):
            by_loop.setdefault(p.loop, []).append((p.future, was_stored))
        for loop, results in by_loop.items():
            loop.call_soon_threadsafe(_set_results, results)

    def write(self, records: Sequence[UsageRecord]) -> list[bool]:
        """One transaction: claim idempotency keys, insert records, add to the monthly counters.

        Returns, for each record, whether it was stored: a record whose idempotency key or request id is
        already stored (earlier, earlier in this group, or by another process racing on the same key) is not.
        Runs on the writer thread (it uses the thread's connection)."""
        try:
            return self._write(records, fast=True)
        except _SomeAlreadyStored:
            return self._write(records, fast=False)

    def _write(self, records: Sequence[UsageRecord], *, fast: bool) -> list[bool]:
        first: list[UsageRecord] = []
        seen_ids: set[str] = set()
        seen_keys: set[tuple[str, str]] = set()
        for r in records:
            slot = (idempotency_scope(r.org_id), r.idempotency_key) if r.idempotency_key is not None else None
            if r.request_id in seen_ids or (slot is not None and slot in seen_keys):
                continue
            seen_ids.add(r.request_id)
            if slot is not None:
                seen_keys.add(slot)
            first.append(r)
        conn = self._connection()
        with conn.begin():
            claimed: set[tuple[str, str]] = set()
            keyed = [r for r in first if r.idempotency_key is not None]
            if keyed:
                rows = [
                    {
                        "scope": idempotency_scope(r.org_id),
                        "key": r.idempotency_key,
                        "request_id": r.request_id,
                        "fingerprint": r.fingerprint or "",
                        "created_at": r.created_at,
                    }
                    for r in keyed
                ]
                claimed = {(s, k) for s, k in conn.execute(self._claim_keys, rows)}
            to_store = [
                r
                for r in first
                if r.idempotency_key is None or (idempotency_scope(r.org_id), r.idempotency_key) in claimed
            ]
            inserted: set[str] = set()
            rows_of = {id(r): r.row() for r in to_store}
            if to_store and fast:
                if self._insert_new_records.run(conn, list(rows_of.values())) != len(to_store):
                    raise _SomeAlreadyStored  # rolls the transaction back; written again with RETURNING
                inserted = {r.request_id for r in to_store}
            elif to_store:
                inserted = {rid for (rid,) in conn.execute(self._insert_records, list(rows_of.values()))}
            stored = {id(r) for r in to_store if r.request_id in inserted}
            totals: dict[tuple[str, str, str], int] = defaultdict(int)
            for r in to_store:
                if id(r) not in stored or r.org_id is None:
                    continue
                for unit, quantity in r.units().items():
                    if quantity:
                        totals[(r.org_id, month_of(r.created_at), unit)] += quantity
            if totals:
                self._counters.run(
                    conn,
                    [
                        {"org_id": org_id, "month": month, "unit": unit, "quantity": quantity}
                        for (org_id, month, unit), quantity in sorted(totals.items())
                    ],
                )
            days = _daily_rollup([rows_of[id(r)] for r in to_store if id(r) in stored])
            if days:
                self._daily.run(conn, days)
            for r in records:
                if r.charge is None:
                    continue
                if id(r) in stored and self._settle is not None:
                    self._settle(conn, rows_of[id(r)], r.charge)
                elif id(r) not in stored and self._release is not None:
                    self._release(conn, r.charge)  # a duplicate: nothing is charged twice
            extra: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
            for r in records:
                if r.also is not None:
                    statement, values = r.also
                    extra.setdefault(id(statement), (statement, []))[1].append(values)
            for statement, rows in extra.values():
                conn.execute(statement, rows)
        return [id(r) in stored for r in records]


# The record columns the daily roll-up sums (usage_daily, migration 0012).
DAILY_SUMS = ("requests", "input_tokens", "output_tokens", "items", "audio_ms", "job_seconds")


def _daily_rollup(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored records summed per (organisation, day, model, key, protocol), in a stable order (no deadlocks
    between writers on PostgreSQL: every transaction takes the rows' locks in the same order)."""
    sums: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
    for row in rows:
        group = (row["org_id"] or "", row["day"], row["model"], row["key_id"], row["protocol"])
        found = sums.get(group)
        if found is None:
            found = sums[group] = {"org_id": group[0], "day": group[1], "model": group[2], "key_id": group[3],
                                   "protocol": group[4], "records": 0, **dict.fromkeys(DAILY_SUMS, 0)}  # fmt: skip
        found["records"] += 1
        for name in DAILY_SUMS:
            found[name] += row[name] or 0
    return [sums[g] for g in sorted(sums)]


def _set_results(results: list[tuple[asyncio.Future[bool], bool]]) -> None:
    for future, value in results:
        if not future.done():
            future.set_result(value)


def _set_exception(future: asyncio.Future[bool], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
