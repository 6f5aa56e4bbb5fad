"""Billing on SQLite and PostgreSQL: the worked example, holds under a race, invoices, late records, the books."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from sqlalchemy import Engine, insert

from openmaas.billing.money import round_half_even
from openmaas.billing.plans import PlanSpec, Tier, dedicated_cost, overage_cost, usage_cost
from openmaas.billing.service import BillingService, PaymentRequired
from openmaas.entities.models import ModelVersion
from openmaas.metering.records import UsageRecord
from openmaas.store.db import upgrade
from openmaas.store.tables import ModelRow, OrgRow, SubscriptionRow, UsageRecordRow

SUBSCRIPTION = PlanSpec(
    name="pro",
    kind="subscription",
    unit="items",
    monthly_fee_micros=100_000_000,
    included_units=500_000,
    overage_price_micros=5_000_000,
    block=1000,
)


def test_worked_example_rating() -> None:
    over, cost = overage_cost(SUBSCRIPTION, 512_345)
    assert over == 12_345
    assert 100_000_000 + round_half_even(cost) == 161_725_000
    hourly = PlanSpec(name="gpu", kind="dedicated", hourly_price_micros=1_000_000)
    assert round_half_even(dedicated_cost(hourly, 90 * 60)) == 1_500_000
    assert round_half_even(dedicated_cost(hourly, 61)) == round_half_even(Fraction(2_000_000, 60))  # started minutes


def test_graduated_tiers_price_each_unit_by_its_tier() -> None:
    plan = PlanSpec(
        name="t",
        kind="usage",
        unit="input_tokens",
        block=1000,
        tiers=[Tier(up_to=1000, price_micros=2000), Tier(up_to=3000, price_micros=1000), Tier(price_micros=500)],
    )
    assert usage_cost(plan, 500) == Fraction(1000)
    assert usage_cost(plan, 1000, already=500) == Fraction(500 * 2 + 500 * 1)  # crosses into tier 2
    assert usage_cost(plan, 4000) == Fraction(1000 * 2000 + 2000 * 1000 + 1000 * 500, 1000)
    assert sum(usage_cost(plan, 100, already=a) for a in range(0, 4000, 100)) == usage_cost(plan, 4000)
    with pytest.raises(ValueError, match="increase"):
        PlanSpec(name="x", kind="usage", tiers=[Tier(up_to=5, price_micros=1), Tier(up_to=3, price_micros=1)])


def _seed(engine: Engine) -> tuple[BillingService, str, str]:
    """A provider org with a model, a consumer org; returns (billing, provider id, consumer id)."""
    upgrade(engine)
    provider, consumer = uuid.uuid4().hex, uuid.uuid4().hex
    with engine.begin() as conn:
        for org in (provider, consumer):
            conn.execute(insert(OrgRow).values(id=org, name=f"o-{org[:8]}", created_at=datetime.now(UTC)))
        conn.execute(
            insert(ModelRow).values(
                name="m",
                owner_org_id=provider,
                visibility="public",
                review_state="approved",
                created_at=datetime.now(UTC),
            )
        )
    return BillingService(engine), provider, consumer


def _usage_row(org: str, items: int, when: datetime, request_id: str | None = None) -> dict:
    return UsageRecord(
        request_id=request_id or uuid.uuid4().hex,
        org_id=org,
        key_id="k",
        model="m",
        version=1,
        protocol="v2",
        latency_ms=1.0,
        items=items,
        created_at=when,
    ).row()


def test_subscription_invoice_worked_example_and_closing_twice(engine: Engine) -> None:
    billing, provider, consumer = _seed(engine)
    plan = billing.create_plan("m", SUBSCRIPTION)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(SubscriptionRow).values(id="s1", org_id=consumer, plan_id=plan.id, model="m", started_at=start)
        )
        # 512,345 items over the month, in uneven calls.
        rows = [_usage_row(consumer, 100_000, start + timedelta(days=d)) for d in range(5)]
        rows.append(_usage_row(consumer, 12_345, start + timedelta(days=30, hours=23)))
        conn.execute(insert(UsageRecordRow), rows)
    first = billing.books.close_period("2026-10")
    assert len(first) == 1
    invoice = first[0]
    assert invoice["total_micros"] == 161_725_000 and invoice["due_micros"] == 161_725_000
    fee, overage = invoice["lines"]
    assert (fee["kind"], fee["amount_micros"], fee["quantity"]) == ("subscription", 100_000_000, 31)
    assert (overage["kind"], overage["quantity"], overage["amount_micros"], overage["records"]) == (
        "overage",
        12_345,
        61_725_000,
        6,
    )
    assert len(billing.books.line_records(invoice, 2)) == 6
    assert billing.books.close_period("2026-10") == first  # idempotent
    statement = billing.books.statement(provider, "2026-10")
    assert statement["gross_micros"] == 161_725_000
    assert statement["commission_micros"] == 32_345_000 and statement["net_micros"] == 129_380_000
    assert billing.books.verify()["ok"], billing.books.verify()
    with pytest.raises(Exception, match="has not ended"):
        billing.books.close_period(datetime.now(UTC).strftime("%Y-%m"))


def _pay_as_you_go(billing: BillingService, price: int = 1_000_000) -> None:
    billing.create_plan("m", PlanSpec(name="payg", kind="usage", unit="requests", price_micros=price))


def _race(billing: BillingService, consumer: str, provider: str, *, threads: int, calls_each: int) -> list[object]:
    """``threads`` threads released together, each admitting ``calls_each`` one-request calls: the holds and the
    402 refusals, in the order they came."""
    outcomes: list[object] = []
    barrier = threading.Barrier(threads)

    def caller(k: int) -> None:
        barrier.wait()
        for i in range(calls_each):
            try:
                outcomes.append(billing.admit(consumer, "m", provider, f"r{k}-{i}", {"requests": 1}))
            except PaymentRequired as e:
                outcomes.append(e)

    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return outcomes


def test_holds_never_overdraw_the_wallet_under_a_race(engine: Engine) -> None:
    billing, provider, consumer = _seed(engine)
    _pay_as_you_go(billing)  # 1.00 per request, held exactly
    billing.credit(consumer, 100 * 1_000_000, "topup-1")
    assert billing.credit(consumer, 100 * 1_000_000, "topup-1")[1] is False  # same reference: added once
    outcomes = _race(billing, consumer, provider, threads=20, calls_each=10)
    held = [o for o in outcomes if not isinstance(o, PaymentRequired)]
    refused = [o for o in outcomes if isinstance(o, PaymentRequired)]
    assert len(held) == 100 and len(refused) == 100
    assert "ask the platform admin to add credit" in str(refused[0])
    wallet = billing.wallet(consumer)
    assert wallet["available_micros"] == 0 and wallet["held_micros"] == 100 * 1_000_000
    # Settle half through the metering path, release the rest.
    with engine.begin() as conn:
        for pending in held[:50]:
            row = _usage_row(consumer, 1, datetime.now(UTC), request_id=pending.hold_id)  # type: ignore[attr-defined]
            conn.execute(insert(UsageRecordRow).values(**row))
            billing.settle(conn, row, pending)  # type: ignore[arg-type]
    for pending in held[50:]:
        billing.release(pending)  # type: ignore[arg-type]
        billing.release(pending)  # type: ignore[arg-type]  # twice: given back once
    wallet = billing.wallet(consumer)
    assert wallet == {"balance_micros": 50 * 1_000_000, "held_micros": 0, "available_micros": 50 * 1_000_000}
    assert billing.books.verify() == {
        "ok": True,
        "problems": [],
        "ledger_entries": billing.books.verify()["ledger_entries"],
    }


def test_a_wallet_holding_the_price_of_n_calls_serves_exactly_n(engine: Engine) -> None:
    """0.01 a call, 1.00 in the wallet: 200 racing calls give exactly 100 holds; settled, the wallet is empty, and
    a wallet showing exactly one call's price serves that call (it was 99 calls and then a 402 at 0.01 left)."""
    billing, provider, consumer = _seed(engine)
    _pay_as_you_go(billing, price=10_000)
    billing.credit(consumer, 1_000_000, "t")
    outcomes = _race(billing, consumer, provider, threads=8, calls_each=25)
    held = [o for o in outcomes if not isinstance(o, PaymentRequired)]
    assert len(held) == 100 and len(outcomes) == 200
    with engine.begin() as conn:
        for pending in held:
            row = _usage_row(consumer, 1, datetime.now(UTC), request_id=pending.hold_id)  # type: ignore[attr-defined]
            conn.execute(insert(UsageRecordRow).values(**row))
            billing.settle(conn, row, pending)  # type: ignore[arg-type]
    assert billing.wallet(consumer) == {"balance_micros": 0, "held_micros": 0, "available_micros": 0}
    billing.credit(consumer, 10_000, "exactly-one-call")
    assert billing.wallet(consumer)["available_micros"] == 10_000
    assert billing.admit(consumer, "m", provider, "last", {"requests": 1}) is not None
    with pytest.raises(PaymentRequired):
        billing.admit(consumer, "m", provider, "one-too-many", {"requests": 1})


def test_hold_amount_is_exact_for_whole_micro_prices_and_covers_rounding_otherwise() -> None:
    from openmaas.billing.plans import hold_amount

    per_call = PlanSpec(name="c", kind="usage", unit="requests", price_micros=10_000)
    assert hold_amount(per_call, 1) == 10_000
    per_1k = PlanSpec(name="k", kind="usage", unit="input_tokens", price_micros=2000, block=1000)
    assert hold_amount(per_1k, 512) == 1024  # 2 micros a token: whole, held exactly
    fractional = PlanSpec(name="f", kind="usage", unit="input_tokens", price_micros=1500, block=1000)
    # 1.5 micros a token: a call's step of the rounded running total can be one micro over its exact share.
    assert hold_amount(fractional, 3) == 6
    steps = [
        round_half_even(usage_cost(fractional, 3 * (n + 1))) - round_half_even(usage_cost(fractional, 3 * n))
        for n in range(20)
    ]
    assert max(steps) <= hold_amount(fractional, 3)


def test_a_record_arriving_after_its_period_closed_lands_on_the_next_invoice(engine: Engine) -> None:
    billing, provider, consumer = _seed(engine)
    _pay_as_you_go(billing, price=250_000)
    billing.credit(consumer, 10_000_000, "t")
    september = datetime(2026, 9, 30, 23, 59, tzinfo=UTC)

    def call(when: datetime) -> None:
        pending = billing.admit(consumer, "m", provider, uuid.uuid4().hex, {"requests": 1})
        assert pending is not None
        with engine.begin() as conn:
            row = _usage_row(consumer, 1, when, request_id=pending.hold_id)
            conn.execute(insert(UsageRecordRow).values(**row))
            billing.settle(conn, row, pending)

    call(september)
    [sep] = billing.books.close_period("2026-09")
    assert sep["prepaid_micros"] == 250_000 and sep["due_micros"] == 0
    call(september - timedelta(hours=1))  # late: its period is already closed
    call(datetime(2026, 10, 15, tzinfo=UTC))
    [oct_] = billing.books.close_period("2026-10")
    [line] = oct_["lines"]
    assert line["records"] == 2 and line["amount_micros"] == 500_000
    assert "earlier period" in line["description"]
    times = [r["created_at"][:10] for r in billing.books.line_records(oct_, 1)]
    assert times == ["2026-09-30", "2026-10-15"]  # the late call keeps its own timestamp
    assert billing.books.close_period("2026-09") == [sep]
    assert billing.books.verify()["ok"]


def _naive_cost(plan: PlanSpec, quantities: list[int]) -> Fraction:
    """Independent recomputation: price every unit one by one by the tier it falls in."""
    total = Fraction(0)
    used = 0
    for q in quantities:
        for _ in range(q):
            price = plan.price_micros
            if plan.tiers:
                price = next(
                    (t.price_micros for t in plan.tiers if t.up_to is None or used < t.up_to),
                    plan.tiers[-1].price_micros,
                )
            total += Fraction(price, plan.block)
            used += 1
    return total


def test_property_invoices_equal_an_independent_recomputation(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Random plans (pay as you go, flat or tiered; subscriptions) and usage streams, each in a month of its own:
    the invoice total equals a unit-by-unit recomputation rounded once, and the books hold after every step."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from openmaas.store.db import create_db_engine

    engine = create_db_engine(f"sqlite:///{tmp_path_factory.mktemp('prop') / 'p.db'}")
    billing, provider, _ = _seed(engine)
    months = iter(range(10**6))  # every example gets a month no other example has closed

    tiers = st.lists(st.integers(1, 400), min_size=1, max_size=3, unique=True).flatmap(
        lambda bounds: st.lists(st.integers(0, 3_000_000), min_size=len(bounds) + 1, max_size=len(bounds) + 1).map(
            lambda prices: (
                [Tier(up_to=b, price_micros=p) for b, p in zip(sorted(bounds), prices, strict=False)]
                + [Tier(price_micros=prices[-1])]
            )
        )
    )
    usage_plans = st.builds(
        lambda price, block, tier_list: PlanSpec(
            name="payg", kind="usage", unit="items", price_micros=price, block=block, tiers=tier_list
        ),
        st.integers(0, 5_000_000),
        st.sampled_from([1, 3, 7, 1000]),
        st.none() | tiers,
    )
    subscription_plans = st.builds(
        lambda fee, included, price, block: PlanSpec(
            name="sub",
            kind="subscription",
            unit="items",
            monthly_fee_micros=fee,
            included_units=included,
            overage_price_micros=price,
            block=block,
        ),
        st.integers(1, 500_000_000),
        st.integers(0, 600),
        st.integers(0, 5_000_000),
        st.sampled_from([1, 7, 1000]),
    )

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(plan=usage_plans | subscription_plans, quantities=st.lists(st.integers(1, 60), min_size=1, max_size=20))
    def check(plan: PlanSpec, quantities: list[int]) -> None:
        k = next(months)
        start = datetime(1900 + k // 12, k % 12 + 1, 1, tzinfo=UTC)
        period = start.strftime("%Y-%m")
        consumer = uuid.uuid4().hex
        model = f"m-{consumer[:8]}"
        with engine.begin() as conn:
            conn.execute(insert(OrgRow).values(id=consumer, name=f"c-{consumer[:12]}", created_at=start))
            conn.execute(
                insert(ModelRow).values(
                    name=model, owner_org_id=provider, visibility="public", review_state="approved", created_at=start
                )
            )
        created = billing.create_plan(model, plan)
        billing.credit(consumer, 10**15, "start")
        if plan.kind == "subscription":
            with engine.begin() as conn:
                conn.execute(
                    insert(SubscriptionRow).values(
                        id=consumer, org_id=consumer, plan_id=created.id, model=model, started_at=start
                    )
                )
        for i, q in enumerate(quantities):
            when = start + timedelta(hours=i)
            row = {**_usage_row(consumer, q, when), "model": model}
            pending = billing.admit(consumer, model, provider, row["request_id"], {"items": q})
            with engine.begin() as conn:
                conn.execute(insert(UsageRecordRow).values(**row))
                if pending is not None:
                    billing.settle(conn, row, pending)
            verdict = billing.books.verify()
            assert verdict["ok"], verdict["problems"]
        invoices = [inv for inv in billing.books.close_period(period) if inv["org_id"] == consumer]
        total = invoices[0]["total_micros"] if invoices else 0
        if plan.kind == "subscription":
            over = max(0, sum(quantities) - plan.included_units)
            expected = plan.monthly_fee_micros + round_half_even(Fraction(over * plan.overage_price_micros, plan.block))
        else:
            expected = round_half_even(_naive_cost(plan, quantities))
            assert billing.wallet(consumer)["balance_micros"] == 10**15 - expected
        assert total == expected
        verdict = billing.books.verify()
        assert verdict["ok"], verdict["problems"]

    check()
    engine.dispose()


def test_amounts_parse_exactly() -> None:
    from openmaas.billing.money import format_micros, parse_amount

    assert parse_amount("161.725") == 161_725_000
    assert parse_amount("0.000001") == 1
    assert format_micros(161_725_000, "CNY") == "161.725000 CNY"
    assert format_micros(-5) == "-0.000005"
    for bad in ("1.0000001", "ten", ""):
        with pytest.raises(ValueError, match=r"amount|decimals"):
            parse_amount(bad)


class _Pins:
    """Serving as dedicated capacity sees it, for billing tests with no model to load (the HTTP tests in
    tests/e2e/test_dedicated.py load real models)."""

    def __init__(self) -> None:
        self.holders: set[str] = set()

    async def pin(self, mv: object, holder: str) -> None:
        self.holders.add(holder)

    def unpin(self, mv: object, holder: str) -> None:
        self.holders.discard(holder)


def _version(name: str) -> ModelVersion:
    return ModelVersion.model_validate(
        {
            "model": name,
            "version": 1,
            "format": "onnx",
            "sha256": "0" * 64,
            "size_bytes": 1,
            "signature": {"inputs": [], "outputs": []},
            "card": {},
            "created_at": datetime.now(UTC),
        }
    )


def test_dedicated_capacity_billed_per_started_minute(engine: Engine) -> None:
    import asyncio

    from openmaas.billing.dedicated import DedicatedCapacity
    from openmaas.store.tables import ReservationRow

    billing, provider, consumer = _seed(engine)
    pins = _Pins()
    dedicated = DedicatedCapacity(engine, billing, pins, _version)
    plan = billing.create_plan("m", PlanSpec(name="gpu", kind="dedicated", hourly_price_micros=1_000_000))
    with pytest.raises(PaymentRequired, match="subscribe"):
        billing.admit(consumer, "m", provider, "r0", {"requests": 1})
    running = asyncio.run(dedicated.start(consumer, "m", "gpu"))
    assert pins.holders == {f"dedicated:{running['id']}"}
    assert billing.admit(consumer, "m", provider, "r1", {"requests": 1}) is None  # calls ride on the reservation
    asyncio.run(dedicated.stop(consumer, running["id"]))
    assert pins.holders == set()
    start = datetime(2026, 8, 31, 23, 0, tzinfo=UTC)
    with engine.begin() as conn:  # 90 minutes across a month boundary: 60 in August, 30 in September
        conn.execute(
            insert(ReservationRow).values(
                id="d1",
                org_id=consumer,
                plan_id=plan.id,
                model="m",
                started_at=start,
                stopped_at=start + timedelta(minutes=90),
            )
        )
        conn.execute(
            insert(ReservationRow).values(
                id="d2",
                org_id=consumer,
                plan_id=plan.id,
                model="m",
                started_at=datetime(2026, 7, 1, tzinfo=UTC),
                stopped_at=datetime(2026, 7, 1, 1, 30, 1, tzinfo=UTC),
            )
        )
    [july] = billing.books.close_period("2026-07")
    assert [(x["kind"], x["quantity"], x["amount_micros"]) for x in july["lines"]] == [("dedicated", 91, 1_516_667)]
    [aug] = billing.books.close_period("2026-08")
    [sep] = billing.books.close_period("2026-09")
    assert aug["lines"][0]["amount_micros"] + sep["lines"][0]["amount_micros"] == 1_500_000
    assert billing.books.verify()["ok"]


def test_subscription_windows_cap_use_per_day(engine: Engine) -> None:
    from openmaas.billing.plans import Window
    from openmaas.errors import QuotaExceeded

    billing, provider, consumer = _seed(engine)
    spec = PlanSpec(
        name="capped",
        kind="subscription",
        unit="items",
        monthly_fee_micros=1_000_000,
        included_units=1000,
        windows=[Window(period="day", limit=10), Window(period="month", limit=25)],
    )
    billing.create_plan("m", spec)
    billing.subscribe(consumer, "m", "capped")
    now = datetime.now(UTC)
    assert billing.admit(consumer, "m", provider, "a", {"items": 10}) is None
    with engine.begin() as conn:
        conn.execute(insert(UsageRecordRow).values(**_usage_row(consumer, 8, now)))
    assert billing.admit(consumer, "m", provider, "b", {"items": 2}) is None
    with pytest.raises(QuotaExceeded, match="10 items per day") as info:
        billing.admit(consumer, "m", provider, "c", {"items": 3})
    assert 0 < int(info.value.headers["Retry-After"]) <= 86400
    if now.day > 1:  # earlier this month: counts toward the monthly cap only
        with engine.begin() as conn:
            conn.execute(insert(UsageRecordRow).values(**_usage_row(consumer, 16, now.replace(day=1, hour=0))))
        with pytest.raises(QuotaExceeded, match="25 items per month"):
            billing.admit(consumer, "m", provider, "d", {"items": 2})


def test_batch_lines_settle_at_the_discount_and_move_the_tiers(engine: Engine) -> None:
    """3 micros a call at 50% off: each batch line pays 1.5 rounded half-even (2) within a hold of 2, and its
    units count towards the month's tiers; the books stay balanced and online calls keep their exact price."""
    from sqlalchemy import select

    from openmaas.store.tables import ChargeRow

    billing, provider, consumer = _seed(engine)
    _pay_as_you_go(billing, price=3)
    billing.credit(consumer, 1_000, "t")
    holds = []
    for i in range(4):
        pending = billing.admit(consumer, "m", provider, f"b{i}.1.1", {"requests": 1}, batch=True)
        assert pending is not None and pending.batch and pending.held_micros == 2
        holds.append((f"b{i}", pending))
    online = billing.admit(consumer, "m", provider, "o1", {"requests": 1})
    assert online is not None and not online.batch and online.held_micros == 3
    holds.append(("o1", online))
    with engine.begin() as conn:
        for request_id, pending in holds:
            row = _usage_row(consumer, 1, datetime.now(UTC), request_id=request_id)
            conn.execute(insert(UsageRecordRow).values(**row))
            billing.settle(conn, row, pending)  # type: ignore[arg-type]
    with engine.connect() as conn:
        paid = conn.execute(select(ChargeRow.request_id, ChargeRow.amount_micros, ChargeRow.channel)).all()
    expected = [("b0", 2, "batch"), ("b1", 2, "batch"), ("b2", 2, "batch"), ("b3", 2, "batch"), ("o1", 3, "online")]
    assert sorted(tuple(p) for p in paid) == expected
    assert billing.wallet(consumer) == {"balance_micros": 1_000 - 11, "held_micros": 0, "available_micros": 989}
    lines = billing.books.draft(consumer)["lines"]
    usage = {line["channel"]: line for line in lines if line["kind"] == "usage"}
    assert (usage["batch"]["quantity"], usage["batch"]["amount_micros"]) == (4, 8)
    assert (usage["online"]["quantity"], usage["online"]["amount_micros"]) == (1, 3)
    assert billing.books.verify()["ok"]


def test_the_holds_of_a_gateway_whose_lease_lapsed_are_given_back(engine: Engine) -> None:
    """A gateway killed mid-call leaves its calls' holds open: another process's sweep gives them back once its
    lease is stale (never a live gateway's); a call that still settles after that pays from the wallet, once."""
    from sqlalchemy import select, update

    from openmaas.billing.holds import STALE_S, HoldKeeper
    from openmaas.store.tables import GatewayRow, HoldRow

    billing, provider, consumer = _seed(engine)
    _pay_as_you_go(billing)
    billing.credit(consumer, 10 * 1_000_000, "t")
    long_ago = datetime.now(UTC) - timedelta(seconds=STALE_S * 4)
    with engine.begin() as conn:
        conn.execute(insert(GatewayRow).values(id="dead", host="h", pid=1, started_at=long_ago, seen_at=long_ago))
    alive = HoldKeeper(engine, "alive")
    alive.start()
    try:
        billing.holder = "dead"
        lost = [billing.admit(consumer, "m", provider, f"lost-{i}", {"requests": 1}) for i in range(2)]
        billing.holder = "alive"
        kept = billing.admit(consumer, "m", provider, "kept", {"requests": 1})
        assert alive.sweep() == 0  # the dead gateway's holds are younger than a stale lease: maybe still running
        with engine.begin() as conn:
            conn.execute(update(HoldRow).values(created_at=long_ago))
        assert alive.sweep() == 2
        assert alive.sweep() == 0
        assert billing.wallet(consumer) == {
            "balance_micros": 10_000_000,
            "held_micros": 1_000_000,
            "available_micros": 9_000_000,
        }
        with engine.begin() as conn:
            for request_id, pending in (("lost-0", lost[0]), ("kept", kept)):
                row = _usage_row(consumer, 1, datetime.now(UTC), request_id=request_id)
                conn.execute(insert(UsageRecordRow).values(**row))
                billing.settle(conn, row, pending)  # type: ignore[arg-type]
        assert billing.wallet(consumer) == {
            "balance_micros": 8_000_000,
            "held_micros": 0,
            "available_micros": 8_000_000,
        }
        assert billing.books.verify()["ok"]
    finally:
        alive.stop()
    with engine.connect() as conn:  # a gateway that stops cleanly removes its lease
        assert conn.execute(select(GatewayRow.id)).all() == [("dead",)]
