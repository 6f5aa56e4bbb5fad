"""Datasets and jobs under /api (org-private; the platform admin sees all)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePath
from typing import Any

import orjson
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from openmaas.api.deps import DatasetsDep, GatewayDep, JobsDep, PrincipalDep, SubmissionsDep, actor, principal
from openmaas.api.responses import JSONResponse
from openmaas.datasets.service import format_of
from openmaas.errors import InvalidRequest, NotFound
from openmaas.gateway.auth import Principal
from openmaas.jobs.service import TERMINAL


def _scope(who: Principal) -> dict[str, Any]:
    return {"any_org": who.is_platform_admin}


def router(scratch: Path) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["datasets", "jobs"], dependencies=[Depends(principal)])

    # -- datasets -------------------------------------------------------------------------------------------------

    @r.post("/datasets", status_code=201)
    async def upload_dataset(
        request: Request,
        gw: GatewayDep,
        who: PrincipalDep,
        datasets: DatasetsDep,
        file: UploadFile = File(description="CSV (with a header row) or JSONL (one object per line)"),
        name: str | None = Form(default=None),
        format: str | None = Form(default=None, description="csv or jsonl (default: from the file name)"),
    ) -> JSONResponse:
        """Upload training data; it is checked now, and a problem names its row and column."""
        who.require("models.manage")
        filename = PurePath(file.filename or "data").name or "data"
        fmt = format_of(filename, format)
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            path = Path(tmp) / filename
            with path.open("wb") as out:
                await run_in_threadpool(shutil.copyfileobj, file.file, out, 1 << 20)
            ds = await run_in_threadpool(datasets.upload, who.org_id, name or filename, path, fmt)
        await gw.audit_async(
            actor(request, who),
            "dataset.upload",
            f"dataset:{ds['id']}",
            org_id=who.org_id,
            after={"name": ds["name"], "sha256": ds["sha256"], "rows": ds["rows"]},
        )
        return JSONResponse(ds, status_code=201, headers={"Location": f"/api/datasets/{ds['id']}"})

    @r.get("/datasets")
    async def list_datasets(who: PrincipalDep, datasets: DatasetsDep) -> JSONResponse:
        return JSONResponse({"datasets": await run_in_threadpool(lambda: datasets.list(who.org_id, **_scope(who)))})

    @r.get("/datasets/{dataset_id}")
    async def get_dataset(dataset_id: str, who: PrincipalDep, datasets: DatasetsDep) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(lambda: datasets.get(who.org_id, dataset_id, **_scope(who))))

    @r.delete("/datasets/{dataset_id}")
    async def delete_dataset(
        dataset_id: str, request: Request, gw: GatewayDep, who: PrincipalDep, datasets: DatasetsDep
    ) -> JSONResponse:
        """Delete a dataset, its stored data and derived caches."""
        ds = await run_in_threadpool(lambda: datasets.get(who.org_id, dataset_id, **_scope(who)))
        who.require("models.manage")
        await run_in_threadpool(lambda: datasets.delete(who.org_id, dataset_id, **_scope(who)))
        await gw.audit_async(actor(request, who), "dataset.delete", f"dataset:{dataset_id}", org_id=ds["org_id"])
        return JSONResponse({"deleted": dataset_id})

    # -- jobs -----------------------------------------------------------------------------------------------------

    @r.post("/jobs", status_code=202)
    async def create_job(
        request: Request, gw: GatewayDep, submissions: SubmissionsDep, who: PrincipalDep
    ) -> JSONResponse:
        """Submit a job, e.g. ``{"type": "train", "task": "tabular-classification", "dataset": ID,
        "target": "label", "params": {...}, "output_model": "my-model"}`` or ``{"type": "evaluate", "model":
        "my-model", "version": 2, "dataset": ID}``; it is checked now and queued."""
        who.require("models.manage")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise InvalidRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        job = await submissions.submit(
            body,
            org_id=who.org_id,
            namespace=who.org_name,
            key_id=who.key_id,
            by_admin=who.is_platform_admin,
            model_version=lambda name, version=None: gw.model_version(who, name, version),
        )
        await gw.audit_async(
            actor(request, who), "job.create", f"job:{job['id']}", org_id=who.org_id, after=job["spec"]
        )
        return JSONResponse(
            {"id": job["id"], "status": job["status"]}, status_code=202, headers={"Location": f"/api/jobs/{job['id']}"}
        )

    @r.get("/jobs")
    async def list_jobs(who: PrincipalDep, jobs: JobsDep) -> JSONResponse:
        return JSONResponse({"jobs": await run_in_threadpool(lambda: jobs.list(who.org_id, **_scope(who)))})

    @r.get("/jobs/{job_id}")
    async def get_job(job_id: str, who: PrincipalDep, jobs: JobsDep) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(lambda: jobs.get(who.org_id, job_id, **_scope(who))))

    @r.post("/jobs/{job_id}/cancel")
    async def cancel_job(
        job_id: str, request: Request, gw: GatewayDep, who: PrincipalDep, jobs: JobsDep
    ) -> JSONResponse:
        who.require("models.manage")
        job = await run_in_threadpool(lambda: jobs.cancel(who.org_id, job_id, **_scope(who)))
        await gw.audit_async(actor(request, who), "job.cancel", f"job:{job_id}", org_id=job["org_id"])
        return JSONResponse(job)

    @r.get("/jobs/{job_id}/logs")
    async def job_logs(job_id: str, who: PrincipalDep, jobs: JobsDep) -> PlainTextResponse:
        await run_in_threadpool(lambda: jobs.get(who.org_id, job_id, **_scope(who)))
        return PlainTextResponse(await run_in_threadpool(jobs.logs, job_id))

    @r.get("/jobs/{job_id}/curves.png")
    async def job_curves(job_id: str, who: PrincipalDep, jobs: JobsDep) -> Response:
        """Training curves (loss, validation loss and metric per epoch) of a finished training job."""
        await run_in_threadpool(lambda: jobs.get(who.org_id, job_id, **_scope(who)))
        path = jobs.jobs_dir / job_id / "curves.png"
        if not path.is_file():
            raise NotFound(f"job {job_id} has no training curves (yet)", param="job")
        return Response(await run_in_threadpool(path.read_bytes), media_type="image/png")

    @r.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, who: PrincipalDep, jobs: JobsDep) -> StreamingResponse:
        """Server-Sent Events: the job's state whenever it changes, until it ends."""
        await run_in_threadpool(lambda: jobs.get(who.org_id, job_id, **_scope(who)))

        async def stream() -> AsyncIterator[bytes]:
            last = None
            while True:
                job = await run_in_threadpool(lambda: jobs.get(None, job_id, any_org=True))
                state = (job["status"], job["progress"], len(job["history"]))
                if state != last:
                    last = state
                    event = {k: job[k] for k in ("id", "status", "progress", "error", "result")}
                    event["epoch"] = job["history"][-1] if job["history"] else None
                    yield b"event: progress\ndata: " + orjson.dumps(event) + b"\n\n"
                if job["status"] in TERMINAL or await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return r
