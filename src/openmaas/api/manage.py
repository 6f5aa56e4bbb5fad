"""Native management API under /api (RFC 9457 problem JSON for errors)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from openmaas.api.deps import EvaluationsDep, GatewayDep, PrincipalDep, RegistryDep, TenancyDep, actor, principal
from openmaas.api.responses import JSONResponse
from openmaas.entities.models import (
    REQUIRED_FOR_PUBLICATION,
    Model,
    ModelCard,
    ModelVersion,
    ReviewState,
    ServingConfig,
    Visibility,
    split_name,
)
from openmaas.errors import Forbidden, InvalidRequest, NotFound
from openmaas.gateway.auth import Principal
from openmaas.gateway.service import Gateway
from openmaas.registry.evaluations import EvaluationService
from openmaas.registry.service import full_name_for
from openmaas.registry.uploads import is_archive, unpack


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


def _version_json(
    mv: ModelVersion, measured: dict[int, dict[str, Any]], weights: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A version with its card; ``measured``: the figures the platform measured (the newest report its owner ran),
    kept apart from the card's ``metrics``, which are what the provider wrote; ``weights``: how serving holds
    them (a language model's int8 or float32, with the quality guard's figures), once known."""
    return {**mv.model_dump(mode="json"), "measured": measured.get(mv.version), "weights": weights}


def _model_json(
    gw: Gateway, model: Model, *, with_versions: bool, evaluations: EvaluationService | None = None
) -> dict[str, Any]:
    out = model.model_dump(mode="json")
    if with_versions:
        versions = gw.versions(model.name)
        measured = evaluations.measured(model.name) if evaluations is not None else {}
        out["versions"] = [_version_json(v, measured, gw.weights(v)) for v in versions]
        if versions:
            latest = versions[-1]
            prep = gw.preparing(latest)
            out["state"] = gw.state(latest)
            out["ready"] = prep is None
            out["preparation"] = prep.model_dump() if prep is not None else None
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


def schema_router() -> APIRouter:
    """JSON Schemas of what clients send (open: they describe formats, not anyone's data)."""
    r = APIRouter(prefix="/api/schemas", tags=["manage"])

    @r.get("/model-card.json")
    async def model_card_schema() -> JSONResponse:
        """The model card's JSON Schema: every field, its type and what it should say."""
        return JSONResponse(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                **ModelCard.model_json_schema(),
                "x-required-for-publication": list(REQUIRED_FOR_PUBLICATION),
            }
        )

    return r


def router(scratch: Path, max_upload_bytes: int) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["manage"], dependencies=[Depends(principal)])

    @r.get("/models")
    async def list_models(
        gw: GatewayDep,
        who: PrincipalDep,
        review_state: ReviewState | None = Query(
            default=None, description="Only models in this review state (pending: what awaits the platform admin)."
        ),
        visibility: Visibility | None = Query(default=None, description="Only private, shared or public models."),
        task: str | None = Query(default=None, max_length=64, description="Only models whose card names this task."),
        q: str | None = Query(
            default=None, max_length=200, description="Only models whose name, task or description contain this."
        ),
        include: Literal["card"] | None = Query(default=None, description="card: each model's latest card too."),
        facets: Literal["task"] | None = Query(
            default=None,
            description="task: also list the tasks named by the cards of the models you can see (after review_state and "
            "visibility, before q and task), for a filter menu.",
        ),
        limit: int | None = Query(
            default=None, ge=1, le=1000, description="At most this many models (by name), from offset; all if unset."
        ),
        offset: int = Query(default=0, ge=0, description="Skip this many matching models (with limit: pages)."),
    ) -> JSONResponse:
        models = [
            m
            for m in gw.list_models(who)
            if (review_state is None or m.review_state == review_state)
            and (visibility is None or m.visibility == visibility)
        ]
        cards = await run_in_threadpool(gw.latest_cards) if include or task or q or facets else {}
        facet_values = (
            {"task": sorted({cards[m.name].task for m in models if m.name in cards and cards[m.name].task})}
            if facets == "task"
            else None
        )
        if task:
            models = [m for m in models if m.name in cards and cards[m.name].task == task]
        if q:
            needle = q.strip().lower()
            models = [
                m
                for m in models
                if needle in m.name.lower()
                or (
                    m.name in cards
                    and (needle in cards[m.name].task.lower() or needle in cards[m.name].description.lower())
                )
            ]
        total = len(models)
        models = models[offset : offset + limit if limit is not None else None]
        out = []
        for m in models:
            entry = _model_json(gw, m, with_versions=False)
            if include == "card":
                card = cards.get(m.name)
                entry["card"] = card.model_dump(mode="json") if card is not None else None
            out.append(entry)
        body: dict[str, Any] = {"models": out, "total": total, "offset": offset, "limit": limit}
        if facet_values is not None:
            body["facets"] = facet_values
        return JSONResponse(body)

    @r.get("/models/{name:model}")
    async def get_model(name: str, gw: GatewayDep, who: PrincipalDep, evaluations: EvaluationsDep) -> JSONResponse:
        model = gw.get_model(who, name)
        return JSONResponse(
            await run_in_threadpool(lambda: _model_json(gw, model, with_versions=True, evaluations=evaluations))
        )

    @r.get("/models/{name:model}/versions/{version}")
    async def get_version(
        name: str, version: int, gw: GatewayDep, who: PrincipalDep, evaluations: EvaluationsDep
    ) -> JSONResponse:
        mv = gw.model_version(who, name, version)
        measured = await run_in_threadpool(evaluations.measured, mv.model)
        return JSONResponse(_version_json(mv, measured, gw.weights(mv)))

    @r.put("/models/{name:model}/versions/{version}/card")
    async def set_card(
        name: str, version: int, card: ModelCard, request: Request, gw: GatewayDep, registry: RegistryDep,
        who: PrincipalDep,
    ) -> JSONResponse:  # fmt: skip
        """Replace a version's model card (the owner's words: intended use, data, metrics, licence...). The
        artifact and signature stay as they are; a public model's card must stay complete."""
        mv = gw.model_version(who, name, version)
        model = gw.get_model(who, name)
        _require_owner(who, model)
        updated = await run_in_threadpool(registry.set_card, model.name, mv.version, card)
        await gw.audit_async(
            actor(request, who), "model.card", f"model:{model.name}:{mv.version}", org_id=model.owner_org_id,
            before=mv.card.model_dump(mode="json"), after=updated.card.model_dump(mode="json"),
        )  # fmt: skip
        return JSONResponse(_version_json(updated, {}, gw.weights(updated)))

    # -- evaluation reports ----------------------------------------------------------------------------------------

    @r.get("/models/{name:model}/versions/{version}/evaluations")
    async def list_evaluations(
        name: str, version: int, gw: GatewayDep, who: PrincipalDep, evaluations: EvaluationsDep
    ) -> JSONResponse:
        """The version's evaluation reports, newest first: its owner's (shown on the card) and the caller's own."""
        mv = gw.model_version(who, name, version)
        reports = await run_in_threadpool(
            lambda: evaluations.for_version(mv.model, mv.version, viewer=who.org_id, admin=who.is_platform_admin)
        )
        return JSONResponse({"model": mv.model, "version": mv.version, "evaluations": reports})

    @r.get("/models/{name:model}/versions/{version}/evaluations/{evaluation_id}")
    async def get_evaluation(
        name: str, version: int, evaluation_id: str, gw: GatewayDep, who: PrincipalDep, evaluations: EvaluationsDep
    ) -> JSONResponse:
        mv = gw.model_version(who, name, version)
        return JSONResponse(
            await run_in_threadpool(
                lambda: evaluations.get(
                    mv.model, mv.version, evaluation_id, viewer=who.org_id, admin=who.is_platform_admin
                )
            )
        )

    @r.get("/models/{name:model}/versions/{version}/evaluations/{evaluation_id}/plots/{plot}.png")
    async def evaluation_plot(
        name: str,
        version: int,
        evaluation_id: str,
        plot: str,
        gw: GatewayDep,
        who: PrincipalDep,
        evaluations: EvaluationsDep,
    ) -> Response:
        """A plot of the report (confusion_matrix, roc, precision_recall, residuals) as PNG."""
        mv = gw.model_version(who, name, version)
        path = await run_in_threadpool(
            lambda: evaluations.plot(
                mv.model, mv.version, evaluation_id, plot, viewer=who.org_id, admin=who.is_platform_admin
            )
        )
        return Response(
            await run_in_threadpool(path.read_bytes),
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=86400, immutable"},
        )

    @r.get("/models/{name:model}/compare")
    async def compare_versions(
        name: str,
        gw: GatewayDep,
        who: PrincipalDep,
        evaluations: EvaluationsDep,
        a: int = Query(description="The first version.", ge=1),
        b: int = Query(description="The second version.", ge=1),
    ) -> JSONResponse:
        """Two versions' newest reports on the same data side by side, with deltas (b - a); ``comparable`` false,
        with the reason, when they were never measured on the same rows of the same dataset."""
        va, vb = gw.model_version(who, name, a), gw.model_version(who, name, b)
        return JSONResponse(
            await run_in_threadpool(
                lambda: evaluations.compare(
                    va.model, va.version, vb.version, viewer=who.org_id, admin=who.is_platform_admin
                )
            )
        )

    @r.patch("/models/{name:model}")
    async def update_model(
        name: str,
        body: ModelUpdate,
        request: Request,
        gw: GatewayDep,
        tenancy: TenancyDep,
        registry: RegistryDep,
        who: PrincipalDep,
    ) -> JSONResponse:
        """Change serving settings (applied at the next load), visibility and sharing.

        Asking for ``public`` puts the model up for platform-admin review (its card must be complete); it stays
        as it is until approved."""
        model = gw.get_model(who, name)
        _require_owner(who, model)
        name = model.name
        before = {**_access_json(model), "serving": model.serving.model_dump(exclude_none=True)}
        if body.serving is not None:
            model = await run_in_threadpool(registry.set_serving, name, body.serving)
        orgs: list[str] | None = None
        if body.shared_with is not None:
            orgs = []
            for ref in body.shared_with:
                try:
                    orgs.append((await run_in_threadpool(tenancy.get_org, ref)).id)
                except NotFound:
                    raise InvalidRequest(f"no organisation '{ref}' to share with", param="shared_with") from None
        if orgs is not None or body.visibility is not None:
            model = await run_in_threadpool(
                lambda: registry.change_access(
                    name, visibility=body.visibility, shared_with=orgs, by_admin=who.is_platform_admin
                )
            )
        after = {**_access_json(model), "serving": model.serving.model_dump(exclude_none=True)}
        await gw.audit_async(
            actor(request, who), "model.update", f"model:{name}", org_id=model.owner_org_id, before=before, after=after
        )
        return JSONResponse(_model_json(gw, model, with_versions=False))

    @r.get("/cluster")
    async def cluster(gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        """Where the models run: nodes, deployments and their replicas, and which models each replica holds
        with its memory (platform admin; ``openmaas cluster status``)."""
        return JSONResponse(await gw.describe_serving(who))

    @r.post("/models/{name:model}/review")
    async def review_model(
        name: str, body: Review, request: Request, gw: GatewayDep, registry: RegistryDep, who: PrincipalDep
    ) -> JSONResponse:
        """Approve or reject a model's request to be public (platform admin)."""
        if not who.is_platform_admin:
            gw.get_model(who, name)  # 404 for models the caller cannot see
            raise Forbidden("reviewing models for publication is for the platform admin")
        name = gw.get_model(who, name).name
        model = await run_in_threadpool(registry.review, name, body.decision, body.reason)
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
        tenancy: TenancyDep,
        registry: RegistryDep,
        who: PrincipalDep,
        file: UploadFile = File(description="ONNX or skops file, or a .zip/.tar.gz of a model folder"),
        name: str = Form(),
        format: str | None = Form(default=None),
        card: str | None = Form(default=None, description="Model card as a JSON object"),
        org: str | None = Form(default=None, description="Owner organisation (platform admin only)."),
    ) -> JSONResponse:
        """Register a model, or a new version of one your organisation owns. New models start private.

        ``name`` is the model's own name (``wine``); it lives in your organisation's namespace as ``acme/wine``,
        so another organisation's ``wine`` never clashes with it. The platform admin registers the platform's
        catalogue (bare names), or for an organisation with ``org`` (or a full name)."""
        who.require("models.manage")
        owner, namespace = who.org_id, who.org_name
        target = org if org is not None else (split_name(name)[0] if who.is_platform_admin else None)
        if target is not None:
            if not who.is_platform_admin:
                raise Forbidden("only the platform admin registers models on behalf of an organisation")
            try:
                found = await run_in_threadpool(tenancy.get_org, target)
            except NotFound:
                raise InvalidRequest(f"no organisation '{target}' to register the model for", param="org") from None
            owner, namespace = found.id, found.name
        name = full_name_for(name, namespace)
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
                registry.register,
                source,
                name,
                format=format or None,
                card=model_card,
                owner_org_id=owner,
                visibility="private" if owner else "public",
            )
        gw.prepare(mv)  # e.g. convert a GGUF file now, so the first call finds it ready
        await gw.audit_async(
            actor(request, who),
            "model.register",
            f"model:{name}",
            org_id=owner,
            after={"version": mv.version, "format": mv.format, "sha256": mv.sha256},
        )
        return JSONResponse(_version_json(mv, {}), status_code=201, headers={"Location": f"/api/models/{mv.model}"})

    return r
