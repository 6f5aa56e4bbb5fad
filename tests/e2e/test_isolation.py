"""Tenant isolation: two organisations, each with a private model and keys, across every endpoint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique


@dataclass
class Tenant:
    org: dict
    key: str
    key_id: str
    model: str
    http: httpx.Client


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("iso") / "m.onnx"
    matmul_chain_model(path, 4)
    return path


def _tenant(server: ServerProcess, admin: httpx.Client, onnx_file: Path, label: str) -> Tenant:
    org = new_org(admin, label)
    created = new_key(admin, org["name"], scopes=["inference", "manage", "billing"])
    http = httpx.Client(base_url=server.url, headers=bearer(created["key"]), timeout=120)
    model = unique(f"{label}-private")
    r = register_model(http, onnx_file, model)
    assert r.status_code == 201, r.text
    # Each tenant uses its own model once, so there is usage (and audit) of its own to hide from the other.
    r = http.post(f"/v2/models/{model}/infer", json={"inputs": [_x()]})
    assert r.status_code == 200, r.text
    return Tenant(org, created["key"], created["id"], model, http)


def _x() -> dict:
    return {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def tenants(server: ServerProcess, admin: httpx.Client, onnx_file: Path) -> Iterator[tuple[Tenant, Tenant]]:
    a = _tenant(server, admin, onnx_file, "alpha")
    b = _tenant(server, admin, onnx_file, "beta")
    yield a, b
    a.http.close()
    b.http.close()


def _not_found(r: httpx.Response) -> None:
    assert r.status_code == 404, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}"


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
def test_neither_org_can_see_call_list_or_read_the_others_resources(
    tenants: tuple[Tenant, Tenant], direction: str
) -> None:
    me, other = tenants if direction == "a_to_b" else tenants[::-1]
    c = me.http
    m, o = other.model, other.org["name"]
    full = f"{o}/{m}"

    # Positive control: my own model works with my key.
    assert c.post(f"/v2/models/{me.model}/infer", json={"inputs": [_x()]}).status_code == 200

    # OpenAI surface
    assert full not in [x["id"] for x in c.get("/v1/models").json()["data"]]
    for ref in (m, full):
        _not_found(c.get(f"/v1/models/{ref}"))
        _not_found(c.post("/v1/embeddings", json={"model": ref, "input": "hello"}))

    # Open Inference Protocol v2, by the bare name and by the full one
    assert full not in [e["name"] for e in c.post("/v2/repository/index").json()]
    for ref in (m, full):
        for path in (
            f"/v2/models/{ref}",
            f"/v2/models/{ref}/ready",
            f"/v2/models/{ref}/versions/1",
            f"/v2/models/{ref}/versions/1/ready",
        ):
            _not_found(c.get(path))
        _not_found(c.post(f"/v2/models/{ref}/infer", json={"inputs": [_x()]}))
        _not_found(c.post(f"/v2/models/{ref}/versions/1/infer", json={"inputs": [_x()]}))
        _not_found(c.post(f"/v2/repository/models/{ref}/load"))
        _not_found(c.post(f"/v2/repository/models/{ref}/unload"))

    # Management API: models
    assert full not in [x["name"] for x in c.get("/api/models").json()["models"]]
    for ref in (m, full):
        _not_found(c.get(f"/api/models/{ref}"))
        _not_found(c.get(f"/api/models/{ref}/versions/1"))
        _not_found(c.patch(f"/api/models/{ref}", json={"visibility": "public"}))
        _not_found(c.post(f"/api/models/{ref}/review", json={"decision": "approve"}))

    # Management API: the other org itself, by name and by id
    for ref in (o, other.org["id"]):
        _not_found(c.get(f"/api/orgs/{ref}"))
        _not_found(c.get(f"/api/orgs/{ref}/members"))
        _not_found(c.post(f"/api/orgs/{ref}/members", json={"email": "x@example.com", "role": "member"}))
        _not_found(c.get(f"/api/orgs/{ref}/keys"))
        _not_found(c.post(f"/api/orgs/{ref}/keys", json={"name": "sneaky"}))
        _not_found(c.delete(f"/api/orgs/{ref}/keys/{other.key_id}"))
        _not_found(c.post(f"/api/orgs/{ref}/keys/{other.key_id}/rotate"))
        _not_found(c.get(f"/api/orgs/{ref}/quotas"))
        _not_found(c.get("/api/usage", params={"org": ref}))
        _not_found(c.get("/api/usage/records", params={"org": ref}))
        _not_found(c.get("/api/audit", params={"org": ref}))
    assert [x["name"] for x in c.get("/api/orgs").json()["orgs"]] == [me.org["name"]]
    # My org's key ids do not include the other's.
    _not_found(c.delete(f"/api/orgs/{me.org['name']}/keys/{other.key_id}"))

    # Usage and audit: only mine.
    usage = c.get("/api/usage", params={"group_by": "model,key"}).json()
    assert usage["data"], usage
    assert {row["model"] for row in usage["data"]} == {f"{me.org['name']}/{me.model}"}
    assert {row["key"] for row in usage["data"]} == {me.key_id}
    records = c.get("/api/usage/records").json()["records"]
    assert records and {r["org_id"] for r in records} == {me.org["id"]}
    events = c.get("/api/audit").json()["events"]
    assert events and {e["org_id"] for e in events} == {me.org["id"]}

    # The other org's key does not work against my org either.
    _not_found(other.http.get(f"/api/orgs/{me.org['name']}"))


def test_a_failed_attempt_meters_nothing_for_either_org(tenants: tuple[Tenant, Tenant]) -> None:
    a, b = tenants
    before_a = a.http.get("/api/usage").json()["totals"]["requests"]
    before_b = b.http.get("/api/usage").json()["totals"]["requests"]
    _not_found(a.http.post(f"/v2/models/{b.model}/infer", json={"inputs": [_x()]}))
    assert a.http.get("/api/usage").json()["totals"]["requests"] == before_a
    assert b.http.get("/api/usage").json()["totals"]["requests"] == before_b


def test_registering_another_orgs_model_name_makes_a_model_of_ones_own(
    tenants: tuple[Tenant, Tenant], onnx_file: Path
) -> None:
    a, b = tenants
    r = register_model(a.http, onnx_file, b.model)
    assert r.status_code == 201, r.text
    assert r.json()["model"] == f"{a.org['name']}/{b.model}"
    r = register_model(a.http, onnx_file, f"{b.org['name']}/{b.model}")
    assert r.status_code == 403, r.text
    assert b.http.get(f"/api/models/{b.model}").json()["latest_version"] == 1


def test_viewer_cannot_create_keys_and_member_cannot_grant_more_than_it_has(
    admin: httpx.Client, server: ServerProcess, tenants: tuple[Tenant, Tenant]
) -> None:
    a, _ = tenants
    org = a.org["name"]
    password = "correct horse battery staple"
    for email, role in ((f"{unique('viewer')}@example.com", "viewer"), (f"{unique('member')}@example.com", "member")):
        r = a.http.post(f"/api/orgs/{org}/members", json={"email": email, "role": role, "password": password})
        assert r.status_code == 201, r.text
        login = httpx.post(server.url + "/api/auth/login", json={"email": email, "password": password, "org": org})
        assert login.status_code == 201, login.text
        session = login.json()
        assert session["role"] == role and session["key"].startswith("om_")
        with httpx.Client(base_url=server.url, headers=bearer(session["key"]), timeout=60) as c:
            assert c.get(f"/api/orgs/{org}").status_code == 200
            r = c.post(f"/api/orgs/{org}/keys", json={"name": "mine"})
            if role == "viewer":
                assert r.status_code == 403, r.text
                assert "'member' role" in r.json()["detail"]
                assert c.post(f"/v2/models/{a.model}/infer", json={"inputs": [_x()]}).status_code == 403
            else:
                assert r.status_code == 201, r.text
                assert r.json()["role"] == "member"
                r = c.post(f"/api/orgs/{org}/keys", json={"name": "too much", "role": "admin"})
                assert r.status_code == 403, r.text
                r = c.post(f"/api/orgs/{org}/members", json={"email": "x@example.com", "role": "owner"})
                assert r.status_code == 403, r.text
    # Wrong password, unknown user and wrong org all get the same 401.
    for body in (
        {"email": email, "password": "wrong password!!", "org": org},
        {"email": "nobody@example.com", "password": password, "org": org},
        {"email": email, "password": password, "org": "no-such-org"},
    ):
        r = httpx.post(server.url + "/api/auth/login", json=body)
        assert r.status_code == 401, r.text
        assert r.json()["detail"] == "wrong email, password or organisation"
        # A sign-in with a wrong password is not about an API key (it was titled "Invalid api key").
        assert r.json()["title"] == "Invalid credentials" and r.json()["code"] == "invalid_credentials"


def test_key_without_manage_scope_cannot_register_models(
    admin: httpx.Client, server: ServerProcess, tenants: tuple[Tenant, Tenant], onnx_file: Path
) -> None:
    a, _ = tenants
    key = new_key(a.http, a.org["name"], scopes=["inference"])
    with httpx.Client(base_url=server.url, headers=bearer(key["key"]), timeout=60) as c:
        r = register_model(c, onnx_file, unique("nope"))
        assert r.status_code == 403, r.text
        assert "'manage' scope" in r.json()["detail"]
        assert c.post(f"/v2/models/{a.model}/infer", json={"inputs": [_x()]}).status_code == 200


def test_expired_and_revoked_keys_get_401(server: ServerProcess, tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    org = a.org["name"]
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    expiring = new_key(a.http, org, expires_at=soon)
    revoked = new_key(a.http, org)
    infer = f"{server.url}/v2/models/{a.model}/infer"
    for key in (expiring, revoked):
        assert httpx.post(infer, json={"inputs": [_x()]}, headers=bearer(key["key"])).status_code == 200
    assert a.http.delete(f"/api/orgs/{org}/keys/{revoked['id']}").json()["revoked_at"] is not None
    r = httpx.post(infer, json={"inputs": [_x()]}, headers=bearer(revoked["key"]))
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    listed = {k["id"]: k for k in a.http.get(f"/api/orgs/{org}/keys").json()["keys"]}
    assert listed[revoked["id"]]["revoked_at"] is not None
    assert all("key" not in k and "key_hash" not in k for k in listed.values())
    time.sleep(max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds()) + 1.1)
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "x", "input": "y"}, headers=bearer(expiring["key"]))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_rotation_keeps_the_old_key_for_the_grace_period(server: ServerProcess, tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    org = a.org["name"]
    old = new_key(a.http, org, limits={"rpm": 1000})
    r = a.http.post(f"/api/orgs/{org}/keys/{old['id']}/rotate", json={"grace_seconds": 2})
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["key"] != old["key"] and new["rotated_from"] == old["id"] and new["limits"]["rpm"] == 1000
    infer = f"{server.url}/v2/models/{a.model}/infer"
    for key in (old["key"], new["key"]):
        assert httpx.post(infer, json={"inputs": [_x()]}, headers=bearer(key)).status_code == 200
    time.sleep(3.2)
    assert httpx.post(infer, json={"inputs": [_x()]}, headers=bearer(old["key"])).status_code == 401
    assert httpx.post(infer, json={"inputs": [_x()]}, headers=bearer(new["key"])).status_code == 200
