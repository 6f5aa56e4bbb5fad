"""tritonclient[http] against a real server, in binary (its default) and JSON modes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

from tests.helpers import ServerProcess


@pytest.fixture(scope="module")
def triton(server: ServerProcess) -> Iterator[http.InferenceServerClient]:
    client = http.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def headers(auth_headers: dict[str, str]) -> dict[str, str]:
    # Pass copies: tritonclient writes Inference-Header-Content-Length into the dict it is given, and a stale
    # value would then go out with the next request.
    return auth_headers


def _digits_accuracy(triton: http.InferenceServerClient, headers: dict[str, str], binary: bool) -> float:
    from openmaas.catalogue.digits import held_out_split

    _, x_test, _, y_test = held_out_split()
    inp = http.InferInput("image", list(x_test.shape), "FP32")
    inp.set_data_from_numpy(x_test, binary_data=binary)
    outputs = [http.InferRequestedOutput("label", binary_data=binary)] if not binary else None
    result = triton.infer("digits-cnn", [inp], outputs=outputs, headers=dict(headers))
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64 and labels.shape == y_test.shape
    return float((labels == y_test).mean())


def test_server_and_model_metadata(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata(headers=dict(headers))
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    model = triton.get_model_metadata("digits-cnn", headers=dict(headers))
    assert model["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"]: o for o in model["outputs"]}["label"] == {"name": "label", "datatype": "INT64", "shape": [-1]}
    assert triton.is_model_ready("digits-cnn", headers=dict(headers))
    assert triton.get_model_metadata("digits-cnn", model_version="1", headers=dict(headers))["versions"] == ["1"]


def test_digits_cnn_binary_default(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    assert _digits_accuracy(triton, headers, binary=True) >= 0.95


def test_digits_cnn_json(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    assert _digits_accuracy(triton, headers, binary=False) >= 0.95


def test_breast_cancer_probabilities_and_labels(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    from openmaas.catalogue.tabular import breast_cancer_split

    _, x_test, _, y_test = breast_cancer_split()
    inp = http.InferInput("features", list(x_test.shape), "FP32")
    inp.set_data_from_numpy(x_test)
    result = triton.infer("breast-cancer-logreg", [inp], headers=dict(headers))
    probs = result.as_numpy("probabilities")
    assert probs.shape == (len(y_test), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (result.as_numpy("label") == y_test).mean() >= 0.93


def test_diabetes_regression_matches_sklearn(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    from sklearn.linear_model import LinearRegression

    from openmaas.catalogue.tabular import diabetes_split

    x_train, x_test, y_train, _ = diabetes_split()
    expected = LinearRegression().fit(x_train, y_train).predict(x_test)
    inp = http.InferInput("features", list(x_test.shape), "FP32")
    inp.set_data_from_numpy(x_test)
    got = triton.infer("diabetes-linreg", [inp], headers=dict(headers)).as_numpy("prediction")
    assert got.shape == (len(x_test),)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.parametrize("binary", [True, False])
def test_embeddings_over_v2(triton: http.InferenceServerClient, headers: dict[str, str], binary: bool) -> None:
    texts = np.array([b"A man is eating food.", "caf\u00e9 au lait".encode()], dtype=object)
    inp = http.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(texts, binary_data=binary)
    out = http.InferRequestedOutput("embedding", binary_data=binary)
    emb = triton.infer("all-minilm-l6-v2", [inp], outputs=[out], headers=dict(headers)).as_numpy("embedding")
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-4)


def test_repository_extension(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    triton.load_model("breast-cancer-logreg", headers=dict(headers))
    index = {e["name"]: e for e in triton.get_model_repository_index(headers=dict(headers))}
    assert index["breast-cancer-logreg"]["state"] == "READY"
    triton.unload_model("breast-cancer-logreg", headers=dict(headers))
    index = {e["name"]: e for e in triton.get_model_repository_index(headers=dict(headers))}
    assert index["breast-cancer-logreg"]["state"] == "UNAVAILABLE"
    # Unloaded models load again on the next request.
    from openmaas.catalogue.tabular import breast_cancer_split

    x = breast_cancer_split()[1][:3]
    inp = http.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    assert triton.infer("breast-cancer-logreg", [inp], headers=dict(headers)).as_numpy("label").shape == (3,)


def test_errors_reach_tritonclient_as_messages(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    inp = http.InferInput("image", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException, match=r"expects \[-1,1,8,8\]"):
        triton.infer("digits-cnn", [inp], headers=dict(headers))
    # Triton's wording, which tools match on.
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'nope' is not found"):
        triton.infer("nope", [inp], headers=dict(headers))
    with pytest.raises(InferenceServerException, match="API key"):
        triton.get_model_metadata("digits-cnn")


def test_statistics_count_requests_batches_and_time(
    triton: http.InferenceServerClient, headers: dict[str, str]
) -> None:
    """Triton's statistics extension: counters before and after calls, in Triton's shape."""

    def stats() -> dict:
        (entry,) = triton.get_inference_statistics("breast-cancer-logreg", headers=dict(headers))["model_stats"]
        return entry

    before = stats()
    assert before["name"] == "breast-cancer-logreg" and before["version"] == "1"
    from openmaas.catalogue.tabular import breast_cancer_split

    x = breast_cancer_split()[1][:5]
    inp = http.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        triton.infer("breast-cancer-logreg", [inp], headers=dict(headers))
    after = stats()
    assert after["inference_count"] - before["inference_count"] == 15  # rows
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3  # batches
    done = after["inference_stats"]["success"]
    assert done["count"] - before["inference_stats"]["success"]["count"] == 3
    assert done["ns"] > before["inference_stats"]["success"]["ns"]
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert after["inference_stats"][part]["count"] >= 3, part
    assert after["last_inference"] > 0
    assert any(b["batch_size"] == 5 and b["compute_infer"]["count"] >= 1 for b in after["batch_stats"])
    every = triton.get_inference_statistics(headers=dict(headers))["model_stats"]
    assert {"breast-cancer-logreg", "digits-cnn"} <= {e["name"] for e in every}
    assert triton.get_inference_statistics("breast-cancer-logreg", "1", headers=dict(headers))["model_stats"]
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.get_inference_statistics("nope", headers=dict(headers))


def test_model_configuration(triton: http.InferenceServerClient, headers: dict[str, str]) -> None:
    config = triton.get_model_config("digits-cnn", headers=dict(headers))
    assert config["name"] == "digits-cnn" and config["max_batch_size"] >= 1
    assert config["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert {"name": "label", "data_type": "TYPE_INT64", "dims": []} in config["output"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] >= 0
    embed = triton.get_model_config("all-minilm-l6-v2", headers=dict(headers))
    assert embed["input"][0]["data_type"] == "TYPE_STRING"
    assert "model_configuration" in triton.get_server_metadata(headers=dict(headers))["extensions"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_compressed_requests_and_responses(
    triton: http.InferenceServerClient, headers: dict[str, str], algorithm: str, binary: bool
) -> None:
    """tritonclient's request/response compression; Inference-Header-Content-Length counts the inflated body."""
    from openmaas.catalogue.digits import held_out_split

    _, x_test, _, y_test = held_out_split()
    inp = http.InferInput("image", list(x_test.shape), "FP32")
    inp.set_data_from_numpy(x_test, binary_data=binary)
    outputs = [http.InferRequestedOutput("label", binary_data=binary)]
    result = triton.infer(
        "digits-cnn",
        [inp],
        outputs=outputs,
        headers=dict(headers),
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    assert float((result.as_numpy("label") == y_test).mean()) >= 0.95


@pytest.mark.parametrize("path", ["/v2/models/digits-cnn/infer", "/v1/embeddings"])
def test_compressed_bodies_are_inflated_within_the_limit(
    server: ServerProcess, headers: dict[str, str], path: str
) -> None:
    import gzip
    import json
    import zlib

    import httpx

    body = (
        {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]}
        if path.startswith("/v2")
        else {"model": "all-minilm-l6-v2", "input": ["compressed hello"] * 4}
    )
    raw = json.dumps(body).encode()
    with httpx.Client(base_url=server.url, headers=dict(headers), timeout=60) as c:
        r = c.post(path, content=gzip.compress(raw), headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        if path == "/v1/embeddings":
            assert r.headers["content-encoding"] == "gzip" and r.json()["data"][3]["index"] == 3
        r = c.post(path, content=zlib.compress(raw), headers={"Content-Encoding": "deflate"})
        assert r.status_code == 200, r.text
        # A few KB that inflate past the 4 MiB body limit: refused, never inflated in full.
        bomb = gzip.compress(b"[" + b" " * (5 << 20) + b"]")
        assert len(bomb) < 20_000
        r = c.post(path, content=bomb, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413, r.text
        r = c.post(path, content=b"not gzip at all", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "gzip" in r.text
        r = c.post(path, content=raw, headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and "gzip, deflate" in r.text
        # No Accept-Encoding: the answer is not compressed.
        plain = c.post(path, content=raw, headers={"Accept-Encoding": "identity"})
        assert plain.status_code == 200 and "content-encoding" not in plain.headers


def test_the_asyncio_client_with_compression(server: ServerProcess, headers: dict[str, str]) -> None:
    import asyncio

    import tritonclient.http.aio as aio

    async def main() -> None:
        client = aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            x = np.zeros((2, 1, 8, 8), np.float32)
            inp = aio.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            result = await client.infer(
                "digits-cnn",
                [inp],
                headers=dict(headers),
                request_compression_algorithm="gzip",
                response_compression_algorithm="gzip",
            )
            assert result.as_numpy("label").shape == (2,)
            stats = await client.get_inference_statistics("digits-cnn", headers=dict(headers))
            assert stats["model_stats"][0]["inference_count"] >= 2
        finally:
            await client.close()

    asyncio.run(main())


def test_query_parameters_triton_ignores_are_ignored(
    triton: http.InferenceServerClient, headers: dict[str, str]
) -> None:
    """tritonclient passes ``query_params`` through; Triton ignores those it does not know, and so do we."""
    params = {"test_1": "1", "timeout": "5"}
    assert triton.get_model_metadata("digits-cnn", headers=dict(headers), query_params=params)["name"] == "digits-cnn"
    inp = http.InferInput("image", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    result = triton.infer("digits-cnn", [inp], headers=dict(headers), query_params=params)
    assert result.as_numpy("label").shape == (1,)
    assert triton.get_inference_statistics("digits-cnn", headers=dict(headers), query_params=params)["model_stats"]
