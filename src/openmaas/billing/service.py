"""Plans, subscriptions, wallets, entitlement at admission, settlement with metering, invoices, statements."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from openmaas.billing import ledger, settlement
from openmaas.billing.books import Books
from openmaas.billing.plans import PendingCharge, Plan, PlanSpec, batch_hold_amount, hold_amount, month_bounds
from openmaas.errors import AlreadyExists, ErrorCode, InvalidRequest, NotFound, OpenMaaSError
from openmaas.store.tables import (
    ChargeRow,
    CreditRow,
    HoldRow,
    LedgerEntryRow,
    ModelRow,
    OrgRow,
    PlanRow,
    ReservationRow,
    SubscriptionRow,
    UsageRecordRow,
    WalletRow,
)

log = logging.getLogger(__name__)
_CACHE_TTL_S = 2.0


class PaymentRequired(OpenMaaSError):
    code = ErrorCode.PAYMENT_REQUIRED


def _plan(r: Any) -> Plan:
    """A plan from a row of (PlanRow, model name, owner org id)."""
    return Plan(
        r.PlanRow.id,
        r.name,
        r.owner_org_id,
        PlanSpec.model_validate(r.PlanRow.spec),
        r.PlanRow.active,
        r.PlanRow.created_at,
    )


class BillingService:
    def __init__(
        self, engine: Engine, currency: str = "CNY", commission_bps: int = 2000, holder: str | None = None
    ) -> None:
        self._engine = engine
        #: This process's lease id (``billing/holds.py``): the holds it takes name it.
        self.holder = holder
        self.currency = currency
        self.commission_bps = commission_bps
        self._plans_cache: dict[str, tuple[float, list[Plan]]] = {}
        self._subs_cache: dict[tuple[str, str], tuple[float, Plan | None]] = {}
        self._plan_by_id: dict[str, Plan] = {}
        self.books = Books(engine, self.plan, currency, commission_bps)

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
            plans = [_plan(r) for r in conn.execute(q)]
        self._plans_cache[model] = (now, plans)
        return plans

    def plan(self, plan_id: str) -> Plan:
        """A plan by id, active or not (specs never change, so they are kept once read)."""
        hit = self._plan_by_id.get(plan_id)
        if hit is not None:
            return hit
        q = select(PlanRow, ModelRow.name, ModelRow.owner_org_id).join(ModelRow, ModelRow.id == PlanRow.model_id)
        with Session(self._engine) as conn:
            r = conn.execute(q.where(PlanRow.id == plan_id)).first()
        if r is None:
            raise NotFound(f"plan '{plan_id}' does not exist", param="plan")
        plan = self._plan_by_id[plan_id] = _plan(r)
        return plan

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
        """The org's active subscription to the model, or its running dedicated capacity (both prepay calls)."""
        running = conn.execute(
            select(ReservationRow.id, ReservationRow.plan_id).where(
                ReservationRow.org_id == org_id, ReservationRow.model == model, ReservationRow.stopped_at.is_(None)
            )
        ).first()
        if running is not None:
            return running
        return conn.execute(
            select(SubscriptionRow).where(
                SubscriptionRow.org_id == org_id,
                SubscriptionRow.model == model,
                SubscriptionRow.started_at <= now,
                (SubscriptionRow.ends_at.is_(None)) | (SubscriptionRow.ends_at > now),
            )
        ).first()

    def forget_entitlements(self) -> None:
        """Subscriptions or reservations changed: the next admission reads them afresh."""
        self._subs_cache.clear()

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

    def movements(self, org_id: str, limit: int = 100, before: datetime | None = None) -> dict[str, Any]:
        """What moved the wallet's balance, newest first: credits in, and what each pay-as-you-go call paid
        (holds for calls in flight are not movements: they change what is available, not the balance). Each
        movement carries the balance right after it; ``before`` pages back in time."""
        credit_where = [CreditRow.org_id == org_id, LedgerEntryRow.account == ledger.wallet(org_id)]
        charge_where = [ChargeRow.org_id == org_id]
        if before is not None:
            credit_where.append(LedgerEntryRow.created_at < before)
            charge_where.append(ChargeRow.created_at < before)
        credit_join = (LedgerEntryRow, LedgerEntryRow.txn_id == CreditRow.txn_id)
        with self._engine.connect() as conn:
            credits = conn.execute(
                select(CreditRow.reference, CreditRow.amount_micros, LedgerEntryRow.created_at)
                .join(*credit_join)
                .where(*credit_where)
                .order_by(LedgerEntryRow.created_at.desc())
                .limit(limit)
            ).all()
            charges = conn.execute(
                select(ChargeRow.request_id, ChargeRow.model, ChargeRow.amount_micros, ChargeRow.created_at)
                .where(*charge_where)
                .order_by(ChargeRow.created_at.desc())
                .limit(limit)
            ).all()
            # The balance right after the newest movement listed: every credit minus every charge up to it.
            credited = conn.execute(
                select(func.coalesce(func.sum(CreditRow.amount_micros), 0)).join(*credit_join).where(*credit_where)
            ).scalar_one()
            charged = conn.execute(
                select(func.coalesce(func.sum(ChargeRow.amount_micros), 0)).where(*charge_where)
            ).scalar_one()
        items: list[dict[str, Any]] = [
            {"at": at, "kind": "credit", "amount_micros": int(amount), "reference": ref, "model": None}
            for ref, amount, at in credits
        ] + [
            {"at": at, "kind": "charge", "amount_micros": -int(amount), "request_id": rid, "model": model}
            for rid, model, amount, at in charges
            if amount
        ]
        items.sort(key=lambda m: m["at"], reverse=True)
        items = items[:limit]
        balance = int(credited) - int(charged)
        for item in items:
            item["balance_after_micros"] = balance
            balance -= item["amount_micros"]
            item["at"] = item["at"].isoformat()
        return {
            "movements": items,
            "currency": self.currency,
            "next_before": items[-1]["at"] if len(items) == limit else None,
        }

    # -- entitlement (the gateway calls these) --------------------------------------------------------------------

    def admit(
        self,
        org_id: str | None,
        model: str,
        owner_org_id: str | None,
        request_id: str,
        worst_case: dict[str, int],
        *,
        batch: bool = False,
    ) -> PendingCharge | None:
        """Check the caller may use a priced model: a subscription, or a hold of the call's worst-case cost
        (``request_id`` names the hold; ``batch``: a batch line's, at the plan's batch discount).

        Returns the hold to settle with the usage record (None when nothing is charged per call); raises 402."""
        if org_id is None or org_id == owner_org_id:
            return None  # the platform admin, or a provider calling its own model
        plans = [p for p in self.plans(model) if not p.spec.free]
        if not plans:
            return None
        subscribed = self._subscribed_plan(org_id, model)
        if subscribed is not None:
            settlement.check_windows(self._engine, org_id, model, subscribed.spec, worst_case)
            return None  # postpaid: fees and overage go on the invoice
        usage = next((p for p in plans if p.spec.kind == "usage"), None)
        if usage is None:
            names = ", ".join(p.spec.name for p in plans)
            raise PaymentRequired(
                f"model '{model}' is sold by subscription ({names}); subscribe with POST "
                f'/api/orgs/{self._org_name(org_id)}/subscriptions {{"model": "{model}", "plan": "<name>"}}'
            )
        spec = usage.spec
        worst = worst_case.get(spec.unit, 0)
        amount = batch_hold_amount(spec, worst) if batch else hold_amount(spec, worst)
        with self._engine.begin() as conn:
            ledger.ensure_wallet(conn, org_id)
            if not ledger.move_to_hold(conn, org_id, amount):
                available = conn.execute(
                    select(WalletRow.available_micros).where(WalletRow.org_id == org_id)
                ).scalar_one()
                org = conn.execute(select(OrgRow.name).where(OrgRow.id == org_id)).scalar_one_or_none() or org_id
                raise PaymentRequired(
                    f"this call may cost up to {amount} micros ({self.currency}) and the wallet of organisation "
                    f"'{org}' has {available} available; ask the platform admin to add credit "
                    f"(POST /api/orgs/{org}/wallet/credits)"
                )
            conn.execute(
                insert(HoldRow).values(
                    id=request_id,
                    org_id=org_id,
                    amount_micros=amount,
                    state="open",
                    created_at=datetime.now(UTC),
                    holder=self.holder,
                )
            )
        return PendingCharge(request_id, org_id, amount, usage.id, owner_org_id, spec.unit, batch=batch)

    def _org_name(self, org_id: str) -> str:
        with self._engine.connect() as conn:
            name = conn.execute(select(OrgRow.name).where(OrgRow.id == org_id)).scalar_one_or_none()
        return str(name or org_id)

    def release(self, pending: PendingCharge) -> None:
        """Give a hold back (the call failed before it was metered)."""
        with self._engine.begin() as conn:
            self.release_in(conn, pending)

    def release_open_holds(self, prefix: str) -> int:
        """Give back every hold still open whose id starts with ``prefix`` (a batch's lines left in flight by a
        process that died); returns how many."""
        with self._engine.begin() as conn:
            rows = conn.execute(
                select(HoldRow).where(HoldRow.id.startswith(prefix, autoescape=True), HoldRow.state == "open")
            ).all()
            for r in rows:
                settlement.release_in(conn, PendingCharge(r.id, r.org_id, r.amount_micros, "", None, ""))
        return len(rows)

    @staticmethod
    def release_in(conn: Connection, pending: PendingCharge) -> None:
        settlement.release_in(conn, pending)

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
        settlement.settle(conn, record, pending, self.plan(pending.plan_id))
