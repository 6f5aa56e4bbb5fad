"""OpenAI-compatible endpoints: models and embeddings (the official ``openai`` SDK works unchanged)."""

from __future__ import annotations

import base64
from typing import Any, Literal, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from openmaas.api.deps import GatewayDep, PrincipalDep, call_context, principal, services
from openmaas.api.requests import deadline_from, until_disconnect
from openmaas.api.responses import JSONResponse
from openmaas.entities.models import Model
from openmaas.errors import ErrorCode, InvalidRequest, OpenMaaSError
from openmaas.gateway.service import Gateway

B = TypeVar("B", bound=BaseModel)


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


async def parse_body(request: Request, model: type[B]) -> B:
    """The JSON body as ``model``, whatever Content-Type the client sent (curl -d sends a form type)."""
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise OpenMaaSError(f"the request body is not valid JSON: {e}", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _model_object(gw: Gateway, model: Model) -> dict[str, Any]:
    """OpenAI's model object, plus what the model is for (``task`` from its card, ``serves``: embeddings,
    generation, speech or tensors) so a client can find, say, the text-generation models."""
    mv = gw.latest(model)
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": model.owner_org_id or "openmaas",
        "task": mv.card.task,
        "serves": gw.served_as(mv),
    }


def router(max_inputs: int) -> APIRouter:
    # /v1/embeddings authenticates inside its handler (``embeddings_response``), which ``api/hot.py`` also serves
    # without the framework; this route stays for the OpenAPI schema and has no dependencies of its own.
    r = APIRouter(prefix="/v1", tags=["openai"])

    @r.get("/models", dependencies=[Depends(principal)])
    async def list_models(gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_object(gw, m) for m in gw.list_models(who)]})

    @r.get("/models/{model_id:model}", dependencies=[Depends(principal)])
    async def get_model(model_id: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(_model_object(gw, gw.get_model(who, model_id)))

    @r.post(
        "/embeddings",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": EmbeddingsRequest.model_json_schema()}},
            }
        },
    )
    async def embeddings(request: Request) -> JSONResponse:
        return await embeddings_response(request, max_inputs)

    return r


async def embeddings_response(request: Request, max_inputs: int) -> JSONResponse:
    """POST /v1/embeddings. Called by the FastAPI route and by ``HotPath`` (which skips the framework)."""
    who = await principal(request)
    gw = services(request).gateway
    body = await parse_body(request, EmbeddingsRequest)
    ctx = call_context(request, await request.body())
    texts = _texts(body.input, max_inputs)
    mv = gw.model_version(who, body.model)
    if body.dimensions is not None:
        spec = mv.signature.output("embedding")
        native = spec.shape[-1] if spec is not None else None
        if body.dimensions != native:
            raise InvalidRequest(
                f"model '{body.model}' produces {native}-dimensional embeddings and cannot shorten them; "
                f"omit 'dimensions' or set it to {native}",
                param="dimensions",
            )
    result = await until_disconnect(request, gw.embed(who, mv, texts, "openai", deadline_from(request), ctx))
    vectors = result.outputs["embedding"]
    data: list[dict[str, Any]] = []
    for i, vec in enumerate(vectors):
        value: Any = (
            base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode()
            if body.encoding_format == "base64"
            else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = int(result.tokens.sum()) if result.tokens is not None else 0
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=ctx.response_headers,
    )


def _texts(value: str | list[str] | list[int] | list[list[int]], max_inputs: int) -> list[str]:
    if isinstance(value, str):
        texts = [value]
    else:
        if not value:
            raise InvalidRequest("'input' must not be an empty list", param="input")
        if not all(isinstance(v, str) for v in value):
            raise InvalidRequest(
                "token-id input is not supported: token ids depend on the tokenizer; send the text instead",
                param="input",
            )
        texts = list(value)  # type: ignore[arg-type]
    if len(texts) > max_inputs:
        raise InvalidRequest(f"'input' has {len(texts)} items; the limit is {max_inputs}", param="input")
    for i, t in enumerate(texts):
        if not t:
            raise InvalidRequest(f"input[{i}] is an empty string", param="input")
    return texts
