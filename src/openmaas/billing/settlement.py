"""Settling a call's charge with its usage record, in the metering transaction: rate the record against the
month's running total, charge the rounded step, and settle or release the hold (exactly once). Also the caps
a subscription's windows put on calls."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update

from openmaas.billing import ledger
from openmaas.billing.money import round_half_even
from openmaas.billing.plans import PendingCharge, Plan, PlanSpec, month_bounds, usage_cost
from openmaas.errors import ExceedsLimit, QuotaExceeded
from openmaas.metering.usage import UNIT_COLUMNS
from openmaas.store.tables import ChargeAccumulatorRow, ChargeRow, HoldRow, UsageRecordRow

log = logging.getLogger(__name__)


def spec_quantity(
    spec: PlanSpec, *, requests: int, input_tokens: int, output_tokens: int, items: int, audio_ms: int
) -> int:
    return {
        "requests": requests,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "items": items,
        "audio_seconds": math.ceil(audio_ms / 1000),
    }[spec.unit]


def settle(conn: Connection, record: UsageRecordRow | dict[str, Any], pending: PendingCharge, plan: Plan) -> None:
    """Rate one stored usage record and settle its hold, in the metering transaction (exactly once)."""
    r = record if isinstance(record, dict) else record.__dict__
    spec = plan.spec
    quantity = spec_quantity(
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
    exact = usage_cost(spec, quantity, already)
    if pending.batch:
        # A batch line moves the month along the tiers like any call but is rated on its own: its exact cost at
        # the discount, rounded half-even (the running numerator stays the online calls' exact total).
        new_numerator = numerator
        cost = round_half_even(exact * Fraction(100 - spec.batch_discount_pct, 100))
    else:
        added = exact * spec.block
        assert added.denominator == 1
        new_numerator = numerator + int(added)
        cost = round_half_even(Fraction(new_numerator, spec.block)) - round_half_even(Fraction(numerator, spec.block))
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
            channel="batch" if pending.batch else "online",
        )
    )
    settled = conn.execute(
        update(HoldRow).where(HoldRow.id == pending.hold_id, HoldRow.state == "open").values(state="settled")
    )
    if settled.rowcount == 1:
        ledger.settle_hold(conn, pending.org_id, pending.held_micros, cost, pending.provider_org_id, r["request_id"])
    else:
        # The hold was given back already (its gateway's lease lapsed while the call was still running, see
        # billing/holds.py): the call is paid from the wallet as it stands.
        ledger.pay(conn, pending.org_id, cost, pending.provider_org_id, r["request_id"])


def release_in(conn: Connection, pending: PendingCharge) -> None:
    """Give a hold back inside the caller's transaction (once: a released or settled hold stays so)."""
    updated = conn.execute(
        update(HoldRow).where(HoldRow.id == pending.hold_id, HoldRow.state == "open").values(state="released")
    )
    if updated.rowcount == 1:
        ledger.release_hold(conn, pending.org_id, pending.held_micros, pending.hold_id)


def check_windows(engine: Engine, org_id: str, model: str, spec: PlanSpec, worst_case: dict[str, int]) -> None:
    """Refuse a call that would pass one of the subscription's caps (429 until the window resets)."""
    if not spec.windows:
        return
    column = UNIT_COLUMNS[spec.unit]
    now = datetime.now(UTC)
    today = now.date()
    for window in spec.windows:
        first = today if window.period == "day" else today.replace(day=1)
        with engine.connect() as conn:
            used = conn.execute(
                select(func.coalesce(func.sum(column), 0)).where(
                    UsageRecordRow.org_id == org_id,
                    UsageRecordRow.model == model,
                    UsageRecordRow.day >= first.isoformat(),
                    UsageRecordRow.day <= today.isoformat(),
                )
            ).scalar_one()
        used = math.ceil(used / 1000) if spec.unit == "audio_seconds" else int(used)
        if worst_case.get(spec.unit, 0) > window.limit:
            raise ExceedsLimit(
                f"this request may use {worst_case.get(spec.unit, 0)} {spec.unit} but plan '{spec.name}' allows "
                f"{window.limit} per {window.period}, so it can never pass: send less at a time"
            )
        if used + worst_case.get(spec.unit, 0) > window.limit:
            if window.period == "day":
                resets = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
            else:
                resets = month_bounds(now.strftime("%Y-%m"))[1]
            raise QuotaExceeded(
                f"plan '{spec.name}' allows {window.limit} {spec.unit} per {window.period} and "
                f"{used} are used; it resets at {resets.isoformat()}",
                retry_after=(resets - now).total_seconds(),
            )
