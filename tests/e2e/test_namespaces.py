"""Model names live in their owner organisation's namespace (``org/name``): no clash between tenants, bare names
resolve within the caller's org first, and nothing tells one org what another has privately."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ns")
    four, six = folder / "four.onnx", folder / "six.onnx"
    matmul_chain_model(four, 4)
    matmul_chain_model(six, 6)
    return four, six


def _client(server: ServerProcess, admin: httpx.Client, label: str) -> tuple[dict, httpx.Client]:
    org = new_org(admin, label)
    key = new_key(admin, org["name"], scopes=["inference", "manage", "billing"])["key"]
    return org, httpx.Client(base_url=server.url, headers=bearer(key), timeout=120)


@pytest.fixture(scope="module")
def two_orgs(server: ServerProcess, admin: httpx.Client) -> Iterator[tuple[tuple[dict, httpx.Client], ...]]:
    a, b = _client(server, admin, "ns-a"), _client(server, admin, "ns-b")
    yield a, b
    a[1].close()
    b[1].close()


def _x(n: int) -> dict:
    return {"name": "x", "shape": [1, n], "datatype": "FP32", "data": list(range(n))}


def test_two_orgs_register_the_same_name_and_each_gets_its_own(
    two_orgs: tuple[tuple[dict, httpx.Client], ...], onnx_files: tuple[Path, Path]
) -> None:
    (org_a, a), (org_b, b) = two_orgs
    four, six = onnx_files
    name = unique("wine")
    r = register_model(a, four, name)
    assert r.status_code == 201, r.text
    assert r.json()["model"] == f"{org_a['name']}/{name}"
    assert r.headers["location"] == f"/api/models/{org_a['name']}/{name}"
    r = register_model(b, six, name)  # the second org to pick the name is not told it is "taken"
    assert r.status_code == 201, r.text
    assert r.json()["model"] == f"{org_b['name']}/{name}" and r.json()["version"] == 1

    # A bare name means the caller's own model; the full name works too, on every surface.
    for client, org, n in ((a, org_a, 4), (b, org_b, 6)):
        full = f"{org['name']}/{name}"
        for ref in (name, full):
            r = client.post(f"/v2/models/{ref}/infer", json={"inputs": [_x(n)]})
            assert r.status_code == 200, r.text
            assert r.json()["model_name"] == full
            meta = client.get(f"/v2/models/{ref}").json()
            assert meta["name"] == full and meta["inputs"][0]["shape"] == [-1, n]
            assert client.get(f"/v2/models/{ref}/ready").json() == {"name": full, "ready": True}
            assert client.get(f"/v2/models/{ref}/versions/1/ready").status_code == 200
            assert client.post(f"/v2/models/{ref}/versions/1/infer", json={"inputs": [_x(n)]}).status_code == 200
            assert client.get(f"/api/models/{ref}").json()["name"] == full
            assert client.get(f"/v1/models/{ref}").json()["id"] == full
        assert full in [m["id"] for m in client.get("/v1/models").json()["data"]]
        usage = client.get("/api/usage", params={"group_by": "model"}).json()["data"]
        assert {row["model"] for row in usage} == {full}

    # A new version goes to the caller's own model, never to the other org's.
    assert register_model(a, four, name).json()["version"] == 2
    assert b.get(f"/api/models/{name}").json()["latest_version"] == 1


def test_another_orgs_private_model_is_indistinguishable_from_no_model(
    two_orgs: tuple[tuple[dict, httpx.Client], ...], onnx_files: tuple[Path, Path]
) -> None:
    (org_a, a), (_, b) = two_orgs
    four, _ = onnx_files
    secret = unique("secret")
    assert register_model(a, four, secret).status_code == 201
    real, fake = f"{org_a['name']}/{secret}", f"{org_a['name']}/{unique('nothing')}"

    def answers(r: httpx.Response, ref: str) -> tuple[int, str]:
        body = r.json()
        error = body.get("error")
        text = body.get("detail") or (error.get("message") if isinstance(error, dict) else error) or ""
        return r.status_code, text.replace(ref, "<ref>")

    for ref_real, ref_fake in ((real, fake), (secret, unique("nothing"))):
        for method, path, kwargs in (
            ("GET", "/api/models/{}", {}),
            ("GET", "/v2/models/{}", {}),
            ("POST", "/v2/models/{}/infer", {"json": {"inputs": [_x(4)]}}),
            ("GET", "/v1/models/{}", {}),
        ):
            got_real = answers(b.request(method, path.format(ref_real), **kwargs), ref_real)
            got_fake = answers(b.request(method, path.format(ref_fake), **kwargs), ref_fake)
            assert got_real == got_fake and got_real[0] == 404, (path, got_real, got_fake)
        r_real = b.post("/v1/embeddings", json={"model": ref_real, "input": "x"})
        r_fake = b.post("/v1/embeddings", json={"model": ref_fake, "input": "x"})
        assert (r_real.status_code, r_fake.status_code) == (404, 404)

    # Registering into another org's namespace: one answer (403), whether or not the model exists there.
    r_real, r_fake = register_model(b, four, real), register_model(b, four, fake)
    assert (r_real.status_code, r_fake.status_code) == (403, 403), (r_real.text, r_fake.text)
    assert r_real.json()["detail"].replace(secret, "<n>") == r_fake.json()["detail"].replace(fake.split("/")[1], "<n>")
    assert a.get(f"/api/models/{secret}").json()["latest_version"] == 1


def test_bare_names_fall_back_to_the_platform_then_to_a_model_shared_with_the_caller(
    server: ServerProcess,
    two_orgs: tuple[tuple[dict, httpx.Client], ...],
    onnx_files: tuple[Path, Path],
    admin: httpx.Client,
) -> None:
    (org_a, a), (org_b, b) = two_orgs
    four, six = onnx_files
    # The bundled catalogue keeps its bare names for everyone.
    r = b.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello"})
    assert r.status_code == 200, r.text
    # A model another org shares with you answers to its bare name when nothing of yours or the platform's has it.
    shared = unique("shared")
    assert register_model(a, four, shared).status_code == 201
    r = a.patch(f"/api/models/{shared}", json={"visibility": "shared", "shared_with": [org_b["name"]]})
    assert r.status_code == 200, r.text
    r = b.post(f"/v2/models/{shared}/infer", json={"inputs": [_x(4)]})
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == f"{org_a['name']}/{shared}"
    # ... but your own model of that name comes first.
    assert register_model(b, six, shared).status_code == 201
    assert b.get(f"/v2/models/{shared}").json()["name"] == f"{org_b['name']}/{shared}"
    # Two visible models of other orgs with one name: a 400 that names both, never a guess.
    org_c, c = _client(server, admin, "ns-c")
    try:
        r = b.patch(f"/api/models/{shared}", json={"visibility": "shared", "shared_with": [org_c["name"]]})
        assert r.status_code == 200, r.text
        r = a.patch(f"/api/models/{shared}", json={"shared_with": [org_b["name"], org_c["name"]]})
        assert r.status_code == 200, r.text
        r = c.get(f"/v2/models/{shared}")
        assert r.status_code == 400, r.text
        assert f"{org_a['name']}/{shared}" in r.text and f"{org_b['name']}/{shared}" in r.text
        assert c.get(f"/v2/models/{org_a['name']}/{shared}").status_code == 200
    finally:
        c.close()


def test_a_key_allow_list_names_models_by_their_own_name_or_full_name(
    server: ServerProcess, two_orgs: tuple[tuple[dict, httpx.Client], ...], onnx_files: tuple[Path, Path]
) -> None:
    (org_a, a), _ = two_orgs
    four, _ = onnx_files
    allowed, other = unique("allowed"), unique("other")
    for name in (allowed, other):
        assert register_model(a, four, name).status_code == 201
    for entry in (allowed, f"{org_a['name']}/{allowed}"):
        key = new_key(a, org_a["name"], scopes=["inference"], models=[entry])["key"]
        with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as k:
            assert k.post(f"/v2/models/{allowed}/infer", json={"inputs": [_x(4)]}).status_code == 200
            assert k.post(f"/v2/models/{other}/infer", json={"inputs": [_x(4)]}).status_code == 404


def test_invalid_and_reserved_model_names_are_refused_before_the_upload_is_read(
    two_orgs: tuple[tuple[dict, httpx.Client], ...], onnx_files: tuple[Path, Path]
) -> None:
    (_, a), _ = two_orgs
    four, _ = onnx_files
    for bad in ("ready", "a/b/c", "-x", "x y"):
        r = register_model(a, four, bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["param"] == "name", r.json()
