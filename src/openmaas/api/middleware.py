"""ASGI middleware: request ids, body size limits, access logs and HTTP metrics (pure ASGI, no per-request tasks)."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openmaas.api.errors import error_response, protocol_of
from openmaas.errors import ErrorCode, PayloadTooLarge
from openmaas.telemetry import Metrics, request_id_var

log = logging.getLogger("openmaas.access")
_RID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextMiddleware:
    """Assigns a request id (echoed in X-Request-Id), enforces the body limit, logs and counts each request."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, body_limit: Callable[[str, str], int]) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit
        # Request ids: a random per-process prefix and a counter (unique, and far cheaper than uuid4 per request).
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def _next_id(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = None
        declared_length: int | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                rid = candidate if _RID_RE.match(candidate) else None
            elif name == b"content-length":
                try:
                    declared_length = int(value)
                except ValueError:
                    declared_length = None
        # call_id is always minted here (usage records are keyed by it); the id echoed and logged may be the
        # client's own X-Request-Id.
        call_id = self._next_id()
        rid = rid or call_id
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["call_id"] = call_id
        token = request_id_var.set(rid)
        path: str = scope["path"]
        protocol = protocol_of(path)
        status_holder = [500]
        rid_header = (b"x-request-id", rid.encode())

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        limit = self.body_limit(scope["method"], path)
        try:
            if declared_length is not None and declared_length > limit:
                response = error_response(
                    protocol,
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"request body of {declared_length} bytes exceeds the limit of {limit} bytes",
                )
                await response(scope, receive, send_wrapper)
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                return message

            await self.app(scope, limited_receive, send_wrapper)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            status = status_holder[0]
            self.metrics.http_requests.labels(protocol, str(status)).inc()
            log.info(
                "request",
                extra={"method": scope["method"], "path": path, "status": status, "ms": round(elapsed_ms, 2)},
            )
            request_id_var.reset(token)
