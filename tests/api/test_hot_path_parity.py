"""POST /v1/embeddings is answered by the hot path (``api/hot.py``) before FastAPI's stack; with the hot path
switched off the FastAPI route answers. For good and bad requests alike, both must give the same status, headers
and body (the app runs in process with its lifespan, on a temporary data dir, with the real MiniLM model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from openmaas.app import create_app
from openmaas.config import Settings
from tests.helpers import matmul_chain_model

ADMIN = "om_parity-admin-key-0123456789abcdefghijkl"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("parity")
    settings = Settings(
        data_dir=data / "data",
        bundled_models=False,
        admin_key=ADMIN,
        max_embedding_inputs=4,
        max_request_bytes=64 * 1024,
    )
    app = create_app(settings)
    with TestClient(app) as c:
        registry = app.state.services.registry
        registry.register(minilm_dir, "all-minilm-l6-v2", format="sentence-transformers", visibility="public")
        matmul_chain_model(data / "tensor.onnx", 4)
        registry.register(data / "tensor.onnx", "tensor-model", visibility="public")
        yield c


CASES: list[tuple[str, dict[str, str], Any]] = [
    ("one sentence", AUTH, {"model": "all-minilm-l6-v2", "input": "A man is eating food."}),
    ("a list", AUTH, {"model": "all-minilm-l6-v2", "input": ["one", "two"]}),
    ("base64", AUTH, {"model": "all-minilm-l6-v2", "input": "x", "encoding_format": "base64"}),
    ("no key", {}, {"model": "all-minilm-l6-v2", "input": "x"}),
    ("a wrong key", {"Authorization": "Bearer om_nope"}, {"model": "all-minilm-l6-v2", "input": "x"}),
    ("not JSON", AUTH, b"{not json"),
    ("empty body", AUTH, b""),
    ("a JSON list", AUTH, [1, 2]),
    ("no model", AUTH, {"input": "x"}),
    ("input of the wrong type", AUTH, {"model": "all-minilm-l6-v2", "input": 5}),
    ("an unknown model", AUTH, {"model": "no-such-model", "input": "x"}),
    ("token ids", AUTH, {"model": "all-minilm-l6-v2", "input": [1, 2, 3]}),
    ("an empty string", AUTH, {"model": "all-minilm-l6-v2", "input": ["a", ""]}),
    ("too many inputs", AUTH, {"model": "all-minilm-l6-v2", "input": ["a"] * 5}),
    ("other dimensions", AUTH, {"model": "all-minilm-l6-v2", "input": "x", "dimensions": 128}),
    ("a model that does not embed", AUTH, {"model": "tensor-model", "input": "x"}),
    ("a body over the limit", AUTH, {"model": "all-minilm-l6-v2", "input": "x" * 70_000}),
]


def _send(client: TestClient, headers: dict[str, str], body: Any) -> tuple[int, dict[str, str], bytes]:
    if isinstance(body, bytes):
        r = client.post("/v1/embeddings", content=body, headers={**headers, **JSON})
    else:
        r = client.post("/v1/embeddings", json=body, headers=headers)
    kept = {k: v for k, v in r.headers.items() if k.lower() not in ("x-request-id", "date")}
    return r.status_code, kept, r.content


@pytest.mark.parametrize(("what", "headers", "body"), CASES, ids=[c[0] for c in CASES])
def test_hot_path_and_framework_route_answer_alike(client: TestClient, what: str, headers: dict, body: Any) -> None:
    app = client.app
    hot = dict(app.hot)  # type: ignore[attr-defined]
    assert ("POST", "/v1/embeddings") in hot
    status, fast_headers, fast_body = _send(client, headers, body)
    app.hot = {}  # type: ignore[attr-defined]
    try:
        framework = _send(client, headers, body)
    finally:
        app.hot = hot  # type: ignore[attr-defined]
    assert (status, fast_headers, fast_body) == framework, what
    if what in ("one sentence", "a list", "base64"):
        assert status == 200
    else:
        assert 400 <= status < 500, (what, status, fast_body)


X = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
V2_CASES: list[tuple[str, str, dict[str, str], Any]] = [
    ("JSON tensors", "/v2/models/tensor-model/infer", AUTH, {"inputs": [X]}),
    ("a version", "/v2/models/tensor-model/versions/1/infer", AUTH, {"inputs": [X]}),
    (
        "binary output",
        "/v2/models/tensor-model/infer",
        AUTH,
        {"inputs": [X], "parameters": {"binary_data_output": True}},
    ),
    ("no key", "/v2/models/tensor-model/infer", {}, {"inputs": [X]}),
    ("an unknown model", "/v2/models/nope/infer", AUTH, {"inputs": [X]}),
    ("an unknown version", "/v2/models/tensor-model/versions/9/infer", AUTH, {"inputs": [X]}),
    ("a version that is not a number", "/v2/models/tensor-model/versions/x/infer", AUTH, {"inputs": [X]}),
    ("the wrong shape", "/v2/models/tensor-model/infer", AUTH, {"inputs": [{**X, "shape": [1, 3], "data": [1, 2, 3]}]}),
    ("no inputs", "/v2/models/tensor-model/infer", AUTH, {"inputs": []}),
    ("not JSON", "/v2/models/tensor-model/infer", AUTH, b"{not json"),
    ("empty body", "/v2/models/tensor-model/infer", AUTH, b""),
    ("a bad header length", "/v2/models/tensor-model/infer", {**AUTH, "Inference-Header-Content-Length": "x"}, b"{}"),
]


def _send_v2(client: TestClient, path: str, headers: dict[str, str], body: Any) -> tuple[int, dict[str, str], bytes]:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={**headers, **JSON})
    else:
        r = client.post(path, json=body, headers=headers)
    kept = {k: v for k, v in r.headers.items() if k.lower() not in ("x-request-id", "date")}
    return r.status_code, kept, r.content


@pytest.mark.parametrize(("what", "path", "headers", "body"), V2_CASES, ids=[c[0] for c in V2_CASES])
def test_v2_infer_hot_path_and_framework_route_answer_alike(
    client: TestClient, what: str, path: str, headers: dict, body: Any
) -> None:
    app = client.app
    patterns = list(app.hot_patterns)  # type: ignore[attr-defined]
    assert patterns and patterns[0][0].match(path)
    fast = _send_v2(client, path, headers, body)
    app.hot_patterns = []  # type: ignore[attr-defined]
    try:
        framework = _send_v2(client, path, headers, body)
    finally:
        app.hot_patterns = patterns  # type: ignore[attr-defined]
    assert fast == framework, what
    assert (fast[0] == 200) == (what in ("JSON tensors", "a version", "binary output")), (what, fast)
