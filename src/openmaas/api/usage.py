"""Usage and audit under /api: org-scoped for org principals, everything for the platform admin."""

from __future__ import annotations

from datetime import UTC, date, datetime

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from openmaas.api.deps import AuditDep, BillingDep, PrincipalDep, TenancyDep, UsageDep, principal
from openmaas.api.responses import JSONResponse
from openmaas.api.tenancy import resolve_org
from openmaas.errors import Forbidden, InvalidRequest
from openmaas.gateway.auth import Principal
from openmaas.metering.usage import parse_group_by
from openmaas.tenancy.roles import Action
from openmaas.tenancy.service import TenancyService


def _day(value: str | None, default: date, param: str) -> str:
    if value is None:
        return default.isoformat()
    try:
        return date.fromisoformat(value[:10]).isoformat()
    except ValueError:
        raise InvalidRequest(f"'{param}' must be a date like 2026-11-23, got '{value}'", param=param) from None


async def _scope(tenancy: TenancyService, who: Principal, org: str | None, action: Action) -> tuple[str | None, bool]:
    """(org id to filter on, whether to include every org) for this principal."""
    if org is not None:
        return (await resolve_org(tenancy, who, org, action)).id, False
    if who.is_platform_admin:
        return None, True
    who.require(action)
    return who.org_id, False


def router() -> APIRouter:
    r = APIRouter(prefix="/api", tags=["usage"], dependencies=[Depends(principal)])

    @r.get("/usage")
    async def usage(
        usage: UsageDep,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        start: str | None = Query(default=None, alias="from", description="First day (default: start of month)."),
        end: str | None = Query(default=None, alias="to", description="Last day, inclusive (default: today)."),
        group_by: str | None = Query(default=None, description="Comma-separated: model, key, day, org, protocol, unit"),
        org: str | None = Query(default=None, description="Organisation (platform admin: any; default all)."),
    ) -> JSONResponse:
        today = datetime.now(UTC).date()
        first = _day(start, today.replace(day=1), "from")
        last = _day(end, today, "to")
        if first > last:
            raise InvalidRequest("'from' is after 'to'", param="from")
        groups = parse_group_by(group_by)
        org_id, all_orgs = await _scope(tenancy, who, org, "usage.read")
        rows = await run_in_threadpool(usage.summary, org_id, first, last, groups, all_orgs=all_orgs)
        empty = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "items": 0, "audio_seconds": 0, "job_seconds": 0,
                 "cost_micros": 0}  # fmt: skip
        if groups and "unit" not in groups:  # the groups partition the records: their sums are the totals
            totals = [{k: sum(row[k] for row in rows) for k in empty}] if rows else []
            if totals:
                totals[0]["audio_seconds"] = round(totals[0]["audio_seconds"], 3)
        else:
            totals = await run_in_threadpool(usage.summary, org_id, first, last, [], all_orgs=all_orgs)
        return JSONResponse(
            {
                "from": first,
                "to": last,
                "group_by": groups,
                "data": rows,
                "totals": totals[0] if totals else empty,
                "currency": billing.currency,
                # cost_micros: paid from the wallet, per call, under pay-as-you-go plans
                "cost_note": "cost_micros is what pay-as-you-go calls paid; subscription fees, overage and "
                "dedicated capacity are on the month's invoice (GET /api/orgs/{org}/invoices/draft for this month)",
            }
        )

    @r.get("/usage/records")
    async def usage_records(
        usage: UsageDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        limit: int = Query(default=100, ge=1, le=1000),
        org: str | None = Query(default=None),
    ) -> JSONResponse:
        org_id, _ = await _scope(tenancy, who, org, "usage.read")
        records = await run_in_threadpool(usage.records, org_id, limit)
        return JSONResponse({"records": records})

    @r.get("/audit")
    async def audit(
        audit_log: AuditDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        after: int = Query(default=0, ge=0, description="Return events after this sequence number."),
        limit: int = Query(default=100, ge=1, le=1000),
        org: str | None = Query(default=None),
    ) -> JSONResponse:
        org_id, _ = await _scope(tenancy, who, org, "audit.read")
        events = await run_in_threadpool(audit_log.list, org_id, after_seq=after, limit=limit)
        return JSONResponse({"events": [e.to_json() for e in events]})

    @r.get("/audit/verify")
    async def audit_verify(audit_log: AuditDep, who: PrincipalDep) -> JSONResponse:
        """Check the whole hash chain; says which event first fails, if any."""
        if not who.is_platform_admin:
            raise Forbidden("verifying the audit chain is for the platform admin")
        result = await run_in_threadpool(audit_log.verify)
        return JSONResponse(result.to_json())

    return r
