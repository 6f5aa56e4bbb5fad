"""tritonclient.grpc (sync and asyncio) against the server's v2 gRPC endpoint: the same gateway as HTTP."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
from tritonclient.utils import InferenceServerException

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def auth(admin_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {admin_key}"}  # gRPC metadata keys are lower case


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from openmaas.catalogue.digits import held_out_split

    _, x_test, _, y_test = held_out_split()
    return x_test, y_test


def _image_input(x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_health_metadata_config_and_statistics(client: grpcclient.InferenceServerClient, auth: dict) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata(headers=auth, as_json=True)
    assert meta["name"] == "openmaas" and "statistics" in meta["extensions"]
    model = client.get_model_metadata("digits-cnn", headers=auth, as_json=True)
    assert model["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert client.is_model_ready("digits-cnn", headers=auth)
    config = client.get_model_config("digits-cnn", headers=auth, as_json=True)["config"]
    assert config["input"][0] == {"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "8", "8"]}
    assert int(config["max_batch_size"]) >= 1
    before = client.get_inference_statistics("digits-cnn", headers=auth, as_json=True)["model_stats"][0]
    x, _ = _digits()
    client.infer("digits-cnn", [_image_input(x[:4])], headers=auth)
    after = client.get_inference_statistics("digits-cnn", headers=auth, as_json=True)["model_stats"][0]
    assert int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)) == 4
    index = client.get_model_repository_index(headers=auth, as_json=True)["models"]
    assert {"digits-cnn", "all-minilm-l6-v2"} <= {m["name"] for m in index}


def test_infer_raw_tensors_and_bytes(client: grpcclient.InferenceServerClient, auth: dict) -> None:
    x, y = _digits()
    result = client.infer("digits-cnn", [_image_input(x)], headers=auth)
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64 and float((labels == y).mean()) >= 0.95
    assert result.get_response().model_name == "digits-cnn"
    text = grpcclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"A man is eating food.", b"A man rides a horse."], dtype=object))
    embedding = client.infer("all-minilm-l6-v2", [text], headers=auth).as_numpy("embedding")
    assert embedding.shape == (2, 384)


def test_errors_are_status_codes_never_internal(
    server: ServerProcess, client: grpcclient.InferenceServerClient, auth: dict, admin: httpx.Client, tmp_path: Path
) -> None:
    x, _ = _digits()
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits-cnn", [_image_input(x[:1])])  # no key
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits-cnn", [_image_input(x[:1])], headers={"authorization": "Bearer om_wrong"})
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    wrong = grpcclient.InferInput("image", [1, 64], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits-cnn", [wrong], headers=auth)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "expects [-1,1,8,8]" in e.value.message()
    # Another organisation's private model: NOT_FOUND, exactly like a model that does not exist.
    owner = new_org(admin, "grpc-owner")
    okey = new_key(admin, owner["name"], scopes=["inference", "manage"])["key"]
    path = tmp_path / "m.onnx"
    matmul_chain_model(path, 4)
    private = unique("grpc-private")
    with httpx.Client(base_url=server.url, headers=bearer(okey), timeout=60) as o:
        assert register_model(o, path, private).status_code == 201
    other = new_org(admin, "grpc-other")
    stranger = {"authorization": f"Bearer {new_key(admin, other['name'])['key']}"}
    four = grpcclient.InferInput("x", [1, 4], "FP32")
    four.set_data_from_numpy(np.ones((1, 4), np.float32))
    answers = []
    for name in (f"{owner['name']}/{private}", f"{owner['name']}/{unique('nothing')}"):
        with pytest.raises(InferenceServerException) as e:
            client.infer(name, [four], headers=stranger)
        answers.append((e.value.status(), e.value.message().replace(name, "<m>")))
    assert answers[0] == answers[1] and answers[0][0] == "StatusCode.NOT_FOUND"
    mine = {"authorization": f"Bearer {okey}"}  # the owner reaches it by its own name
    assert client.infer(private, [four], headers=mine).get_response().model_name == f"{owner['name']}/{private}"


def test_rate_limit_is_resource_exhausted_with_retry_information(
    server: ServerProcess, client: grpcclient.InferenceServerClient, admin: httpx.Client
) -> None:
    org = new_org(admin, "grpc-limited")
    key = new_key(admin, org["name"], limits={"rpm": 1})["key"]
    limited = {"authorization": f"Bearer {key}"}
    x, _ = _digits()
    client.infer("digits-cnn", [_image_input(x[:1])], headers=limited)
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits-cnn", [_image_input(x[:1])], headers=limited)
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "rate limit" in e.value.message().lower() or "limit" in e.value.message().lower()


def test_grpc_calls_are_metered_once_each(
    server: ServerProcess, client: grpcclient.InferenceServerClient, admin: httpx.Client
) -> None:
    org = new_org(admin, "grpc-metered")
    created = new_key(admin, org["name"])
    headers = {"authorization": f"Bearer {created['key']}"}
    x, _ = _digits()
    for _ in range(3):
        client.infer("digits-cnn", [_image_input(x[:2])], headers=headers)
    # A client's own x-request-id is echoed, never the key of a usage record: two calls with one id, two records.
    for _ in range(2):
        client.infer("digits-cnn", [_image_input(x[:2])], headers={**headers, "x-request-id": "client-chosen"})
    records = admin.get("/api/usage/records", params={"org": org["name"]}).json()["records"]
    assert len(records) == 5 and {r["protocol"] for r in records} == {"grpc"}
    assert {r["items"] for r in records} == {2} and len({r["request_id"] for r in records}) == 5


def test_streaming_answers_each_request_in_the_stream(client: grpcclient.InferenceServerClient, auth: dict) -> None:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth)
    try:
        x, _ = _digits()
        for i in range(3):
            client.async_stream_infer("digits-cnn", [_image_input(x[i : i + 2])], request_id=f"r{i}")
        wrong = grpcclient.InferInput("image", [1, 64], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 64), np.float32))
        client.async_stream_infer("digits-cnn", [wrong], request_id="bad")
        got = [results.get(timeout=60) for _ in range(4)]
    finally:
        client.stop_stream()
    ok = [r for r, err in got if err is None]
    assert sorted(r.get_response().id for r in ok) == ["r0", "r1", "r2"]
    assert all(r.as_numpy("label").shape == (2,) for r in ok)
    errors = [err for _, err in got if err is not None]
    assert len(errors) == 1 and "expects" in str(errors[0])


def test_repository_load_and_unload(client: grpcclient.InferenceServerClient, auth: dict) -> None:
    client.unload_model("breast-cancer-logreg", headers=auth)
    client.load_model("breast-cancer-logreg", headers=auth)
    index = client.get_model_repository_index(headers=auth, as_json=True)["models"]
    assert {m["name"]: m.get("state") for m in index}["breast-cancer-logreg"] == "READY"


def test_the_asyncio_client(server: ServerProcess, auth: dict) -> None:
    async def main() -> np.ndarray:
        async with grpc_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as c:
            assert await c.is_server_live()
            x, _ = _digits()
            inp = grpc_aio.InferInput("image", [3, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[:3])
            result = await c.infer("digits-cnn", [inp], headers=auth)
            return result.as_numpy("label")

    assert asyncio.run(main()).shape == (3,)
