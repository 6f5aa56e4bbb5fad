"""Dependencies shared by the routers: the composed services and the calling principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from openmaas.audit import Actor
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import CallContext, Gateway


async def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def principal(request: Request) -> Principal:
    """The authenticated caller; 401 in the protocol's format when the key is missing or wrong."""
    gw: Gateway = request.app.state.gateway
    token = _bearer(request)
    cached = gw.auth.cached(token)
    if cached is not None:
        return cached
    return await gw.auth.authenticate_async(token)


GatewayDep = Annotated[Gateway, Depends(gateway)]
PrincipalDep = Annotated[Principal, Depends(principal)]


def call_context(request: Request, *fingerprint_parts: bytes) -> CallContext:
    """The gateway's view of this call: its id, and its Idempotency-Key with a fingerprint of what was asked."""
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
