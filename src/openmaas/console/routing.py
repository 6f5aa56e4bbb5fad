"""The console's route class: errors become pages (or a sign-in redirect), never problem JSON or a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment
from starlette.responses import HTMLResponse, Response

from openmaas.api.errors import validation_message
from openmaas.console.web import to_sign_in
from openmaas.errors import OpenMaaSError, Unauthenticated

log = logging.getLogger(__name__)


def error_page(env: Environment, request: Request, status: int, message: str) -> Response:
    if request.headers.get("hx-request"):  # a fragment: the message in place of what would have been swapped in
        body = env.get_template("_error.html").render(status=status, message=message)
    else:
        body = env.get_template("error.html").render(status=status, message=message, signed=None, path="")
    return HTMLResponse(body, status_code=status)


def console_route(env: Environment) -> type[APIRoute]:
    class ConsoleRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except Unauthenticated:
                    return to_sign_in(request)
                except OpenMaaSError as e:
                    if e.status >= 500:
                        log.error("console error", extra={"code": e.code.value, "error": e.message})
                    return error_page(env, request, e.status, e.message)
                except RequestValidationError as e:
                    _, message, _ = validation_message(e)
                    return error_page(env, request, 400, message)

            return handle

    return ConsoleRoute
