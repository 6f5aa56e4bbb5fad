"""Request helpers shared by the protocol surfaces: deadlines and client disconnects."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from openmaas.errors import ClientClosedRequest, InvalidRequest

T = TypeVar("T")

TIMEOUT_HEADER = "x-request-timeout"
# The openai SDK tells the server how long it will wait; past that, work on the request is wasted.
OPENAI_SDK_TIMEOUT_HEADER = "x-stainless-timeout"


def deadline_from(request: Request, timeout_s: float | None = None) -> float | None:
    """time.monotonic() deadline from an explicit timeout, X-Request-Timeout (seconds) or the SDK's header."""
    candidates = []
    if timeout_s is not None:
        candidates.append(timeout_s)
    for header in (TIMEOUT_HEADER, OPENAI_SDK_TIMEOUT_HEADER):
        raw = request.headers.get(header)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            if header == TIMEOUT_HEADER:
                raise InvalidRequest(f"X-Request-Timeout must be seconds, got '{raw}'", param=header) from None
            continue
        if not math.isfinite(value) or value <= 0:
            if header == TIMEOUT_HEADER:
                raise InvalidRequest("X-Request-Timeout must be a positive number of seconds", param=header)
            continue
        candidates.append(value)
    return time.monotonic() + min(candidates) if candidates else None


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` in this task, cancelling it if the client disconnects first (so it leaves any queue it waits
    in). One watcher task a request: the work runs in the caller's own task, not in a second one."""
    current = asyncio.current_task()
    if current is None:  # pragma: no cover - always called from a request's task
        return await work
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone = True
                current.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        # Our own cancellation, and nobody else's: answer as an error, not a traceback.
        if gone and current.uncancel() == 0:
            raise ClientClosedRequest("the client closed the connection before the answer was ready") from None
        raise
    finally:
        watcher.cancel()
