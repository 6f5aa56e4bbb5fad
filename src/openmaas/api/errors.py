"""The one table that maps catalogue error codes to each protocol's wire format."""

from __future__ import annotations

import html
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, Response

from openmaas.api.responses import JSONResponse, ProblemResponse
from openmaas.errors import REFUSALS, STATUS, ErrorCode, ModelNotFound, OpenMaaSError

log = logging.getLogger(__name__)

# OpenAI error ``type`` for each status class, as the OpenAI API uses them.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    402: "insufficient_quota",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


_CONSOLE_ERROR = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{status} - OpenMaaS console</title>'
    '<link rel="stylesheet" href="/console/static/console.css"></head><body><main class="narrow">'
    '<h1>{status}</h1><p role="alert">{message}</p><p><a href="/console">Back to the console</a></p></main></body></html>'
)

# Where a protocol's clients expect another status for the same condition.
_PROTOCOL_STATUS = {("openai", ErrorCode.OVERLOADED): 429}


# gRPC status code (by name) for each error code, for the v2 gRPC surface (api/grpc); unlisted: INTERNAL.
GRPC_STATUS: dict[ErrorCode, str] = {
    ErrorCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    ErrorCode.INVALID_CREDENTIALS: "UNAUTHENTICATED",
    ErrorCode.CLIENT_CLOSED_REQUEST: "CANCELLED",
    ErrorCode.FORBIDDEN: "PERMISSION_DENIED",
    ErrorCode.NOT_FOUND: "NOT_FOUND",
    ErrorCode.MODEL_NOT_FOUND: "NOT_FOUND",
    ErrorCode.ALREADY_EXISTS: "ALREADY_EXISTS",
    ErrorCode.INVALID_REQUEST: "INVALID_ARGUMENT",
    ErrorCode.INVALID_JSON: "INVALID_ARGUMENT",
    ErrorCode.INVALID_INPUT: "INVALID_ARGUMENT",
    ErrorCode.UNSUPPORTED_FORMAT: "INVALID_ARGUMENT",
    ErrorCode.UNSAFE_FORMAT: "INVALID_ARGUMENT",
    ErrorCode.UNSUPPORTED_OPERATION: "INVALID_ARGUMENT",
    ErrorCode.UNSUPPORTED_ENCODING: "INVALID_ARGUMENT",
    ErrorCode.EXCEEDS_LIMIT: "INVALID_ARGUMENT",
    ErrorCode.PAYLOAD_TOO_LARGE: "RESOURCE_EXHAUSTED",
    ErrorCode.METHOD_NOT_ALLOWED: "UNIMPLEMENTED",
    ErrorCode.MODEL_NOT_READY: "UNAVAILABLE",
    ErrorCode.MODEL_LOAD_FAILED: "INTERNAL",
    ErrorCode.OVERLOADED: "RESOURCE_EXHAUSTED",
    ErrorCode.RATE_LIMITED: "RESOURCE_EXHAUSTED",
    ErrorCode.QUOTA_EXCEEDED: "RESOURCE_EXHAUSTED",
    ErrorCode.STORAGE_QUOTA_EXCEEDED: "RESOURCE_EXHAUSTED",
    ErrorCode.PAYMENT_REQUIRED: "FAILED_PRECONDITION",
    ErrorCode.IDEMPOTENCY_CONFLICT: "FAILED_PRECONDITION",
    ErrorCode.IDEMPOTENCY_IN_PROGRESS: "ABORTED",
    ErrorCode.METERING_UNAVAILABLE: "UNAVAILABLE",
    ErrorCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    ErrorCode.INTERNAL: "INTERNAL",
}


def protocol_of(path: str) -> str:
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    if path == "/console" or path.startswith("/console/"):
        return "console"
    return "api"


def error_response(
    protocol: str,
    code: ErrorCode,
    message: str,
    *,
    param: str | None = None,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error in the wire format of ``protocol``: OpenAI error object, v2 ``{"error"}`` or RFC 9457."""
    status = status or _PROTOCOL_STATUS.get((protocol, code)) or STATUS[code]
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    body: dict[str, Any]
    if protocol == "openai":
        body = {
            "error": {
                "message": message,
                "type": "insufficient_quota"
                if code == ErrorCode.QUOTA_EXCEEDED
                else _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                "param": param,
                "code": code.value,
            }
        }
        return JSONResponse(body, status_code=status, headers=headers)
    if protocol == "v2":
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    if protocol == "console":
        # The console renders its own error pages; this plain page is for what reaches no console route.
        headers.pop("WWW-Authenticate", None)
        page = _CONSOLE_ERROR.format(status=status, message=html.escape(message))
        return HTMLResponse(page, status_code=status, headers=headers)
    problem: dict[str, Any] = {
        "type": f"https://openmaas.dev/errors/{code.value}",
        "title": code.value.replace("_", " ").capitalize(),
        "status": status,
        "detail": message,
        "code": code.value,
    }
    if param:
        problem["param"] = param
    return ProblemResponse(problem, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[ErrorCode, str, str | None]:
    errors = exc.errors()
    if not errors:
        return ErrorCode.INVALID_REQUEST, "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return ErrorCode.INVALID_JSON, "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return ErrorCode.INVALID_REQUEST, f"missing required parameter '{param}'", param
    return ErrorCode.INVALID_REQUEST, f"invalid value for '{param}': {msg}" if param else msg, param


def log_server_error(exc: OpenMaaSError) -> None:
    """Log a domain error the server answers with a 5xx: an error, except a refusal (``REFUSALS``), which is only
    counted (debug level here)."""
    if exc.status < 500:
        return
    if exc.code in REFUSALS:
        log.debug("refused", extra={"code": exc.code.value, "error": exc.message})
    else:
        log.error("server error", extra={"code": exc.code.value, "error": exc.message})


def domain_error_response(path: str, exc: OpenMaaSError) -> Response:
    log_server_error(exc)
    protocol = protocol_of(path)
    message = exc.triton_message if protocol == "v2" and isinstance(exc, ModelNotFound) else exc.message
    return error_response(protocol, exc.code, message, param=exc.param, headers=exc.headers)


def validation_error_response(path: str, exc: RequestValidationError) -> Response:
    code, message, param = validation_message(exc)
    return error_response(protocol_of(path), code, message, param=param)


def unexpected_error_response(path: str, exc: BaseException) -> Response:
    """500 for an exception nobody handled, logged with its traceback (the client sees only the request id)."""
    log.error("unhandled error", exc_info=exc, extra={"path": path})
    return error_response(
        protocol_of(path),
        ErrorCode.INTERNAL,
        "internal server error; the request id in X-Request-Id identifies it in the server logs",
    )


def install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenMaaSError)
        return domain_error_response(request.url.path, exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(request.url.path, exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.INVALID_REQUEST
        )
        message = str(exc.detail) if exc.detail else code.value
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(
            protocol_of(request.url.path), code, message, status=exc.status_code, headers=dict(exc.headers or {})
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_error_response(request.url.path, exc)

    app.add_exception_handler(OpenMaaSError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
