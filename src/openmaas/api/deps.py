"""Dependencies shared by the routers: one per domain service, the gateway, and the calling principal.

The composition root (``app.py``) puts a ``Services`` on ``app.state.services``; a route names the service it
needs (``RegistryDep``, ``BillingDep``, …) and nothing else, so a route cannot reach past its domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from openmaas.audit import Actor, AuditLog
from openmaas.billing.dedicated import DedicatedCapacity
from openmaas.billing.service import BillingService
from openmaas.datasets.service import DatasetService
from openmaas.gateway.admission import CallContext
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway
from openmaas.jobs.service import JobService
from openmaas.jobs.submission import JobSubmission
from openmaas.metering.usage import UsageQueries
from openmaas.registry.service import ModelRegistry
from openmaas.tenancy.service import TenancyService


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


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


async def gateway(request: Request) -> Gateway:
    return services(request).gateway


async def registry(request: Request) -> ModelRegistry:
    return services(request).registry


async def tenancy(request: Request) -> TenancyService:
    return services(request).tenancy


async def billing(request: Request) -> BillingService:
    return services(request).billing


async def dedicated(request: Request) -> DedicatedCapacity:
    return services(request).dedicated


async def usage(request: Request) -> UsageQueries:
    return services(request).usage


async def audit_log(request: Request) -> AuditLog:
    return services(request).audit


async def datasets(request: Request) -> DatasetService:
    return services(request).datasets


async def jobs(request: Request) -> JobService:
    return services(request).jobs


async def submissions(request: Request) -> JobSubmission:
    return services(request).submissions


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
    gw = services(request).gateway
    token = _bearer(request)
    cached = gw.auth.cached(token)
    if cached is not None:
        return cached
    return await gw.auth.authenticate_async(token)


GatewayDep = Annotated[Gateway, Depends(gateway)]
RegistryDep = Annotated[ModelRegistry, Depends(registry)]
TenancyDep = Annotated[TenancyService, Depends(tenancy)]
BillingDep = Annotated[BillingService, Depends(billing)]
DedicatedDep = Annotated[DedicatedCapacity, Depends(dedicated)]
UsageDep = Annotated[UsageQueries, Depends(usage)]
AuditDep = Annotated[AuditLog, Depends(audit_log)]
DatasetsDep = Annotated[DatasetService, Depends(datasets)]
JobsDep = Annotated[JobService, Depends(jobs)]
SubmissionsDep = Annotated[JobSubmission, Depends(submissions)]
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
