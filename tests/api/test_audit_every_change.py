"""Every mutating /api route writes an audit event.

The test walks the app's routes (from its OpenAPI document): each POST, PUT, PATCH or DELETE under /api must appear in the scenario below
(so a new route without a step here fails), each step must succeed, and each must add at least one event to the
audit log. The app runs in process with its lifespan on a temporary data dir."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from openmaas.app import create_app
from openmaas.config import Settings
from tests.helpers import matmul_chain_model

ADMIN = "om_audit-walk-admin-key-0123456789abcdefgh"
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
CARD = {
    "task": "tabular-regression",
    "intended_use": "tests",
    "training_data": "random",
    "metrics": {"mse": 1.0},
    "limitations": "none",
    "license": "Apache-2.0",
    "privacy": "no personal data",
}


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    data = tmp_path_factory.mktemp("audit-walk")
    app = create_app(Settings(data_dir=data / "data", bundled_models=False, admin_key=ADMIN, max_jobs=0))
    with TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        yield c, data


def _events(c: TestClient) -> int:
    r = c.get("/api/audit", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return len(r.json()["events"])


def test_every_mutating_api_route_writes_an_audit_event(app_client: tuple[TestClient, Path]) -> None:
    c, data = app_client
    # The app's own OpenAPI document lists every route it serves (FastAPI includes all of them by default).
    paths = c.app.openapi()["paths"]  # type: ignore[attr-defined]
    routes = {
        (method.upper(), path)
        for path, operations in paths.items()
        if path.startswith("/api/")
        for method in operations
        if method.upper() in MUTATING
    }
    assert len(routes) >= 20, routes  # the walk found the API, not nothing
    done: set[tuple[str, str]] = set()

    def step(method: str, template: str, call: Callable[[], httpx.Response]) -> dict[str, Any]:
        before = _events(c)
        r = call()
        assert 200 <= r.status_code < 300, f"{method} {template}: {r.status_code} {r.text}"
        assert _events(c) > before, f"{method} {template} wrote no audit event"
        done.add((method, template))
        return dict(r.json())

    # -- tenancy --------------------------------------------------------------------------------------------------
    provider = step("POST", "/api/orgs", lambda: c.post("/api/orgs", json={"name": "provider"}))
    consumer = step("POST", "/api/orgs", lambda: c.post("/api/orgs", json={"name": "consumer"}))
    p, cons = provider["name"], consumer["name"]
    user = step(
        "POST", "/api/users", lambda: c.post("/api/users", json={"email": "u@x.org", "password": "long-password-1"})
    )
    step("PATCH", "/api/users/{user}", lambda: c.patch("/api/users/u@x.org", json={"platform_admin": False}))
    step(
        "POST",
        "/api/orgs/{org}/members",
        lambda: c.post(f"/api/orgs/{p}/members", json={"email": "u@x.org", "role": "owner"}),
    )
    step(
        "POST",
        "/api/auth/login",
        lambda: c.post("/api/auth/login", json={"email": "u@x.org", "password": "long-password-1", "org": p}),
    )
    owner_key = step(
        "POST",
        "/api/orgs/{org}/keys",
        lambda: c.post(f"/api/orgs/{p}/keys", json={"name": "owner", "scopes": ["inference", "manage", "billing"]}),
    )
    spare = step("POST", "/api/orgs/{org}/keys", lambda: c.post(f"/api/orgs/{p}/keys", json={"name": "spare"}))
    rotated = step(
        "POST",
        "/api/orgs/{org}/keys/{key_id}/rotate",
        lambda: c.post(f"/api/orgs/{p}/keys/{spare['id']}/rotate", json={"grace_seconds": 0}),
    )
    step("DELETE", "/api/orgs/{org}/keys/{key_id}", lambda: c.delete(f"/api/orgs/{p}/keys/{rotated['id']}"))
    step(
        "PUT",
        "/api/orgs/{org}/quotas/{unit}",
        lambda: c.put(f"/api/orgs/{cons}/quotas/requests", json={"monthly_limit": 1000}),
    )

    # -- models -----------------------------------------------------------------------------------------------------
    matmul_chain_model(data / "m.onnx", 4)

    def register() -> httpx.Response:
        with (data / "m.onnx").open("rb") as f:
            return c.post(
                "/api/models",
                data={"name": "m", "org": p, "card": json.dumps(CARD)},
                files={"file": ("m.onnx", f)},
            )

    step("POST", "/api/models", register)
    as_owner = {"Authorization": f"Bearer {owner_key['key']}"}
    step(
        "PATCH",
        "/api/models/{name}",
        lambda: c.patch("/api/models/m", json={"visibility": "public"}, headers=as_owner),
    )
    step("POST", "/api/models/{name}/review", lambda: c.post("/api/models/m/review", json={"decision": "approve"}))
    step(
        "PUT",
        "/api/models/{name}/versions/{version}/card",
        lambda: c.put("/api/models/m/versions/1/card", json={**CARD, "description": "edited"}, headers=as_owner),
    )

    # -- billing ----------------------------------------------------------------------------------------------------
    plan = {"name": "sub", "kind": "subscription", "monthly_fee_micros": 1}
    step("POST", "/api/models/{name}/plans", lambda: c.post("/api/models/m/plans", json=plan))
    dedicated_plan = {"name": "gpu", "kind": "dedicated", "hourly_price_micros": 1}
    step("POST", "/api/models/{name}/plans", lambda: c.post("/api/models/m/plans", json=dedicated_plan))
    sub = step(
        "POST",
        "/api/orgs/{org}/subscriptions",
        lambda: c.post(f"/api/orgs/{cons}/subscriptions", json={"model": "m", "plan": "sub"}),
    )
    step(
        "DELETE",
        "/api/orgs/{org}/subscriptions/{sub_id}",
        lambda: c.delete(f"/api/orgs/{cons}/subscriptions/{sub['id']}"),
    )
    reservation = step(
        "POST",
        "/api/orgs/{org}/dedicated",
        lambda: c.post(f"/api/orgs/{cons}/dedicated", json={"model": "m", "plan": "gpu"}),
    )
    step(
        "DELETE",
        "/api/orgs/{org}/dedicated/{reservation_id}",
        lambda: c.delete(f"/api/orgs/{cons}/dedicated/{reservation['id']}"),
    )
    step(
        "POST",
        "/api/orgs/{org}/wallet/credits",
        lambda: c.post(f"/api/orgs/{cons}/wallet/credits", json={"amount_micros": 5, "reference": "r1"}),
    )
    last_month = (datetime.now(UTC).replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    step("POST", "/api/billing/periods/{period}/close", lambda: c.post(f"/api/billing/periods/{last_month}/close"))

    # -- datasets and jobs (no job worker runs: max_jobs=0) ---------------------------------------------------------
    rows = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20))
    dataset = step(
        "POST",
        "/api/datasets",
        lambda: c.post("/api/datasets", files={"file": ("d.csv", rows.encode())}, data={"name": "d"}),
    )
    job_spec = {
        "type": "train",
        "task": "tabular-classification",
        "dataset": dataset["id"],
        "target": "label",
        "output_model": "trained",
        "params": {"epochs": 1},
    }
    job = step("POST", "/api/jobs", lambda: c.post("/api/jobs", json=job_spec))
    step("POST", "/api/jobs/{job_id}/cancel", lambda: c.post(f"/api/jobs/{job['id']}/cancel"))
    step("DELETE", "/api/datasets/{dataset_id}", lambda: c.delete(f"/api/datasets/{dataset['id']}"))
    step(
        "DELETE",
        "/api/orgs/{org}/members/{user_id}",
        lambda: c.delete(f"/api/orgs/{p}/members/{user['id']}"),
    )

    assert routes - done == set(), f"mutating routes without an audited step here: {sorted(routes - done)}"
    assert done <= routes
