"""ASGI middleware: request ids, body size limits, access logs and HTTP metrics (pure ASGI, no per-request tasks)."""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openmaas.api.compression import chosen_encoding, compressing, inflate
from openmaas.api.errors import domain_error_response, error_response, protocol_of
from openmaas.errors import ErrorCode, OpenMaaSError, PayloadTooLarge
from openmaas.gateway.admission import BATCH_LINE
from openmaas.telemetry import Metrics, request_id_var

log = logging.getLogger("openmaas.access")
_RID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextMiddleware:
    """Assigns a request id (echoed in X-Request-Id), enforces the body limit, logs and counts each request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        body_limit: Callable[[str, str], int],
        compress_responses: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit
        self.compress_responses = compress_responses
        # Request ids: a random per-process prefix and a counter (unique, and far cheaper than uuid4 per request).
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def _next_id(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"

    @staticmethod
    async def _inflated(scope: Scope, receive: Receive, encoding: bytes, limit: int) -> tuple[Scope, Receive]:
        """The request with its compressed body inflated (within ``limit``), as if it had been sent plain."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = inflate(b"".join(chunks), encoding.decode("latin-1").strip().lower(), limit)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # a disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return {**scope, "headers": headers}, replay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = None
        declared_length: int | None = None
        encoding = accept = b""
        for name, value in scope["headers"]:
            if name == b"content-encoding":
                encoding = value
            elif name == b"accept-encoding":
                accept = value
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                rid = candidate if _RID_RE.match(candidate) else None
            elif name == b"content-length":
                try:
                    declared_length = int(value)
                except ValueError:
                    declared_length = None
        # call_id is always minted here (usage records are keyed by it); the id echoed and logged may be the
        # client's own X-Request-Id.
        state = scope.setdefault("state", {})
        # A batch line sent in-process by the batch runner carries its own id (batch and line) and is not logged
        # one access line each; nothing from the network can set the scope's state.
        in_batch = BATCH_LINE in state
        call_id = state["call_id"] if in_batch else self._next_id()
        rid = rid or call_id
        state["request_id"] = rid
        state["call_id"] = call_id
        token = request_id_var.set(rid)
        path: str = scope["path"]
        protocol = protocol_of(path)
        status_holder = [500]
        rid_header = (b"x-request-id", rid.encode())

        started_response = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
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

            app_receive: Receive = limited_receive
            respond: Send = send_wrapper
            if protocol in ("openai", "v2"):
                if encoding and encoding.lower() != b"identity":
                    scope, app_receive = await self._inflated(scope, limited_receive, encoding, limit)
                # On /v2 only inference responses, as Triton does: tritonclient's asyncio client sends aiohttp's
                # default Accept-Encoding on every call but decompresses only infer responses.
                if accept and self.compress_responses and (protocol == "openai" or path.endswith("/infer")):
                    chosen = chosen_encoding(accept.decode("latin-1"))
                    if chosen is not None:
                        respond = compressing(send_wrapper, chosen)
            await self.app(scope, app_receive, respond)
        except OpenMaaSError as e:  # raised here (inflating the body), before the app's error handlers see it
            if started_response:
                raise
            await domain_error_response(path, e)(scope, receive, send_wrapper)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000
            status = status_holder[0]
            self.metrics.http_requests_of(protocol, str(status)).inc()
            if not in_batch:
                log.info(
                    "request",
                    extra={"method": scope["method"], "path": path, "status": status, "ms": round(elapsed_ms, 2)},
                )
            request_id_var.reset(token)
