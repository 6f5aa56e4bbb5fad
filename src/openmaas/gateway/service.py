"""The gateway: authenticate, authorise, admit, dispatch to serving, and record the outcome."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from openmaas.errors import Forbidden, InvalidInput, ModelNotFound, OpenMaaSError
from openmaas.gateway.auth import KeyAuthenticator, Principal
from openmaas.registry.models import Model, ModelVersion
from openmaas.registry.service import ModelRegistry
from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime
from openmaas.serving.pool import ResidencyPool
from openmaas.serving.types import InferenceRequest, InferenceResponse
from openmaas.serving.validation import validate_request
from openmaas.telemetry import Metrics


def _cost(mv: ModelVersion, request: InferenceRequest, rows: int) -> int:
    """What a request weighs in a batch: estimated tokens for text models (about 4 bytes each), else rows."""
    text = request.inputs.get("text")
    if mv.format == SentenceTransformerRuntime.format and text is not None:
        return int(sum(len(t) // 4 + 2 for t in text.reshape(-1)))
    return rows


class Gateway:
    """The one entry point surfaces call for anything that touches models."""

    def __init__(self, auth: KeyAuthenticator, registry: ModelRegistry, pool: ResidencyPool, metrics: Metrics) -> None:
        self.auth = auth
        self.registry = registry
        self.pool = pool
        self.metrics = metrics

    # -- visibility -------------------------------------------------------------------------------------------

    def can_see(self, principal: Principal, model: Model) -> bool:
        if principal.is_platform_admin or model.visibility == "public":
            return True
        return model.owner_org_id is not None and model.owner_org_id == principal.org_id

    def list_models(self, principal: Principal) -> list[Model]:
        return [m for m in self.registry.list_models() if self.can_see(principal, m)]

    def get_model(self, principal: Principal, name: str) -> Model:
        model = self.registry.get_model(name)
        if not self.can_see(principal, model):
            raise ModelNotFound(name)  # exactly as if it did not exist
        return model

    def model_version(self, principal: Principal, name: str, version: int | None = None) -> ModelVersion:
        mv = self.registry.resolve(name, version)
        if not principal.is_platform_admin:
            self.get_model(principal, name)
        return mv

    # -- inference --------------------------------------------------------------------------------------------

    async def infer(
        self, principal: Principal, name: str, version: int | None, request: InferenceRequest, protocol: str
    ) -> InferenceResponse:
        """Validate, run and account for one tensor inference request."""
        if not principal.has_scope("inference"):
            raise Forbidden("this API key lacks the 'inference' scope")
        mv = self.model_version(principal, name, version)
        rows = validate_request(mv.signature, request)
        started = time.perf_counter()
        status = "error"
        self.metrics.in_flight.labels(mv.model).inc()
        try:
            result = await self.pool.infer(mv, request.inputs, rows, _cost(mv, request, rows), request.deadline)
            wanted = request.outputs or [o.name for o in mv.signature.outputs]
            outputs = {k: result.outputs[k] for k in wanted}
            status = "ok"
            return InferenceResponse(
                model=mv.model, version=mv.version, outputs=outputs, tokens=result.tokens, id=request.id
            )
        except OpenMaaSError as e:
            status = str(e.status)
            raise
        except asyncio.CancelledError:
            status = "cancelled"  # the client went away
            raise
        finally:
            self.metrics.in_flight.labels(mv.model).dec()
            labels = (mv.model, str(mv.version), protocol, status)
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)

    async def embed(
        self, principal: Principal, name: str, texts: list[str], protocol: str, deadline: float | None = None
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
        return await self.infer(principal, name, None, request, protocol)
