"""Sign-in and sign-out: the session cookie is an opaque random id (HttpOnly, SameSite=Lax, Secure over
HTTPS), its server-side row rotated on every sign-in and deleted on sign-out."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Form, Request
from jinja2 import Environment
from starlette.responses import HTMLResponse, RedirectResponse, Response

from openmaas.api.deps import SESSION_COOKIE, actor, check_same_origin, services
from openmaas.console.web import PREFIX, safe_next, signed_in
from openmaas.errors import InvalidCredentials, Unauthenticated
from openmaas.gateway.auth import Principal


def _form(env: Environment, request: Request, *, status: int = 200, message: str | None = None,
          email: str = "", org: str = "", next_url: str = PREFIX) -> Response:  # fmt: skip
    html = env.get_template("signin.html").render(
        signed=None, path=request.url.path, message=message, email=email, org=org, next=next_url
    )
    # The form is never cached (a shared machine's back button must not show someone's details).
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def _set_cookie(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def router(env: Environment, route_class: type) -> APIRouter:
    r = APIRouter(prefix=PREFIX, route_class=route_class, include_in_schema=False)

    @r.get("/sign-in")
    async def sign_in_form(request: Request, next: str | None = None) -> Response:
        try:
            await signed_in(request)
            return RedirectResponse(safe_next(next), status_code=303)
        except Unauthenticated:
            return _form(env, request, next_url=safe_next(next))

    @r.post("/sign-in")
    async def sign_in(
        request: Request,
        email: str = Form(default="", max_length=320),
        password: str = Form(default="", max_length=1024),
        org: str = Form(default="", max_length=128),
        next: str = Form(default=PREFIX, max_length=2048),
    ) -> Response:
        check_same_origin(request)  # no sign-in from another site's form (login CSRF)
        svc = services(request)
        destination = safe_next(next)
        try:
            token = await asyncio.to_thread(
                svc.console_sessions.sign_in,
                email,
                password,
                org,
                replacing=request.cookies.get(SESSION_COOKIE),
            )
        except InvalidCredentials as e:
            return _form(env, request, status=401, message=e.message, email=email, org=org, next_url=destination)
        found = await asyncio.to_thread(svc.console_sessions.lookup, token)
        assert found is not None
        who = Principal(kind="session", key_id=found.key_id, scopes=frozenset(), org_id=found.org_id,
                        user_id=found.user_id)  # fmt: skip
        await svc.gateway.audit_async(
            actor(request, who), "console.sign_in", f"user:{found.user_id}", org_id=found.org_id,
            after={"operator": found.operator},
        )  # fmt: skip
        response = RedirectResponse(destination, status_code=303)
        _set_cookie(response, request, token, int(svc.console_sessions.absolute.total_seconds()))
        return response

    @r.post("/switch")
    async def switch(request: Request, org: str = Form(max_length=128)) -> Response:
        """Move to another organisation the member belongs to: a new session there, this one ended."""
        check_same_origin(request)
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            raise Unauthenticated("sign in to use the console", param="session")
        svc = services(request)
        try:
            new = await asyncio.to_thread(svc.console_sessions.switch, token, org)
        except InvalidCredentials:
            raise Unauthenticated("sign in to use the console", param="session") from None
        response = RedirectResponse(PREFIX, status_code=303)
        _set_cookie(response, request, new, int(svc.console_sessions.absolute.total_seconds()))
        return response

    @r.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        check_same_origin(request)
        await asyncio.to_thread(services(request).console_sessions.sign_out, request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax")
        return response

    return r
