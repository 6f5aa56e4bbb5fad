"""Process health and Prometheus metrics (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from openmaas.api.responses import JSONResponse


def router() -> APIRouter:
    r = APIRouter(tags=["health"])

    @r.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        ready = bool(getattr(request.app.state, "ready", False))
        return JSONResponse({"status": "ok" if ready else "starting"}, status_code=200 if ready else 503)

    @r.get("/metrics")
    async def metrics(request: Request) -> Response:
        data = generate_latest(request.app.state.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return r
