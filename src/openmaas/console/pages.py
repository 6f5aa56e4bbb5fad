"""Overview, catalogue, model pages and the playground."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Form, Query, Request
from jinja2 import Environment
from starlette.responses import Response

from openmaas.console.web import PREFIX, Page, json_or_raise, page
from openmaas.errors import InvalidRequest

# Tasks the playground has a form for; any other model gets v2 tensors as JSON.
CATALOGUE_PAGE = 50  # models a catalogue page lists
CHAT_TASKS = ("text-generation",)
EMBEDDING_TASKS = ("embedding", "text-embedding", "sentence-similarity", "feature-extraction")
SPEECH_TASKS = ("automatic-speech-recognition", "speech-recognition", "speech")


def _kind(task: str) -> str:
    if task in CHAT_TASKS:
        return "chat"
    if task in EMBEDDING_TASKS:
        return "embeddings"
    if task in SPEECH_TASKS:
        return "speech"
    return "tensors"


def similarity(vectors: list[list[float]]) -> list[list[float]]:
    """Cosine similarity of every pair (embeddings from the API are normalised already, but need not be)."""
    norms = [math.sqrt(sum(x * x for x in v)) or 1.0 for v in vectors]
    return [
        [sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv) for v, nv in zip(vectors, norms, strict=True)]
        for u, nu in zip(vectors, norms, strict=True)
    ]


async def _quota_rows(p: Page) -> list[dict[str, Any]]:
    if p.org is None:
        return []
    quotas = await p.try_get(f"/api/orgs/{p.org}/quotas", {"quotas": {}})
    rows = []
    for unit, q in (quotas.get("quotas") or {}).items():
        limit = q.get("monthly_limit")
        share = q["used"] / limit if limit else None
        rows.append({"unit": unit, "used": q["used"], "limit": limit, "share": share, "near": (share or 0) >= 0.8})
    return rows


def router(env: Environment, route_class: type) -> APIRouter:
    r = APIRouter(prefix=PREFIX, route_class=route_class, include_in_schema=False)

    @r.get("")
    async def overview(request: Request) -> Response:
        p = await page(request, env)
        usage = await p.try_get("/api/usage", {}, group_by="model")
        wallet = await p.try_get(f"/api/orgs/{p.org}/wallet") if p.org else None
        jobs = (await p.try_get("/api/jobs", {"jobs": []}))["jobs"][:5]
        batches = (await p.try_get("/v1/batches", {"data": []}, limit=5)).get("data", [])
        return p.render(
            "overview.html",
            usage=usage,
            wallet=wallet,
            jobs=jobs,
            batches=batches,
            quotas=await _quota_rows(p),
        )

    @r.get("/models")
    async def catalogue(
        request: Request, q: str = "", task: str = "", page_no: int = Query(1, alias="page")
    ) -> Response:
        p = await page(request, env)
        q, task, page_no = q.strip()[:200], task.strip()[:64], max(1, page_no)
        found = await p.get(
            "/api/models",
            include="card",
            facets="task",
            q=q,
            task=task,
            limit=CATALOGUE_PAGE,
            offset=(page_no - 1) * CATALOGUE_PAGE,
        )
        pages = max(1, math.ceil(found["total"] / CATALOGUE_PAGE))
        fragment = bool(request.headers.get("hx-request")) and request.headers.get("hx-target") == "model-list"
        return p.render(
            "_model_list.html" if fragment else "models.html",
            models=found["models"],
            total=found["total"],
            first=(page_no - 1) * CATALOGUE_PAGE + 1,
            page_no=page_no,
            pages=pages,
            q=q,
            task=task,
            tasks=found["facets"]["task"],
        )

    @r.get("/models/{name:model}")
    async def model_page(request: Request, name: str) -> Response:
        p = await page(request, env)
        model = await p.get(f"/api/models/{name}")
        plans = (await p.try_get(f"/api/models/{name}/plans", {"plans": []})).get("plans", [])
        latest = model["versions"][-1] if model.get("versions") else None
        evaluations = []
        if latest is not None:
            evaluations = (
                await p.try_get(f"/api/models/{name}/versions/{latest['version']}/evaluations", {"evaluations": []})
            ).get("evaluations", [])
        mine = p.principal.is_platform_admin or model.get("owner_org_id") == p.org
        return p.render(
            "model.html",
            model=model,
            latest=latest,
            plans=plans,
            evaluations=evaluations,
            mine=mine,
            kind=_kind(latest["card"]["task"]) if latest else "tensors",
        )

    @r.get("/playground")
    async def playground(request: Request, model: str = "") -> Response:
        p = await page(request, env)
        models = (await p.get("/api/models", include="card"))["models"]
        chosen = next((m for m in models if m["name"] == model), None) or (models[0] if models else None)
        kind = _kind((chosen.get("card") or {}).get("task") or "") if chosen else "tensors"
        signature = None
        if chosen is not None and kind == "tensors":
            meta = await p.try_get(f"/v2/models/{chosen['name']}")
            signature = meta
        return p.render("playground.html", models=models, chosen=chosen, kind=kind, signature=signature)

    @r.post("/playground/embeddings")
    async def try_embeddings(
        request: Request, model: str = Form(max_length=200), text: str = Form(max_length=20_000)
    ) -> Response:
        p = await page(request, env)
        sentences = [line.strip() for line in text.splitlines() if line.strip()][:16]
        if not sentences:
            raise InvalidRequest("type one sentence a line", param="text")
        result = await p.send("POST", "/v1/embeddings", {"model": model, "input": sentences})
        vectors = [d["embedding"] for d in sorted(result["data"], key=lambda d: d["index"])]
        return p.render(
            "_similarity.html",
            sentences=sentences,
            matrix=similarity(vectors),
            dims=len(vectors[0]) if vectors else 0,
            usage=result.get("usage", {}),
        )

    @r.post("/playground/transcribe")
    async def try_speech(request: Request) -> Response:
        """The uploaded form is passed to /v1/audio/transcriptions as it came (the API checks and limits it)."""
        p = await page(request, env)
        return p.render("_transcript.html", result=await p.forward("/v1/audio/transcriptions"))

    @r.post("/playground/infer")
    async def try_tensors(
        request: Request, model: str = Form(max_length=200), body: str = Form(max_length=1_000_000)
    ) -> Response:
        p = await page(request, env)
        answer = await p.api("POST", f"/v2/models/{model}/infer", raw=body.encode())
        return p.render("_tensors.html", result=json_or_raise(answer))

    return r
