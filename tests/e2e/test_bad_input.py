"""Every kind of bad input gets a 4xx that names the problem, in the protocol's error format; never a 500."""

from __future__ import annotations

import struct

import httpx
import numpy as np
import orjson
import pytest

from tests.helpers import ServerProcess


@pytest.fixture(scope="module")
def http(server: ServerProcess, auth_headers: dict[str, str]) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=60) as client:
        yield client  # type: ignore[misc]


def _infer_json(inputs: list[dict], outputs: list[dict] | None = None) -> bytes:
    body: dict = {"inputs": inputs}
    if outputs is not None:
        body["outputs"] = outputs
    return orjson.dumps(body)


IMAGE = {"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}

V2_CASES = [
    ("wrong shape", _infer_json([{**IMAGE, "shape": [1, 64]}]), None, 400, "shape [1,64]"),
    ("wrong datatype", _infer_json([{**IMAGE, "datatype": "FP64"}]), None, 400, "FP64"),
    ("wrong element count", _infer_json([{**IMAGE, "data": [0.0] * 63}]), None, 400, "63 elements"),
    ("unknown input", _infer_json([{**IMAGE, "name": "pixels"}]), None, 400, "unknown input 'pixels'"),
    ("unknown output", _infer_json([IMAGE], [{"name": "logits"}]), None, 400, "unknown output 'logits'"),
    ("malformed JSON", b'{"inputs": [', None, 400, "not valid JSON"),
    ("empty body", b"", None, 400, "empty"),
    ("empty batch", _infer_json([{**IMAGE, "shape": [0, 1, 8, 8], "data": []}]), None, 400, "empty batch"),
    ("unknown datatype", _infer_json([{**IMAGE, "datatype": "FP8"}]), None, 400, "FP8"),
]


@pytest.mark.parametrize(
    ("case", "body", "header_length", "status", "fragment"), V2_CASES, ids=[c[0] for c in V2_CASES]
)
def test_v2_bad_json_requests(
    http: httpx.Client, case: str, body: bytes, header_length: int | None, status: int, fragment: str
) -> None:
    r = http.post("/v2/models/digits-cnn/infer", content=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def _binary(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    h = orjson.dumps(header)
    return h + blob, {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}


@pytest.mark.parametrize(
    ("declared", "actual", "fragment"),
    [(200, 256, "needs 256"), (300, 256, "runs past"), (128, 256, "no input")],
)
def test_v2_wrong_binary_sizes(http: httpx.Client, declared: int, actual: int, fragment: str) -> None:
    inp = {"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "parameters": {"binary_data_size": declared}}
    if fragment == "no input":  # the declared size fits the shape, the body carries more
        inp["shape"] = [2, 1, 4, 4]
    body, headers = _binary({"inputs": [inp]}, b"\0" * actual)
    r = http.post("/v2/models/digits-cnn/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_v2_bad_header_length(http: httpx.Client) -> None:
    body, headers = _binary({"inputs": [IMAGE]}, b"")
    headers["Inference-Header-Content-Length"] = "abc"
    r = http.post("/v2/models/digits-cnn/infer", content=body, headers=headers)
    assert r.status_code == 400
    assert "Inference-Header-Content-Length" in r.json()["error"]
    headers["Inference-Header-Content-Length"] = str(len(body) + 10)
    assert http.post("/v2/models/digits-cnn/infer", content=body, headers=headers).status_code == 400


def test_v2_bytes_with_lying_length_prefix(http: httpx.Client) -> None:
    blob = struct.pack("<I", 1000) + b"short"
    inp = {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
    body, headers = _binary({"inputs": [inp]}, blob)
    r = http.post("/v2/models/all-minilm-l6-v2/infer", content=body, headers=headers)
    assert r.status_code == 400
    assert "runs past" in r.json()["error"]


def test_unknown_model_and_version_are_404(http: httpx.Client) -> None:
    assert http.post("/v2/models/nope/infer", content=_infer_json([IMAGE])).status_code == 404
    assert http.get("/v2/models/nope").status_code == 404
    assert http.post("/v2/models/digits-cnn/versions/99/infer", content=_infer_json([IMAGE])).status_code == 404
    r = http.post("/v2/models/digits-cnn/versions/abc/infer", content=_infer_json([IMAGE]))
    assert r.status_code == 400
    assert "integer" in r.json()["error"]
    assert http.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"
    problem = http.get("/api/models/nope")
    assert problem.status_code == 404
    assert problem.headers["content-type"] == "application/problem+json"


def test_oversized_bodies_get_413_in_each_protocol(http: httpx.Client) -> None:
    big = np.zeros(2_000_000, np.float32).tobytes()  # 8 MB > the 4 MiB limit the test server runs with
    r = http.post("/v2/models/digits-cnn/infer", content=big)
    assert r.status_code == 413
    assert "exceeds" in r.json()["error"]
    r = http.post("/v1/embeddings", content=b'{"model": "all-minilm-l6-v2", "input": "' + b"a" * 5_000_000 + b'"}')
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"x" * 1_000_000

    r = http.post("/v2/models/digits-cnn/infer", content=chunks())
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"input": "hi"}', "model"),
        (b'{"model": "all-minilm-l6-v2"}', "input"),
        (b'{"model": "all-minilm-l6-v2", "input": 5}', "input"),
        (b"", "empty"),
    ],
)
def test_openai_malformed_bodies(http: httpx.Client, body: bytes, fragment: str) -> None:
    r = http.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert fragment in err["message"]


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert "error" in r.json()
    r = http.get("/v1/embeddings")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_curl_style_form_content_type_still_parses(http: httpx.Client) -> None:
    r = http.post(
        "/v1/embeddings",
        content=b'{"model": "all-minilm-l6-v2", "input": "hello"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    assert len(r.json()["data"][0]["embedding"]) == 384


def test_server_log_has_no_tracebacks_from_client_errors(server: ServerProcess) -> None:
    assert "Traceback" not in server.log()
    assert '"status":500' not in server.log()
