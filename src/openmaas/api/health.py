"""Process health (open: load balancers carry no keys) and Prometheus metrics (a scrape token or the
platform-admin key: the labels name every organisation's models)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from openmaas.api.deps import bearer_token, principal
from openmaas.api.responses import JSONResponse
from openmaas.errors import Forbidden


def router(metrics_token: str | None) -> APIRouter:
    r = APIRouter(tags=["health"])

    @r.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        ready = bool(getattr(request.app.state, "ready", False))
        return JSONResponse({"status": "ok" if ready else "starting"}, status_code=200 if ready else 503)

    @r.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text format; send ``Authorization: Bearer <OPENMAAS_METRICS_TOKEN or admin key>``."""
        token = bearer_token(request)
        scraper = metrics_token is not None and token is not None and hmac.compare_digest(token, metrics_token)
        if not scraper:
            who = await principal(request)  # 401 without a key or with a wrong one
            if not who.is_platform_admin:
                raise Forbidden("metrics are for the platform admin or a scraper with OPENMAAS_METRICS_TOKEN")
        data = generate_latest(request.app.state.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return r
