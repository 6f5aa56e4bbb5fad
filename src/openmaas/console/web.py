"""What every console page shares: templates, the signed-in member, in-process API calls, security headers."""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openmaas.api import inprocess
from openmaas.api.deps import CONSOLE_PRINCIPAL, SESSION_COOKIE, check_same_origin, console_session, services
from openmaas.errors import ErrorCode, NotFound, OpenMaaSError, Unauthenticated
from openmaas.gateway.auth import Principal
from openmaas.tenancy.sessions import Membership, SignedIn

HERE = Path(__file__).parent
PREFIX = "/console"

# Sent with every console response (pages, fragments, static files, errors).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class ConsoleHeaders:
    """Adds the security headers to every response under /console (pure ASGI)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k for k, _ in message.get("headers", ())}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _money(micros: int | None, currency: str = "") -> str:
    value = (micros or 0) / 1_000_000
    return f"{value:,.2f} {currency}".strip() if abs(value) >= 0.01 or not value else f"{value:,.6f} {currency}".strip()


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _when(value: str | None) -> str:
    if not value:
        return ""
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return value


def templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["money"] = _money
    env.filters["number"] = _number
    env.filters["when"] = _when
    env.filters["quote"] = lambda s: urllib.parse.quote(str(s), safe="/")
    return env


@dataclass
class Page:
    """One request's view of the console: who is signed in, and the API as that member."""

    request: Request
    signed: SignedIn
    principal: Principal
    env: Environment
    errors: list[str] = field(default_factory=list)
    # The organisations the member may switch to (the header's switcher, when there are several).
    orgs: list[Membership] = field(default_factory=list)

    @property
    def org(self) -> str | None:
        return self.signed.org_id

    async def api(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                  content_type: str = "application/json", **query: Any) -> inprocess.Answer:  # fmt: skip
        """``method path`` on the platform's API as the signed-in member (the API's checks, errors and audit)."""
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
        q = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None and v != ""})
        state = {CONSOLE_PRINCIPAL: self.principal}
        return await inprocess.call(
            self.request.app, method, path, body=data, query=q, content_type=content_type, state=state
        )

    async def get(self, path: str, **query: Any) -> Any:
        """The JSON of a GET, or raise the API's error as a domain error (shown on the page)."""
        answer = await self.api("GET", path, **query)
        return json_or_raise(answer)

    async def send(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        answer = await self.api(method, path, body=body, **kwargs)
        return json_or_raise(answer)

    async def forward(self, path: str) -> Any:
        """POST this request's own (multipart) body to an API route as it came: the API parses, limits and checks
        it; its JSON, or its error raised."""
        body = await self.request.body()
        answer = await self.api("POST", path, raw=body, content_type=self.request.headers.get("content-type", ""))
        return json_or_raise(answer)

    async def try_get(self, path: str, default: Any = None, **query: Any) -> Any:
        """A GET whose failure (e.g. too little right for this section) leaves ``default`` and a note."""
        try:
            return await self.get(path, **query)
        except OpenMaaSError as e:
            if e.status >= 500:
                self.errors.append(e.message)
            return default

    def render(self, name: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any) -> Response:
        html = self.env.get_template(name).render(
            signed=self.signed,
            path=self.request.url.path,
            errors=self.errors,
            memberships=self.orgs,
            base_url=str(self.request.base_url).rstrip("/"),
            **context,
        )
        return HTMLResponse(html, status_code=status, headers=headers)


class ApiAnswerError(OpenMaaSError):
    """An API error met by a console page, with the API's own status and wording."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, status: int, message: str, code: ErrorCode) -> None:
        super().__init__(message, code=code)
        self._status = status

    @property
    def status(self) -> int:
        return self._status


def json_or_raise(answer: inprocess.Answer) -> Any:
    if answer.status < 400:
        return answer.json()
    try:
        problem = answer.json() or {}
    except orjson.JSONDecodeError:
        problem = {}
    if isinstance(problem.get("error"), dict):  # an OpenAI-shaped error from /v1
        problem = {"detail": problem["error"].get("message"), "code": problem["error"].get("code")}
    elif isinstance(problem.get("error"), str):  # v2
        problem = {"detail": problem["error"]}
    try:
        code = ErrorCode(str(problem.get("code")))
    except ValueError:
        code = ErrorCode.INTERNAL if answer.status >= 500 else ErrorCode.INVALID_REQUEST
    raise ApiAnswerError(answer.status, str(problem.get("detail") or f"HTTP {answer.status}"), code)


async def signed_in(request: Request) -> tuple[SignedIn, Principal]:
    """The live session of this request and its principal; raise Unauthenticated otherwise."""
    session = await console_session(request, request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise Unauthenticated("sign in to use the console", param="session")
    return session


async def page(request: Request, env: Environment, *, operator: bool = False) -> Page:
    """The Page for a console request: signed in (else Unauthenticated), CSRF-checked for unsafe methods, and
    for operator pages a platform admin (else NotFound, as if the page did not exist)."""
    check_same_origin(request)
    signed, who = await signed_in(request)
    if operator and not who.is_platform_admin:
        raise NotFound(f"no such page: {request.url.path}")
    orgs = [] if request.headers.get("hx-request") else await asyncio.to_thread(
        services(request).console_sessions.memberships, signed.user_id
    )  # fmt: skip
    return Page(request, signed, who, env, orgs=orgs)


def to_sign_in(request: Request) -> Response:
    """Where an unauthenticated page request goes: the sign-in page, back to this page afterwards; an htmx
    fragment is told to reload the whole page instead of swapping a sign-in form into a corner."""
    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = f"{PREFIX}/sign-in?next={urllib.parse.quote(back, safe='')}"
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def safe_next(value: str | None) -> str:
    """A post-sign-in destination inside the console only (never an open redirect)."""
    if value and value.startswith(PREFIX) and not value.startswith("//") and "\\" not in value:
        return value
    return PREFIX
