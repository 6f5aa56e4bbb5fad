"""Append-only audit events chained by a keyed hash (HMAC-SHA256 under the server secret).

Each event's hash covers its content and the previous event's hash, so changing, removing or reordering any
event breaks the chain from there on; keying the hash means someone with write access to the database alone
cannot forge a consistent chain either.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from openmaas.store.tables import AuditEventRow

GENESIS = "0" * 64


@dataclass(frozen=True)
class Actor:
    """Who did it and from where."""

    kind: str
    key_id: str | None = None
    user_id: str | None = None
    client_ip: str | None = None


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    at: datetime
    actor_kind: str
    actor_key_id: str | None
    actor_user_id: str | None
    org_id: str | None
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    client_ip: str | None
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "actor": {"kind": self.actor_kind, "key_id": self.actor_key_id, "user_id": self.actor_user_id},
            "org_id": self.org_id,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "client_ip": self.client_ip,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def chain_hash(secret: bytes, prev_hash: str, content: dict[str, Any]) -> str:
    """HMAC of the previous hash and the event's canonical JSON."""
    payload = prev_hash.encode() + orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def _content(row: AuditEventRow | AuditEvent) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "at": row.at.astimezone(UTC).isoformat(),
        "actor_kind": row.actor_kind,
        "actor_key_id": row.actor_key_id,
        "actor_user_id": row.actor_user_id,
        "org_id": row.org_id,
        "action": row.action,
        "target": row.target,
        "before": row.before,
        "after": row.after,
        "client_ip": row.client_ip,
    }


def _event(row: AuditEventRow) -> AuditEvent:
    return AuditEvent(
        seq=row.seq,
        at=row.at,
        actor_kind=row.actor_kind,
        actor_key_id=row.actor_key_id,
        actor_user_id=row.actor_user_id,
        org_id=row.org_id,
        action=row.action,
        target=row.target,
        before=row.before,
        after=row.after,
        client_ip=row.client_ip,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


@dataclass(frozen=True)
class Verification:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "first_bad_seq": self.first_bad_seq, "reason": self.reason}


def verify_chain(secret: bytes, events: Iterable[AuditEvent]) -> Verification:
    """Check sequence, links and hashes of the whole chain, in order; report the first event that fails."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for ev in events:
        count += 1
        if ev.seq != expected_seq:
            return Verification(False, count, ev.seq, f"expected event {expected_seq}, found {ev.seq} (a gap)")
        if ev.prev_hash != prev:
            return Verification(False, count, ev.seq, "its link to the previous event does not match")
        if not hmac.compare_digest(chain_hash(secret, prev, _content(ev)), ev.hash):
            return Verification(False, count, ev.seq, "its content does not match its hash (changed)")
        prev = ev.hash
        expected_seq += 1
    return Verification(True, count)


class AuditLog:
    """Appends and reads audit events. Appends are serialised (process lock; advisory lock on PostgreSQL)."""

    def __init__(self, sessions: sessionmaker[Session], secret: bytes) -> None:
        self._sessions = sessions
        self._secret = secret
        self._lock = threading.Lock()

    def append(
        self,
        actor: Actor,
        action: str,
        target: str,
        *,
        org_id: str | None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> AuditEvent:
        with self._lock, self._sessions() as s:
            if s.get_bind().dialect.name == "postgresql":
                # Several gateway processes may append at once: one chain, one writer at a time.
                s.execute(text("SELECT pg_advisory_xact_lock(7411)"))
            last = s.scalar(select(AuditEventRow).order_by(AuditEventRow.seq.desc()).limit(1))
            seq = 1 if last is None else last.seq + 1
            prev = GENESIS if last is None else last.hash
            row = AuditEventRow(
                seq=seq,
                at=datetime.now(UTC),
                actor_kind=actor.kind,
                actor_key_id=actor.key_id,
                actor_user_id=actor.user_id,
                org_id=org_id,
                action=action,
                target=target,
                before=_jsonable(before),
                after=_jsonable(after),
                client_ip=actor.client_ip,
                prev_hash=prev,
                hash="",
            )
            row.hash = chain_hash(self._secret, prev, _content(row))
            s.add(row)
            s.commit()
            return _event(row)

    def list(self, org_id: str | None = None, *, after_seq: int = 0, limit: int = 100) -> list[AuditEvent]:
        """Events in order; only those concerning ``org_id`` when given."""
        q = select(AuditEventRow).where(AuditEventRow.seq > after_seq).order_by(AuditEventRow.seq).limit(limit)
        if org_id is not None:
            q = q.where(AuditEventRow.org_id == org_id)
        with self._sessions() as s:
            return [_event(r) for r in s.scalars(q)]

    def count(self) -> int:
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(AuditEventRow)) or 0)

    def verify(self, page: int = 1000) -> Verification:
        """Verify the whole chain, reading it in pages."""

        def all_events() -> Iterable[AuditEvent]:
            after = 0
            while True:
                batch = self.list(after_seq=after, limit=page)
                if not batch:
                    return
                yield from batch
                after = batch[-1].seq

        return verify_chain(self._secret, all_events())


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON round trip, so what is hashed now is exactly what is read back later."""
    if value is None:
        return None
    result: dict[str, Any] = orjson.loads(orjson.dumps(value, default=str))
    return result
