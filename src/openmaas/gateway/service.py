"""The gateway: authenticate, authorise, admit, dispatch to serving, and record the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from openmaas.audit import Actor, AuditLog
from openmaas.billing.plans import PendingCharge
from openmaas.billing.service import BillingService
from openmaas.errors import (
    ErrorCode,
    InvalidInput,
    InvalidRequest,
    ModelNotFound,
    OpenMaaSError,
    PayloadTooLarge,
)
from openmaas.gateway.auth import KeyAuthenticator, Principal
from openmaas.gateway.limits import Admission, QuotaGuard, RateLimiter
from openmaas.metering.records import UsageRecord, idempotency_scope
from openmaas.metering.usage import UsageQueries
from openmaas.metering.writer import GroupCommitWriter
from openmaas.registry.models import Model, ModelVersion
from openmaas.registry.service import ModelRegistry
from openmaas.runtimes import GENERATIVE_FORMATS
from openmaas.runtimes.generative import CausalLMRuntime, Generation, SamplingParams, TokenEvent, converted_folder
from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime
from openmaas.runtimes.whisper import SAMPLE_RATE, AudioError, Transcript, WhisperRuntime, decode_audio
from openmaas.serving.pool import ResidencyPool, Resident
from openmaas.serving.types import InferenceRequest, InferenceResponse
from openmaas.serving.validation import validate_request
from openmaas.telemetry import Metrics
from openmaas.tenancy.service import TenancyService

log = logging.getLogger(__name__)
MAX_IDEMPOTENCY_KEY = 255


def _cost(mv: ModelVersion, request: InferenceRequest, rows: int) -> int:
    """What a request weighs in a batch: estimated tokens for text models (about 4 bytes each), else rows."""
    text = request.inputs.get("text")
    if mv.format == SentenceTransformerRuntime.format and text is not None:
        return int(sum(len(t) // 4 + 2 for t in text.reshape(-1)))
    return rows


@dataclass
class CallContext:
    """Per-call facts from the protocol layer, and the headers the gateway wants sent back."""

    request_id: str
    idempotency_key: str | None = None
    # sha256 of the raw request (set by the protocol layer when an idempotency key is present).
    fingerprint: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False

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


class Gateway:
    """The one entry point surfaces call for anything that touches models."""

    def __init__(
        self,
        auth: KeyAuthenticator,
        registry: ModelRegistry,
        pool: ResidencyPool,
        metrics: Metrics,
        metering: Metering,
        limiter: RateLimiter,
        quotas: QuotaGuard,
        tenancy: TenancyService,
        audit: AuditLog,
        billing: BillingService,
    ) -> None:
        self.auth = auth
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.metering = metering
        self.limiter = limiter
        self.quotas = quotas
        self.tenancy = tenancy
        self.audit = audit
        self.billing = billing
        # Idempotency keys with a call in progress in this process: a concurrent duplicate gets 409.
        self._idempotency_in_flight: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[None]] = set()

    # -- visibility -------------------------------------------------------------------------------------------

    def can_see(self, principal: Principal, model: Model) -> bool:
        if principal.is_platform_admin:
            return True
        if not principal.may_use_model(model.name):
            return False
        if model.visibility == "public":
            return True
        if principal.org_id is None:
            return False
        if model.owner_org_id == principal.org_id:
            return True
        return model.visibility == "shared" and principal.org_id in model.shared_with

    def list_models(self, principal: Principal) -> list[Model]:
        return [m for m in self.registry.list_models() if self.can_see(principal, m)]

    def get_model(self, principal: Principal, name: str) -> Model:
        model = self.registry.cached_model(name)
        if not self.can_see(principal, model):
            raise ModelNotFound(name)  # exactly as if it did not exist
        return model

    def model_version(self, principal: Principal, name: str, version: int | None = None) -> ModelVersion:
        if not principal.is_platform_admin:
            self.get_model(principal, name)  # visibility first: no existence leak through version errors
        return self.registry.resolve(name, version)

    async def audit_async(
        self,
        who: Actor,
        action: str,
        target: str,
        *,
        org_id: str | None,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
    ) -> None:
        """Append a management action to the audit log (off the event loop)."""
        await asyncio.to_thread(self.audit.append, who, action, target, org_id=org_id, before=before, after=after)

    # -- inference --------------------------------------------------------------------------------------------

    async def infer(
        self,
        principal: Principal,
        name: str,
        version: int | None,
        request: InferenceRequest,
        protocol: str,
        ctx: CallContext | None = None,
    ) -> InferenceResponse:
        """Authorise, admit, run and meter one tensor inference request."""
        mv = self.model_version(principal, name, version)
        principal.require("inference")
        rows = validate_request(mv.signature, request)
        ctx = ctx or CallContext(request_id=request.id or "")
        cost = _cost(mv, request, rows)
        tokens = cost if mv.format == SentenceTransformerRuntime.format else 0
        text = request.inputs.get("text")

        def worst() -> dict[str, int]:  # asked only for a sold model: off the hot path of free ones
            # Each token takes at least one byte, and the model reads at most its window (well under 512).
            tokens = int(sum(min(len(t) + 2, 512) for t in text.reshape(-1))) if text is not None else 0
            return {"requests": 1, "items": rows, "input_tokens": tokens}

        async with self._admitted(
            principal,
            mv,
            ctx,
            protocol,
            tokens=tokens,
            items=rows,
            quota={"requests": 1, "items": rows, "input_tokens": tokens},
            worst=worst,
        ) as call:
            result = await self.pool.infer(mv, request.inputs, rows, cost, request.deadline)
            wanted = request.outputs or [o.name for o in mv.signature.outputs]
            outputs = {k: result.outputs[k] for k in wanted}
            used = int(result.tokens.sum()) if result.tokens is not None else 0
            await call.meter(input_tokens=used, items=rows)
            return InferenceResponse(
                model=mv.model, version=mv.version, outputs=outputs, tokens=result.tokens, id=request.id
            )

    async def _admit(
        self,
        principal: Principal,
        mv: ModelVersion,
        ctx: CallContext,
        protocol: str,
        *,
        tokens: int,
        items: int,
        quota: dict[str, int],
        worst: Callable[[], dict[str, int]],
    ) -> AdmittedCall:
        """Idempotency, rate limits (``tokens``, ``items``), the monthly ``quota`` and, for a sold model, a
        subscription or a hold of the ``worst()`` case; the caller then meters and closes the call."""
        idem = await self._check_idempotency(principal, ctx)
        call = AdmittedCall(self, principal, mv, ctx, protocol, time.perf_counter(), idem)
        self.metrics.in_flight.labels(mv.model).inc()
        try:
            call.admission = await self.limiter.admit(
                principal.key_id, principal.limits, ctx.request_id, tokens=tokens, items=items
            )
            ctx.response_headers.update(call.admission.headers)
            if not ctx.replayed:
                await self.quotas.check(principal.org_id, quota)
                call.pending = await self._entitle_units(principal, mv, ctx, worst)
        except BaseException as e:
            await call.close(_status_of(e, self.metrics))
            raise
        return call

    @contextlib.asynccontextmanager
    async def _admitted(
        self,
        principal: Principal,
        mv: ModelVersion,
        ctx: CallContext,
        protocol: str,
        **admission: Any,
    ) -> AsyncIterator[AdmittedCall]:
        """``_admit``, then run the body and close the call with how it went."""
        call = await self._admit(principal, mv, ctx, protocol, **admission)
        status = "error"
        try:
            yield call
            status = "ok"
        except BaseException as e:
            status = _status_of(e, self.metrics)
            raise
        finally:
            await call.close(status)

    async def _meter(self, record: UsageRecord) -> None:
        try:
            await self.metering.writer.record(record)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.metering_failures.inc()
            raise OpenMaaSError(
                "the call's usage could not be recorded, so its result is withheld; retry (with the same "
                "Idempotency-Key, if you sent one)",
                code=ErrorCode.METERING_UNAVAILABLE,
            ) from None

    async def _check_idempotency(self, principal: Principal, ctx: CallContext) -> tuple[str, str] | None:
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
        if slot in self._idempotency_in_flight:
            raise OpenMaaSError(
                "a request with this Idempotency-Key is still in progress; retry once it has finished",
                code=ErrorCode.IDEMPOTENCY_IN_PROGRESS,
                param="Idempotency-Key",
            )
        prior = await asyncio.to_thread(self.metering.usage.prior_call, scope, key, datetime.now(UTC))
        if prior is not None:
            if prior.fingerprint != ctx.fingerprint:
                raise OpenMaaSError(
                    "this Idempotency-Key was already used for a different request; use a new key for a new request",
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    param="Idempotency-Key",
                )
            ctx.replayed = True
            ctx.response_headers["Idempotent-Replayed"] = "true"
            ctx.response_headers["X-Original-Request-Id"] = prior.request_id
        self._idempotency_in_flight.add(slot)
        return slot

    async def embed(
        self,
        principal: Principal,
        name: str,
        texts: list[str],
        protocol: str,
        deadline: float | None = None,
        ctx: CallContext | None = None,
    ) -> InferenceResponse:
        """Embeddings for ``texts`` from a text-embedding model."""
        mv = self.model_version(principal, name)
        spec = mv.signature.input("text")
        if mv.format != SentenceTransformerRuntime.format or spec is None:
            raise InvalidInput(
                f"model '{name}' is not a text-embedding model (task: {mv.card.task or 'unknown'})",
                param="model",
            )
        array = np.array([t.encode("utf-8") for t in texts], dtype=object)
        request = InferenceRequest(inputs={"text": array}, deadline=deadline)
        return await self.infer(principal, name, None, request, protocol, ctx)

    # -- generation and speech --------------------------------------------------------------------------------

    async def generate(
        self,
        principal: Principal,
        name: str,
        *,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        max_tokens: int | None,
        sampling: dict[str, Any],
        protocol: str,
        ctx: CallContext,
    ) -> GenerationCall:
        """Authorise and admit a text-generation request and queue it on the model's engine.

        Everything a client can get wrong (not a language model, prompt too long, over a limit) is refused here,
        before any answer starts; the returned call streams the answer and is finished exactly once."""
        mv = self.model_version(principal, name)
        principal.require("inference")
        if mv.format not in GENERATIVE_FORMATS:
            raise InvalidInput(
                f"model '{name}' does not generate text (task: {mv.card.task or 'unknown'}); "
                "list text-generation models with GET /v1/models",
                param="model",
            )
        resident = await self.pool.acquire(mv)
        try:
            runtime = resident.instances[0].runtime
            assert isinstance(runtime, CausalLMRuntime)
            stop = tuple(sampling.pop("stop", ()))
            if messages is not None:
                prompt = runtime.render_chat(messages)
                stop = stop + tuple(s for s in runtime.chat_stop if s not in stop)
            ids = runtime.encode(prompt or "")
            window = runtime.context_window
            if max_tokens is not None and len(ids) + max_tokens > window:
                raise InvalidRequest(
                    f"this model's context window is {window} tokens; the request asks for {len(ids) + max_tokens} "
                    f"({len(ids)} in the prompt, {max_tokens} to generate): shorten the prompt or lower max_tokens",
                    param="messages" if messages is not None else "prompt",
                )
            if len(ids) >= window:
                raise InvalidRequest(
                    f"the prompt is {len(ids)} tokens; this model's context window is {window} tokens",
                    param="messages" if messages is not None else "prompt",
                )
            budget = (
                max_tokens
                if max_tokens is not None
                else min(self.pool.options.generation_max_tokens, window - len(ids))
            )
            params = SamplingParams(max_tokens=budget, stop=stop, **sampling)
            call = await self._admit(
                principal,
                mv,
                ctx,
                protocol,
                tokens=len(ids) + budget,
                items=1,
                quota={"requests": 1, "input_tokens": len(ids)},
                worst=lambda: {"requests": 1, "input_tokens": len(ids), "output_tokens": budget},
            )
        except BaseException:
            await self.pool.release(resident)
            raise
        try:
            request = runtime.generate(ids, params, asyncio.get_running_loop())
        except BaseException as e:
            await call.close(_status_of(e, self.metrics))
            await self.pool.release(resident)
            raise
        return GenerationCall(call, request, len(ids), resident)

    async def transcribe(
        self,
        principal: Principal,
        name: str,
        audio: bytes,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        max_seconds: float,
        protocol: str,
        ctx: CallContext,
    ) -> Transcript:
        """Speech to text with a Whisper model, metered in audio seconds."""
        mv = self.model_version(principal, name)
        principal.require("inference")
        if mv.format != WhisperRuntime.format:
            raise InvalidInput(
                f"model '{name}' is not a speech-recognition model (task: {mv.card.task or 'unknown'})", param="model"
            )
        try:
            samples = await asyncio.to_thread(decode_audio, audio)
        except AudioError as e:
            raise InvalidRequest(str(e), param="file") from None
        seconds = len(samples) / SAMPLE_RATE
        if seconds > max_seconds:
            raise PayloadTooLarge(
                f"the audio is {seconds:.1f} s long; the limit is {max_seconds:g} s (OPENMAAS_AUDIO_MAX_SECONDS)",
                param="file",
            )
        audio_s = math.ceil(seconds)
        async with self._admitted(
            principal,
            mv,
            ctx,
            protocol,
            tokens=0,
            items=1,
            quota={"requests": 1, "audio_seconds": audio_s},
            worst=lambda: {"requests": 1, "audio_seconds": audio_s},
        ) as call:
            resident = await self.pool.acquire(mv)
            try:
                runtime = resident.instances[0].runtime
                assert isinstance(runtime, WhisperRuntime)
                if language and runtime.english_only and language != "en":
                    raise InvalidRequest(
                        f"model '{name}' transcribes English only; omit 'language' or send 'en'", param="language"
                    )
                transcript = await resident.instances[0].call(
                    functools.partial(runtime.transcribe, samples, language, prompt, temperature)
                )
            finally:
                await self.pool.release(resident)
            await call.meter(items=1, audio_ms=round(seconds * 1000))
            return transcript

    async def _entitle_units(
        self, principal: Principal, mv: ModelVersion, ctx: CallContext, units: Callable[[], dict[str, int]]
    ) -> PendingCharge | None:
        """A subscription or a hold of ``units()``' cost (the call's worst case) when the model is sold; 402 if
        not. ``units`` is called only for a sold model."""
        if principal.org_id is None or not await self.billing.priced(mv.model):
            return None
        owner = self.registry.cached_model(mv.model).owner_org_id
        if owner == principal.org_id:
            return None
        worst = {"requests": 0, "items": 0, "input_tokens": 0, "output_tokens": 0, "audio_seconds": 0} | units()
        return await asyncio.to_thread(self.billing.admit, principal.org_id, mv.model, owner, ctx.request_id, worst)

    def prepare_in_background(self, mv: ModelVersion) -> None:
        """Convert a newly registered GGUF file to its served form now, off the request path (the first load
        would otherwise do it); failures are logged, and the first load tries again."""

        async def convert() -> None:
            try:
                await asyncio.to_thread(converted_folder, self.registry.artifact_path(mv))
            except Exception:
                log.exception("background GGUF conversion failed", extra={"model": mv.model, "version": mv.version})

        task = asyncio.get_running_loop().create_task(convert())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.limiter.close()
        await asyncio.to_thread(self.metering.writer.close)


def _status_of(error: BaseException, metrics: Metrics) -> str:
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
    """A call past idempotency, limits, quota and billing admission: ``meter`` it once when it has delivered,
    then ``close`` it (which gives back what admission took, and a hold that was never settled)."""

    gateway: Gateway
    principal: Principal
    mv: ModelVersion
    ctx: CallContext
    protocol: str
    started: float
    idem: tuple[str, str] | None
    admission: Admission | None = None
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
        if not self.gateway.metering.enabled or self.ctx.replayed:
            return
        await self.gateway._meter(
            UsageRecord(
                request_id=self.ctx.request_id,
                org_id=self.principal.org_id,
                key_id=self.principal.key_id,
                model=self.mv.model,
                version=self.mv.version,
                protocol=self.protocol,
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
        )
        self.metered = True

    async def close(self, status: str) -> None:
        """Give back the hold (unless settled), the limits' slot and the idempotency key; count the call."""
        if self.closed:
            return
        self.closed = True
        gw = self.gateway
        try:
            if self.pending is not None and not self.metered:
                await asyncio.to_thread(gw.billing.release, self.pending)
            if self.admission is not None:
                await self.admission.release()
        finally:
            if self.idem is not None:
                gw._idempotency_in_flight.discard(self.idem)
            gw.metrics.in_flight.labels(self.mv.model).dec()
            labels = (self.mv.model, str(self.mv.version), self.protocol, status)
            gw.metrics.requests.labels(*labels).inc()
            gw.metrics.latency.labels(*labels).observe(time.perf_counter() - self.started)


@dataclass(eq=False)
class GenerationCall:
    """An admitted generation request: iterate ``events()``, add what reached the client to ``delivered``, and
    ``finish`` it once with how it ended (finishing twice does nothing)."""

    call: AdmittedCall
    request: Generation
    prompt_tokens: int
    resident: Resident
    delivered: int = 0
    outcome: str | None = None

    @property
    def ctx(self) -> CallContext:
        return self.call.ctx

    @property
    def mv(self) -> ModelVersion:
        return self.call.mv

    async def events(self) -> AsyncIterator[TokenEvent]:
        first = True
        while True:
            event = await self.request.events.get()
            if first and event.text:
                first = False
                self.call.gateway.metrics.time_to_first_token.labels(self.mv.model).observe(
                    time.perf_counter() - self.call.started
                )
            yield event
            if event.finish_reason is not None:
                return

    async def finish(self, outcome: str) -> None:
        """Settle once: meter what was delivered (a failure before any text is not charged), release the rest."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.request.cancel()  # a no-op once the engine has finished it
        try:
            if not (outcome == "error" and self.delivered == 0):
                await self.call.meter(outcome, input_tokens=self.prompt_tokens, output_tokens=self.delivered)
                self.call.gateway.metrics.generated_tokens.labels(self.mv.model).inc(self.delivered)
        finally:
            await self.call.close("ok" if outcome in ("stop", "length") else outcome)
            await self.call.gateway.pool.release(self.resident)
