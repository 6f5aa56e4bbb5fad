"""Reading usage: summaries for the usage API, monthly totals for quotas, idempotency lookups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.errors import InvalidRequest
from openmaas.metering.records import UNITS
from openmaas.store.tables import ChargeRow, IdempotencyKeyRow, UsageCounterRow, UsageDailyRow, UsageRecordRow

IDEMPOTENCY_WINDOW = timedelta(hours=24)
GROUPS = {
    "model": UsageRecordRow.model,
    "key": UsageRecordRow.key_id,
    "day": UsageRecordRow.day,
    "org": UsageRecordRow.org_id,
    "protocol": UsageRecordRow.protocol,
}
# The same over the daily roll-up (its org_id is "" for records without an organisation).
DAILY_GROUPS = {
    "model": UsageDailyRow.model,
    "key": UsageDailyRow.key_id,
    "day": UsageDailyRow.day,
    "org": UsageDailyRow.org_id,
    "protocol": UsageDailyRow.protocol,
}
DAILY_UNITS = {
    "requests": UsageDailyRow.requests,
    "input_tokens": UsageDailyRow.input_tokens,
    "output_tokens": UsageDailyRow.output_tokens,
    "items": UsageDailyRow.items,
    "audio_seconds": UsageDailyRow.audio_ms,
    "job_seconds": UsageDailyRow.job_seconds,
}
# The usage record column behind each unit (audio is kept in milliseconds).
UNIT_COLUMNS = {
    "requests": UsageRecordRow.requests,
    "input_tokens": UsageRecordRow.input_tokens,
    "output_tokens": UsageRecordRow.output_tokens,
    "items": UsageRecordRow.items,
    "audio_seconds": UsageRecordRow.audio_ms,
    "job_seconds": UsageRecordRow.job_seconds,
}


@dataclass(frozen=True)
class PriorCall:
    request_id: str
    fingerprint: str


def parse_group_by(raw: str | None) -> list[str]:
    if not raw:
        return []
    names = [n.strip() for n in raw.split(",") if n.strip()]
    allowed = [*GROUPS, "unit"]
    for n in names:
        if n not in allowed:
            raise InvalidRequest(f"cannot group usage by '{n}'; use any of {', '.join(allowed)}", param="group_by")
    return list(dict.fromkeys(names))


def _org(dim: str, value: Any) -> Any:
    """A group's value as the API shows it: no organisation is None (the roll-up stores "")."""
    return None if dim == "org" and value == "" else value


def _quantity(unit: str, value: int) -> int | float:
    # Audio is stored in milliseconds and reported in seconds.
    return value / 1000 if unit == "audio_seconds" else int(value)


class UsageQueries:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def prior_call(self, scope: str, key: str, now: datetime) -> PriorCall | None:
        """The call already served under this idempotency key in the last 24 h (an older one is forgotten)."""
        with self._sessions() as s:
            row = s.get(IdempotencyKeyRow, (scope, key))
            if row is None:
                return None
            if row.created_at < now - IDEMPOTENCY_WINDOW:
                s.execute(
                    delete(IdempotencyKeyRow).where(IdempotencyKeyRow.scope == scope, IdempotencyKeyRow.key == key)
                )
                s.commit()
                return None
            return PriorCall(row.request_id, row.fingerprint)

    def month_totals(self, org_id: str, month: str) -> dict[str, int]:
        q = select(UsageCounterRow.unit, UsageCounterRow.quantity).where(
            UsageCounterRow.org_id == org_id, UsageCounterRow.month == month
        )
        with self._sessions() as s:
            return {unit: int(qty) for unit, qty in s.execute(q)}

    def summary(
        self, org_id: str | None, start: str, end: str, group_by: list[str], *, all_orgs: bool = False
    ) -> list[dict[str, Any]]:
        """Sums per group over days ``start``..``end`` (inclusive, YYYY-MM-DD); one org unless ``all_orgs``.

        Read from the daily roll-up (``usage_daily``, kept with each record), not from every record.
        ``cost_micros`` is what the calls paid from the wallet under pay-as-you-go plans (exactly the charges of
        these records); subscription fees, overage and dedicated capacity are billed per month, on the invoice."""
        dims = [g for g in group_by if g != "unit"]
        cols = [DAILY_GROUPS[d].label(d) for d in dims]
        sums = [func.coalesce(func.sum(c), 0).label(u) for u, c in DAILY_UNITS.items()]
        where = [UsageDailyRow.day >= start, UsageDailyRow.day <= end]
        if not all_orgs or org_id is not None:
            where.append(UsageDailyRow.org_id == (org_id or ""))
        q = select(*cols, *sums).where(*where)
        if dims:
            q = q.group_by(*[DAILY_GROUPS[d] for d in dims]).order_by(*[DAILY_GROUPS[d] for d in dims])
        # Costs from the charges (pay-as-you-go calls only), joined to their records for the groups.
        charged = [UsageRecordRow.day >= start, UsageRecordRow.day <= end]
        if not all_orgs or org_id is not None:
            charged.append(ChargeRow.org_id == org_id if org_id is not None else UsageRecordRow.org_id.is_(None))
        costs = (
            select(
                *[GROUPS[d].label(d) for d in dims],
                ChargeRow.unit.label("charged_unit"),
                func.sum(ChargeRow.amount_micros).label("cost"),
            )
            .select_from(ChargeRow)
            .join(UsageRecordRow, UsageRecordRow.request_id == ChargeRow.request_id)
            .where(*charged)
            .group_by(*[GROUPS[d] for d in dims], ChargeRow.unit)
        )
        out: list[dict[str, Any]] = []
        with self._sessions() as s:
            cost_of: dict[tuple[Any, ...], dict[str, int]] = {}
            for row in s.execute(costs).mappings():
                cost_of.setdefault(tuple(_org(d, row[d]) for d in dims), {})[row["charged_unit"]] = int(
                    row["cost"] or 0
                )
            for row in s.execute(q).mappings():
                base = {d: _org(d, row[d]) for d in dims}
                paid = cost_of.get(tuple(base[d] for d in dims), {})
                if "unit" in group_by:
                    for unit in UNITS:
                        if row[unit]:
                            out.append(
                                {
                                    **base,
                                    "unit": unit,
                                    "quantity": _quantity(unit, row[unit]),
                                    "cost_micros": paid.get(unit, 0),
                                }
                            )
                elif dims or row["requests"] or row["job_seconds"]:
                    out.append({**base, **{u: _quantity(u, row[u]) for u in UNITS}, "cost_micros": sum(paid.values())})
        return out

    def records(self, org_id: str | None, limit: int = 100) -> list[dict[str, Any]]:
        q = select(UsageRecordRow).order_by(UsageRecordRow.created_at.desc()).limit(limit)
        if org_id is not None:
            q = q.where(UsageRecordRow.org_id == org_id)
        with self._sessions() as s:
            return [
                {
                    "request_id": r.request_id,
                    "org_id": r.org_id,
                    "key_id": r.key_id,
                    "model": r.model,
                    "version": r.version,
                    "protocol": r.protocol,
                    "requests": r.requests,
                    "input_tokens": r.input_tokens,
                    "output_tokens": r.output_tokens,
                    "items": r.items,
                    "audio_seconds": r.audio_ms / 1000,
                    "job_seconds": r.job_seconds,
                    "latency_ms": r.latency_ms,
                    "outcome": r.outcome,
                    "created_at": r.created_at.isoformat(),
                }
                for r in s.scalars(q)
            ]
