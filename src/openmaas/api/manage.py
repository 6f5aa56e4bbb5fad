"""Native management API under /api (RFC 9457 problem JSON for errors)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePath
from typing import Any

import orjson
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from openmaas.api.deps import GatewayDep, PrincipalDep, principal
from openmaas.api.responses import JSONResponse
from openmaas.errors import Forbidden, InvalidRequest
from openmaas.gateway.service import Gateway
from openmaas.registry.models import Model, ModelCard, ModelVersion, ServingConfig
from openmaas.registry.uploads import is_archive, unpack


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serving: ServingConfig | None = None


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
    async def update_model(name: str, body: ModelUpdate, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        """Change a model's serving settings (they apply the next time the model loads)."""
        if not who.has_scope("manage"):
            raise Forbidden("changing models needs an API key with the 'manage' scope")
        gw.get_model(who, name)
        model = gw.registry.get_model(name)
        if body.serving is not None:
            model = await run_in_threadpool(gw.registry.set_serving, name, body.serving)
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
    ) -> JSONResponse:
        if not who.has_scope("manage"):
            raise Forbidden("registering models needs an API key with the 'manage' scope")
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
                owner_org_id=who.org_id,
                visibility="private" if who.org_id else "public",
            )
        return JSONResponse(_version_json(mv), status_code=201, headers={"Location": f"/api/models/{name}"})

    return r
