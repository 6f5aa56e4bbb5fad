"""Admission control without HTTP: windows, concurrency slots, quotas and the reset format."""

from __future__ import annotations

import asyncio

import pytest

from openmaas.errors import ExceedsLimit, QuotaExceeded, RateLimited
from openmaas.gateway.limits import QuotaGuard, RateLimiter, current_month, duration
from openmaas.tenancy.models import KeyLimits


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "0.5s"), (12, "12s"), (59.99, "60s"), (90, "1m30s"), (-1, "0s")])
def test_duration_in_openai_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_no_limits_costs_nothing_and_sends_no_headers() -> None:
    async def main() -> None:
        admission = await RateLimiter().admit("k", KeyLimits(), "r", tokens=10**9, items=10**9)
        assert admission.headers == {}
        await admission.release()

    asyncio.run(main())


def test_windows_and_concurrency() -> None:
    async def main() -> None:
        rl = RateLimiter()
        limits = KeyLimits(rpm=3, ipm=5, concurrency=2)
        a = await rl.admit("k", limits, "r1", tokens=0, items=2)
        assert a.headers["x-ratelimit-remaining-requests"] == "2"
        assert a.headers["x-ratelimit-remaining-items"] == "3"
        b = await rl.admit("k", limits, "r2", tokens=0, items=2)
        with pytest.raises(RateLimited, match="in flight") as info:
            await rl.admit("k", limits, "r3", tokens=0, items=1)
        assert info.value.headers["Retry-After"] == "1"
        await a.release()
        await a.release()  # releasing twice gives back one slot only
        with pytest.raises(RateLimited, match="5 items per minute"):
            await rl.admit("k", limits, "r4", tokens=0, items=2)
        # More than the limit allows at all: refused outright (400), never worth retrying.
        with pytest.raises(ExceedsLimit, match=r"needs 6 items .* can never pass") as too_big:
            await rl.admit("other", limits, "r5", tokens=0, items=6)
        assert too_big.value.status == 400 and "Retry-After" not in too_big.value.headers
        await b.release()
        c = await rl.admit("k2", KeyLimits(rpm=1), "r6", tokens=0, items=1)
        with pytest.raises(RateLimited, match="1 requests per minute") as info:
            await rl.admit("k2", KeyLimits(rpm=1), "r7", tokens=0, items=1)
        assert 1 <= int(info.value.headers["Retry-After"]) <= 60
        await c.release()
        await rl.close()

    asyncio.run(main())


def test_quota_guard_reads_totals_and_refuses_when_used_up() -> None:
    totals = {"requests": 9, "audio_seconds": 5_500}
    calls: list[str] = []

    def month_totals(org: str, month: str) -> dict[str, int]:
        calls.append(month)
        return totals

    guard = QuotaGuard(lambda: {"o": {"requests": 10, "audio_seconds": 6}}, month_totals)

    async def main() -> None:
        await guard.check(None, {"requests": 1})  # the platform admin has no quota
        await guard.check("other", {"requests": 1})  # an org without quotas is not looked up
        await guard.check("o", {"requests": 1})
        with pytest.raises(QuotaExceeded, match="10 requests"):
            await guard.check("o", {"requests": 2})
        with pytest.raises(QuotaExceeded, match="6 audio_seconds"):
            await guard.check("o", {"audio_seconds": 1})  # 5.5 s used of 6 (counted in ms)
        with pytest.raises(ExceedsLimit, match="whole monthly quota is 10 requests"):
            await guard.check("o", {"requests": 11})  # more than the month allows at all

    asyncio.run(main())
    assert calls == [current_month()]  # cached within its time to live
