"""Per-key limits, org quotas, Idempotency-Key replays and usage reporting against a real server."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import BadRequestError, OpenAI, RateLimitError

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique

X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def org(admin: httpx.Client) -> dict:
    return new_org(admin, "limits")


@pytest.fixture(scope="module")
def owner(server: ServerProcess, admin: httpx.Client, org: dict) -> Iterator[httpx.Client]:
    key = new_key(admin, org["name"], scopes=["inference", "manage", "billing"])
    with httpx.Client(base_url=server.url, headers=bearer(key["key"]), timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(owner: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("lim") / "m.onnx"
    matmul_chain_model(path, 4)
    name = unique("limited")
    assert register_model(owner, path, name).status_code == 201
    return name


def _client(server: ServerProcess, key: dict) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=bearer(key["key"]), timeout=60)


def test_requests_per_minute_with_openai_style_headers(
    server: ServerProcess, owner: httpx.Client, org: dict, model: str
) -> None:
    key = new_key(owner, org["name"], limits={"rpm": 5})
    with _client(server, key) as c:
        oks = [c.post(f"/v2/models/{model}/infer", json={"inputs": [X]}) for _ in range(5)]
        assert [r.status_code for r in oks] == [200] * 5
        assert oks[0].headers["x-ratelimit-limit-requests"] == "5"
        assert [r.headers["x-ratelimit-remaining-requests"] for r in oks] == ["4", "3", "2", "1", "0"]
        refused = c.post(f"/v2/models/{model}/infer", json={"inputs": [X]})
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "5 requests per minute" in refused.json()["error"]


def test_openai_sdk_sees_a_rate_limit_error_and_tokens_per_minute(
    server: ServerProcess, owner: httpx.Client, org: dict
) -> None:
    key = new_key(owner, org["name"], limits={"tpm": 40})
    client = OpenAI(base_url=server.url + "/v1", api_key=key["key"], max_retries=0)
    raw = client.embeddings.with_raw_response.create(model="all-minilm-l6-v2", input="a short sentence")
    assert raw.headers["x-ratelimit-limit-tokens"] == "40"
    remaining = int(raw.headers["x-ratelimit-remaining-tokens"])
    assert 0 < remaining < 40

    def spend_the_window() -> None:
        for _ in range(20):
            client.embeddings.create(model="all-minilm-l6-v2", input="another short sentence for the window")

    with pytest.raises(RateLimitError) as info:
        spend_the_window()
    assert info.value.status_code == 429
    assert info.value.response.headers["x-ratelimit-remaining-tokens"] is not None
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]


def test_a_request_that_can_never_pass_is_a_400_not_a_retryable_429(
    server: ServerProcess, admin: httpx.Client, owner: httpx.Client, org: dict
) -> None:
    """A 1 MB text was estimated at 270,002 tokens and refused with 429 and Retry-After: 60, so the SDK retried for
    minutes. The model reads at most its window (256 tokens for MiniLM), so that is what the text costs; a request
    larger than the key's tokens-per-minute or the org's monthly quota could ever allow is refused at once, as 400,
    naming the limit."""
    huge = "word " * 200_000  # 1 MB
    roomy = new_key(owner, org["name"], limits={"tpm": 1000})
    with _client(server, roomy) as c:
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": huge})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 256  # what the model read (and what is metered)
        assert int(r.headers["x-ratelimit-remaining-tokens"]) >= 1000 - 256
    tight = new_key(owner, org["name"], limits={"tpm": 100})
    sdk = OpenAI(base_url=server.url + "/v1", api_key=tight["key"], max_retries=2)
    started = time.monotonic()
    with pytest.raises(BadRequestError) as info:
        sdk.embeddings.create(model="all-minilm-l6-v2", input=huge)
    assert time.monotonic() - started < 10  # not retried
    assert info.value.body["code"] == "request_exceeds_limit"  # type: ignore[index]
    assert "100 tokens per minute" in info.value.message and "never pass" in info.value.message
    assert "retry-after" not in info.value.response.headers
    # A request that fits the limit but not what is left of this minute is still the retryable 429.
    with _client(server, tight) as c:
        statuses = [
            c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "word " * 60}).status_code
            for _ in range(4)
        ]
        assert statuses[0] == 200 and 429 in statuses, statuses
    # Larger than the organisation's whole monthly quota: 400 as well.
    quota_org = new_org(admin, "small-quota")
    assert admin.put(f"/api/orgs/{quota_org['name']}/quotas/items", json={"monthly_limit": 2}).status_code == 200
    key = new_key(admin, quota_org["name"])
    with _client(server, key) as c:
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a", "b", "c"]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "request_exceeds_limit"
        assert "whole monthly quota is 2 items" in r.json()["error"]["message"]
        assert c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a", "b"]}).status_code == 200


def test_concurrency_limit(server: ServerProcess, owner: httpx.Client, org: dict) -> None:
    key = new_key(owner, org["name"], limits={"concurrency": 1})
    long_text = ["word " * 200] * 256  # keeps the model busy for a while
    statuses: list[int] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        with _client(server, key) as c:
            barrier.wait()
            r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": long_text})
            statuses.append(r.status_code)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: call(), range(4)))
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    with _client(server, key) as c:  # the slot is given back after each call
        assert c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "free again"}).status_code == 200


def test_model_allow_list(server: ServerProcess, owner: httpx.Client, org: dict, model: str) -> None:
    key = new_key(owner, org["name"], models=[model])
    with _client(server, key) as c:
        assert c.post(f"/v2/models/{model}/infer", json={"inputs": [X]}).status_code == 200
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [f"{org['name']}/{model}"]
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"})
        assert r.status_code == 404, r.text


def test_idempotency_key_replays_without_metering_again(server: ServerProcess, owner: httpx.Client, org: dict) -> None:
    key = new_key(owner, org["name"])
    body = {"model": "all-minilm-l6-v2", "input": ["idempotent one", "idempotent two"]}
    idem = {"Idempotency-Key": unique("idem")}
    with _client(server, key) as c:
        first = c.post("/v1/embeddings", json=body, headers=idem)
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        again = c.post("/v1/embeddings", json=body, headers=idem)
        assert again.status_code == 200, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert (
            again.headers["x-original-request-id"] == first.headers["x-request-id"]
            or again.headers["x-original-request-id"]
        )
        assert again.json() == first.json()
        other = c.post("/v1/embeddings", json={**body, "input": "something else"}, headers=idem)
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        bad = c.post("/v1/embeddings", json=body, headers={"Idempotency-Key": ""})
        assert bad.status_code == 400
    usage = owner.get("/api/usage", params={"group_by": "key"}).json()["data"]
    mine = [row for row in usage if row["key"] == key["id"]]
    assert mine == [
        {
            "key": key["id"],
            "requests": 1,
            "input_tokens": first.json()["usage"]["prompt_tokens"],
            "output_tokens": 0,
            "items": 2,
            "audio_seconds": 0,
            "job_seconds": 0,
            "cost_micros": 0,  # the bundled model is free
        }
    ]


def test_usage_group_by_unit_and_day(server: ServerProcess, owner: httpx.Client, org: dict, model: str) -> None:
    key = new_key(owner, org["name"])
    with _client(server, key) as c:
        for _ in range(3):
            assert (
                c.post(
                    f"/v2/models/{model}/infer", json={"inputs": [{**X, "shape": [2, 4], "data": [1] * 8}]}
                ).status_code
                == 200
            )
    rows = owner.get("/api/usage", params={"group_by": "key,unit,day"}).json()["data"]
    mine = {row["unit"]: row["quantity"] for row in rows if row["key"] == key["id"]}
    assert mine == {"requests": 3, "items": 6}
    r = owner.get("/api/usage", params={"group_by": "colour"})
    assert r.status_code == 400 and r.json()["param"] == "group_by"
    r = owner.get("/api/usage", params={"from": "yesterday"})
    assert r.status_code == 400


def test_monthly_quota(server: ServerProcess, admin: httpx.Client, model: str, tmp_path: Path) -> None:
    org = new_org(admin, "quota")
    key = new_key(admin, org["name"], scopes=["inference", "manage", "billing"])
    path = tmp_path / "q.onnx"
    matmul_chain_model(path, 4)
    name = unique("quota-model")
    with _client(server, key) as c:
        assert register_model(c, path, name).status_code == 201
        r = c.put(f"/api/orgs/{org['name']}/quotas/requests", json={"monthly_limit": 3})
        assert r.status_code == 403  # quotas are set by the platform admin
        r = admin.put(f"/api/orgs/{org['name']}/quotas/requests", json={"monthly_limit": 3})
        assert r.status_code == 200 and r.json()["quotas"] == {"requests": 3}
        for _ in range(3):
            assert c.post(f"/v2/models/{name}/infer", json={"inputs": [X]}).status_code == 200
        time.sleep(1.2)  # quota checks read totals at most a second old
        refused = c.post(f"/v2/models/{name}/infer", json={"inputs": [X]})
        assert refused.status_code == 429, refused.text
        assert "monthly quota of 3 requests" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) > 0
        quotas = c.get(f"/api/orgs/{org['name']}/quotas").json()["quotas"]
        assert quotas["requests"] == {"monthly_limit": 3, "used": 3}
        r = admin.put(f"/api/orgs/{org['name']}/quotas/requests", json={"monthly_limit": None})
        assert r.json()["quotas"] == {}
        assert c.post(f"/v2/models/{name}/infer", json={"inputs": [X]}).status_code == 200


def test_sharing_and_publication_review(server: ServerProcess, admin: httpx.Client, tmp_path: Path) -> None:
    owner_org, guest_org, stranger_org = new_org(admin, "prov"), new_org(admin, "guest"), new_org(admin, "stranger")
    keys = {
        o["name"]: new_key(admin, o["name"], scopes=["inference", "manage", "billing"])
        for o in (owner_org, guest_org, stranger_org)
    }
    path = tmp_path / "s.onnx"
    matmul_chain_model(path, 4)
    name = unique("shared")
    with (
        _client(server, keys[owner_org["name"]]) as own,
        _client(server, keys[guest_org["name"]]) as guest,
        _client(server, keys[stranger_org["name"]]) as stranger,
    ):
        assert register_model(own, path, name, card={"task": "tabular-regression"}).status_code == 201
        assert guest.get(f"/v2/models/{name}").status_code == 404
        r = own.patch(f"/api/models/{name}", json={"visibility": "shared", "shared_with": [guest_org["name"]]})
        assert r.status_code == 200, r.text
        assert guest.post(f"/v2/models/{name}/infer", json={"inputs": [X]}).status_code == 200
        assert stranger.get(f"/v2/models/{name}").status_code == 404
        assert guest.patch(f"/api/models/{name}", json={"visibility": "public"}).status_code == 403

        # Public needs a complete card, then review.
        r = own.patch(f"/api/models/{name}", json={"visibility": "public"})
        assert r.status_code == 400
        for field in ("intended_use", "training_data", "metrics", "limitations", "license", "privacy"):
            assert field in r.json()["detail"]
        assert own.post(f"/api/models/{name}/review", json={"decision": "approve"}).status_code == 403
        card = {
            "task": "tabular-regression",
            "intended_use": "tests",
            "training_data": "none: random weights",
            "metrics": {"mse": 0.0},
            "limitations": "meaningless outputs",
            "license": "MIT",
            "privacy": "no personal data",
        }
        assert register_model(own, path, name, card=card).status_code == 201  # version 2 carries the full card
        r = own.patch(f"/api/models/{name}", json={"visibility": "public"})
        assert r.status_code == 200 and r.json()["review_state"] == "pending" and r.json()["visibility"] == "shared"
        assert stranger.get(f"/v2/models/{name}").status_code == 404
        r = admin.post(f"/api/models/{name}/review", json={"decision": "reject"})
        assert r.status_code == 400 and "reason" in r.json()["detail"]
        r = admin.post(f"/api/models/{name}/review", json={"decision": "approve", "reason": "complete card"})
        assert r.status_code == 200 and r.json()["visibility"] == "public"
        assert stranger.post(f"/v2/models/{name}/infer", json={"inputs": [X]}).status_code == 200
        full = f"{owner_org['name']}/{name}"
        assert full in [m["id"] for m in stranger.get("/v1/models").json()["data"]]
        # Only the owner's usage shows its own calls; the stranger's calls are metered to the stranger.
        rows = stranger.get("/api/usage", params={"group_by": "model"}).json()["data"]
        assert [r["model"] for r in rows] == [full]
