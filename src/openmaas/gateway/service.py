"""The gateway: authorise, admit, dispatch to the serving backend, settle, audit.

It never learns what runs a model or where: it asks the ``ServingBackend`` contract only. Every call path here
resolves the model version once (visibility first, so a model the caller cannot see is 404 exactly as if it did
not exist) and hands that version down.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from openmaas.audit import Actor, AuditLog
from openmaas.entities.generation import TokenEvent
from openmaas.entities.models import Model, ModelCard, ModelVersion, Preparation
from openmaas.entities.speech import Transcript
from openmaas.errors import Forbidden, InvalidInput, PayloadTooLarge
from openmaas.gateway.admission import (
    BATCH_PRIORITY,
    AdmissionControl,
    AdmittedCall,
    CallContext,
    Demand,
    status_of,
)
from openmaas.gateway.auth import KeyAuthenticator, Principal
from openmaas.registry.service import ModelRegistry
from openmaas.serving.backend import (
    Batching,
    GenerationSession,
    GenerationSpec,
    ModelState,
    ServedAs,
    ServingBackend,
)
from openmaas.serving.stats import InferenceCounters
from openmaas.serving.types import InferenceRequest, InferenceResponse
from openmaas.serving.validation import validate_request
from openmaas.telemetry import Metrics


class Gateway:
    """The one entry point surfaces call for anything that runs a model."""

    def __init__(
        self,
        auth: KeyAuthenticator,
        registry: ModelRegistry,
        backend: ServingBackend,
        admission: AdmissionControl,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.auth = auth
        self.registry = registry
        self.backend = backend
        self.admission = admission
        self.audit = audit
        self.metrics = metrics

    # -- visibility -------------------------------------------------------------------------------------------

    def can_see(self, principal: Principal, model: Model) -> bool:
        if principal.is_platform_admin:
            return True
        if not principal.may_use_model(model):
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

    def latest_cards(self) -> dict[str, ModelCard]:
        """Every model's latest card by name (filter with ``list_models`` first: this shows no visibility)."""
        return self.registry.latest_cards()

    def get_model(self, principal: Principal, name: str) -> Model:
        """The model ``name`` means to this caller (``org/name``, or a bare name: its own organisation's, the
        platform's, then another's it may see); 404 for what it cannot see, exactly as if it did not exist."""
        return self.registry.find(name, principal.org_name, lambda m: self.can_see(principal, m))

    def model_version(self, principal: Principal, name: str, version: int | None = None) -> ModelVersion:
        """The version a call to ``name`` uses (the latest when None); 404 for a model the caller cannot see."""
        model = self.get_model(principal, name)  # visibility first: no existence leak through version errors
        return self.registry.resolve(model.name, version)

    def latest(self, model: Model) -> ModelVersion:
        """The latest version of a model already shown to the caller (``get_model``, ``list_models``)."""
        return self.registry.resolve(model.name)

    def versions(self, name: str) -> list[ModelVersion]:
        return self.registry.list_versions(name)

    def served_as(self, mv: ModelVersion) -> ServedAs:
        return self.backend.served_as(mv)

    def platform(self, mv: ModelVersion) -> str:
        return self.backend.platform(mv)

    def state(self, mv: ModelVersion) -> ModelState:
        return self.backend.state(mv)

    def preparing(self, mv: ModelVersion) -> Preparation | None:
        return self.backend.preparing(mv)

    def weights(self, mv: ModelVersion) -> dict[str, Any] | None:
        """How ``mv``'s weights are held when served (int8 or float32 and why, for language models)."""
        return self.backend.weights(mv)

    def inference_stats(self, mv: ModelVersion) -> InferenceCounters:
        return self.backend.inference_stats(mv)

    def batching(self, mv: ModelVersion) -> Batching:
        return self.backend.batching(mv)

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
        mv: ModelVersion,
        request: InferenceRequest,
        protocol: str,
        ctx: CallContext | None = None,
    ) -> InferenceResponse:
        """Authorise, admit, run and meter one tensor inference request on version ``mv``."""
        principal.require("inference")
        rows = validate_request(mv.signature, request)
        ctx = ctx or CallContext(request_id=request.id or "")
        if ctx.batch is not None:
            request.priority = BATCH_PRIORITY
        estimate = self.backend.estimate_tokens(mv, request)
        tokens = estimate.expected if estimate is not None else 0
        at_most = estimate.at_most if estimate is not None else 0
        demand = Demand(
            tokens=tokens,
            items=rows,
            quota={"requests": 1, "items": rows, "input_tokens": tokens},
            worst=lambda: {"requests": 1, "items": rows, "input_tokens": at_most},
        )
        async with self.admission.admitted(principal, mv, ctx, protocol, demand) as call:
            result = await self.backend.infer(mv, request, rows, tokens if estimate is not None else rows)
            wanted = request.outputs or [o.name for o in mv.signature.outputs]
            outputs = {k: result.outputs[k] for k in wanted}
            used = int(result.tokens.sum()) if result.tokens is not None else 0
            await call.meter(input_tokens=used, items=rows)
            return InferenceResponse(
                model=mv.model, version=mv.version, outputs=outputs, tokens=result.tokens, id=request.id
            )

    async def embed(
        self,
        principal: Principal,
        mv: ModelVersion,
        texts: list[str],
        protocol: str,
        deadline: float | None = None,
        ctx: CallContext | None = None,
    ) -> InferenceResponse:
        """Embeddings for ``texts`` from a text-embedding model version."""
        if self.backend.served_as(mv) != "embedding" or mv.signature.input("text") is None:
            raise InvalidInput(
                f"model '{mv.model}' is not a text-embedding model (task: {mv.card.task or 'unknown'})",
                param="model",
            )
        array = np.array([t.encode("utf-8") for t in texts], dtype=object)
        return await self.infer(
            principal, mv, InferenceRequest(inputs={"text": array}, deadline=deadline), protocol, ctx
        )

    # -- generation and speech --------------------------------------------------------------------------------

    async def generate(
        self, principal: Principal, mv: ModelVersion, spec: GenerationSpec, protocol: str, ctx: CallContext
    ) -> GenerationCall:
        """Authorise and admit a text-generation request and queue it on the model.

        Everything a client can get wrong (not a language model, prompt too long, over a limit) is refused here,
        before any answer starts; the returned call streams the answer and is finished exactly once."""
        principal.require("inference")
        if self.backend.served_as(mv) != "generation":
            raise InvalidInput(
                f"model '{mv.model}' does not generate text (task: {mv.card.task or 'unknown'}); "
                "list text-generation models with GET /v1/models",
                param="model",
            )
        session = await self.backend.open_generation(mv, spec)
        prompt, budget = session.prompt_tokens, session.max_tokens
        try:
            call = await self.admission.admit(
                principal,
                mv,
                ctx,
                protocol,
                Demand(
                    tokens=prompt + budget,
                    items=1,
                    quota={"requests": 1, "input_tokens": prompt},
                    worst=lambda: {"requests": 1, "input_tokens": prompt, "output_tokens": budget},
                ),
            )
        except BaseException:
            await session.close()
            raise
        try:
            session.start()
        except BaseException as e:
            await call.close(status_of(e, self.metrics))
            await session.close()
            raise
        return GenerationCall(self, call, session)

    async def transcribe(
        self,
        principal: Principal,
        mv: ModelVersion,
        audio: bytes,
        *,
        language: str | None,
        prompt: str | None,
        temperature: float,
        max_seconds: float,
        protocol: str,
        ctx: CallContext,
    ) -> Transcript:
        """Speech to text with a speech-recognition model version, metered in audio seconds."""
        principal.require("inference")
        if self.backend.served_as(mv) != "speech":
            raise InvalidInput(
                f"model '{mv.model}' is not a speech-recognition model (task: {mv.card.task or 'unknown'})",
                param="model",
            )
        clip = await asyncio.to_thread(self.backend.decode_audio, audio)
        if clip.seconds > max_seconds:
            raise PayloadTooLarge(
                f"the audio is {clip.seconds:.1f} s long; the limit is {max_seconds:g} s (OPENMAAS_AUDIO_MAX_SECONDS)",
                param="file",
            )
        audio_s = math.ceil(clip.seconds)
        demand = Demand(
            tokens=0,
            items=1,
            quota={"requests": 1, "audio_seconds": audio_s},
            worst=lambda: {"requests": 1, "audio_seconds": audio_s},
        )
        async with self.admission.admitted(principal, mv, ctx, protocol, demand) as call:
            transcript = await self.backend.transcribe(
                mv, clip, language=language, prompt=prompt, temperature=temperature
            )
            await call.meter(items=1, audio_ms=round(clip.seconds * 1000))
            return transcript

    # -- residency (the repository API) -----------------------------------------------------------------------

    async def load(self, mv: ModelVersion, *, pin: bool | None = None) -> None:
        """Load now; ``pin`` True keeps it loaded on the repository API's behalf, False lets it go again."""
        if pin is True:
            await self.backend.pin(mv, REPOSITORY_HOLDER)
            return
        if pin is False:
            self.backend.unpin(mv, REPOSITORY_HOLDER)
        await self.backend.load(mv)

    async def unload(self, name: str) -> None:
        await self.backend.unload(name)

    async def describe_serving(self, principal: Principal) -> dict[str, Any]:
        """Where models run (nodes, deployments, replicas, models resident where): the platform admin's view."""
        if not principal.is_platform_admin:
            raise Forbidden("the cluster's state is for the platform admin")
        return await self.backend.describe()

    def prepare(self, mv: ModelVersion) -> None:
        """Start a newly registered version's one-time preparation (a format conversion) in the background."""
        self.backend.prepare(mv)

    async def close(self) -> None:
        await self.admission.close()


#: Who pins a model through ``POST /v2/repository/models/{m}/load`` with ``{"parameters": {"pin": true}}``.
REPOSITORY_HOLDER = "repository"


@dataclass(eq=False)
class GenerationCall:
    """An admitted generation request: iterate ``events()``, add what reached the client to ``delivered``, and
    ``finish`` it once with how it ended (finishing twice does nothing)."""

    gateway: Gateway
    call: AdmittedCall
    session: GenerationSession
    delivered: int = 0
    outcome: str | None = None

    @property
    def ctx(self) -> CallContext:
        return self.call.ctx

    @property
    def mv(self) -> ModelVersion:
        return self.call.mv

    @property
    def prompt_tokens(self) -> int:
        return self.session.prompt_tokens

    async def events(self) -> AsyncIterator[TokenEvent]:
        first = True
        async for event in self.session.events():
            if first and event.text:
                first = False
                self.gateway.metrics.time_to_first_token.labels(self.mv.model).observe(
                    time.perf_counter() - self.call.started
                )
            yield event

    async def finish(self, outcome: str) -> None:
        """Settle once: meter what was delivered (a failure before any text is not charged), release the rest."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.session.cancel()  # a no-op once the engine has finished it
        try:
            if not (outcome == "error" and self.delivered == 0):
                await self.call.meter(outcome, input_tokens=self.prompt_tokens, output_tokens=self.delivered)
                self.gateway.metrics.generated_tokens.labels(self.mv.model).inc(self.delivered)
        finally:
            await self.call.close("ok" if outcome in ("stop", "length") else outcome)
            await self.session.close()
