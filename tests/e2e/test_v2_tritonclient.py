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
    with pytest.raises(InferenceServerException, match="does not exist"):
        triton.infer("nope", [inp], headers=dict(headers))
    with pytest.raises(InferenceServerException, match="API key"):
        triton.get_model_metadata("digits-cnn")
