"""Keys, usage (charts, table, CSV) and billing (wallet, subscriptions, invoices, statements)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Form, Request
from jinja2 import Environment
from starlette.responses import RedirectResponse, Response

from openmaas.console.web import PREFIX, Page, page
from openmaas.errors import InvalidRequest, NotFound

# The secret of a new key is on one page only, never stored by the browser or a proxy.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
UNITS = ("requests", "input_tokens", "output_tokens", "items", "audio_seconds", "job_seconds")


def _org_of(p: Page) -> str:
    if p.org is None:
        raise NotFound("sign in to an organisation to see this page (operators act on organisations from Operator)")
    return p.org


def _int_or_none(value: str, name: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a whole number", param=name) from None
    if n < 1:
        raise InvalidRequest(f"'{name}' must be at least 1", param=name)
    return n


def day_chart(
    rows: list[dict[str, Any]], unit: str, start: str, end: str, width: int = 720, height: int = 180
) -> dict[str, Any]:
    """Bars of ``unit`` per day from ``start`` to ``end`` (summed over models; days without usage at zero), as
    coordinates for an SVG the template draws (no script)."""
    per_day: dict[str, float] = {}
    for row in rows:
        per_day[row["day"]] = per_day.get(row["day"], 0) + float(row.get(unit) or 0)
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    days = [(first + timedelta(days=i)).isoformat() for i in range(min((last - first).days + 1, 366))]
    top = max(per_day.values(), default=0) or 1
    slot = width / max(len(days), 1)
    bar = min(slot * 0.8, 48)
    bars = []
    for i, d in enumerate(days):
        value = per_day.get(d, 0)
        h = round(value / top * (height - 20), 1)
        bars.append({"day": d, "value": value, "x": round(i * slot + (slot - bar) / 2, 1), "w": round(bar, 1),
                     "h": h, "y": round(height - h, 1)})  # fmt: skip
    return {"bars": bars, "width": width, "height": height, "top": top, "unit": unit}


def router(env: Environment, route_class: type) -> APIRouter:
    r = APIRouter(prefix=PREFIX, route_class=route_class, include_in_schema=False)

    # -- keys ---------------------------------------------------------------------------------------------------

    @r.get("/keys")
    async def keys(request: Request) -> Response:
        p = await page(request, env)
        org = _org_of(p)
        listed = await p.get(f"/api/orgs/{org}/keys")
        return p.render("keys.html", keys=listed["keys"], headers=NO_STORE)

    @r.post("/keys")
    async def create_key(
        request: Request,
        name: str = Form(max_length=128),
        scopes: list[str] = Form(default=["inference"]),
        models: str = Form(default="", max_length=4000),
        rpm: str = Form(default="", max_length=12),
        concurrency: str = Form(default="", max_length=12),
        expires: str = Form(default="", max_length=10),
    ) -> Response:
        p = await page(request, env)
        org = _org_of(p)
        limits = {k: v for k, v in (("rpm", _int_or_none(rpm, "rpm")),
                                    ("concurrency", _int_or_none(concurrency, "concurrency"))) if v}  # fmt: skip
        body: dict[str, Any] = {"name": name.strip(), "scopes": scopes}
        allow = [m.strip() for m in models.replace("\n", ",").split(",") if m.strip()]
        if allow:
            body["models"] = allow
        if limits:
            body["limits"] = limits
        if expires.strip():
            body["expires_at"] = f"{expires.strip()}T00:00:00Z"
        created = await p.send("POST", f"/api/orgs/{org}/keys", body)
        return p.render("key_created.html", created=created, rotated=None, headers=NO_STORE)

    @r.post("/keys/{key_id}/rotate")
    async def rotate_key(
        request: Request, key_id: str, grace_seconds: int = Form(default=3600, ge=0, le=2_592_000)
    ) -> Response:
        p = await page(request, env)
        created = await p.send("POST", f"/api/orgs/{_org_of(p)}/keys/{key_id}/rotate", {"grace_seconds": grace_seconds})
        return p.render("key_created.html", created=created, rotated=key_id, headers=NO_STORE)

    @r.post("/keys/{key_id}/revoke")
    async def revoke_key(request: Request, key_id: str) -> Response:
        p = await page(request, env)
        await p.send("DELETE", f"/api/orgs/{_org_of(p)}/keys/{key_id}")
        return RedirectResponse(f"{PREFIX}/keys", status_code=303)

    # -- usage ----------------------------------------------------------------------------------------------------

    async def _usage(p: Page, start: str, end: str, model: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        data = await p.get("/api/usage", group_by="day,model", **{"from": start or None, "to": end or None})
        rows = [row for row in data["data"] if not model or row["model"] == model]
        return data, rows

    @r.get("/usage")
    async def usage(
        request: Request, start: str = "", end: str = "", model: str = "", unit: str = "requests"
    ) -> Response:
        p = await page(request, env)
        if unit not in UNITS:
            raise InvalidRequest(f"unit must be one of {', '.join(UNITS)}", param="unit")
        data, rows = await _usage(p, start, end, model)
        by_model: dict[str, dict[str, Any]] = {}
        for row in rows:
            agg = by_model.setdefault(
                row["model"], {"model": row["model"], "cost_micros": 0, **dict.fromkeys(UNITS, 0)}
            )
            for u in (*UNITS, "cost_micros"):
                agg[u] += row.get(u) or 0
        models = sorted({row["model"] for row in data["data"]})
        return p.render(
            "usage.html",
            data=data,
            rows=rows,
            by_model=sorted(by_model.values(), key=lambda a: -a["requests"]),
            chart=day_chart(rows, unit, data["from"], data["to"]),
            models=models,
            start=data["from"],
            end=data["to"],
            model=model,
            unit=unit,
            units=UNITS,
        )

    @r.get("/usage.csv")
    async def usage_csv(request: Request, start: str = "", end: str = "", model: str = "") -> Response:
        """Per day and model, summed by the database (the API's ``group_by``), as CSV."""
        p = await page(request, env)
        data, rows = await _usage(p, start, end, model)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["day", "model", *UNITS, f"cost_{data['currency']}"])
        for row in rows:
            writer.writerow([row["day"], row["model"], *(row.get(u) or 0 for u in UNITS),
                             f"{(row.get('cost_micros') or 0) / 1_000_000:.6f}"])  # fmt: skip
        name = f"openmaas-usage-{data['from']}-{data['to']}.csv"
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip

    # -- billing --------------------------------------------------------------------------------------------------

    @r.get("/billing")
    async def billing(request: Request) -> Response:
        p = await page(request, env)
        org = _org_of(p)
        wallet = await p.try_get(f"/api/orgs/{org}/wallet")
        movements = (await p.try_get(f"/api/orgs/{org}/wallet/movements", {}, limit=20)).get("movements", [])
        subscriptions = (await p.try_get(f"/api/orgs/{org}/subscriptions", {})).get("subscriptions", [])
        invoices = (await p.try_get(f"/api/orgs/{org}/invoices", {})).get("invoices", [])
        draft = await p.try_get(f"/api/orgs/{org}/invoices/draft")
        month = datetime.now(UTC).strftime("%Y-%m")
        return p.render(
            "billing.html",
            wallet=wallet,
            movements=movements,
            subscriptions=subscriptions,
            invoices=invoices,
            draft=draft,
            month=month,
        )

    @r.get("/billing/invoices/{invoice_id}")
    async def invoice(request: Request, invoice_id: str) -> Response:
        """An issued invoice, line by line; each line's calls load on demand ("explain my bill")."""
        p = await page(request, env)
        found = await p.get(f"/api/invoices/{invoice_id}")
        return p.render("invoice.html", invoice=found)

    @r.get("/billing/invoices/{invoice_id}/lines/{n}")
    async def invoice_line(request: Request, invoice_id: str, n: int) -> Response:
        p = await page(request, env)
        found = await p.get(f"/api/invoices/{invoice_id}/lines/{n}/records")
        return p.render("_line_records.html", records=found["records"], n=n)

    @r.get("/billing/statements/{period}")
    async def statement(request: Request, period: str) -> Response:
        p = await page(request, env)
        found = await p.get(f"/api/orgs/{_org_of(p)}/statements/{period}")
        return p.render("statement.html", statement=found, period=period)

    @r.post("/billing/subscriptions")
    async def subscribe(
        request: Request, model: str = Form(max_length=200), plan: str = Form(max_length=200)
    ) -> Response:
        p = await page(request, env)
        await p.send("POST", f"/api/orgs/{_org_of(p)}/subscriptions", {"model": model, "plan": plan})
        return RedirectResponse(f"{PREFIX}/billing", status_code=303)

    @r.post("/billing/subscriptions/{sub_id}/cancel")
    async def cancel(request: Request, sub_id: str) -> Response:
        p = await page(request, env)
        await p.send("DELETE", f"/api/orgs/{_org_of(p)}/subscriptions/{sub_id}")
        return RedirectResponse(f"{PREFIX}/billing", status_code=303)

    return r
