"""The operator's pages (platform admin only; anyone else gets 404): the review queue, organisations and members,
credits, closing a billing period, the audit log with its chain check, health and model residency."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Form, Request
from jinja2 import Environment
from starlette.responses import RedirectResponse, Response

from openmaas.console.web import PREFIX, page
from openmaas.console.work import micros

OPERATOR = f"{PREFIX}/operator"


def _last_month() -> str:
    today = datetime.now(UTC).date()
    year, month = (today.year, today.month - 1) if today.month > 1 else (today.year - 1, 12)
    return f"{year:04d}-{month:02d}"


def router(env: Environment, route_class: type) -> APIRouter:
    r = APIRouter(prefix=OPERATOR, route_class=route_class, include_in_schema=False)

    @r.get("")
    async def home(request: Request) -> Response:
        p = await page(request, env, operator=True)
        pending = (await p.get("/api/models", review_state="pending", include="card"))["models"]
        orgs = (await p.get("/api/orgs"))["orgs"]
        users = (await p.get("/api/users"))["users"]
        health = await p.try_get("/healthz", {})
        serving = await p.try_get("/api/cluster", {})
        return p.render("operator.html", pending=pending, orgs=orgs, users=users, health=health, serving=serving,
                        last_month=_last_month())  # fmt: skip

    @r.post("/review/{name:model}")
    async def review(request: Request, name: str, decision: str = Form(max_length=8),
                     reason: str = Form(default="", max_length=1000)) -> Response:  # fmt: skip
        p = await page(request, env, operator=True)
        await p.send("POST", f"/api/models/{name}/review", {"decision": decision, "reason": reason.strip()})
        return RedirectResponse(OPERATOR, status_code=303)

    @r.post("/orgs")
    async def create_org(request: Request, name: str = Form(max_length=64)) -> Response:
        p = await page(request, env, operator=True)
        await p.send("POST", "/api/orgs", {"name": name.strip()})
        return RedirectResponse(OPERATOR, status_code=303)

    @r.get("/orgs/{org}")
    async def org_page(request: Request, org: str) -> Response:
        p = await page(request, env, operator=True)
        found = await p.get(f"/api/orgs/{org}")
        members = (await p.get(f"/api/orgs/{org}/members"))["members"]
        wallet = await p.try_get(f"/api/orgs/{org}/wallet")
        return p.render("operator_org.html", org=found, members=members, wallet=wallet)

    @r.post("/orgs/{org}/members")
    async def add_member(request: Request, org: str, email: str = Form(max_length=320), role: str = Form(max_length=16),
                         password: str = Form(default="", max_length=1024)) -> Response:  # fmt: skip
        p = await page(request, env, operator=True)
        body = {"email": email.strip(), "role": role, **({"password": password} if password else {})}
        await p.send("POST", f"/api/orgs/{org}/members", body)
        return RedirectResponse(f"{OPERATOR}/orgs/{org}", status_code=303)

    @r.post("/orgs/{org}/credits")
    async def credit(request: Request, org: str, amount: str = Form(max_length=32),
                     reference: str = Form(max_length=128)) -> Response:  # fmt: skip
        p = await page(request, env, operator=True)
        await p.send("POST", f"/api/orgs/{org}/wallet/credits",
                     {"amount_micros": micros(amount, "amount"), "reference": reference.strip()})  # fmt: skip
        return RedirectResponse(f"{OPERATOR}/orgs/{org}", status_code=303)

    @r.post("/periods")
    async def close_period(request: Request, period: str = Form(max_length=7)) -> Response:
        p = await page(request, env, operator=True)
        closed = await p.send("POST", f"/api/billing/periods/{period.strip()}/close")
        return p.render("operator_closed.html", closed=closed)

    @r.get("/audit")
    async def audit(request: Request, after: int = 0) -> Response:
        p = await page(request, env, operator=True)
        events = (await p.get("/api/audit", after=max(after, 0), limit=100))["events"]
        verified = await p.get("/api/audit/verify")
        return p.render("operator_audit.html", events=events, verified=verified, after=after)

    return r
