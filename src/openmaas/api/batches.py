"""OpenAI's Files and Batches API (``/v1/files``, ``/v1/batches``): the official SDK's ``client.files`` and
``client.batches`` work unchanged. Everything belongs to the caller's organisation; another's is 404."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse

from openmaas.api.deps import GatewayDep, PrincipalDep, actor, principal, services
from openmaas.api.openai import parse_body
from openmaas.api.responses import JSONResponse
from openmaas.batches.lines import MAX_BYTES
from openmaas.errors import InvalidRequest


class ExpiresAfter(BaseModel):
    """OpenAI's ``{"anchor": "created_at", "seconds": N}``: how long the batch's output files are kept."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"] = "created_at"
    seconds: int


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: str = Field(min_length=1)
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None
    output_expires_after: ExpiresAfter | None = None


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def _expires_after(form: Any) -> int | None:
    """OpenAI's ``expires_after[anchor]=created_at`` and ``expires_after[seconds]=N`` form fields."""
    anchor = form.get("expires_after[anchor]")
    seconds = form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor not in (None, "created_at"):
        raise InvalidRequest("expires_after[anchor] must be created_at", param="expires_after")
    try:
        return int(str(seconds))
    except ValueError:
        raise InvalidRequest(
            "expires_after[seconds] must be a whole number of seconds", param="expires_after"
        ) from None


def router() -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["batch"], dependencies=[Depends(principal)])

    @r.post("/files")
    async def upload_file(request: Request, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        who.require("inference")
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("send the file as a multipart field named 'file'", param="file")
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequest("'purpose' is required (batch)", param="purpose")
        files = services(request).batches.files
        stored = await asyncio.to_thread(
            files.upload,
            who.org_id,
            upload.filename or "",
            purpose,
            upload.file,
            expires_after_s=_expires_after(form),
            max_bytes=MAX_BYTES,
        )
        await gw.audit_async(
            actor(request, who),
            "file.create",
            f"file:{stored.id}",
            org_id=who.org_id,
            after={"filename": stored.filename, "bytes": stored.bytes, "sha256": stored.sha256},
        )
        return JSONResponse(stored.to_json())

    @r.get("/files")
    async def list_files(
        request: Request,
        who: PrincipalDep,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = Query(default=10_000),
        order: str = "desc",
    ) -> JSONResponse:
        files = services(request).batches.files
        found, more = await asyncio.to_thread(
            files.page, who.org_id, purpose=purpose, after=after, limit=limit, order=order
        )
        return JSONResponse(_page([f.to_json() for f in found], more))

    @r.get("/files/{file_id}")
    async def get_file(file_id: str, request: Request, who: PrincipalDep) -> JSONResponse:
        found = await asyncio.to_thread(services(request).batches.files.get, who.org_id, file_id)
        return JSONResponse(found.to_json())

    @r.get("/files/{file_id}/content")
    async def file_content(file_id: str, request: Request, who: PrincipalDep) -> FileResponse:
        found, path = await asyncio.to_thread(services(request).batches.files.path, who.org_id, file_id)
        return FileResponse(path, media_type="application/octet-stream", filename=found.filename)

    @r.delete("/files/{file_id}")
    async def delete_file(file_id: str, request: Request, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        who.require("inference")
        await asyncio.to_thread(services(request).batches.files.delete, who.org_id, file_id)
        await gw.audit_async(actor(request, who), "file.delete", f"file:{file_id}", org_id=who.org_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @r.post("/batches")
    async def create_batch(request: Request, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        who.require("inference")
        body = await parse_body(request, CreateBatch)
        batch = await asyncio.to_thread(
            services(request).batches.create,
            who.org_id,
            who.key_id,
            body.input_file_id,
            body.endpoint,
            body.completion_window,
            body.metadata,
            body.output_expires_after.seconds if body.output_expires_after is not None else None,
        )
        await gw.audit_async(
            actor(request, who),
            "batch.create",
            f"batch:{batch['id']}",
            org_id=who.org_id,
            after={"input_file_id": body.input_file_id, "endpoint": body.endpoint},
        )
        return JSONResponse(batch)

    @r.get("/batches")
    async def list_batches(
        request: Request, who: PrincipalDep, after: str | None = None, limit: int = Query(default=20)
    ) -> JSONResponse:
        found, more = await asyncio.to_thread(services(request).batches.page, who.org_id, after=after, limit=limit)
        return JSONResponse(_page(found, more))

    @r.get("/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request, who: PrincipalDep) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(services(request).batches.get, who.org_id, batch_id))

    @r.post("/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request, gw: GatewayDep, who: PrincipalDep) -> JSONResponse:
        who.require("inference")
        batch, changed = await asyncio.to_thread(services(request).batches.cancel, who.org_id, batch_id)
        if changed:
            await gw.audit_async(actor(request, who), "batch.cancel", f"batch:{batch_id}", org_id=who.org_id)
        return JSONResponse(batch)

    return r
