"""Admission: what a call must pass before it runs, and the hand-off of its usage once it has delivered.

In this order (cheapest refusal first, nothing taken that a later refusal would have to give back unless it is
given back): idempotency (a replay is marked, a concurrent duplicate is 409), the key's rate limits and
concurrency slot, the organisation's monthly quota, and for a sold model a subscription or a hold of the call's
worst-case cost on the wallet (402 when neither). ``AdmittedCall`` then meters the call once and closes it once,
which gives back the slot, the idempotency key and a hold that was never settled.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from openmaas.billing.plans import PendingCharge
from openmaas.billing.service import BillingService
from openmaas.entities.models import ModelVersion
from openmaas.errors import ErrorCode, InvalidRequest, OpenMaaSError
from openmaas.gateway.auth import Principal
from openmaas.gateway.limits import LimitGrant, QuotaGuard, RateLimiter
from openmaas.metering.records import UsageRecord, idempotency_scope
from openmaas.metering.usage import UsageQueries
from openmaas.metering.writer import GroupCommitWriter
from openmaas.telemetry import Metrics

MAX_IDEMPOTENCY_KEY = 255
#: Every unit a billing hold can be asked for; a call's worst case names the ones it uses.
_NO_UNITS = {"requests": 0, "items": 0, "input_tokens": 0, "output_tokens": 0, "audio_seconds": 0}


#: Where an in-process batch line's ``BatchLine`` sits in its ASGI scope's state.
BATCH_LINE = "openmaas.batch_line"
#: The serving priority of a batch line: queued behind every online request (``serving/batcher.py``).
BATCH_PRIORITY = 1


@dataclass
class BatchLine:
    """What makes a call a line of an offline batch: it runs at batch priority, outside the key's per-minute
    limits (the batch scheduler paces it), is rated at the plan's batch discount with a hold of its own id
    (``hold_id``, new on every run of the batch), and its usage record is not written by the call but handed
    back in ``deferred``, for the batch runner to store together with the line's result in one transaction."""

    principal: Principal
    hold_id: str
    deferred: UsageRecord | None = None


@dataclass
class CallContext:
    """Per-call facts from the protocol layer, and the headers the gateway wants sent back."""

    request_id: str
    idempotency_key: str | None = None
    # sha256 of the raw request (set by the protocol layer when an idempotency key is present).
    fingerprint: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False
    # Set for a line of an offline batch (``BatchLine``).
    batch: BatchLine | None = None

    @staticmethod
    def fingerprint_of(*parts: bytes) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(len(p).to_bytes(8, "big"))
            h.update(p)
        return h.hexdigest()


@dataclass
class Metering:
    """Where usage goes: the group-commit writer, the queries behind idempotency, and the on/off switch."""

    writer: GroupCommitWriter
    usage: UsageQueries
    enabled: bool = True
    # Batch lines' records (with their results) go through a writer of their own, in smaller groups, so an online
    # call's record never waits behind a group of batch lines.
    batch_writer: GroupCommitWriter | None = None


@dataclass(frozen=True)
class Demand:
    """What a call asks of admission: ``tokens`` and ``items`` for the key's per-minute limits, ``quota`` units for
    the organisation's month, and ``worst()``, the most it can be billed (asked only for a sold model)."""

    tokens: int
    items: int
    quota: dict[str, int]
    worst: Callable[[], dict[str, int]]


class AdmissionControl:
    """Limits, quotas, billing holds, idempotency and the metering hand-off, for every kind of call."""

    def __init__(
        self,
        limiter: RateLimiter,
        quotas: QuotaGuard,
        billing: BillingService,
        metering: Metering,
        metrics: Metrics,
        owner_of: Callable[[str], str | None],
    ) -> None:
        self.limiter = limiter
        self.quotas = quotas
        self.billing = billing
        self.metering = metering
        self.metrics = metrics
        self._owner_of = owner_of
        # Idempotency keys with a call in progress in this process: a concurrent duplicate gets 409.
        self._in_flight: set[tuple[str, str]] = set()

    async def admit(
        self, principal: Principal, mv: ModelVersion, ctx: CallContext, protocol: str, demand: Demand
    ) -> AdmittedCall:
        """Admit one call or raise the refusal; the caller meters the returned call and closes it."""
        slot = await self._claim_idempotency(principal, ctx)
        call = AdmittedCall(self, principal, mv, ctx, protocol, time.perf_counter(), slot)
        self.metrics.in_flight_of(mv.model).inc()
        try:
            if ctx.batch is None:  # a batch line is paced by the batch scheduler, not the key's online limits
                call.grant = await self.limiter.admit(
                    principal.key_id, principal.limits, ctx.request_id, tokens=demand.tokens, items=demand.items
                )
                ctx.response_headers.update(call.grant.headers)
            if not ctx.replayed:
                await self.quotas.check(principal.org_id, demand.quota)
                call.pending = await self._entitle(principal, mv, ctx, demand.worst)
        except BaseException as e:
            await call.close(status_of(e, self.metrics))
            raise
        return call

    def admitted(
        self, principal: Principal, mv: ModelVersion, ctx: CallContext, protocol: str, demand: Demand
    ) -> Admitted:
        """``admit``, then run the body and close the call with how it went (``async with``)."""
        return Admitted(self, principal, mv, ctx, protocol, demand)

    async def close(self) -> None:
        """Close the limiter's connections and flush and stop the metering writer."""
        await self.limiter.close()
        await asyncio.to_thread(self.metering.writer.close)
        if self.metering.batch_writer is not None:
            await asyncio.to_thread(self.metering.batch_writer.close)

    # -- what AdmittedCall hands back ---------------------------------------------------------------------------

    @property
    def metering_enabled(self) -> bool:
        return self.metering.enabled

    async def record(self, record: UsageRecord, *, batch: bool = False) -> None:
        """Make the usage record durable (with its hold's settlement); 503 when it cannot be. ``batch``: a batch
        line's record, through the batch writer."""
        writer = self.metering.batch_writer if batch and self.metering.batch_writer else self.metering.writer
        try:
            await writer.record(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.metering_failures.inc()
            raise OpenMaaSError(
                "the call's usage could not be recorded, so its result is withheld; retry (with the same "
                "Idempotency-Key, if you sent one)",
                code=ErrorCode.METERING_UNAVAILABLE,
            ) from None

    async def release_hold(self, pending: PendingCharge) -> None:
        await asyncio.to_thread(self.billing.release, pending)

    def end(self, call: AdmittedCall, status: str) -> None:
        """Free the call's idempotency key and count it."""
        if call.idempotency_slot is not None:
            self._in_flight.discard(call.idempotency_slot)
        self.metrics.in_flight_of(call.mv.model).dec()
        labels = (call.mv.model, str(call.mv.version), call.protocol, status)
        self.metrics.requests_of(*labels).inc()
        self.metrics.latency_of(*labels).observe(time.perf_counter() - call.started)

    # -- the checks ---------------------------------------------------------------------------------------------

    async def _claim_idempotency(self, principal: Principal, ctx: CallContext) -> tuple[str, str] | None:
        """Mark a retry of a call already metered as a replay; refuse a key reused for another request."""
        key = ctx.idempotency_key
        if key is None:
            return None
        if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters", param="Idempotency-Key"
            )
        scope = idempotency_scope(principal.org_id)
        slot = (scope, key)
        if slot in self._in_flight:
            raise OpenMaaSError(
                "a request with this Idempotency-Key is still in progress; retry once it has finished",
                code=ErrorCode.IDEMPOTENCY_IN_PROGRESS,
                param="Idempotency-Key",
            )
        self._in_flight.add(slot)  # before the first await: a concurrent duplicate must see it
        try:
            prior = await asyncio.to_thread(self.metering.usage.prior_call, scope, key, datetime.now(UTC))
        except BaseException:
            self._in_flight.discard(slot)
            raise
        if prior is not None:
            if prior.fingerprint != ctx.fingerprint:
                self._in_flight.discard(slot)
                raise OpenMaaSError(
                    "this Idempotency-Key was already used for a different request; use a new key for a new request",
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    param="Idempotency-Key",
                )
            ctx.replayed = True
            ctx.response_headers["Idempotent-Replayed"] = "true"
            ctx.response_headers["X-Original-Request-Id"] = prior.request_id
        return slot

    async def _entitle(
        self, principal: Principal, mv: ModelVersion, ctx: CallContext, worst: Callable[[], dict[str, int]]
    ) -> PendingCharge | None:
        """A subscription or a hold of ``worst()``'s cost when the model is sold to the caller; 402 if neither."""
        if principal.org_id is None or not await self.billing.priced(mv.model):
            return None
        owner = self._owner_of(mv.model)
        if owner == principal.org_id:
            return None
        units = _NO_UNITS | worst()
        if ctx.batch is not None:
            return await asyncio.to_thread(
                self.billing.admit, principal.org_id, mv.model, owner, ctx.batch.hold_id, units, batch=True
            )
        return await asyncio.to_thread(self.billing.admit, principal.org_id, mv.model, owner, ctx.request_id, units)


class Admitted:
    """``async with admission.admitted(...) as call``: the call admitted on entry, closed on exit with "ok" or the
    status of what was raised. A class rather than a generator-based context manager: it is entered on every
    call, and the generator's machinery cost more than the two methods."""

    __slots__ = ("_admission", "_args", "_call")

    def __init__(
        self,
        admission: AdmissionControl,
        principal: Principal,
        mv: ModelVersion,
        ctx: CallContext,
        protocol: str,
        demand: Demand,
    ) -> None:
        self._admission = admission
        self._args = (principal, mv, ctx, protocol, demand)
        self._call: AdmittedCall | None = None

    async def __aenter__(self) -> AdmittedCall:
        self._call = await self._admission.admit(*self._args)
        return self._call

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        assert self._call is not None
        await self._call.close("ok" if error is None else status_of(error, self._admission.metrics))


def status_of(error: BaseException, metrics: Metrics) -> str:
    """The status label of a call that ended with ``error`` (counting refusals by limits and quotas)."""
    if isinstance(error, OpenMaaSError):
        if error.code in (ErrorCode.RATE_LIMITED, ErrorCode.QUOTA_EXCEEDED):
            metrics.rate_limited.labels(error.code.value).inc()
        return str(error.status)
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"  # the client went away
    return "error"


@dataclass(eq=False)
class AdmittedCall:
    """A call past admission: ``meter`` it once when it has delivered, then ``close`` it (which gives back what
    admission took, and a hold that was never settled)."""

    admission: AdmissionControl
    principal: Principal
    mv: ModelVersion
    ctx: CallContext
    protocol: str
    started: float
    idempotency_slot: tuple[str, str] | None
    grant: LimitGrant | None = None
    pending: PendingCharge | None = None
    metered: bool = False
    closed: bool = False

    async def meter(
        self,
        outcome: str = "completed",
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        items: int = 0,
        audio_ms: int = 0,
    ) -> None:
        """Record the usage (``input_tokens``, ``output_tokens``, ``items``, ``audio_ms``) with the hold's
        settlement, unless metering is off or this is a replay; a failure to record withholds the result (503)."""
        if self.metered or not self.admission.metering_enabled or self.ctx.replayed:
            return
        record = UsageRecord(
            request_id=self.ctx.request_id,
            org_id=self.principal.org_id,
            key_id=self.principal.key_id,
            model=self.mv.model,
            version=self.mv.version,
            protocol="batch" if self.ctx.batch is not None else self.protocol,
            latency_ms=(time.perf_counter() - self.started) * 1000,
            outcome=outcome,
            idempotency_key=self.ctx.idempotency_key,
            fingerprint=self.ctx.fingerprint,
            charge=self.pending,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            items=items,
            audio_ms=audio_ms,
        )
        if self.ctx.batch is not None:
            # The batch runner stores it with the line's result (and gives the hold back if that fails).
            self.ctx.batch.deferred = record
        else:
            await self.admission.record(record)
        self.metered = True

    async def close(self, status: str) -> None:
        """Give back the hold (unless settled), the limits' slot and the idempotency key; count the call."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.pending is not None and not self.metered:
                await self.admission.release_hold(self.pending)
            if self.grant is not None:
                await self.grant.release()
        finally:
            self.admission.end(self, status)
