"""Management API for organisations, members, users, API keys, sessions and quotas (under /api)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from openmaas.api.deps import GatewayDep, PrincipalDep, TenancyDep, UsageDep, actor, principal
from openmaas.api.responses import JSONResponse
from openmaas.errors import Forbidden, InvalidRequest, NotFound
from openmaas.gateway.auth import Principal
from openmaas.metering.records import UNITS
from openmaas.tenancy.models import ApiKey, KeyLimits, Org
from openmaas.tenancy.roles import ALL_SCOPES, Action, Role, Scope, at_least
from openmaas.tenancy.service import TenancyService, key_json


class OrgCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str
    password: str = Field(repr=False)


class MemberAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str
    role: Role = "member"
    password: str | None = Field(default=None, repr=False, description="Creates the user when it does not exist.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["inference"]))
    models: list[str] | None = Field(default=None, description="Allow-list of model names; default all visible.")
    expires_at: datetime | None = None
    limits: KeyLimits | None = None
    role: Role | None = Field(default=None, description="Most the key may do; at most your own role.")


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_seconds: int = Field(default=3600, ge=0, le=30 * 86400)


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    platform_admin: bool = Field(description="An operator: signs in to the console as the platform admin.")


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str
    password: str = Field(repr=False)
    org: str


class QuotaSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    monthly_limit: int | None = Field(ge=0, description="null removes the quota.")


def _org_json(org: Org) -> dict[str, Any]:
    return org.model_dump(mode="json")


async def resolve_org(tenancy: TenancyService, who: Principal, ref: str, action: Action) -> Org:
    """The org named by ``ref`` if ``who`` may do ``action`` in it; another org's is 404 as if it did not exist."""
    try:
        org = await run_in_threadpool(tenancy.get_org, ref)
        who.require(action, org.id)
    except NotFound:
        raise NotFound(f"organisation '{ref}' does not exist or you do not have access to it", param="org") from None
    return org


def _require_platform_admin(who: Principal, what: str) -> None:
    if not who.is_platform_admin:
        raise Forbidden(f"{what} is for the platform admin")


def _created_key(secret: str, key: ApiKey) -> dict[str, Any]:
    # The only response that ever carries the secret.
    return {**key_json(key), "key": secret}


def public_router() -> APIRouter:
    """Endpoints that need no API key: signing in."""
    r = APIRouter(prefix="/api", tags=["tenancy"])

    @r.post("/auth/login", status_code=201)
    async def login(body: Login, request: Request, gw: GatewayDep, tenancy: TenancyDep) -> JSONResponse:
        """Exchange email and password for a 12-hour session key in one organisation (your role applies)."""
        secret, key = await run_in_threadpool(tenancy.login, body.email, body.password, body.org)
        who = Principal(kind="session", key_id=key.id, scopes=frozenset(key.scopes), org_id=key.org_id)
        await gw.audit_async(
            actor(request, who), "session.create", f"user:{key.user_id}", org_id=key.org_id, after=key_json(key)
        )
        return JSONResponse(_created_key(secret, key), status_code=201)

    return r


def router() -> APIRouter:
    r = APIRouter(prefix="/api", tags=["tenancy"], dependencies=[Depends(principal)])

    # -- organisations ----------------------------------------------------------------------------------------

    @r.post("/orgs", status_code=201)
    async def create_org(
        body: OrgCreate, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        _require_platform_admin(who, "creating organisations")
        org = await run_in_threadpool(tenancy.create_org, body.name)
        await gw.audit_async(actor(request, who), "org.create", f"org:{org.id}", org_id=org.id, after=_org_json(org))
        return JSONResponse(_org_json(org), status_code=201, headers={"Location": f"/api/orgs/{org.id}"})

    @r.get("/orgs")
    async def list_orgs(tenancy: TenancyDep, who: PrincipalDep) -> JSONResponse:
        if who.is_platform_admin:
            orgs = await run_in_threadpool(tenancy.list_orgs)
        elif who.org_id is not None:
            orgs = await run_in_threadpool(tenancy.list_orgs, who.org_id)
        else:
            orgs = []
        return JSONResponse({"orgs": [_org_json(o) for o in orgs]})

    @r.get("/orgs/{org}")
    async def get_org(org: str, tenancy: TenancyDep, who: PrincipalDep) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "org.read")
        members = await run_in_threadpool(tenancy.list_members, found.id)
        quotas = await run_in_threadpool(tenancy.quotas, found.id)
        return JSONResponse(
            {
                **_org_json(found),
                "members": [m.model_dump(mode="json") for m in members],
                "quotas": quotas,
            }
        )

    # -- members and users ------------------------------------------------------------------------------------

    @r.post("/orgs/{org}/members", status_code=201)
    async def add_member(
        org: str, body: MemberAdd, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "members.manage")
        if not who.is_platform_admin and not at_least(who.role, body.role):
            raise Forbidden(f"you cannot grant the '{body.role}' role: it is above your own ('{who.role}')")
        member = await run_in_threadpool(tenancy.add_member, found.id, body.email, body.role, body.password)
        await gw.audit_async(
            actor(request, who),
            "member.add",
            f"user:{member.user_id}",
            org_id=found.id,
            after={"email": member.email, "role": member.role},
        )
        return JSONResponse(member.model_dump(mode="json"), status_code=201)

    @r.get("/orgs/{org}/members")
    async def list_members(org: str, tenancy: TenancyDep, who: PrincipalDep) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "org.read")
        members = await run_in_threadpool(tenancy.list_members, found.id)
        return JSONResponse({"members": [m.model_dump(mode="json") for m in members]})

    @r.delete("/orgs/{org}/members/{user_id}")
    async def remove_member(
        org: str, user_id: str, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "members.manage")
        await run_in_threadpool(tenancy.remove_member, found.id, user_id)
        await gw.audit_async(actor(request, who), "member.remove", f"user:{user_id}", org_id=found.id)
        return JSONResponse({"removed": user_id})

    @r.post("/users", status_code=201)
    async def create_user(
        body: UserCreate, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        _require_platform_admin(who, "creating users outside an organisation")
        user = await run_in_threadpool(tenancy.create_user, body.email, body.password)
        await gw.audit_async(
            actor(request, who), "user.create", f"user:{user.id}", org_id=None, after={"email": user.email}
        )
        return JSONResponse(user.model_dump(mode="json"), status_code=201)

    @r.patch("/users/{user}")
    async def update_user(
        user: str, body: UserUpdate, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        """Make a user (by id or email) an operator, who signs in to the console as the platform admin, or no
        longer one (their operator sessions end at their next page)."""
        _require_platform_admin(who, "making operators")
        found = await run_in_threadpool(tenancy.set_platform_admin, user, body.platform_admin)
        await gw.audit_async(
            actor(request, who), "user.update", f"user:{found.id}", org_id=None,
            after={"platform_admin": found.platform_admin},
        )  # fmt: skip
        return JSONResponse(found.model_dump(mode="json"))

    @r.get("/users")
    async def list_users(tenancy: TenancyDep, who: PrincipalDep) -> JSONResponse:
        _require_platform_admin(who, "listing all users")
        users = await run_in_threadpool(tenancy.list_users)
        return JSONResponse({"users": [u.model_dump(mode="json") for u in users]})

    # -- API keys ---------------------------------------------------------------------------------------------

    @r.post("/orgs/{org}/keys", status_code=201)
    async def create_key(
        org: str, body: KeyCreate, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "keys.manage")
        role: Role = body.role or ("admin" if who.is_platform_admin else who.role)
        if not who.is_platform_admin:
            if not at_least(who.role, role):
                raise Forbidden(f"a key cannot have the '{role}' role: it is above your own ('{who.role}')")
            extra = sorted(set(body.scopes) - who.scopes)
            if extra:
                raise Forbidden(f"a key cannot have scopes you lack: {', '.join(extra)}")
        unknown = sorted(set(body.scopes) - set(ALL_SCOPES))
        if unknown or not body.scopes:
            raise InvalidRequest(f"scopes must be a non-empty subset of {', '.join(ALL_SCOPES)}", param="scopes")
        if body.expires_at is not None and body.expires_at.tzinfo is None:
            raise InvalidRequest("'expires_at' needs a time zone, e.g. 2026-12-31T00:00:00Z", param="expires_at")
        secret, key = await run_in_threadpool(
            lambda: tenancy.create_key(
                found.id,
                body.name,
                body.scopes,
                role=role,
                user_id=who.user_id,
                models=body.models,
                expires_at=body.expires_at,
                limits=body.limits,
            )
        )
        await gw.audit_async(actor(request, who), "key.create", f"key:{key.id}", org_id=found.id, after=key_json(key))
        return JSONResponse(_created_key(secret, key), status_code=201)

    @r.get("/orgs/{org}/keys")
    async def list_keys(org: str, tenancy: TenancyDep, who: PrincipalDep) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "keys.manage")
        keys = await run_in_threadpool(tenancy.list_keys, found.id)
        return JSONResponse({"keys": [key_json(k) for k in keys]})

    @r.delete("/orgs/{org}/keys/{key_id}")
    async def revoke_key(
        org: str, key_id: str, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        found = await resolve_org(tenancy, who, org, "keys.manage")
        before = await run_in_threadpool(tenancy.get_key, found.id, key_id)
        key = await run_in_threadpool(tenancy.revoke_key, found.id, key_id)
        await gw.audit_async(
            actor(request, who),
            "key.revoke",
            f"key:{key_id}",
            org_id=found.id,
            before=key_json(before),
            after=key_json(key),
        )
        return JSONResponse(key_json(key))

    @r.post("/orgs/{org}/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(
        org: str,
        key_id: str,
        request: Request,
        gw: GatewayDep,
        tenancy: TenancyDep,
        who: PrincipalDep,
        body: KeyRotate | None = None,
    ) -> JSONResponse:
        """A new secret with the same settings; the old one keeps working for ``grace_seconds`` (default 1 h)."""
        found = await resolve_org(tenancy, who, org, "keys.manage")
        grace = timedelta(seconds=(body or KeyRotate()).grace_seconds)
        secret, new, old = await run_in_threadpool(tenancy.rotate_key, found.id, key_id, grace)
        await gw.audit_async(
            actor(request, who),
            "key.rotate",
            f"key:{key_id}",
            org_id=found.id,
            before=key_json(old),
            after=key_json(new),
        )
        return JSONResponse({**_created_key(secret, new), "previous": key_json(old)}, status_code=201)

    # -- quotas -----------------------------------------------------------------------------------------------

    @r.put("/orgs/{org}/quotas/{unit}")
    async def set_quota(
        org: str, unit: str, body: QuotaSet, request: Request, gw: GatewayDep, tenancy: TenancyDep, who: PrincipalDep
    ) -> JSONResponse:
        _require_platform_admin(who, "setting quotas")
        found = await resolve_org(tenancy, who, org, "org.read")
        before = await run_in_threadpool(tenancy.quotas, found.id)
        quotas = await run_in_threadpool(tenancy.set_quota, found.id, unit, body.monthly_limit)
        await gw.audit_async(
            actor(request, who), "quota.set", f"org:{found.id}", org_id=found.id, before=before, after=quotas
        )
        return JSONResponse({"quotas": quotas})

    @r.get("/orgs/{org}/quotas")
    async def get_quotas(org: str, tenancy: TenancyDep, usage: UsageDep, who: PrincipalDep) -> JSONResponse:
        from openmaas.gateway.limits import current_month

        found = await resolve_org(tenancy, who, org, "org.read")
        quotas = await run_in_threadpool(tenancy.quotas, found.id)
        month = current_month()
        used = await run_in_threadpool(usage.month_totals, found.id, month)
        return JSONResponse(
            {
                "month": month,
                "quotas": {
                    u: {"monthly_limit": quotas.get(u), "used": used.get(u, 0) // (1000 if u == "audio_seconds" else 1)}
                    for u in UNITS
                    if u in quotas or u in used
                },
            }
        )

    return r
