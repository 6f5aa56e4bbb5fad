"""Billing API under /api: plans, subscriptions, wallets, invoices, provider statements, books check."""

from __future__ import annotations

import csv
import html
import io
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from openmaas.api.deps import (
    BillingDep,
    DedicatedDep,
    GatewayDep,
    PrincipalDep,
    TenancyDep,
    actor,
    principal,
)
from openmaas.api.responses import JSONResponse
from openmaas.api.tenancy import resolve_org
from openmaas.billing.money import format_micros
from openmaas.billing.plans import PlanSpec, month_bounds
from openmaas.billing.service import BillingService
from openmaas.errors import Forbidden, InvalidRequest, NotFound
from openmaas.gateway.auth import Principal


class SubscriptionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    plan: str = Field(description="Plan name or id.")


class CreditCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount_micros: int = Field(gt=0)
    reference: str = Field(min_length=1, max_length=255, description="Adding the same reference twice adds once.")


def _admin_only(who: Principal, what: str) -> None:
    if not who.is_platform_admin:
        raise Forbidden(f"{what} is for the platform admin")


async def _invoice_for(billing: BillingService, who: Principal, invoice_id: str) -> dict[str, Any]:
    try:
        invoice = await run_in_threadpool(billing.books.invoice, invoice_id)
        who.require("usage.read", invoice["org_id"])
    except NotFound:
        raise NotFound(
            f"invoice '{invoice_id}' does not exist or you do not have access to it", param="invoice"
        ) from None
    return invoice


def _instant(value: str, param: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"'{param}' must be a time like 2026-12-01T10:00:00Z, got '{value}'", param=param
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _invoice_response(request: Request, inv: dict[str, Any], format: str | None) -> Response:
    accept = request.headers.get("accept", "")
    kind = format or ("csv" if "text/csv" in accept else "html" if "text/html" in accept else "json")
    if kind == "csv":
        name = f"invoice-{inv['period']}-{'draft' if inv.get('draft') else inv['id'][:8]}.csv"
        return Response(
            invoice_csv(inv), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )
    if kind == "html":
        return Response(invoice_html(inv), media_type="text/html")
    if kind != "json":
        raise InvalidRequest("format must be json, csv or html", param="format")
    return JSONResponse(inv)


def invoice_csv(invoice: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "line",
            "kind",
            "description",
            "model",
            "provider",
            "plan",
            "quantity",
            "unit",
            "pricing",
            "records",
            "prepaid",
            f"amount ({invoice['currency']})",
        ]
    )
    for line in invoice["lines"]:
        writer.writerow(
            [
                line["n"],
                line["kind"],
                line["description"],
                line["model"],
                line.get("provider", ""),
                line["plan"],
                line["quantity"],
                line.get("unit", ""),
                line.get("pricing", {}).get("text", ""),
                line["records"],
                "yes" if line["prepaid"] else "no",
                format_micros(line["amount_micros"]),
            ]
        )
    pad = [""] * 9
    writer.writerow(["", "total", *pad, format_micros(invoice["total_micros"])])
    writer.writerow(["", "paid from wallet", *pad, format_micros(invoice["prepaid_micros"])])
    writer.writerow(["", "due", *pad, format_micros(invoice["due_micros"])])
    return out.getvalue()


def invoice_html(invoice: dict[str, Any]) -> str:
    org_name = invoice["org_name"]
    e = html.escape
    cur = e(invoice["currency"])
    rows = "\n".join(
        f"<tr><td>{line['n']}</td><td>{e(line['description'])}<br><small>{e(line.get('provider', ''))}"
        f"{': ' if line.get('pricing') else ''}{e(line.get('pricing', {}).get('text', ''))}</small></td>"
        f"<td class=n>{line['quantity']}</td>"
        f"<td class=n>{line['records']}</td><td class=n>{e(format_micros(line['amount_micros']))}</td></tr>"
        for line in invoice["lines"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {e(invoice["period"])} - {e(org_name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ccc;padding:.4em;text-align:left}}.n{{text-align:right}}
@media print{{body{{margin:0}}}}</style></head>
<body><h1>{"Draft invoice" if invoice.get("draft") else "Invoice"} {e(invoice["period"])}</h1>
<p>Organisation: <strong>{e(org_name)}</strong><br>{
        f"As of {e(invoice['as_of'][:16])} UTC: not issued, it changes until the month is closed"
        if invoice.get("draft")
        else f"Invoice: {e(invoice['id'])}<br>Issued: {e(invoice['created_at'][:10])}"
    }</p>
<table><thead><tr><th>#</th><th>Description</th><th class=n>Quantity</th><th class=n>Calls</th><th class=n>Amount ({
        cur
    })</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot><tr><th></th><th>Total</th><th></th><th></th><th class=n>{e(format_micros(invoice["total_micros"]))}</th></tr>
<tr><td></td><td>Paid from the prepaid wallet</td><td></td><td></td><td class=n>{
        e(format_micros(invoice["prepaid_micros"]))
    }</td></tr>
<tr><th></th><th>Due</th><th></th><th></th><th class=n>{
        e(format_micros(invoice["due_micros"]))
    }</th></tr></tfoot></table>
</body></html>
"""


def router() -> APIRouter:
    r = APIRouter(prefix="/api", tags=["billing"], dependencies=[Depends(principal)])

    # -- plans ----------------------------------------------------------------------------------------------------

    @r.post("/models/{name:model}/plans", status_code=201)
    async def create_plan(
        name: str, request: Request, gw: GatewayDep, billing: BillingDep, who: PrincipalDep
    ) -> JSONResponse:
        """Publish a service package for a model your organisation owns."""
        model = gw.get_model(who, name)
        if not who.is_platform_admin and model.owner_org_id != who.org_id:
            raise Forbidden("only the model's owner organisation sells it")
        who.require("models.manage")
        name = model.name
        try:
            spec = PlanSpec.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidRequest(f"invalid plan field '{where}': {first['msg']}", param=where) from None
        plan = await run_in_threadpool(billing.create_plan, name, spec)
        await gw.audit_async(
            actor(request, who), "plan.create", f"model:{name}", org_id=model.owner_org_id, after=plan.to_json()
        )
        return JSONResponse(plan.to_json(), status_code=201)

    @r.get("/models/{name:model}/plans")
    async def list_plans(name: str, gw: GatewayDep, billing: BillingDep, who: PrincipalDep) -> JSONResponse:
        name = gw.get_model(who, name).name
        plans = await run_in_threadpool(lambda: billing.plans(name, fresh=True))
        return JSONResponse({"plans": [p.to_json() for p in plans], "currency": billing.currency})

    # -- subscriptions --------------------------------------------------------------------------------------------

    @r.post("/orgs/{org}/subscriptions", status_code=201)
    async def subscribe(
        org: str,
        body: SubscriptionCreate,
        request: Request,
        gw: GatewayDep,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
    ) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "billing")
        model = gw.get_model(who, body.model).name
        sub = await run_in_threadpool(billing.subscribe, found.id, model, body.plan)
        await gw.audit_async(
            actor(request, who), "subscription.create", f"subscription:{sub['id']}", org_id=found.id, after=sub
        )
        return JSONResponse(sub, status_code=201)

    @r.get("/orgs/{org}/subscriptions")
    async def subscriptions(org: str, billing: BillingDep, who: PrincipalDep, tenancy: TenancyDep) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "usage.read")
        return JSONResponse({"subscriptions": await run_in_threadpool(billing.subscriptions, found.id)})

    @r.delete("/orgs/{org}/subscriptions/{sub_id}")
    async def cancel(
        org: str,
        sub_id: str,
        request: Request,
        gw: GatewayDep,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
    ) -> JSONResponse:
        """Cancel at the end of the current period."""
        found = await resolve_org(tenancy, who, org, "billing")
        result = await run_in_threadpool(billing.cancel, found.id, sub_id)
        await gw.audit_async(
            actor(request, who), "subscription.cancel", f"subscription:{sub_id}", org_id=found.id, after=result
        )
        return JSONResponse(result)

    # -- dedicated capacity ---------------------------------------------------------------------------------------

    @r.post("/orgs/{org}/dedicated", status_code=201)
    async def start_dedicated(
        org: str,
        body: SubscriptionCreate,
        request: Request,
        gw: GatewayDep,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        dedicated: DedicatedDep,
    ) -> JSONResponse:
        """Reserve a model under a dedicated plan: it is loaded and kept resident, billed per started minute."""
        found = await resolve_org(tenancy, who, org, "billing")
        model = gw.get_model(who, body.model).name
        result = await dedicated.start(found.id, model, body.plan)
        await gw.audit_async(actor(request, who), "dedicated.start", f"model:{model}", org_id=found.id, after=result)
        return JSONResponse(result, status_code=201)

    @r.delete("/orgs/{org}/dedicated/{reservation_id}")
    async def stop_dedicated(
        org: str,
        reservation_id: str,
        request: Request,
        gw: GatewayDep,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        dedicated: DedicatedDep,
    ) -> JSONResponse:
        """Stop dedicated capacity: billing stops; the model may be evicted again once nobody else needs it."""
        found = await resolve_org(tenancy, who, org, "billing")
        result = await dedicated.stop(found.id, reservation_id)
        await gw.audit_async(
            actor(request, who), "dedicated.stop", f"model:{result['model']}", org_id=found.id, after=result
        )
        return JSONResponse(result)

    # -- wallet ---------------------------------------------------------------------------------------------------

    @r.get("/orgs/{org}/wallet")
    async def wallet(org: str, billing: BillingDep, who: PrincipalDep, tenancy: TenancyDep) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "usage.read")
        return JSONResponse({**await run_in_threadpool(billing.wallet, found.id), "currency": billing.currency})

    @r.get("/orgs/{org}/wallet/movements")
    async def wallet_movements(
        org: str,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        limit: int = Query(default=100, ge=1, le=1000),
        before: str | None = Query(default=None, description="Only movements before this time (next_before)."),
    ) -> JSONResponse:
        """What moved the balance, newest first: credits in, and what each pay-as-you-go call paid."""
        found = await resolve_org(tenancy, who, org, "usage.read")
        until = _instant(before, "before") if before is not None else None
        return JSONResponse(await run_in_threadpool(billing.movements, found.id, limit, until))

    @r.post("/orgs/{org}/wallet/credits")
    async def credit(
        org: str,
        body: CreditCreate,
        request: Request,
        gw: GatewayDep,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
    ) -> JSONResponse:
        """Add prepaid credit (platform admin); 201 when added, 200 when this reference was already added."""
        _admin_only(who, "adding credit")
        found = await resolve_org(tenancy, who, org, "org.read")
        result, added = await run_in_threadpool(billing.credit, found.id, body.amount_micros, body.reference)
        if added:
            await gw.audit_async(
                actor(request, who),
                "wallet.credit",
                f"org:{found.id}",
                org_id=found.id,
                after={"amount_micros": body.amount_micros, "reference": body.reference},
            )
        return JSONResponse({**result, "currency": billing.currency, "added": added}, status_code=201 if added else 200)

    # -- invoices and statements ----------------------------------------------------------------------------------

    @r.post("/billing/periods/{period}/close")
    async def close(
        period: str, request: Request, gw: GatewayDep, billing: BillingDep, who: PrincipalDep
    ) -> JSONResponse:
        """Close a month: one invoice per organisation (closing again returns the same invoices)."""
        _admin_only(who, "closing a billing period")
        month_bounds(period)
        invoices = await run_in_threadpool(billing.books.close_period, period)
        await gw.audit_async(
            actor(request, who), "billing.close", f"period:{period}", org_id=None, after={"invoices": len(invoices)}
        )
        return JSONResponse({"period": period, "invoices": invoices})

    @r.get("/billing/verify")
    async def verify(billing: BillingDep, who: PrincipalDep) -> JSONResponse:
        _admin_only(who, "checking the books")
        return JSONResponse(await run_in_threadpool(billing.books.verify))

    @r.get("/orgs/{org}/invoices")
    async def invoices(org: str, billing: BillingDep, who: PrincipalDep, tenancy: TenancyDep) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "usage.read")
        return JSONResponse({"invoices": await run_in_threadpool(lambda: billing.books.invoices(org_id=found.id))})

    @r.get("/orgs/{org}/invoices/draft")
    async def draft_invoice(
        org: str,
        request: Request,
        billing: BillingDep,
        who: PrincipalDep,
        tenancy: TenancyDep,
        format: str | None = Query(default=None, description="json (default), csv or html"),
    ) -> Response:
        """The open month's invoice as it stands now (not issued: it changes until the month is closed)."""
        found = await resolve_org(tenancy, who, org, "usage.read")
        return _invoice_response(request, await run_in_threadpool(billing.books.draft, found.id), format)

    @r.get("/invoices/{invoice_id}")
    async def invoice(
        invoice_id: str,
        request: Request,
        who: PrincipalDep,
        billing: BillingDep,
        format: str | None = Query(default=None, description="json (default), csv or html"),
    ) -> Response:
        """An issued invoice as JSON, CSV or a printable HTML page (``format`` or the Accept header)."""
        return _invoice_response(request, await _invoice_for(billing, who, invoice_id), format)

    @r.get("/invoices/{invoice_id}/lines/{n}/records")
    async def line_records(invoice_id: str, n: int, billing: BillingDep, who: PrincipalDep) -> JSONResponse:
        """The usage records behind an invoice line, with their original timestamps."""
        inv = await _invoice_for(billing, who, invoice_id)
        return JSONResponse(
            {
                "invoice": invoice_id,
                "line": n,
                "records": await run_in_threadpool(billing.books.line_records, inv, n),
            }
        )

    @r.get("/orgs/{org}/statements/{period}")
    async def statement(
        org: str, period: str, billing: BillingDep, who: PrincipalDep, tenancy: TenancyDep
    ) -> JSONResponse:
        """A provider's revenue in a closed period: gross per model and plan, commission, net payout."""
        found = await resolve_org(tenancy, who, org, "billing")
        month_bounds(period)
        return JSONResponse(await run_in_threadpool(billing.books.statement, found.id, period))

    return r
