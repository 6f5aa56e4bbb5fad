"""Admission control per API key (requests/min, tokens or items/min, concurrency) and per org (monthly quotas).

Requests per minute use the ``limits`` library's moving window, so no 60-second span ever admits more than the
limit. Tokens and items per minute use its sliding-window counter: a moving window keeps one entry per unit, which
for tokens would be hundreds of thousands of entries a minute; the counter costs the same whatever the volume and
smooths across the window boundary (weighted by the previous minute). Counters live in memory by default and in Redis when ``OPENMAAS_REDIS_URL`` is set, so every gateway process
sharing that Redis enforces one combined limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.aio.strategies import RateLimiter as Strategy
from limits.storage import storage_from_string

from openmaas.errors import ExceedsLimit, QuotaExceeded, RateLimited
from openmaas.tenancy.models import KeyLimits

# A concurrency slot whose holder vanished (a killed process) is freed after this long.
_SLOT_TTL_S = 600
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``0.5s``, ``12s``, ``1m30s``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass
class LimitGrant:
    """An admitted call: headers to send back, and the concurrency slot to give back when done."""

    headers: dict[str, str] = field(default_factory=dict)
    _release: Callable[[], Awaitable[None]] | None = None

    async def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            await release()


class RateLimiter:
    def __init__(self, redis_url: str | None = None, prefix: str = "openmaas") -> None:
        self._redis_url = redis_url
        self._prefix = prefix
        self._limiter: MovingWindowRateLimiter | None = None
        self._volume: SlidingWindowCounterRateLimiter | None = None
        self._redis: Any = None
        self._acquire_script: Any = None
        self._local_slots: dict[str, int] = {}

    @property
    def shared(self) -> bool:
        return self._redis_url is not None

    def _strategy(self) -> MovingWindowRateLimiter:
        # Built on first use, inside the event loop (the async storages bind to it).
        if self._limiter is None:
            if self._redis_url:
                url = "async+" + self._redis_url
                storage = storage_from_string(url, implementation="redispy", key_prefix=f"{self._prefix}:rl")
                import redis.asyncio

                self._redis = redis.asyncio.from_url(self._redis_url)
                self._acquire_script = self._redis.register_script(_ACQUIRE)
            else:
                storage = storage_from_string("async+memory://")
            self._limiter = MovingWindowRateLimiter(storage)
            self._volume = SlidingWindowCounterRateLimiter(storage)
        return self._limiter

    async def admit(self, key_id: str, limits: KeyLimits, request_id: str, *, tokens: int, items: int) -> LimitGrant:
        """Take a concurrency slot and count this call against the key's windows, or raise RateLimited.

        A call refused by one limit is not counted against the others: the slot is taken first (and given back on
        refusal), and every window is tested before any is charged."""
        if limits.empty:
            return LimitGrant()
        requests = self._strategy()
        assert self._volume is not None
        windows: list[tuple[str, int, int, RateLimitItem, Strategy]] = [
            (name, limit, cost, RateLimitItemPerMinute(limit), requests if name == "requests" else self._volume)
            for name, limit, cost in (
                ("requests", limits.rpm, 1),
                ("tokens", limits.tpm, tokens),
                ("items", limits.ipm, items),
            )
            if limit is not None and cost > 0
        ]
        for name, limit, cost, _, _ in windows:
            if cost > limit:
                raise ExceedsLimit(
                    f"this request needs {cost} {name} but the key allows {limit} {name} per minute, so it can "
                    f"never pass: send less at a time, or use a key with a higher {name}-per-minute limit",
                    param="input" if name != "requests" else None,
                )
        release = None
        if limits.concurrency is not None:
            release = await self._take_slot(key_id, limits.concurrency, request_id)
        try:
            for name, limit, cost, item, strategy in windows:
                if not await strategy.test(item, name, key_id, cost=cost):
                    raise await self._refusal(strategy, item, name, limit, key_id)
            for name, limit, cost, item, strategy in windows:
                if not await strategy.hit(item, name, key_id, cost=cost):  # lost a race since the test
                    raise await self._refusal(strategy, item, name, limit, key_id)
        except RateLimited:
            if release is not None:
                await release()
            raise
        headers: dict[str, str] = {}
        for name, limit, _, item, strategy in windows:
            stats = await strategy.get_window_stats(item, name, key_id)
            headers.update(_headers(name, limit, stats.remaining, stats.reset_time - time.time()))
        return LimitGrant(headers, release)

    @staticmethod
    async def _refusal(strategy: Strategy, item: RateLimitItem, name: str, limit: int, key_id: str) -> RateLimited:
        stats = await strategy.get_window_stats(item, name, key_id)
        reset = max(0.0, stats.reset_time - time.time())
        return RateLimited(
            f"rate limit reached: {limit} {name} per minute for this API key; retry in {duration(reset)}",
            headers=_headers(name, limit, stats.remaining, reset),
            retry_after=reset,
        )

    async def _take_slot(self, key_id: str, limit: int, request_id: str) -> Callable[[], Awaitable[None]]:
        def refuse() -> RateLimited:
            return RateLimited(
                f"this API key already has {limit} requests in flight (its concurrency limit); retry when one ends",
                headers={"x-ratelimit-limit-concurrency": str(limit)},
                retry_after=1.0,
            )

        if self._redis is None:
            held = self._local_slots.get(key_id, 0)
            if held >= limit:
                raise refuse()
            self._local_slots[key_id] = held + 1

            async def release_local() -> None:
                left = self._local_slots.get(key_id, 1) - 1
                if left <= 0:
                    self._local_slots.pop(key_id, None)
                else:
                    self._local_slots[key_id] = left

            return release_local
        name = f"{self._prefix}:conc:{key_id}"
        now = time.time()
        taken = await self._acquire_script(keys=[name], args=[now - _SLOT_TTL_S, limit, now, request_id, _SLOT_TTL_S])
        if not taken:
            raise refuse()

        async def release_shared() -> None:
            await self._redis.zrem(name, request_id)

        return release_shared

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
        if self._limiter is not None:
            storage: Any = self._limiter.storage
            closer = getattr(storage, "close", None) or getattr(getattr(storage, "storage", None), "aclose", None)
            if closer is not None:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result


def _headers(name: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    reset_s = max(0.0, reset_s)
    return {
        f"x-ratelimit-limit-{name}": str(limit),
        f"x-ratelimit-remaining-{name}": str(max(0, remaining)),
        f"x-ratelimit-reset-{name}": duration(reset_s),
    }


class QuotaGuard:
    """Refuses calls once an org has used its monthly quota of a unit (totals read at most ``ttl`` seconds old)."""

    def __init__(
        self,
        quotas: Callable[[], dict[str, dict[str, int]]],
        month_totals: Callable[[str, str], dict[str, int]],
        ttl: float = 1.0,
    ) -> None:
        self._quotas = quotas
        self._month_totals = month_totals
        self._ttl = ttl
        self._quota_cache: tuple[float, dict[str, dict[str, int]]] = (-math.inf, {})
        self._totals_cache: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}

    def invalidate(self) -> None:
        self._quota_cache = (-math.inf, {})
        self._totals_cache.clear()

    async def check(self, org_id: str | None, wanted: dict[str, int]) -> None:
        if org_id is None:
            return
        now = time.monotonic()
        at, quotas = self._quota_cache
        if now - at > self._ttl * 5:
            quotas = await asyncio.to_thread(self._quotas)
            self._quota_cache = (now, quotas)
        mine = quotas.get(org_id)
        if not mine:
            return
        month = current_month()
        hit = self._totals_cache.get((org_id, month))
        if hit is None or now - hit[0] > self._ttl:
            totals = await asyncio.to_thread(self._month_totals, org_id, month)
            self._totals_cache[(org_id, month)] = (now, totals)
        else:
            totals = hit[1]
        for unit, limit in mine.items():
            used, want, cap = totals.get(unit, 0), wanted.get(unit, 0), limit
            if unit == "audio_seconds":  # counted in milliseconds
                want, cap = want * 1000, limit * 1000
            if want > cap:
                raise ExceedsLimit(
                    f"this request needs {wanted.get(unit, 0)} {unit} but the organisation's whole monthly quota "
                    f"is {limit} {unit}, so it can never pass: send less at a time, or ask the platform admin to "
                    "raise the quota"
                )
            if used + want > cap and (want > 0 or used >= cap):
                if unit == "audio_seconds":
                    used //= 1000
                raise QuotaExceeded(
                    f"the organisation has used {used} of its monthly quota of {limit} {unit}; "
                    "it resets at the start of next month (UTC), or ask the platform admin to raise it",
                    retry_after=_seconds_to_next_month(),
                )


def current_month() -> str:
    return datetime.now(UTC).strftime("%Y-%m")


def _seconds_to_next_month() -> float:
    now = datetime.now(UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return (datetime(year, month, 1, tzinfo=UTC) - now).total_seconds()
