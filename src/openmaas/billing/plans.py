"""Service packages (plans) and how they rate usage: pure functions over integers and fractions."""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openmaas.billing.money import format_micros
from openmaas.errors import InvalidRequest

Unit = Literal["requests", "input_tokens", "output_tokens", "items", "audio_seconds"]
PlanKind = Literal["usage", "subscription", "dedicated"]


class Tier(BaseModel):
    """Graduated pricing: units up to ``up_to`` (cumulative, None = no end) cost ``price_micros`` per block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    up_to: int | None = Field(default=None, ge=1)
    price_micros: int = Field(ge=0)


class Window(BaseModel):
    """A cap on a subscription's unit per day or per calendar month (UTC); calls beyond it are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    period: Literal["day", "month"]
    limit: int = Field(ge=1)


class PlanSpec(BaseModel):
    """What a provider sells. Prices are micros per ``block`` units (e.g. per 1,000 tokens)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    kind: PlanKind
    unit: Unit = "requests"
    block: int = Field(default=1, ge=1)
    # usage
    price_micros: int = Field(default=0, ge=0)
    tiers: list[Tier] | None = None
    # subscription
    monthly_fee_micros: int = Field(default=0, ge=0)
    included_units: int = Field(default=0, ge=0)
    overage_price_micros: int = Field(default=0, ge=0)
    windows: list[Window] | None = Field(default=None, description="Caps per day/month (subscriptions).")
    # dedicated
    hourly_price_micros: int = Field(default=0, ge=0)
    # offline batch lines (usage plans): the percentage taken off their price
    batch_discount_pct: int = Field(default=50, ge=0, le=100)

    @model_validator(mode="after")
    def _check(self) -> PlanSpec:
        if self.tiers:
            bounds = [t.up_to for t in self.tiers]
            if any(b is None for b in bounds[:-1]):
                raise ValueError("only the last tier may be open-ended (up_to: null)")
            ends = [b for b in bounds if b is not None]
            if ends != sorted(set(ends)):
                raise ValueError("tier bounds (up_to) must increase")
        return self

    @property
    def free(self) -> bool:
        prices = [self.price_micros, self.monthly_fee_micros, self.overage_price_micros, self.hourly_price_micros]
        prices += [t.price_micros for t in self.tiers or []]
        return not any(prices)


def hold_amount(plan: PlanSpec, quantity: int) -> int:
    """What to hold on the wallet for a call of at most ``quantity`` units of a usage plan: the most it can cost.

    Charges are the steps of the month's running total rounded to whole micros. When every price is a whole
    number of micros per unit (a multiple of ``block``), every running total is whole and a call costs exactly its
    price, so the hold is exactly that and a wallet holding the price of N calls serves N calls. Otherwise a
    call's step of the rounded total can exceed its exact share by one micro, and the hold covers that micro."""
    prices = [plan.price_micros] + [t.price_micros for t in plan.tiers or []]
    whole = all(p % plan.block == 0 for p in prices)
    return math.ceil(Fraction(max(prices) * quantity, plan.block)) + (0 if whole else 1)


def batch_hold_amount(plan: PlanSpec, quantity: int) -> int:
    """What to hold for a batch line of at most ``quantity`` units: its worst case at the batch discount, rounded
    up (a batch line is charged its own discounted cost, rounded half-even, which never exceeds this)."""
    prices = [plan.price_micros] + [t.price_micros for t in plan.tiers or []]
    return math.ceil(Fraction(max(prices) * quantity * (100 - plan.batch_discount_pct), plan.block * 100))


def usage_cost(plan: PlanSpec, quantity: int, already: int = 0) -> Fraction:
    """Exact cost of ``quantity`` units of a usage plan, ``already`` units having been used this period
    (graduated tiers price each unit by the tier it falls in)."""
    if not plan.tiers:
        return Fraction(plan.price_micros * quantity, plan.block)
    total = Fraction(0)
    start, end = already, already + quantity
    lower = 0
    for tier in plan.tiers:
        upper = tier.up_to if tier.up_to is not None else max(end, lower)
        overlap = max(0, min(end, upper) - max(start, lower))
        total += Fraction(tier.price_micros * overlap, plan.block)
        lower = upper
        if lower >= end:
            break
    if end > lower:  # beyond the last bounded tier: priced like the last tier
        total += Fraction(plan.tiers[-1].price_micros * (end - max(start, lower)), plan.block)
    return total


def overage_cost(plan: PlanSpec, used: int) -> tuple[int, Fraction]:
    """Units beyond a subscription's allowance in a period, and their exact cost."""
    over = max(0, used - plan.included_units)
    return over, Fraction(plan.overage_price_micros * over, plan.block)


def prorated_fee(plan: PlanSpec, active_days: int, days_in_month: int) -> Fraction:
    """The monthly fee for the days a subscription was active in the month."""
    return Fraction(plan.monthly_fee_micros * active_days, days_in_month)


def dedicated_cost(plan: PlanSpec, running_seconds: float) -> Fraction:
    """Reserved replicas, billed per started minute while running."""
    import math

    minutes = math.ceil(running_seconds / 60) if running_seconds > 0 else 0
    return Fraction(plan.hourly_price_micros * minutes, 60)


def pricing(
    plan: PlanSpec, line: Literal["usage", "subscription", "overage", "dedicated"], currency: str
) -> dict[str, Any]:
    """The price terms behind an invoice line, as numbers and as one sentence (``text``)."""
    one = {"requests": "request", "audio_seconds": "second of audio"}.get(plan.unit, plan.unit[:-1].replace("_", " "))
    per = f"per {plan.block:,} {plan.unit.replace('_', ' ')}" if plan.block != 1 else f"per {one}"

    def amount(micros: int) -> str:
        return format_micros(micros, currency)

    if line == "usage":
        if plan.tiers:
            lower, parts = 0, []
            for tier in plan.tiers:
                span = f"{lower:,}-{tier.up_to:,}" if tier.up_to is not None else f"over {lower:,}"
                parts.append(f"{span}: {amount(tier.price_micros)}")
                lower = tier.up_to or lower
            return {
                "block": plan.block,
                "tiers": [t.model_dump() for t in plan.tiers],
                "text": f"graduated, {per}, by units used this month: " + "; ".join(parts),
            }
        return {"block": plan.block, "price_micros": plan.price_micros, "text": f"{amount(plan.price_micros)} {per}"}
    if line == "subscription":
        return {"monthly_fee_micros": plan.monthly_fee_micros, "text": f"{amount(plan.monthly_fee_micros)} a month"}
    if line == "overage":
        return {
            "block": plan.block,
            "included_units": plan.included_units,
            "overage_price_micros": plan.overage_price_micros,
            "text": f"{plan.included_units:,} {plan.unit} included, then {amount(plan.overage_price_micros)} {per}",
        }
    return {"hourly_price_micros": plan.hourly_price_micros, "text": f"{amount(plan.hourly_price_micros)} an hour"}


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
    #: A batch line's hold: rated at the plan's batch discount, charged on its own invoice line.
    batch: bool = False


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
