"""The books: closing periods into invoices, explaining invoice lines, provider statements, checking invariants."""

from __future__ import annotations

import math
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from openmaas.billing import ledger
from openmaas.billing.money import round_half_even
from openmaas.billing.plans import Plan, dedicated_cost, month_bounds, overage_cost, pricing, prorated_fee
from openmaas.errors import InvalidRequest, NotFound
from openmaas.metering.usage import UNIT_COLUMNS
from openmaas.store.tables import (
    ChargeRow,
    HoldRow,
    InvoiceRow,
    LedgerEntryRow,
    OrgRow,
    PeriodRow,
    ReservationRow,
    SubscriptionRow,
    UsageRecordRow,
    WalletRow,
)


def _number_and_total(lines: list[dict[str, Any]]) -> tuple[int, int]:
    """Number an invoice's lines from 1; (total, the part already paid from the wallet)."""
    for n, line in enumerate(lines, start=1):
        line["n"] = n
    total = sum(line["amount_micros"] for line in lines)
    return total, sum(line["amount_micros"] for line in lines if line["prepaid"])


class Books:
    def __init__(self, engine: Engine, plan: Callable[[str], Plan], currency: str, commission_bps: int) -> None:
        self._engine = engine
        self.plan = plan
        self.currency = currency
        self.commission_bps = commission_bps
        self._lock = threading.Lock()

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

    def draft(self, org_id: str, now: datetime | None = None) -> dict[str, Any]:
        """The invoice of the open month as it stands now: what closing it at this moment would bill (fees for
        the days so far, usage and overage so far, dedicated minutes so far, pay-as-you-go already paid)."""
        now = now or datetime.now(UTC)
        period = now.strftime("%Y-%m")
        start, month_end, days = month_bounds(period)
        with self._engine.connect() as conn:
            lines = self._lines(conn, start, min(now, month_end), days, org_id=org_id).get(org_id, [])
            names = self._org_names(conn)
        total, prepaid = _number_and_total(lines)
        draft = {
            "id": None,
            "draft": True,
            "as_of": now.isoformat(),
            "org_id": org_id,
            "period": period,
            "currency": self.currency,
            "total_micros": total,
            "prepaid_micros": prepaid,
            "due_micros": total - prepaid,
            "lines": lines,
            "created_at": now.isoformat(),
        }
        return self._with_names(draft, names)

    def _close(self, conn: Connection, period: str, start: datetime, end: datetime, days: int) -> None:
        lines_by_org = self._lines(conn, start, end, days)
        now = datetime.now(UTC)
        for org, lines in sorted(lines_by_org.items()):
            total, prepaid = _number_and_total(lines)
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

    def _lines(
        self, conn: Connection, start: datetime, end: datetime, days: int, org_id: str | None = None
    ) -> dict[str, list[dict[str, Any]]]:
        """Invoice lines per org for ``start``..``end`` (a whole month, or the open one up to now), each with
        its plan's pricing terms."""
        lines_by_org: dict[str, list[dict[str, Any]]] = defaultdict(list)
        subs_q = select(SubscriptionRow).where(
            SubscriptionRow.started_at < end,
            (SubscriptionRow.ends_at.is_(None)) | (SubscriptionRow.ends_at > start),
        )
        if org_id is not None:
            subs_q = subs_q.where(SubscriptionRow.org_id == org_id)
        subs = conn.execute(subs_q).all()
        first_day, last_day = start.date().isoformat(), (end - timedelta(microseconds=1)).date().isoformat()
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
                    "unit": "days",
                    "pricing": pricing(spec, "subscription", self.currency),
                    "amount_micros": fee,
                    "records": 0,
                    "prepaid": False,
                }
            )
            column = UNIT_COLUMNS[spec.unit]
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
                    "unit": spec.unit,
                    "pricing": pricing(spec, "overage", self.currency),
                    "amount_micros": round_half_even(cost),
                    "records": int(count),
                    "prepaid": False,
                }
            )
        res_q = select(ReservationRow).where(
            ReservationRow.started_at < end,
            (ReservationRow.stopped_at.is_(None)) | (ReservationRow.stopped_at > start),
        )
        if org_id is not None:
            res_q = res_q.where(ReservationRow.org_id == org_id)
        reservations = conn.execute(res_q).all()
        for res in reservations:
            plan = self.plan(res.plan_id)
            running = (min(res.stopped_at or end, end) - max(res.started_at, start)).total_seconds()
            minutes = math.ceil(running / 60)
            lines_by_org[res.org_id].append(
                {
                    "kind": "dedicated",
                    "description": f"{plan.model}: dedicated capacity, {minutes} started minutes",
                    "model": plan.model,
                    "plan": plan.spec.name,
                    "provider_org_id": plan.owner_org_id,
                    "quantity": minutes,
                    "unit": "minutes",
                    "pricing": pricing(plan.spec, "dedicated", self.currency),
                    "amount_micros": round_half_even(dedicated_cost(plan.spec, running)),
                    "records": 0,
                    "prepaid": False,
                }
            )
        line_of = (
            ChargeRow.org_id,
            ChargeRow.model,
            ChargeRow.plan_id,
            ChargeRow.provider_org_id,
            ChargeRow.unit,
            ChargeRow.channel,
        )
        charges_q = (
            select(
                *line_of,
                func.sum(ChargeRow.quantity),
                func.sum(ChargeRow.amount_micros),
                func.count(),
                func.min(ChargeRow.created_at),
            )
            .where(ChargeRow.invoice_id.is_(None), ChargeRow.created_at < end)
            .group_by(*line_of)
            .order_by(ChargeRow.org_id, ChargeRow.model, ChargeRow.plan_id, ChargeRow.channel)
        )
        if org_id is not None:
            charges_q = charges_q.where(ChargeRow.org_id == org_id)
        charges = conn.execute(charges_q).all()
        for org, model, plan_id, provider, unit, channel, qty, amount, count, earliest in charges:
            plan = self.plan(plan_id)
            late = " (includes calls from an earlier period)" if earliest < start else ""
            how = "pay as you go"
            if channel == "batch":
                how = f"offline batch at {plan.spec.batch_discount_pct}% off"
            lines_by_org[org].append(
                {
                    "kind": "usage",
                    "channel": channel,
                    "description": f"{model}: {int(qty)} {unit}, {how}{late}",
                    "model": model,
                    "plan": plan.spec.name,
                    "plan_id": plan_id,
                    "provider_org_id": provider,
                    "quantity": int(qty),
                    "unit": unit,
                    "pricing": pricing(plan.spec, "usage", self.currency),
                    "amount_micros": int(amount),
                    "records": int(count),
                    "prepaid": True,
                }
            )
        return lines_by_org

    def invoices(self, *, org_id: str | None = None, period: str | None = None) -> list[dict[str, Any]]:
        q = select(InvoiceRow).order_by(InvoiceRow.period, InvoiceRow.org_id)
        if org_id is not None:
            q = q.where(InvoiceRow.org_id == org_id)
        if period is not None:
            q = q.where(InvoiceRow.period == period)
        with self._engine.connect() as conn:
            names = self._org_names(conn)
            return [self._with_names(self._invoice_json(r), names) for r in conn.execute(q)]

    def invoice(self, invoice_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            row = conn.execute(select(InvoiceRow).where(InvoiceRow.id == invoice_id)).first()
            names = self._org_names(conn)
        if row is None:
            raise NotFound(f"invoice '{invoice_id}' does not exist", param="invoice")
        return self._with_names(self._invoice_json(row), names)

    @staticmethod
    def _org_names(conn: Connection) -> dict[str, str]:
        return {org_id: name for org_id, name in conn.execute(select(OrgRow.id, OrgRow.name))}

    @staticmethod
    def _with_names(invoice: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
        """Organisation names beside their ids: the invoiced org's, and each line's provider ("platform" for the
        platform's own models)."""
        invoice["org_name"] = names.get(invoice["org_id"], invoice["org_id"])
        for line in invoice["lines"]:
            provider = line.get("provider_org_id")
            line["provider"] = "platform" if provider is None else names.get(provider, provider)
        return invoice

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
                .where(
                    ChargeRow.invoice_id == invoice["id"],
                    ChargeRow.plan_id == line["plan_id"],
                    ChargeRow.channel == line.get("channel", "online"),
                )
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
