"""Dependencies shared by the routers: one per domain service, the gateway, and the calling principal.

The composition root (``app.py``) puts a ``Services`` on ``app.state.services``; a route names the service it
needs (``RegistryDep``, ``BillingDep``, …) and nothing else, so a route cannot reach past its domain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request

import openmaas.api.routing  # noqa: F401  (registers the {name:model} path parameter every router uses)
from openmaas.audit import Actor, AuditLog
from openmaas.batches.service import BatchService
from openmaas.billing.dedicated import DedicatedCapacity
from openmaas.billing.service import BillingService
from openmaas.datasets.service import DatasetService
from openmaas.errors import Forbidden, Unauthenticated
from openmaas.gateway.admission import BATCH_LINE, BatchLine, CallContext
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway
from openmaas.jobs.service import JobService
from openmaas.jobs.submission import JobSubmission
from openmaas.metering.usage import UsageQueries
from openmaas.registry.evaluations import EvaluationService
from openmaas.registry.service import ModelRegistry
from openmaas.tenancy.service import TenancyService
from openmaas.tenancy.sessions import ConsoleSessions, SignedIn

T = TypeVar("T")


@dataclass(frozen=True)
class Services:
    """The domain services the surfaces call (built once by the composition root)."""

    gateway: Gateway
    registry: ModelRegistry
    tenancy: TenancyService
    billing: BillingService
    dedicated: DedicatedCapacity
    usage: UsageQueries
    audit: AuditLog
    datasets: DatasetService
    jobs: JobService
    submissions: JobSubmission
    evaluations: EvaluationService
    batches: BatchService
    console_sessions: ConsoleSessions


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def _service(pick: Callable[[Services], T]) -> Callable[[Request], Awaitable[T]]:
    """A FastAPI dependency handing a route one service (async: no thread-pool hop per request)."""

    async def dependency(request: Request) -> T:
        return pick(services(request))

    return dependency


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    return bearer_of(request.headers.get("authorization"))


def bearer_of(header: str | None) -> str | None:
    """The token of an ``Authorization`` value ``Bearer <token>`` (HTTP header or gRPC metadata), if any."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def batch_line(request: Request) -> BatchLine | None:
    """The batch line this request runs, when the batch runner sent it in-process (never set from the network:
    it lives in the ASGI scope's state, which no client can write)."""
    line: BatchLine | None = request.scope.get("state", {}).get(BATCH_LINE)
    return line


# The console's sign-in cookie (an opaque id; see tenancy/sessions.py) and the scope-state entry through which a
# console page calls the API in-process as its signed-in member (no network request can set scope state).
SESSION_COOKIE = "openmaas_session"
CONSOLE_PRINCIPAL = "openmaas.console_principal"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin(request: Request) -> bool:
    """Whether the browser says this request comes from a page of this origin: ``Sec-Fetch-Site: same-origin``,
    or, from a browser that does not send it, an ``Origin`` equal to this server's."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    return origin is not None and host is not None and origin == f"{request.url.scheme}://{host}"


def check_same_origin(request: Request) -> None:
    """Refuse a state-changing request that a cookie would authenticate unless it comes from this origin (CSRF)."""
    if request.method not in SAFE_METHODS and not same_origin(request):
        raise Forbidden("cross-site request refused: this action must come from the console's own pages")


async def console_session(request: Request, cookie: str | None) -> tuple[SignedIn, Principal] | None:
    """The live console session of a cookie value and the principal it acts as; None when there is none (never
    was, expired, signed out, or its key revoked)."""
    svc = services(request)
    found = await asyncio.to_thread(svc.console_sessions.lookup, cookie) if cookie else None
    if found is None:
        return None
    try:
        return found, await asyncio.to_thread(svc.gateway.auth.by_key_id, found.key_id)
    except Unauthenticated:
        return None


async def session_principal(request: Request, cookie: str) -> Principal:
    """The principal of a console session cookie (CSRF-checked for unsafe methods); 401 once it has ended."""
    check_same_origin(request)
    session = await console_session(request, cookie)
    if session is None:
        raise Unauthenticated("Your console session has ended; sign in again.", param="session")
    return session[1]


async def principal(request: Request) -> Principal:
    """The authenticated caller; 401 in the protocol's format when the key is missing or wrong.

    A bearer key wins; without one, the console's session cookie (a signed-in member's calls from the console's
    own pages, e.g. the playground's streaming chat) is accepted, and only from this origin for unsafe methods."""
    state = request.scope.get("state", {})
    line: BatchLine | None = state.get(BATCH_LINE)
    if line is not None:
        return line.principal  # the key that created the batch, checked when the batch runner took it
    console: Principal | None = state.get(CONSOLE_PRINCIPAL)
    if console is not None:
        return console
    gw = services(request).gateway
    token = bearer_token(request)
    if token is None and SESSION_COOKIE in request.cookies and "authorization" not in request.headers:
        return await session_principal(request, request.cookies[SESSION_COOKIE])
    cached = gw.auth.cached(token)
    if cached is not None:
        return cached
    return await gw.auth.authenticate_async(token)


GatewayDep = Annotated[Gateway, Depends(_service(lambda s: s.gateway))]
RegistryDep = Annotated[ModelRegistry, Depends(_service(lambda s: s.registry))]
TenancyDep = Annotated[TenancyService, Depends(_service(lambda s: s.tenancy))]
BillingDep = Annotated[BillingService, Depends(_service(lambda s: s.billing))]
DedicatedDep = Annotated[DedicatedCapacity, Depends(_service(lambda s: s.dedicated))]
UsageDep = Annotated[UsageQueries, Depends(_service(lambda s: s.usage))]
AuditDep = Annotated[AuditLog, Depends(_service(lambda s: s.audit))]
DatasetsDep = Annotated[DatasetService, Depends(_service(lambda s: s.datasets))]
JobsDep = Annotated[JobService, Depends(_service(lambda s: s.jobs))]
SubmissionsDep = Annotated[JobSubmission, Depends(_service(lambda s: s.submissions))]
EvaluationsDep = Annotated[EvaluationService, Depends(_service(lambda s: s.evaluations))]
PrincipalDep = Annotated[Principal, Depends(principal)]


def call_context(request: Request, *fingerprint_parts: bytes) -> CallContext:
    """The gateway's view of this call: its id, and its Idempotency-Key with a fingerprint of what was asked."""
    line = batch_line(request)
    if line is not None:
        return CallContext(request_id=request.state.call_id, batch=line)
    key = request.headers.get("idempotency-key")
    return CallContext(
        request_id=request.state.call_id,
        idempotency_key=key,
        fingerprint=CallContext.fingerprint_of(request.url.path.encode(), *fingerprint_parts) if key else None,
    )


def actor(request: Request, who: Principal) -> Actor:
    """Who is acting, for the audit log (never the key itself)."""
    return Actor(
        kind=who.kind,
        key_id=who.key_id,
        user_id=who.user_id,
        client_ip=request.client.host if request.client is not None else None,
    )
