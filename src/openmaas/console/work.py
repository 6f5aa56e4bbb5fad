"""Datasets, jobs (training, evaluation, compression) with live progress, offline batches, and the provider's
pages: register a model with its card, sell it through plans, ask for public review."""

from __future__ import annotations

import secrets
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from fastapi import APIRouter, Form, Request
from jinja2 import Environment
from starlette.responses import RedirectResponse, Response

from openmaas.console.web import PREFIX, json_or_raise, page
from openmaas.errors import InvalidRequest

JOB_TYPES = ("train", "evaluate", "quantize", "prune", "distill")
TRAIN_TASKS = ("tabular-classification", "tabular-regression", "image-classification", "text-classification")
TERMINAL = ("succeeded", "failed", "cancelled")
CARD_TEXT = ("task", "description", "intended_use", "training_data", "limitations", "license", "privacy")


def micros(value: str, name: str) -> int:
    """A price typed in currency units ("0.002") as integer micro-units."""
    value = value.strip() or "0"
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise InvalidRequest(f"'{name}' must be an amount like 0.002", param=name) from None
    if amount < 0 or amount != amount.quantize(Decimal("0.000001")):
        raise InvalidRequest(f"'{name}' must be zero or more, to at most six decimals", param=name)
    return int(amount * 1_000_000)


def _metrics(text: str) -> dict[str, float]:
    """``accuracy=0.93, f1=0.91`` as a card's metrics."""
    out: dict[str, float] = {}
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InvalidRequest(f"write metrics as name=value, e.g. accuracy=0.93 (got '{part.strip()}')",
                                 param="metrics") from None  # fmt: skip
        if not sep or not name.strip():
            raise InvalidRequest(f"write metrics as name=value (got '{part.strip()}')", param="metrics")
    return out


# Which form fields each job type takes, and the spec field each one fills (the API validates the values).
_FORM_FIELDS: dict[str, dict[str, str]] = {
    "train": {"task": "task", "dataset": "dataset", "target": "target", "output_model": "output_model"},
    "evaluate": {"model": "model", "version": "version", "dataset": "dataset", "target": "target", "task": "task"},
    "quantize": {"model": "model", "version": "version", "method": "method", "eval_dataset": "eval_dataset",
                 "calibration_dataset": "calibration_dataset", "target": "target", "output_model": "output_model",
                 "max_metric_drop": "max_metric_drop"},
    "prune": {"model": "model", "version": "version", "dataset": "dataset", "sparsity": "sparsity",
              "target": "target", "output_model": "output_model", "max_metric_drop": "max_metric_drop",
              "fine_tune_epochs": "fine_tune_epochs"},
    "distill": {"model": "teacher", "version": "teacher_version", "dataset": "dataset", "target": "target",
                "output_model": "output_model", "max_metric_drop": "max_metric_drop", "epochs": "epochs"},
}  # fmt: skip
_WHOLE = {"version", "teacher_version", "fine_tune_epochs", "epochs"}
_FRACTION = {"sparsity", "max_metric_drop"}
_LIMIT = 20_000  # characters in one field (a JSON spec is the longest)


def _number(value: str, name: str, whole: bool) -> int | float:
    try:
        number: int | float = int(value) if whole else float(value)
    except ValueError:
        kind = "a whole number" if whole else "a number like 0.5"
        raise InvalidRequest(f"'{name}' must be {kind} (got '{value[:40]}')", param=name) from None
    return number


def job_from_form(form: dict[str, str]) -> dict[str, Any]:
    """A job spec from a console form: ``spec`` (JSON) as it is, else ``type`` and the fields that type takes.
    Empty fields are left out, so the API's defaults apply; numbers are checked here, the rest by the API."""
    if any(len(v) > _LIMIT for v in form.values()):
        raise InvalidRequest(f"a form field is longer than {_LIMIT:,} characters")
    spec = form.get("spec", "").strip()
    if spec:
        try:
            body = orjson.loads(spec)
        except orjson.JSONDecodeError:
            raise InvalidRequest("the job's spec is not valid JSON", param="spec") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the job's spec must be a JSON object", param="spec")
        return body
    kind = form.get("type", "train").strip()
    if kind not in _FORM_FIELDS:
        raise InvalidRequest(f"type must be one of {', '.join(JOB_TYPES)}", param="type")
    out: dict[str, Any] = {"type": kind}
    for field, target in _FORM_FIELDS[kind].items():
        value = form.get(field, "").strip()
        if not value:
            continue
        if target in _WHOLE or target in _FRACTION:
            out[target] = _number(value, field, whole=target in _WHOLE)
        else:
            out[target] = value
    epochs = form.get("epochs", "").strip()
    if kind == "train" and epochs:
        out["params"] = {"epochs": _number(epochs, "epochs", whole=True)}
    if kind == "prune":
        out["structured"] = form.get("structured", "") in ("on", "true", "1")
    if kind == "distill":
        hidden = form.get("student_hidden", "").strip()
        if hidden:
            widths = [w.strip() for w in hidden.split(",") if w.strip()]
            out["student"] = {"hidden": [_number(w, "student_hidden", whole=True) for w in widths]}
    return out


def router(env: Environment, route_class: type) -> APIRouter:
    r = APIRouter(prefix=PREFIX, route_class=route_class, include_in_schema=False)

    # -- datasets and jobs ----------------------------------------------------------------------------------------

    @r.get("/jobs")
    async def jobs(request: Request) -> Response:
        p = await page(request, env)
        listed = (await p.get("/api/jobs"))["jobs"]
        datasets = (await p.try_get("/api/datasets", {"datasets": []}))["datasets"]
        models = (await p.try_get("/api/models", {"models": []}))["models"]
        return p.render("jobs.html", jobs=listed, datasets=datasets, models=models, types=JOB_TYPES,
                        tasks=TRAIN_TASKS)  # fmt: skip

    @r.post("/datasets")
    async def upload_dataset(request: Request) -> Response:
        p = await page(request, env)
        await p.forward("/api/datasets")
        return RedirectResponse(f"{PREFIX}/jobs", status_code=303)

    @r.post("/jobs")
    async def start_job(request: Request) -> Response:
        """A job from one of the page's forms (training, evaluation, quantisation, pruning, distillation), or any
        job from its JSON spec (which wins when given)."""
        p = await page(request, env)
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        created = await p.send("POST", "/api/jobs", job_from_form(fields))
        return RedirectResponse(f"{PREFIX}/jobs/{created['id']}", status_code=303)

    @r.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str) -> Response:
        p = await page(request, env)
        found = await p.get(f"/api/jobs/{job_id}")
        fragment = request.headers.get("hx-request") is not None
        logs = ""
        if not fragment or found["status"] in TERMINAL:
            answer = await p.api("GET", f"/api/jobs/{job_id}/logs")
            logs = answer.body.decode("utf-8", "replace")[-20_000:] if answer.status == 200 else ""
        return p.render("_job_progress.html" if fragment else "job.html", job=found, logs=logs,
                        terminal=found["status"] in TERMINAL)  # fmt: skip

    @r.post("/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, job_id: str) -> Response:
        p = await page(request, env)
        await p.send("POST", f"/api/jobs/{job_id}/cancel")
        return RedirectResponse(f"{PREFIX}/jobs/{job_id}", status_code=303)

    # -- offline batches --------------------------------------------------------------------------------------------

    @r.get("/batches")
    async def batches(request: Request) -> Response:
        p = await page(request, env)
        listed = (await p.get("/v1/batches", limit=50)).get("data", [])
        files = (await p.try_get("/v1/files", {"data": []})).get("data", [])
        return p.render("batches.html", batches=listed, files=files)

    @r.post("/batches")
    async def start_batch(request: Request) -> Response:
        """Upload a JSONL file (purpose batch) and start a batch on it in one step."""
        p = await page(request, env)
        await request.body()  # kept for the forward below (form() alone would consume the stream)
        form = await request.form()
        endpoint = str(form.get("endpoint") or "/v1/embeddings")
        uploaded = await p.forward("/v1/files")
        await p.send("POST", "/v1/batches", {"input_file_id": uploaded["id"], "endpoint": endpoint,
                                             "completion_window": "24h"})  # fmt: skip
        return RedirectResponse(f"{PREFIX}/batches", status_code=303)

    @r.post("/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        p = await page(request, env)
        await p.send("POST", f"/v1/batches/{batch_id}/cancel")
        return RedirectResponse(f"{PREFIX}/batches", status_code=303)

    # -- provider -------------------------------------------------------------------------------------------------

    @r.get("/provider")
    async def provider(request: Request) -> Response:
        p = await page(request, env)
        models = [m for m in (await p.get("/api/models"))["models"]
                  if p.principal.is_platform_admin or m["owner_org_id"] == p.org]  # fmt: skip
        return p.render("provider.html", models=models)

    @r.post("/provider/models")
    async def register(request: Request) -> Response:
        """The upload form goes to ``POST /api/models`` as it came; its card fields become the card JSON there."""
        p = await page(request, env)
        form = await request.form()
        card = {k: str(form.get(k) or "").strip() for k in CARD_TEXT}
        card_json: dict[str, Any] = {k: v for k, v in card.items() if v}
        metrics = _metrics(str(form.get("metrics") or ""))
        if metrics:
            card_json["metrics"] = metrics
        upload = form.get("file")
        name = str(form.get("name") or "").strip()
        if upload is None or isinstance(upload, str) or not upload.filename:
            raise InvalidRequest("choose the model file to upload", param="file")
        if not name:
            raise InvalidRequest("give the model a name", param="name")
        boundary = b"openmaas-console-" + secrets.token_hex(16).encode()
        parts = [
            (b"name", None, name.encode()),
            (b"card", None, orjson.dumps(card_json)),
            (b"file", upload.filename.encode(), await upload.read()),
        ]
        body = b"".join(
            b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + field + b"\""
            + (b"; filename=\"" + filename.replace(b'"', b"") + b"\"" if filename else b"")
            + b"\r\n\r\n" + value + b"\r\n"
            for field, filename, value in parts
        ) + b"--" + boundary + b"--\r\n"  # fmt: skip
        answer = await p.api("POST", "/api/models", raw=body,
                             content_type=f"multipart/form-data; boundary={boundary.decode()}")  # fmt: skip
        created = json_or_raise(answer)
        return RedirectResponse(f"{PREFIX}/models/{created['model']}", status_code=303)

    @r.post("/provider/models/{name:model}/card")
    async def edit_card(request: Request, name: str, version: int = Form(ge=1)) -> Response:
        """The card form, over the version's card (fields the form does not show, like classes, are kept)."""
        p = await page(request, env)
        form = await request.form()
        current = (await p.get(f"/api/models/{name}/versions/{version}"))["card"]
        card = {**current, **{k: str(form.get(k) or "").strip() for k in CARD_TEXT}}
        card["metrics"] = _metrics(str(form.get("metrics") or ""))
        await p.send("PUT", f"/api/models/{name}/versions/{version}/card", card)
        return RedirectResponse(f"{PREFIX}/models/{name}", status_code=303)

    @r.post("/provider/models/{name:model}/plans")
    async def add_plan(
        request: Request,
        name: str,
        plan: str = Form(max_length=64),
        kind: str = Form(max_length=16),
        unit: str = Form(default="requests", max_length=32),
        block: int = Form(default=1, ge=1, le=1_000_000_000),
        price: str = Form(default="", max_length=32),
        monthly_fee: str = Form(default="", max_length=32),
        included_units: int = Form(default=0, ge=0),
        overage_price: str = Form(default="", max_length=32),
        hourly_price: str = Form(default="", max_length=32),
    ) -> Response:
        p = await page(request, env)
        spec = {
            "name": plan.strip(),
            "kind": kind,
            "unit": unit,
            "block": block,
            "price_micros": micros(price, "price"),
            "monthly_fee_micros": micros(monthly_fee, "monthly_fee"),
            "included_units": included_units,
            "overage_price_micros": micros(overage_price, "overage_price"),
            "hourly_price_micros": micros(hourly_price, "hourly_price"),
        }
        await p.send("POST", f"/api/models/{name}/plans", spec)
        return RedirectResponse(f"{PREFIX}/models/{name}", status_code=303)

    @r.post("/provider/models/{name:model}/visibility")
    async def visibility(request: Request, name: str, visibility: str = Form(max_length=16),
                         shared_with: str = Form(default="", max_length=2000)) -> Response:  # fmt: skip
        p = await page(request, env)
        body: dict[str, Any] = {"visibility": visibility}
        if visibility == "shared":
            body["shared_with"] = [o.strip() for o in shared_with.split(",") if o.strip()]
        await p.send("PATCH", f"/api/models/{name}", body)
        return RedirectResponse(f"{PREFIX}/models/{name}", status_code=303)

    return r
