"""Dependencies shared by the routers: the composed services and the calling principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway


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
    return await run_in_threadpool(gw.auth.authenticate, token)


GatewayDep = Annotated[Gateway, Depends(gateway)]
PrincipalDep = Annotated[Principal, Depends(principal)]
