"""Plans, subscriptions, wallets, entitlement at admission, settlement with metering, invoices, statements."""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from openmaas.billing import ledger
from openmaas.billing.money import round_half_even
from openmaas.billing.plans import PlanSpec, overage_cost, prorated_fee, usage_cost
from openmaas.errors import AlreadyExists, ErrorCode, InvalidRequest, NotFound, OpenMaaSError
from openmaas.store.tables import (
    ChargeAccumulatorRow,
    ChargeRow,
    CreditRow,
    HoldRow,
    InvoiceRow,
    LedgerEntryRow,
    ModelRow,
    PeriodRow,
    PlanRow,
    SubscriptionRow,
    UsageRecordRow,
    WalletRow,
)

log = logging.getLogger(__name__)
_CACHE_TTL_S = 2.0


class PaymentRequired(OpenMaaSError):
    code = ErrorCode.PAYMENT_REQUIRED


@dataclass(frozen=True)
class Plan:
    id: str
    model: str
    owner_org_id: str | None
    spec: PlanSpec
    active: bool
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "active": self.active,
            "created_at": self.created_at.isoformat(),
            **self.spec.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class PendingCharge:
    """A pay-as-you-go call's hold, settled in the same transaction as its usage record."""

    hold_id: str
    org_id: str
    held_micros: int
    plan_id: str
    provider_org_id: str | None
    unit: str


def month_bounds(period: str) -> tuple[datetime, datetime, int]:
    """(start, end, days) of a ``YYYY-MM`` period, in UTC."""
    try:
        year, month = (int(p) for p in period.split("-"))
        start = datetime(year, month, 1, tzinfo=UTC)
    except ValueError:
        raise InvalidRequest(f"a period is a month like 2026-11, not '{period}'", param="period") from None
    days = calendar.monthrange(year, month)[1]
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end, days


def _spec_quantity(
    spec: PlanSpec, *, requests: int, input_tokens: int, output_tokens: int, items: int, audio_ms: int
) -> int:
    return {
        "requests": requests,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "items": items,
        "audio_seconds": math.ceil(audio_ms / 1000),
    }[spec.unit]


class BillingService:
    def __init__(self, engine: Engine, currency: str = "CNY", commission_bps: int = 2000) -> None:
        self._engine = engine
        self.currency = currency
        self.commission_bps = commission_bps
        self._plans_cache: dict[str, tuple[float, list[Plan]]] = {}
        self._subs_cache: dict[tuple[str, str], tuple[float, Plan | None]] = {}
        self._lock = threading.Lock()

    # -- plans ----------------------------------------------------------------------------------------------------

    def create_plan(self, model: str, spec: PlanSpec) -> Plan:
        with self._engine.begin() as conn:
            row = conn.execute(select(ModelRow.id, ModelRow.owner_org_id).where(ModelRow.name == model)).first()
            if row is None:
                raise NotFound(f"model '{model}' does not exist", param="model")
            plan_id = uuid.uuid4().hex
            now = datetime.now(UTC)
            try:
                conn.execute(
                    insert(PlanRow).values(
                        id=plan_id,
                        model_id=row.id,
                        name=spec.name,
                        kind=spec.kind,
                        spec=spec.model_dump(mode="json"),
                        active=True,
                        created_at=now,
                    )
                )
            except IntegrityError:
                raise AlreadyExists(f"model '{model}' already has a plan named '{spec.name}'", param="name") from None
        self._plans_cache.pop(model, None)
        return Plan(plan_id, model, row.owner_org_id, spec, True, now)

    def plans(self, model: str, *, fresh: bool = False) -> list[Plan]:
        """Active plans of a model (cached briefly for the request path)."""
        now = time.monotonic()
        hit = self._plans_cache.get(model)
        if hit is not None and not fresh and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        q = (
            select(PlanRow, ModelRow.name, ModelRow.owner_org_id)
            .join(ModelRow, ModelRow.id == PlanRow.model_id)
            .where(ModelRow.name == model, PlanRow.active.is_(True))
            .order_by(PlanRow.created_at)
        )
        with Session(self._engine) as conn:
            plans = [
                Plan(
                    r.PlanRow.id,
                    r.name,
                    r.owner_org_id,
                    PlanSpec.model_validate(r.PlanRow.spec),
                    r.PlanRow.active,
                    r.PlanRow.created_at,
                )
                for r in conn.execute(q)
            ]
        self._plans_cache[model] = (now, plans)
        return plans

    def plan(self, plan_id: str) -> Plan:
        q = select(PlanRow, ModelRow.name, ModelRow.owner_org_id).join(ModelRow, ModelRow.id == PlanRow.model_id)
        with Session(self._engine) as conn:
            r = conn.execute(q.where(PlanRow.id == plan_id)).first()
        if r is None:
            raise NotFound(f"plan '{plan_id}' does not exist", param="plan")
        return Plan(
            r.PlanRow.id,
            r.name,
            r.owner_org_id,
            PlanSpec.model_validate(r.PlanRow.spec),
            r.PlanRow.active,
            r.PlanRow.created_at,
        )

    # -- subscriptions --------------------------------------------------------------------------------------------

    def subscribe(self, org_id: str, model: str, plan_ref: str) -> dict[str, Any]:
        plan = next((p for p in self.plans(model, fresh=True) if plan_ref in (p.id, p.spec.name)), None)
        if plan is None:
            raise NotFound(f"model '{model}' has no active plan '{plan_ref}'", param="plan")
        if plan.spec.kind != "subscription":
            raise InvalidRequest(
                f"plan '{plan.spec.name}' is a {plan.spec.kind} plan: it needs no subscription", param="plan"
            )
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            if self._active_subscription_row(conn, org_id, model, now) is not None:
                raise AlreadyExists(f"the organisation already subscribes to '{model}'", param="model")
            sub_id = uuid.uuid4().hex
            conn.execute(
                insert(SubscriptionRow).values(id=sub_id, org_id=org_id, plan_id=plan.id, model=model, started_at=now)
            )
        self._subs_cache.clear()
        return {
            "id": sub_id,
            "org_id": org_id,
            "model": model,
            "plan": plan.spec.name,
            "started_at": now.isoformat(),
            "ends_at": None,
        }

    def cancel(self, org_id: str, sub_id: str) -> dict[str, Any]:
        """Cancel at the end of the current period."""
        now = datetime.now(UTC)
        _, end, _ = month_bounds(now.strftime("%Y-%m"))
        with self._engine.begin() as conn:
            row = conn.execute(select(SubscriptionRow).where(SubscriptionRow.id == sub_id)).first()
            if row is None or row.org_id != org_id:
                raise NotFound(f"subscription '{sub_id}' does not exist in this organisation", param="subscription")
            if row.ends_at is None or row.ends_at > end:
                conn.execute(update(SubscriptionRow).where(SubscriptionRow.id == sub_id).values(ends_at=end))
        self._subs_cache.clear()
        return {"id": sub_id, "ends_at": end.isoformat()}

    def subscriptions(self, org_id: str) -> list[dict[str, Any]]:
        with Session(self._engine) as conn:
            rows = conn.execute(
                select(SubscriptionRow, PlanRow.name)
                .join(PlanRow, PlanRow.id == SubscriptionRow.plan_id)
                .where(SubscriptionRow.org_id == org_id)
                .order_by(SubscriptionRow.started_at)
            ).all()
        return [
            {
                "id": r.SubscriptionRow.id,
                "model": r.SubscriptionRow.model,
                "plan": r.name,
                "started_at": r.SubscriptionRow.started_at.isoformat(),
                "ends_at": r.SubscriptionRow.ends_at.isoformat() if r.SubscriptionRow.ends_at else None,
            }
            for r in rows
        ]

    @staticmethod
    def _active_subscription_row(conn: Connection, org_id: str, model: str, now: datetime) -> Any:
        return conn.execute(
            select(SubscriptionRow).where(
                SubscriptionRow.org_id == org_id,
                SubscriptionRow.model == model,
                SubscriptionRow.started_at <= now,
                (SubscriptionRow.ends_at.is_(None)) | (SubscriptionRow.ends_at > now),
            )
        ).first()

    def _subscribed_plan(self, org_id: str, model: str) -> Plan | None:
        now = time.monotonic()
        hit = self._subs_cache.get((org_id, model))
        if hit is not None and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
        with self._engine.connect() as conn:
            row = self._active_subscription_row(conn, org_id, model, datetime.now(UTC))
        plan = self.plan(row.plan_id) if row is not None else None
        self._subs_cache[(org_id, model)] = (now, plan)
        return plan

    # -- wallet ---------------------------------------------------------------------------------------------------

    def credit(self, org_id: str, amount: int, reference: str) -> tuple[dict[str, int], bool]:
        """Add credit; the same reference twice adds it once. Returns the wallet and whether this call added it."""
        if amount <= 0:
            raise InvalidRequest("'amount_micros' must be positive", param="amount_micros")
        if not reference:
            raise InvalidRequest("a credit needs a 'reference' (it makes retries safe)", param="reference")
        added = False
        try:
            with self._engine.begin() as conn:
                existing = conn.execute(
                    select(CreditRow).where(CreditRow.org_id == org_id, CreditRow.reference == reference)
                ).first()
                if existing is not None:
                    if existing.amount_micros != amount:
                        raise InvalidRequest(
                            f"reference '{reference}' was already used for a credit of {existing.amount_micros} micros",
                            param="reference",
                        )
                else:
                    ledger.ensure_wallet(conn, org_id)
                    txn = ledger.post(
                        conn, "credit", [(f"funding:{org_id}", -amount), (ledger.wallet(org_id), amount)], reference
                    )
                    conn.execute(
                        insert(CreditRow).values(org_id=org_id, reference=reference, amount_micros=amount, txn_id=txn)
                    )
                    conn.execute(
                        update(WalletRow)
                        .where(WalletRow.org_id == org_id)
                        .values(available_micros=WalletRow.available_micros + amount)
                    )
                    added = True
        except IntegrityError:  # the same reference raced in from another request: it was added once
            added = False
        return self.wallet(org_id), added

    def wallet(self, org_id: str) -> dict[str, int]:
        with self._engine.connect() as conn:
            row = conn.execute(select(WalletRow).where(WalletRow.org_id == org_id)).first()
        available, held = (row.available_micros, row.held_micros) if row is not None else (0, 0)
        return {"balance_micros": available + held, "held_micros": held, "available_micros": available}

    # -- entitlement (the gateway calls these) --------------------------------------------------------------------

    def admit(
        self, org_id: str | None, model: str, owner_org_id: str | None, request_id: str, worst_case: dict[str, int]
    ) -> PendingCharge | None:
        """Check the caller may use a priced model: a subscription, or a hold of the call's worst-case cost.

        Returns the hold to settle with the usage record (None when nothing is charged per call); raises 402."""
        if org_id is None or org_id == owner_org_id:
            return None  # the platform admin, or a provider calling its own model
        plans = [p for p in self.plans(model) if not p.spec.free]
        if not plans:
            return None
        subscribed = self._subscribed_plan(org_id, model)
        if subscribed is not None:
            return None  # postpaid: fees and overage go on the invoice
        usage = next((p for p in plans if p.spec.kind == "usage"), None)
        if usage is None:
            names = ", ".join(p.spec.name for p in plans)
            raise PaymentRequired(
                f"model '{model}' is sold by subscription ({names}); subscribe with "
                f'POST /api/orgs/{{org}}/subscriptions {{"model": "{model}", "plan": "<name>"}}'
            )
        spec = usage.spec
        quantity = worst_case.get(spec.unit, 0)
        top_price = max([spec.price_micros] + [t.price_micros for t in spec.tiers or []])
        # Rounding the running total can add one micro to a call's share of it.
        amount = math.ceil(Fraction(top_price * quantity, spec.block)) + 1
        with self._engine.begin() as conn:
            ledger.ensure_wallet(conn, org_id)
            if not ledger.move_to_hold(conn, org_id, amount):
                available = conn.execute(
                    select(WalletRow.available_micros).where(WalletRow.org_id == org_id)
                ).scalar_one()
                raise PaymentRequired(
                    f"this call may cost up to {amount} micros ({self.currency}) and the organisation's wallet has "
                    f"{available} available; ask the platform admin to add credit "
                    "(POST /api/orgs/{org}/wallet/credits)"
                )
            conn.execute(
                insert(HoldRow).values(
                    id=request_id, org_id=org_id, amount_micros=amount, state="open", created_at=datetime.now(UTC)
                )
            )
        return PendingCharge(request_id, org_id, amount, usage.id, owner_org_id, spec.unit)

    def release(self, pending: PendingCharge) -> None:
        """Give a hold back (the call failed before it was metered)."""
        with self._engine.begin() as conn:
            self.release_in(conn, pending)

    @staticmethod
    def release_in(conn: Connection, pending: PendingCharge) -> None:
        updated = conn.execute(
            update(HoldRow).where(HoldRow.id == pending.hold_id, HoldRow.state == "open").values(state="released")
        )
        if updated.rowcount == 1:
            ledger.release_hold(conn, pending.org_id, pending.held_micros, pending.hold_id)

    async def priced(self, model: str) -> bool:
        """Whether calls to ``model`` may cost anything (plans cached; refreshed off the event loop)."""
        hit = self._plans_cache.get(model)
        if hit is not None and time.monotonic() - hit[0] < _CACHE_TTL_S:
            plans = hit[1]
        else:
            plans = await asyncio.to_thread(self.plans, model)
        return any(not p.spec.free for p in plans)

    def settle(self, conn: Connection, record: UsageRecordRow | dict[str, Any], pending: PendingCharge) -> None:
        """Rate one stored usage record and settle its hold, in the metering transaction (exactly once)."""
        r = record if isinstance(record, dict) else record.__dict__
        plan = self.plan(pending.plan_id)
        spec = plan.spec
        quantity = _spec_quantity(
            spec,
            requests=r["requests"],
            input_tokens=r["input_tokens"],
            output_tokens=r["output_tokens"],
            items=r["items"],
            audio_ms=r["audio_ms"],
        )
        month = r["created_at"].astimezone(UTC).strftime("%Y-%m")
        key = (
            ChargeAccumulatorRow.org_id == pending.org_id,
            ChargeAccumulatorRow.plan_id == pending.plan_id,
            ChargeAccumulatorRow.month == month,
        )
        acc = conn.execute(
            select(ChargeAccumulatorRow.quantity, ChargeAccumulatorRow.numerator).where(*key).with_for_update()
        ).first()
        already, numerator = (acc.quantity, acc.numerator) if acc is not None else (0, 0)
        added = usage_cost(spec, quantity, already) * spec.block
        assert added.denominator == 1
        new_numerator = numerator + int(added)
        if acc is None:
            conn.execute(
                insert(ChargeAccumulatorRow).values(
                    org_id=pending.org_id,
                    plan_id=pending.plan_id,
                    month=month,
                    quantity=quantity,
                    numerator=new_numerator,
                )
            )
        else:
            conn.execute(
                update(ChargeAccumulatorRow).where(*key).values(quantity=already + quantity, numerator=new_numerator)
            )
        cost = round_half_even(Fraction(new_numerator, spec.block)) - round_half_even(Fraction(numerator, spec.block))
        if cost > pending.held_micros:
            log.error(
                "call cost more than its hold",
                extra={"request": pending.hold_id, "cost": cost, "held": pending.held_micros},
            )
            cost = pending.held_micros
        conn.execute(
            insert(ChargeRow).values(
                request_id=r["request_id"],
                org_id=pending.org_id,
                provider_org_id=pending.provider_org_id,
                model=r["model"],
                plan_id=pending.plan_id,
                unit=spec.unit,
                quantity=quantity,
                amount_micros=cost,
                created_at=r["created_at"],
                invoice_id=None,
            )
        )
        conn.execute(update(HoldRow).where(HoldRow.id == pending.hold_id).values(state="settled"))
        ledger.settle_hold(conn, pending.org_id, pending.held_micros, cost, pending.provider_org_id, r["request_id"])

    # -- invoices -------------------------------------------------------------------------------------------------

    def close_period(self, period: str) -> list[dict[str, Any]]:
        """One invoice per org for ``period``; closing again returns the same invoices."""
        start, end, days = month_bounds(period)
        if end > datetime.now(UTC):
            raise InvalidRequest(f"period {period} has not ended yet", param="period")
        with self._lock, self._engine.begin() as conn:
            if conn.execute(select(PeriodRow).where(PeriodRow.period == period)).first() is None:
                self._close(conn, period, start, end, days)
        return self.invoices(period=period)

    def _close(self, conn: Connection, period: str, start: datetime, end: datetime, days: int) -> None:
        lines_by_org: dict[str, list[dict[str, Any]]] = defaultdict(list)
        subs = conn.execute(
            select(SubscriptionRow).where(
                SubscriptionRow.started_at < end,
                (SubscriptionRow.ends_at.is_(None)) | (SubscriptionRow.ends_at > start),
            )
        ).all()
        first_day, last_day = start.date().isoformat(), date.fromordinal(end.date().toordinal() - 1).isoformat()
        for sub in subs:
            plan = self.plan(sub.plan_id)
            spec = plan.spec
            active_from = max(sub.started_at, start)
            active_to = min(sub.ends_at or end, end)
            active_days = max(0, math.ceil((active_to - active_from).total_seconds() / 86400))
            fee = round_half_even(prorated_fee(spec, active_days, days))
            lines_by_org[sub.org_id].append(
                {
                    "kind": "subscription",
                    "description": f"{plan.model}: {spec.name}, {active_days} of {days} days",
                    "model": plan.model,
                    "plan": spec.name,
                    "provider_org_id": plan.owner_org_id,
                    "quantity": active_days,
                    "amount_micros": fee,
                    "records": 0,
                    "prepaid": False,
                }
            )
            column = {
                "requests": UsageRecordRow.requests,
                "input_tokens": UsageRecordRow.input_tokens,
                "output_tokens": UsageRecordRow.output_tokens,
                "items": UsageRecordRow.items,
                "audio_seconds": UsageRecordRow.audio_ms,
            }[spec.unit]
            used, count = conn.execute(
                select(func.coalesce(func.sum(column), 0), func.count()).where(
                    UsageRecordRow.org_id == sub.org_id,
                    UsageRecordRow.model == plan.model,
                    UsageRecordRow.day >= first_day,
                    UsageRecordRow.day <= last_day,
                )
            ).one()
            used = math.ceil(int(used) / 1000) if spec.unit == "audio_seconds" else int(used)
            over, cost = overage_cost(spec, used)
            lines_by_org[sub.org_id].append(
                {
                    "kind": "overage",
                    "description": f"{plan.model}: {used} {spec.unit} used, {spec.included_units} included",
                    "model": plan.model,
                    "plan": spec.name,
                    "provider_org_id": plan.owner_org_id,
                    "quantity": over,
                    "amount_micros": round_half_even(cost),
                    "records": int(count),
                    "prepaid": False,
                }
            )
        charges = conn.execute(
            select(
                ChargeRow.org_id,
                ChargeRow.model,
                ChargeRow.plan_id,
                ChargeRow.provider_org_id,
                ChargeRow.unit,
                func.sum(ChargeRow.quantity),
                func.sum(ChargeRow.amount_micros),
                func.count(),
                func.min(ChargeRow.created_at),
            )
            .where(ChargeRow.invoice_id.is_(None), ChargeRow.created_at < end)
            .group_by(ChargeRow.org_id, ChargeRow.model, ChargeRow.plan_id, ChargeRow.provider_org_id, ChargeRow.unit)
        ).all()
        for org, model, plan_id, provider, unit, qty, amount, count, earliest in charges:
            plan = self.plan(plan_id)
            late = " (includes calls from an earlier period)" if earliest < start else ""
            lines_by_org[org].append(
                {
                    "kind": "usage",
                    "description": f"{model}: {int(qty)} {unit}, pay as you go{late}",
                    "model": model,
                    "plan": plan.spec.name,
                    "plan_id": plan_id,
                    "provider_org_id": provider,
                    "quantity": int(qty),
                    "amount_micros": int(amount),
                    "records": int(count),
                    "prepaid": True,
                }
            )
        now = datetime.now(UTC)
        for org, lines in sorted(lines_by_org.items()):
            for n, line in enumerate(lines, start=1):
                line["n"] = n
            total = sum(line["amount_micros"] for line in lines)
            prepaid = sum(line["amount_micros"] for line in lines if line["prepaid"])
            invoice_id = uuid.uuid4().hex
            conn.execute(
                insert(InvoiceRow).values(
                    id=invoice_id,
                    org_id=org,
                    period=period,
                    currency=self.currency,
                    total_micros=total,
                    prepaid_micros=prepaid,
                    due_micros=total - prepaid,
                    lines=lines,
                    created_at=now,
                )
            )
            conn.execute(
                update(ChargeRow)
                .where(ChargeRow.org_id == org, ChargeRow.invoice_id.is_(None), ChargeRow.created_at < end)
                .values(invoice_id=invoice_id)
            )
            postpaid: dict[str | None, int] = defaultdict(int)
            for line in lines:
                if not line["prepaid"]:
                    postpaid[line["provider_org_id"]] += line["amount_micros"]
            entries = [(ledger.revenue(p), amount) for p, amount in postpaid.items()]
            ledger.post(conn, "invoice", [(f"receivable:{org}", -sum(postpaid.values())), *entries], invoice_id)
        conn.execute(insert(PeriodRow).values(period=period, closed_at=now))

    def invoices(self, *, org_id: str | None = None, period: str | None = None) -> list[dict[str, Any]]:
        q = select(InvoiceRow).order_by(InvoiceRow.period, InvoiceRow.org_id)
        if org_id is not None:
            q = q.where(InvoiceRow.org_id == org_id)
        if period is not None:
            q = q.where(InvoiceRow.period == period)
        with self._engine.connect() as conn:
            return [self._invoice_json(r) for r in conn.execute(q)]

    def invoice(self, invoice_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            row = conn.execute(select(InvoiceRow).where(InvoiceRow.id == invoice_id)).first()
        if row is None:
            raise NotFound(f"invoice '{invoice_id}' does not exist", param="invoice")
        return self._invoice_json(row)

    @staticmethod
    def _invoice_json(row: Any) -> dict[str, Any]:
        return {
            "id": row.id,
            "org_id": row.org_id,
            "period": row.period,
            "currency": row.currency,
            "total_micros": row.total_micros,
            "prepaid_micros": row.prepaid_micros,
            "due_micros": row.due_micros,
            "lines": row.lines,
            "created_at": row.created_at.isoformat(),
        }

    def line_records(self, invoice: dict[str, Any], n: int, limit: int = 1000) -> list[dict[str, Any]]:
        """The usage records behind one invoice line ("explain my bill")."""
        line = next((x for x in invoice["lines"] if x["n"] == n), None)
        if line is None:
            raise NotFound(f"invoice {invoice['id']} has no line {n}", param="line")
        cols = (
            UsageRecordRow.request_id,
            UsageRecordRow.created_at,
            UsageRecordRow.key_id,
            UsageRecordRow.model,
            UsageRecordRow.requests,
            UsageRecordRow.input_tokens,
            UsageRecordRow.output_tokens,
            UsageRecordRow.items,
            UsageRecordRow.audio_ms,
        )
        q: Any
        if line["kind"] == "usage":
            q = (
                select(*cols, ChargeRow.amount_micros)
                .join(ChargeRow, ChargeRow.request_id == UsageRecordRow.request_id)
                .where(ChargeRow.invoice_id == invoice["id"], ChargeRow.plan_id == line["plan_id"])
            )
        elif line["kind"] == "overage":
            start, end, _ = month_bounds(invoice["period"])
            q = select(*cols).where(
                UsageRecordRow.org_id == invoice["org_id"],
                UsageRecordRow.model == line["model"],
                UsageRecordRow.created_at >= start,
                UsageRecordRow.created_at < end,
            )
        else:
            return []
        with self._engine.connect() as conn:
            rows = conn.execute(q.order_by(UsageRecordRow.created_at).limit(limit)).mappings().all()
        return [{**dict(r), "created_at": r["created_at"].isoformat()} for r in rows]

    # -- provider statements --------------------------------------------------------------------------------------

    def statement(self, provider_org_id: str, period: str) -> dict[str, Any]:
        by_key: dict[tuple[str, str], int] = defaultdict(int)
        for inv in self.invoices(period=period):
            for line in inv["lines"]:
                if line["provider_org_id"] == provider_org_id:
                    by_key[(line["model"], line["plan"])] += line["amount_micros"]
        gross = sum(by_key.values())
        commission = round_half_even(Fraction(gross * self.commission_bps, 10_000))
        return {
            "org_id": provider_org_id,
            "period": period,
            "currency": self.currency,
            "lines": [{"model": m, "plan": p, "gross_micros": v} for (m, p), v in sorted(by_key.items())],
            "gross_micros": gross,
            "commission_bps": self.commission_bps,
            "commission_micros": commission,
            "net_micros": gross - commission,
        }

    # -- invariants -----------------------------------------------------------------------------------------------

    def verify(self) -> dict[str, Any]:
        """Check the books: balanced transactions, wallets equal to the ledger, holds, charges and invoices."""
        problems: list[str] = []
        with self._engine.connect() as conn:
            total = conn.execute(select(func.coalesce(func.sum(LedgerEntryRow.amount_micros), 0))).scalar_one()
            if total != 0:
                problems.append(f"ledger entries sum to {total}, not 0")
            unbalanced = conn.execute(
                select(LedgerEntryRow.txn_id)
                .group_by(LedgerEntryRow.txn_id)
                .having(func.sum(LedgerEntryRow.amount_micros) != 0)
            ).all()
            problems += [f"ledger transaction {t} does not balance" for (t,) in unbalanced]
            for w in conn.execute(select(WalletRow)).all():
                if w.available_micros < 0 or w.held_micros < 0:
                    problems.append(f"wallet of {w.org_id} is negative")
                if ledger.balance(conn, ledger.wallet(w.org_id)) != w.available_micros:
                    problems.append(f"wallet of {w.org_id}: available differs from the ledger")
                if ledger.balance(conn, ledger.hold(w.org_id)) != w.held_micros:
                    problems.append(f"wallet of {w.org_id}: held differs from the ledger")
                open_holds = conn.execute(
                    select(func.coalesce(func.sum(HoldRow.amount_micros), 0)).where(
                        HoldRow.org_id == w.org_id, HoldRow.state == "open"
                    )
                ).scalar_one()
                if open_holds != w.held_micros:
                    problems.append(f"wallet of {w.org_id}: open holds {open_holds} differ from held {w.held_micros}")
            orphans = conn.execute(
                select(func.count())
                .select_from(ChargeRow)
                .outerjoin(UsageRecordRow, UsageRecordRow.request_id == ChargeRow.request_id)
                .where(UsageRecordRow.request_id.is_(None))
            ).scalar_one()
            if orphans:
                problems.append(f"{orphans} charges have no usage record")
            for inv in conn.execute(select(InvoiceRow)).all():
                if sum(line["amount_micros"] for line in inv.lines) != inv.total_micros:
                    problems.append(f"invoice {inv.id}: lines do not add up to the total")
                charged = conn.execute(
                    select(func.coalesce(func.sum(ChargeRow.amount_micros), 0)).where(ChargeRow.invoice_id == inv.id)
                ).scalar_one()
                if charged != inv.prepaid_micros:
                    problems.append(f"invoice {inv.id}: usage lines differ from the rated calls")
            entries = conn.execute(select(func.count()).select_from(LedgerEntryRow)).scalar_one()
        return {"ok": not problems, "problems": problems, "ledger_entries": int(entries)}
