"""Open Inference Protocol v2 (KServe / Triton) with the binary tensor and model repository extensions."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from openmaas import __version__
from openmaas.api import v2_views as views
from openmaas.api.deps import GatewayDep, PrincipalDep, actor, call_context, principal, services
from openmaas.api.requests import deadline_from, until_disconnect
from openmaas.api.responses import JSONResponse
from openmaas.api.v2_codec import HEADER_LENGTH, decode_request, encode_response
from openmaas.errors import InvalidRequest


def health_router() -> APIRouter:
    """Liveness and readiness: open to everyone (load balancers carry no keys)."""
    router = APIRouter(prefix="/v2/health", tags=["v2"])

    @router.get("/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        is_ready = bool(getattr(request.app.state, "ready", False))
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    return router


async def infer_response(request: Request, model: str, version: str | None) -> Response:
    """POST /v2/models/{model}[/versions/{version}]/infer, JSON or binary tensors. Called by the FastAPI routes
    and by ``HotPath`` (which skips the framework: small models pay more for the request path than for the model)."""
    who = await principal(request)
    gw = services(request).gateway
    number = views.version_number(version)
    raw_length = request.headers.get(HEADER_LENGTH)
    header_length: int | None = None
    if raw_length is not None:
        try:
            header_length = int(raw_length)
        except ValueError:
            raise InvalidRequest(
                f"Inference-Header-Content-Length must be an integer, got '{raw_length}'",
                param="Inference-Header-Content-Length",
            ) from None
    body = await request.body()
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object with 'inputs'")
    decoded = decode_request(body, header_length)
    decoded.request.deadline = deadline_from(request, views.timeout_parameter(decoded.request.parameters))
    ctx = call_context(request, (raw_length or "").encode(), body)
    mv = gw.model_version(who, model, number)
    result = await until_disconnect(request, gw.infer(who, mv, decoded.request, "v2", ctx))
    content, json_length = encode_response(result, decoded.binary_outputs, decoded.default_binary)
    if json_length is None:
        return Response(content, media_type="application/json", headers=ctx.response_headers)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={**ctx.response_headers, "Inference-Header-Content-Length": str(json_length)},
    )


def router() -> APIRouter:
    r = APIRouter(prefix="/v2", tags=["v2"], dependencies=[Depends(principal)])

    @r.get("")
    async def server_metadata() -> JSONResponse:
        return JSONResponse({"name": "openmaas", "version": __version__, "extensions": views.EXTENSIONS})

    # -- statistics and model configuration extensions (before /models/{model}: "stats" is not a model) ----------

    @r.get("/models/stats")
    async def all_stats(gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        """Triton's statistics extension: every version of every model the caller can see."""
        return JSONResponse({"model_stats": views.stats_entries(gw, who, None, None)})

    @r.get("/models/{model:model}/stats")
    async def model_stats(model: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse({"model_stats": views.stats_entries(gw, who, model, None)})

    @r.get("/models/{model:model}/versions/{version}/stats")
    async def version_stats(model: str, version: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse({"model_stats": views.stats_entries(gw, who, model, views.version_number(version))})

    @r.get("/models/{model:model}/config")
    async def model_config(model: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        """Triton's model configuration extension, for tools that read it."""
        return JSONResponse(views.model_config(gw, gw.model_version(who, model)))

    @r.get("/models/{model:model}/versions/{version}/config")
    async def version_config(model: str, version: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(views.model_config(gw, gw.model_version(who, model, views.version_number(version))))

    @r.get("/models/{model:model}")
    async def model_metadata(model: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(views.model_metadata(gw, gw.model_version(who, model)))

    @r.get("/models/{model:model}/versions/{version}")
    async def version_metadata(model: str, version: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(views.model_metadata(gw, gw.model_version(who, model, views.version_number(version))))

    @r.get("/models/{model:model}/ready")
    async def model_ready(model: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        """Whether calls can be served: false while a one-time preparation (a conversion) runs."""
        mv = gw.model_version(who, model)
        return JSONResponse({"name": mv.model, "ready": gw.preparing(mv) is None})

    @r.get("/models/{model:model}/versions/{version}/ready")
    async def version_ready(model: str, version: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        mv = gw.model_version(who, model, views.version_number(version))
        return JSONResponse({"name": mv.model, "ready": gw.preparing(mv) is None})

    @r.post("/models/{model:model}/infer")
    async def infer(model: str, request: Request) -> Response:
        return await infer_response(request, model, None)

    @r.post("/models/{model:model}/versions/{version}/infer")
    async def infer_version(model: str, version: str, request: Request) -> Response:
        return await infer_response(request, model, version)

    # -- model repository extension --------------------------------------------------------------------------

    @r.post("/repository/index")
    async def repository_index(gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        entries = views.repository_index_entries(gw, who)
        return JSONResponse(entries)

    @r.post("/repository/models/{model:model}/load")
    async def repository_load(model: str, request: Request, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        """Load a model's latest version now; ``{"parameters": {"pin": true}}`` keeps it from being evicted."""
        model = views.require_manage(gw, who, model)
        pin: bool | None = None
        raw = await request.body()
        if raw.strip():
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise InvalidRequest("the request body is not valid JSON") from None
            params = body.get("parameters") if isinstance(body, dict) else None
            if isinstance(params, dict) and "pin" in params:
                pin = bool(params["pin"])
        await gw.load(gw.model_version(who, model), pin=pin)
        await gw.audit_async(actor(request, who), "model.load", model, org_id=who.org_id, after={"pin": pin})
        return JSONResponse({})

    @r.post("/repository/models/{model:model}/unload")
    async def repository_unload(model: str, request: Request, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        model = views.require_manage(gw, who, model)
        await gw.unload(model)
        await gw.audit_async(actor(request, who), "model.unload", model, org_id=who.org_id)
        return JSONResponse({})

    return r
