"""The error catalogue: every domain error has a code; each protocol maps codes to its wire format in api/errors.py."""

from __future__ import annotations

import math
from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable error codes. The HTTP status of each lives in ``STATUS``."""

    UNAUTHENTICATED = "invalid_api_key"
    INVALID_CREDENTIALS = "invalid_credentials"
    CLIENT_CLOSED_REQUEST = "client_closed_request"
    FORBIDDEN = "permission_denied"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    ALREADY_EXISTS = "already_exists"
    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    INVALID_INPUT = "invalid_input"
    UNSUPPORTED_FORMAT = "unsupported_format"
    UNSAFE_FORMAT = "unsafe_format"
    UNSUPPORTED_OPERATION = "unsupported_operation"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_ENCODING = "unsupported_content_encoding"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MODEL_NOT_READY = "model_not_ready"
    MODEL_LOAD_FAILED = "model_load_failed"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limit_exceeded"
    EXCEEDS_LIMIT = "request_exceeds_limit"
    QUOTA_EXCEEDED = "insufficient_quota"
    STORAGE_QUOTA_EXCEEDED = "storage_quota_exceeded"
    PAYMENT_REQUIRED = "payment_required"
    IDEMPOTENCY_CONFLICT = "idempotency_key_reused"
    IDEMPOTENCY_IN_PROGRESS = "idempotency_key_in_use"
    METERING_UNAVAILABLE = "metering_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal_error"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.INVALID_CREDENTIALS: 401,
    # nginx's code for a request the client abandoned: only the access log and metrics see it.
    ErrorCode.CLIENT_CLOSED_REQUEST: 499,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.UNSUPPORTED_FORMAT: 400,
    ErrorCode.UNSAFE_FORMAT: 400,
    ErrorCode.UNSUPPORTED_OPERATION: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_ENCODING: 415,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.MODEL_NOT_READY: 503,
    ErrorCode.MODEL_LOAD_FAILED: 500,
    # 503 by default; the OpenAI surface answers 429, as OpenAI clients retry that (api/errors.py).
    ErrorCode.OVERLOADED: 503,
    ErrorCode.RATE_LIMITED: 429,
    # Larger than a limit allows at all (a key's per-minute limit, a monthly quota): retrying cannot help.
    ErrorCode.EXCEEDS_LIMIT: 400,
    ErrorCode.QUOTA_EXCEEDED: 429,
    # An upload that would take the organisation's stored files past its quota: delete files first.
    ErrorCode.STORAGE_QUOTA_EXCEEDED: 413,
    ErrorCode.PAYMENT_REQUIRED: 402,
    ErrorCode.IDEMPOTENCY_CONFLICT: 422,
    ErrorCode.IDEMPOTENCY_IN_PROGRESS: 409,
    # The call ran but its usage could not be made durable, so its result is withheld: retry.
    ErrorCode.METERING_UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.INTERNAL: 500,
}

#: 5xx answers that refuse work the server cannot take now (back-pressure, a model still being prepared): the
#: client is told when to retry and the metrics count them by status, so they are not logged as the server's
#: errors (a flood logged an error line for every refused request, at the moment the server had least to spare).
REFUSALS = frozenset({ErrorCode.OVERLOADED, ErrorCode.MODEL_NOT_READY})


class OpenMaaSError(Exception):
    """A domain error with a catalogue code, a human message and optionally the offending parameter."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross processes (a Ray replica's reach the gateway): rebuilt from their state, whatever arguments
        # a subclass's __init__ takes.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[OpenMaaSError], message: str, state: dict[str, object]) -> OpenMaaSError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class Unauthenticated(OpenMaaSError):
    code = ErrorCode.UNAUTHENTICATED


class InvalidCredentials(Unauthenticated):
    """A sign-in with a wrong email, password or organisation (401, not about an API key)."""

    code = ErrorCode.INVALID_CREDENTIALS


class ClientClosedRequest(OpenMaaSError):
    """The client went away before its answer was ready (logged as 499; nobody reads the response)."""

    code = ErrorCode.CLIENT_CLOSED_REQUEST


class Forbidden(OpenMaaSError):
    code = ErrorCode.FORBIDDEN


class NotFound(OpenMaaSError):
    code = ErrorCode.NOT_FOUND


class ModelNotFound(OpenMaaSError):
    code = ErrorCode.MODEL_NOT_FOUND

    def __init__(self, name: str, version: str | int | None = None) -> None:
        what = f"model '{name}'" if version is None else f"version {version} of model '{name}'"
        super().__init__(f"The {what} does not exist or you do not have access to it.", param="model")
        self.model_name = name
        self.version = version

    @property
    def triton_message(self) -> str:
        """Triton's wording, which tools that speak the v2 protocol match on."""
        if self.version is None:
            return f"Request for unknown model: '{self.model_name}' is not found"
        return f"Request for unknown model: '{self.model_name}' version {self.version} is not found"


class AlreadyExists(OpenMaaSError):
    code = ErrorCode.ALREADY_EXISTS


class InvalidRequest(OpenMaaSError):
    code = ErrorCode.INVALID_REQUEST


class InvalidInput(OpenMaaSError):
    """A tensor or text input that does not match the model's signature."""

    code = ErrorCode.INVALID_INPUT


class UnsupportedFormat(OpenMaaSError):
    code = ErrorCode.UNSUPPORTED_FORMAT


class UnsafeFormat(OpenMaaSError):
    """A model file that could run code when loaded (pickle and friends)."""

    code = ErrorCode.UNSAFE_FORMAT


class PayloadTooLarge(OpenMaaSError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedEncoding(OpenMaaSError):
    code = ErrorCode.UNSUPPORTED_ENCODING


class ModelLoadFailed(OpenMaaSError):
    code = ErrorCode.MODEL_LOAD_FAILED


class ModelNotReady(OpenMaaSError):
    """The model is still being prepared (a one-time conversion): retry after ``retry_after`` seconds."""

    code = ErrorCode.MODEL_NOT_READY

    def __init__(self, message: str, retry_after: float = 10.0) -> None:
        seconds = max(1, round(retry_after))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class Overloaded(OpenMaaSError):
    """The model's queue (or the memory budget) is full: retry after ``retry_after`` seconds."""

    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        seconds = max(1, round(retry_after))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class RateLimited(OpenMaaSError):
    """A key's requests/tokens/items per minute or concurrency limit is reached."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, retry_after: float = 1.0) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, headers={**(headers or {}), "Retry-After": str(seconds)})
        self.retry_after = seconds


class ExceedsLimit(OpenMaaSError):
    """The request alone is larger than a limit allows, so no wait makes it pass (400, not a retryable 429)."""

    code = ErrorCode.EXCEEDS_LIMIT


class QuotaExceeded(OpenMaaSError):
    """An organisation's monthly quota of a unit is used up."""

    code = ErrorCode.QUOTA_EXCEEDED

    def __init__(self, message: str, *, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, headers={"Retry-After": str(seconds)})


class DeadlineExceeded(OpenMaaSError):
    code = ErrorCode.DEADLINE_EXCEEDED


class BatchMismatch(OpenMaaSError):
    """A runtime returned a different number of rows than the batch it was given (a server fault)."""

    code = ErrorCode.INTERNAL
