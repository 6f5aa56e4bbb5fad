"""Native management API under /api (RFC 9457 problem JSON for errors)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from openmaas.api.deps import GatewayDep, PrincipalDep, actor, principal
from openmaas.api.responses import JSONResponse
from openmaas.errors import AlreadyExists, Forbidden, InvalidRequest, ModelNotFound, NotFound
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway
from openmaas.registry.models import Model, ModelCard, ModelVersion, ServingConfig, Visibility
from openmaas.registry.uploads import is_archive, unpack
from openmaas.runtimes.generative import GGUFRuntime


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serving: ServingConfig | None = None
    visibility: Visibility | None = Field(
        default=None, description="private, shared (with shared_with) or public (after platform-admin review)"
    )
    shared_with: list[str] | None = Field(default=None, description="Organisation names or ids.")


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    reason: str = Field(default="", max_length=1000)


def _access_json(model: Model) -> dict[str, Any]:
    return {
        "visibility": model.visibility,
        "shared_with": list(model.shared_with),
        "review_state": model.review_state,
        "review_reason": model.review_reason,
    }


def _require_owner(who: Principal, model: Model) -> None:
    if not who.is_platform_admin and model.owner_org_id != who.org_id:
        raise Forbidden("only the model's owner organisation may change it")
    who.require("models.manage")


def _version_json(mv: ModelVersion) -> dict[str, Any]:
    return mv.model_dump(mode="json")


def _model_json(gw: Gateway, model: Model, *, with_versions: bool) -> dict[str, Any]:
    out = model.model_dump(mode="json")
    if with_versions:
        out["versions"] = [_version_json(v) for v in gw.registry.list_versions(model.name)]
    return out


def _parse_card(raw: str | None) -> ModelCard | None:
    if raw is None or raw == "":
        return None
    try:
        return ModelCard.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise InvalidRequest("'card' must be a JSON object", param="card") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"invalid model card field '{where}': {first['msg']}", param="card") from None


def router(scratch: Path, max_upload_bytes: int) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["manage"], dependencies=[Depends(principal)])

    @r.get("/models")
    async def list_models(gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse({"models": [_model_json(gw, m, with_versions=False) for m in gw.list_models(who)]})

    @r.get("/models/{name}")
    async def get_model(name: str, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(_model_json(gw, gw.get_model(who, name), with_versions=True))

    @r.get("/models/{name}/versions/{version}")
    async def get_version(name: str, version: int, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(_version_json(gw.model_version(who, name, version)))

    @r.patch("/models/{name}")
    async def update_model(
        name: str, body: ModelUpdate, request: Request, gw: GatewayDep, who: PrincipalDep
    ) -> JSONResponse:
        """Change serving settings (applied at the next load), visibility and sharing.

        Asking for ``public`` puts the model up for platform-admin review (its card must be complete); it stays
        as it is until approved."""
        model = gw.get_model(who, name)
        _require_owner(who, model)
        before = {**_access_json(model), "serving": model.serving.model_dump(exclude_none=True)}
        if body.serving is not None:
            model = await run_in_threadpool(gw.registry.set_serving, name, body.serving)
        changes: dict[str, Any] = {}
        if body.shared_with is not None:
            orgs = []
            for ref in body.shared_with:
                try:
                    orgs.append((await run_in_threadpool(gw.tenancy.get_org, ref)).id)
                except NotFound:
                    raise InvalidRequest(f"no organisation '{ref}' to share with", param="shared_with") from None
            changes["shared_with"] = orgs
        if body.visibility == "public" and not who.is_platform_admin:
            if model.visibility != "public":
                card = (await run_in_threadpool(gw.registry.resolve, name, None)).card
                missing = card.missing_for_publication()
                if missing:
                    raise InvalidRequest(
                        "the model card must be complete before the model can be reviewed for publication; "
                        f"missing: {', '.join(missing)}",
                        param="visibility",
                    )
                changes["review_state"] = "pending"
        elif body.visibility is not None:
            if body.visibility == "shared" and not (changes.get("shared_with") or model.shared_with):
                raise InvalidRequest(
                    "visibility 'shared' needs 'shared_with' (organisation names)", param="shared_with"
                )
            changes["visibility"] = body.visibility
            if body.visibility == "public":
                changes["review_state"] = "approved"
        if changes:
            model = await run_in_threadpool(lambda: gw.registry.update_access(name, **changes))
        after = {**_access_json(model), "serving": model.serving.model_dump(exclude_none=True)}
        await gw.audit_async(
            actor(request, who), "model.update", f"model:{name}", org_id=model.owner_org_id, before=before, after=after
        )
        return JSONResponse(_model_json(gw, model, with_versions=False))

    @r.post("/models/{name}/review")
    async def review_model(
        name: str, body: Review, request: Request, gw: GatewayDep, who: PrincipalDep
    ) -> JSONResponse:
        """Approve or reject a model's request to be public (platform admin)."""
        if not who.is_platform_admin:
            gw.get_model(who, name)  # 404 for models the caller cannot see
            raise Forbidden("reviewing models for publication is for the platform admin")
        model = gw.get_model(who, name)
        if model.review_state != "pending":
            raise InvalidRequest(
                f"model '{name}' has no pending review (state: {model.review_state}); its owner asks for one by "
                "setting visibility to 'public'",
                param="name",
            )
        if body.decision == "approve":
            model = await run_in_threadpool(
                lambda: gw.registry.update_access(
                    name, visibility="public", review_state="approved", review_reason=body.reason or None
                )
            )
        else:
            if not body.reason:
                raise InvalidRequest("a rejection needs a 'reason' the owner can act on", param="reason")
            model = await run_in_threadpool(
                lambda: gw.registry.update_access(name, review_state="rejected", review_reason=body.reason)
            )
        await gw.audit_async(
            actor(request, who),
            f"model.review.{body.decision}",
            f"model:{name}",
            org_id=model.owner_org_id,
            after=_access_json(model),
        )
        return JSONResponse(_model_json(gw, model, with_versions=False))

    @r.post("/models", status_code=201)
    async def register_model(
        request: Request,
        gw: GatewayDep,
        who: PrincipalDep,
        file: UploadFile = File(description="ONNX or skops file, or a .zip/.tar.gz of a model folder"),
        name: str = Form(),
        format: str | None = Form(default=None),
        card: str | None = Form(default=None, description="Model card as a JSON object"),
        org: str | None = Form(default=None, description="Owner organisation (platform admin only)."),
    ) -> JSONResponse:
        """Register a model, or a new version of one your organisation owns. New models start private."""
        who.require("models.manage")
        owner = who.org_id
        if org is not None:
            if not who.is_platform_admin:
                raise Forbidden("only the platform admin registers models on behalf of an organisation")
            owner = (await run_in_threadpool(gw.tenancy.get_org, org)).id
        try:
            existing: Model | None = gw.get_model(who, name)
        except ModelNotFound:
            existing = None
            # A name taken by a model the caller cannot see is reported as taken, without saying by whom.
            if await run_in_threadpool(gw.registry.exists, name):
                raise AlreadyExists(f"the model name '{name}' is taken; choose another", param="name") from None
        if existing is not None and not who.is_platform_admin and existing.owner_org_id != who.org_id:
            raise Forbidden(f"model '{name}' belongs to another organisation; register yours under another name")
        model_card = _parse_card(card)
        filename = PurePath(file.filename or "upload").name or "upload"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            upload = Path(tmp) / filename
            with upload.open("wb") as out:
                await run_in_threadpool(shutil.copyfileobj, file.file, out, 1 << 20)
            source = upload
            if is_archive(filename):
                dest = Path(tmp) / "unpacked"
                dest.mkdir()
                source = await run_in_threadpool(unpack, upload, dest, max_bytes=max_upload_bytes)
            mv = await run_in_threadpool(
                gw.registry.register,
                source,
                name,
                format=format or None,
                card=model_card,
                owner_org_id=owner,
                visibility="private" if owner else "public",
            )
        if mv.format == GGUFRuntime.format:
            gw.prepare_in_background(mv)  # convert now, so the first call finds it ready
        await gw.audit_async(
            actor(request, who),
            "model.register",
            f"model:{name}",
            org_id=owner,
            after={"version": mv.version, "format": mv.format, "sha256": mv.sha256},
        )
        return JSONResponse(_version_json(mv), status_code=201, headers={"Location": f"/api/models/{name}"})

    return r
