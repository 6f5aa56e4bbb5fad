"""The hot path: POST /v1/embeddings and POST /v2/models/{m}/infer served without the web framework's layers.

At 64 concurrent clients on two cores, every CPU-second the event loop spends comes out of the model copies'
share, and Starlette/FastAPI's layers (error middlewares, the router's scan of every route, the request/response
wrappers) were about a quarter of the loop's time per request. ``OpenMaaSApp`` hands this one route straight to
its handler, still inside ``RequestContextMiddleware`` (request id, body limit, compression, access log, HTTP
metrics), and turns exceptions into the same responses as the app's error handlers. Every other request goes
through FastAPI as before; the FastAPI routes stay too (OpenAPI, and the same handlers).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from openmaas.api.errors import domain_error_response, unexpected_error_response, validation_error_response
from openmaas.errors import OpenMaaSError

Handler = Callable[[Request], Awaitable[Response]]


class HotPath:
    """A pure ASGI app for one route's handler, with the app's error responses."""

    def __init__(self, app: FastAPI, handler: Handler) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app  # request.app.state, as under FastAPI
        request = Request(scope, receive)
        path: str = scope["path"]
        try:
            response = await self.handler(request)
        except OpenMaaSError as e:
            response = domain_error_response(path, e)
        except RequestValidationError as e:
            response = validation_error_response(path, e)
        except Exception as e:
            response = unexpected_error_response(path, e)
        await response(scope, receive, send)


class OpenMaaSApp(FastAPI):
    """FastAPI, with the routes in ``hot`` ((method, path) -> ASGI app) and ``hot_patterns`` (POST paths under
    /v2/ matching a pattern, whose named groups become ``path_params``) answered before the framework's stack."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hot: dict[tuple[str, str], ASGIApp] = {}
        self.hot_patterns: list[tuple[re.Pattern[str], ASGIApp]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            route = self.hot.get((scope["method"], path))
            if route is None and self.hot_patterns and scope["method"] == "POST" and path.startswith("/v2/"):
                for pattern, app in self.hot_patterns:
                    match = pattern.match(path)
                    if match is not None:
                        scope["path_params"] = match.groupdict()
                        route = app
                        break
            if route is not None:
                await route(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
